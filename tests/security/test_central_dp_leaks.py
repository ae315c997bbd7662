"""Hostile-coordinator suite, issue 13 finding 6: central DP must not leak participation.

Before: the aggregate was divided by the number of *accepted* replies and the noise std was
z·S/(accepted), so which sites refused for their budget or were rejected by screening changed
both the mean and the noise, and the per-coordinate noise std (0.20 with 5 updates, 0.25 with 4
for z·S = 1) could be read off consecutive global adapters. Now the denominator is the number of
sites *asked* (the strategy's sampled set); a missing, failed, refused or rejected site counts as
a zero update, and a round in which no update arrived still releases the same noise.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedllm import wire
from fedllm.config import RunConfig
from fedllm.coordinator.protocol import Reply
from fedllm.flower.coordinator_strategy import make_strategy
from tests.unit.test_round_loop import SITES, FakeFederation, _run

Z, S = 1.0, 1.0
SHAPES = {"lora_B.a": (400, 250), "lora_B.b": (200, 250)}  # 150,000 coordinates: std error 0.18%


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


class _Nodes:
    def __init__(self, count: int) -> None:
        self.ids = list(range(1, count + 1))

    def node_ids(self):
        return list(self.ids)


def _strategy(clipping: str = "fixed"):
    config = RunConfig.from_flat({"central-dp.enabled": True, "central-dp.noise-multiplier": Z,
                                  "central-dp.clipping-norm": S, "central-dp.clipping": clipping})
    return make_strategy(config, sites_per_round=5)


def _release(strategy, *, arrived: int, asked: int = 5, step: float = 0.01):
    """Ask ``asked`` sites, let ``arrived`` of them send an update of norm ``step`` (the others
    refused, failed or were rejected: they are simply not among the accepted replies); return
    the global adapter released and the sum of the updates that arrived."""
    current = {k: np.zeros(s, dtype=np.float32) for k, s in SHAPES.items()}
    tasks = strategy.configure_train(1, current, {}, _Nodes(asked))
    assert len(tasks) == asked
    rng = np.random.default_rng(arrived)
    replies, total = [], {k: np.zeros(s) for k, s in SHAPES.items()}
    for task in tasks[:arrived]:
        delta = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
        norm = math.sqrt(sum(float((d ** 2).sum()) for d in delta.values()))
        arrays = {k: (current[k] + delta[k] * step / norm).astype(np.float32) for k in SHAPES}
        for k in SHAPES:
            total[k] += arrays[k] - current[k]
        replies.append(Reply(task.node_id, site=f"site{task.node_id}", arrays=arrays,
                             metrics={wire.NUM_EXAMPLES: 10, wire.TRAIN_LOSS: 1.0}))
    released = strategy.aggregate_train(1, replies)
    assert released is not None  # every round that asked sites releases
    return released, total


def _noise(released, total, m):
    return np.concatenate([(released[k].astype(np.float64) - total[k] / m).ravel() for k in SHAPES])


@pytest.mark.usefixtures("seeded_randomness")
def test_one_site_refusing_of_five_asked_leaves_the_noise_at_z_s_over_5():
    strategy = _strategy()
    released, total = _release(strategy, arrived=4)  # 5 asked, 1 refused
    noise = _noise(released, total, 5)  # the sum of the 4 updates over the 5 sites asked
    assert noise.std() == pytest.approx(Z * S / 5, rel=0.01)  # 0.20, not z·S/4 = 0.25
    assert abs(noise.mean()) < 4 * (Z * S / 5) / math.sqrt(noise.size)
    assert strategy.central_dp_round(released=True) == (S, 5)


@pytest.mark.usefixtures("seeded_randomness")
def test_adaptive_clipping_also_divides_by_the_sites_asked():
    strategy = _strategy("adaptive")
    z_update = strategy.strategy.noise_multiplier  # the update's share of the total z (σ_b = max(m/20, z) = 1)
    assert z_update == pytest.approx((Z ** -2 - 2.0 ** -2) ** -0.5)
    released, total = _release(strategy, arrived=4)
    assert _noise(released, total, 5).std() == pytest.approx(z_update * S / 5, rel=0.01)


@pytest.mark.usefixtures("seeded_randomness")
def test_consecutive_releases_with_5_and_4_updates_are_indistinguishable_by_their_noise():
    """The attack: compare the noise std of two global adapters to learn how many sites took part."""
    strategy = _strategy()
    stds = []
    for arrived in (5, 4, 0):
        released, total = _release(strategy, arrived=arrived)
        stds.append(_noise(released, total, 5).std())
    assert stds == pytest.approx([Z * S / 5] * 3, rel=0.01)


@pytest.mark.usefixtures("seeded_randomness")
def test_a_round_without_any_update_still_releases_noise_of_z_s_over_m():
    strategy = _strategy()
    released, total = _release(strategy, arrived=0)
    assert all(not total[k].any() for k in SHAPES)
    assert _noise(released, total, 5).std() == pytest.approx(Z * S / 5, rel=0.01)


def test_refused_rejected_and_missing_sites_count_as_zero_updates_in_the_round_loop(tmp_path):
    """Through the round loop: oncology refuses for its budget, radiology's reply times out
    (a failure), pediatrics sends a malformed update (rejected by screening); m stays 4."""
    fed = FakeFederation(SITES, refuse={"oncology": None}, fail={"radiology": {2}}, step=0.05)
    real_answer = fed._answer

    def answer(task):
        reply = real_answer(task)
        if task.kind == "train" and fed.names[task.node_id] == "pediatrics" and reply.arrays is not None:
            reply.arrays = {k: np.full_like(v, np.nan) for k, v in reply.arrays.items()}  # screening rejects it
        return reply

    fed._answer = answer
    history = _run(fed, tmp_path, **{"central-dp.enabled": True, "federation.tolerated-failures": 1,
                                     "federation.min-completed-sites": 1}).data
    rounds = history["rounds"][1:]
    assert [sorted(r["train"]["sites"]) for r in rounds] == [["cardiology", "radiology"], ["cardiology"],
                                                             ["cardiology", "radiology"]]
    assert [r["central-dp"]["sites"] for r in rounds] == [4, 4, 4]  # the sites asked, whoever replied
    # the adapter round 2 was sent = the two accepted round-1 updates summed over the 4 asked (+ noise)
    sent_1, sent_2 = fed.sent[1][0].arrays, fed.sent[3][0].arrays
    accepted = [n for n, name in SITES.items() if name in ("cardiology", "radiology")]
    noise = np.concatenate([(sent_2[key].astype(np.float64) - sent_1[key]
                             - sum(fed.trained[(1, n)][key].astype(np.float64) - sent_1[key] for n in accepted) / 4
                             ).ravel() for key in sent_1])
    assert noise.size > 1000 and noise.std() == pytest.approx(1.0 / 4, rel=0.1)


def test_when_every_site_refuses_the_round_still_releases_and_is_recorded(tmp_path):
    fed = FakeFederation(SITES, refuse={name: {2} for name in SITES.values()})
    history = _run(fed, tmp_path, **{"central-dp.enabled": True, "num-server-rounds": 4}).data
    assert history["rounds"][2]["central-dp"]["sites"] == 4  # released with m = 4, not skipped
    assert history["central-dp"]["rounds"] == 2
    ledger = json.loads((tmp_path / "ledgers" / "_coordinator.json").read_text())
    assert [e["server_round"] for e in ledger["entries"]] == [1, 2]
    assert [e["central_dp"]["sites_per_round"] for e in ledger["entries"]] == [4, 4]
