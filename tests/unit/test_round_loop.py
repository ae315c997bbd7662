"""The coordinator's round loop (``run_federation``) against a fake federation: plain Python objects
implementing the protocol (no Flower processes), with Flower's own strategies behind
``FlowerStrategy`` and the tiny test model. Sampling, budget refusals, site failures, central DP
and resume after the coordinator died."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from fedllm import wire
from fedllm.config import RunConfig, flatten, read_toml
from fedllm.coordinator.checkpoint import load_server_state
from fedllm.coordinator.protocol import Reply, Task
from fedllm.coordinator.rounds import run_federation
from fedllm.errors import RunFailedError
from fedllm.flower.coordinator_strategy import make_strategy
from fedllm.model import lora as model_lora
from fedllm.privacy.site_level import site_level_epsilon
from tests.helpers import REPO

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


class _Killed(Exception):
    """The coordinator process dying mid-run."""


class FakeFederation:
    """Sites ``node id → name`` that train by a fixed, deterministic step (norm ``step`` per site
    and round) and evaluate to a fixed loss. ``refuse``: name → rounds it refuses for its budget
    (None: every round); ``fail``: name → rounds it crashes in; ``kill_at``: the train round
    whose sending kills the coordinator. ``sent`` keeps every batch of tasks, ``trained`` every
    train reply's arrays by (round, node)."""

    def __init__(self, names: dict[int, str], *, refuse=None, fail=None, kill_at: int | None = None,
                 step: float = 0.05) -> None:
        self.names, self.refuse, self.fail = names, dict(refuse or {}), dict(fail or {})
        self.kill_at, self.step = kill_at, step
        self.sent: list[list[Task]] = []
        self.trained: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def node_ids(self) -> list[int]:
        return list(self.names)

    def send_and_receive(self, tasks, *, timeout):
        tasks = list(tasks)
        self.sent.append(tasks)
        return [self._answer(task) for task in sorted(tasks, key=lambda t: t.node_id)]

    def _answer(self, task: Task) -> Reply:
        name, server_round = self.names[task.node_id], int(task.config[wire.SERVER_ROUND])
        if task.kind == "evaluate":
            metrics = {wire.NUM_EXAMPLES: 4, wire.EVAL_LOSS: 2.0, wire.PERPLEXITY: math.exp(2.0), wire.EVAL_TOKENS: 40,
                       wire.METRICS_RELEASE: wire.RELEASE_CODES["exact"]}
            return Reply(task.node_id, site=name, metrics=metrics)
        if server_round == self.kill_at:
            raise _Killed(f"coordinator killed while sending round {server_round}")
        if name in self.refuse and (self.refuse[name] is None or server_round in self.refuse[name]):
            return Reply(task.node_id, error_code=wire.BUDGET_REFUSED,
                         error_reason=f"Site '{name}' would exceed its privacy budget")
        if server_round in self.fail.get(name, ()):
            return Reply(task.node_id, error_code=2, error_reason=f"{name} crashed: CUDA out of memory")
        rng = np.random.default_rng(100 * server_round + task.node_id)
        deltas = {k: rng.standard_normal(v.shape) for k, v in task.arrays.items()}
        norm = math.sqrt(sum(float((d ** 2).sum()) for d in deltas.values()))
        arrays = {k: (v + deltas[k] * self.step / norm).astype(v.dtype) for k, v in task.arrays.items()}
        self.trained[(server_round, task.node_id)] = arrays
        metrics = dict.fromkeys(wire.TRAIN_METRIC_KEYS, 1.0) | {
            wire.NUM_EXAMPLES: 10 * task.node_id, wire.TRAIN_LOSS: 1.5, wire.TOKENS: 100, wire.EPSILON: 0.5,
            wire.DELTA: 1e-5}
        return Reply(task.node_id, site=name, arrays=arrays, metrics=metrics)

    def train_rounds(self) -> list[tuple[int, list[int]]]:
        """(round, nodes asked) of every train batch sent."""
        return [(int(b[0].config[wire.SERVER_ROUND]), sorted(t.node_id for t in b))
                for b in self.sent if b and b[0].kind == "train"]


SITES = {1: "cardiology", 2: "oncology", 3: "radiology", 4: "pediatrics"}


def _config(out, **flat) -> RunConfig:
    return RunConfig.from_flat({"model.name": "tiny-random-llama", "num-server-rounds": 3, "output-dir": str(out)}
                               | flat)


def _run(federation, out, **flat):
    model_lora._RESIDENT.clear()  # a fresh model: the resident one holds the previous run's final adapter
    return run_federation(federation, make_strategy, _config(out, **flat), run_id="run-1")


def _history(out) -> dict:
    return json.loads((out / "history.json").read_text(encoding="utf-8"))


def test_every_round_trains_aggregates_evaluates_and_exports(tmp_path):
    fed = FakeFederation(SITES)
    history = _run(fed, tmp_path).data
    assert history["status"] == "completed" and [r["round"] for r in history["rounds"]] == [0, 1, 2, 3]
    assert fed.train_rounds() == [(r, [1, 2, 3, 4]) for r in (1, 2, 3)]
    for entry in history["rounds"][1:]:
        assert sorted(entry["train"]["sites"]) == sorted(SITES.values())
        assert entry["evaluate"]["aggregate"][wire.EVAL_LOSS] == pytest.approx(2.0)
    # round 2 was sent the FedAvg (weighted by num-examples) of round 1's replies
    sent = fed.sent[3][0].arrays  # batches: eval 0, train 1, eval 1, train 2
    key = next(iter(sent))
    expected = sum(fed.trained[(1, n)][key].astype(np.float64) * 10 * n for n in SITES) / (10 * sum(SITES))
    np.testing.assert_allclose(sent[key], expected, rtol=1e-5, atol=1e-7)
    assert sent[key].dtype == np.float32
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert load_server_state(tmp_path).server_round == 3
    # the run folder says which base model and settings it used (fedllm generate / export read it)
    written = RunConfig.from_flat(flatten(read_toml(tmp_path / "config.toml")))
    assert written.model.name == "tiny-random-llama" and written == _config(tmp_path)


def test_a_fraction_of_the_sites_is_sampled_for_training(tmp_path):
    fed = FakeFederation(SITES)
    history = _run(fed, tmp_path, **{"strategy.fraction-train": 0.5}).data
    rounds = fed.train_rounds()
    assert [r for r, _ in rounds] == [1, 2, 3]
    assert all(len(nodes) == 2 and set(nodes) <= set(SITES) for _, nodes in rounds)
    assert [r["train"]["aggregate"]["sites-trained"] for r in history["rounds"][1:]] == [2, 2, 2]
    assert all(len(r["evaluate"]["sites"]) == 4 for r in history["rounds"])  # fraction-evaluate 1.0


def test_a_site_refusing_for_its_budget_does_not_stop_the_round(tmp_path):
    fed = FakeFederation(SITES, refuse={"oncology": None})
    history = _run(fed, tmp_path).data
    assert history["status"] == "completed" and "stopped-early" not in history
    for entry in history["rounds"][1:]:
        assert list(entry["train"]["refused"]) == ["oncology"] and "privacy budget" in entry["train"]["refused"]["oncology"]
        assert entry["train"]["aggregate"]["sites-trained"] == 3


def test_when_every_site_refuses_the_run_ends_early_as_completed(tmp_path):
    fed = FakeFederation(SITES, refuse={name: {2} for name in SITES.values()})
    history = _run(fed, tmp_path, **{"num-server-rounds": 4}).data
    assert history["status"] == "completed"
    assert history["stopped-early"].startswith("all sites refused round 2 (privacy budget): ")
    assert [r for r, _ in fed.train_rounds()] == [1, 2]  # nothing asked after round 2
    assert sorted(history["rounds"][2]["train"]["refused"]) == sorted(SITES.values())
    assert _history(tmp_path)["stopped-early"] == history["stopped-early"]


def test_a_failure_beyond_the_tolerated_ones_fails_the_run_with_the_sites_reason(tmp_path):
    fed = FakeFederation(SITES, fail={"radiology": {2}})
    with pytest.raises(RunFailedError, match=r"round 2: site radiology failed: radiology crashed: CUDA out of memory "
                                             r"\(1 failed; federation.tolerated-failures = 0\)"):
        _run(fed, tmp_path)
    on_disk = _history(tmp_path)
    assert on_disk["status"] == "failed" and "radiology crashed" in on_disk["error"]
    assert load_server_state(tmp_path).server_round == 1  # the last completed round is kept for --resume


def test_failures_within_the_tolerated_ones_let_the_run_continue(tmp_path):
    fed = FakeFederation(SITES, fail={"radiology": {2}, "oncology": {3}})
    history = _run(fed, tmp_path, **{"federation.tolerated-failures": 1}).data
    assert history["status"] == "completed"
    assert history["rounds"][2]["train"]["failed"] == [
        {"site": "radiology", "code": 2, "reason": "radiology crashed: CUDA out of memory"}]
    assert [r["train"]["aggregate"]["sites-trained"] for r in history["rounds"][1:]] == [4, 3, 3]


def test_central_dp_adds_noise_and_records_the_site_level_epsilon_every_round(tmp_path):
    fed = FakeFederation(SITES, step=0.05)  # every update below S = 1: no clipping, only noise
    flat = {"central-dp.enabled": True, "central-dp.noise-multiplier": 1.0, "central-dp.clipping-norm": 1.0,
            "strategy.fraction-train": 0.75}
    history = _run(fed, tmp_path, **flat).data
    # the global adapter round 2 was sent = the plain mean of round 1's updates + N(0, (z S / m)^2)
    sent_1, sent_2 = fed.sent[1][0].arrays, fed.sent[3][0].arrays
    nodes = fed.train_rounds()[0][1]
    assert len(nodes) == 3
    noise = np.concatenate([(sent_2[k].astype(np.float64) - sum(fed.trained[(1, n)][k] for n in nodes) / 3).ravel()
                            for k in sent_1])
    assert noise.size > 1000 and noise.std() == pytest.approx(1.0 * 1.0 / 3, rel=0.1)
    eps = [site_level_epsilon(noise_multiplier=1.0, sites_per_round=3, total_sites=4, rounds=r, target_delta=1e-5,
                              sampling="fixed-subset") for r in (1, 2, 3)]
    assert [r["central-dp"] for r in history["rounds"][1:]] == [
        {"clipping-norm": 1.0, "epsilon": pytest.approx(e), "sites": 3, "cumulative-epsilon": pytest.approx(e)}
        for e in eps]
    block = history["central-dp"]
    assert (block["rounds"], block["sites-per-round"], block["total-sites"], block["sampling"]) == (
        3, 3, 4, "fixed-subset")
    assert block["epsilon"] == pytest.approx(eps[-1]) == block["cumulative-epsilon"]
    assert block["ledger"] == str(tmp_path / "ledgers" / "_coordinator.json") and block["ledger-releases"] == 3


@pytest.mark.parametrize("killed_in", [2, 3])
def test_a_run_killed_after_round_k_resumes_at_k_plus_1_and_ends_as_if_never_stopped(tmp_path, killed_in):
    flat = {"strategy.name": "fedadam", "strategy.server-learning-rate": 0.05, "num-server-rounds": 4}
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    _run(FakeFederation(SITES), straight_dir, **flat)
    with pytest.raises(_Killed):
        _run(FakeFederation(SITES, kill_at=killed_in), resumed_dir, **flat)
    assert load_server_state(resumed_dir).server_round == killed_in - 1
    second = FakeFederation(SITES)
    history = _run(second, resumed_dir, **flat, **{"federation.resume": True}).data
    assert [r for r, _ in second.train_rounds()] == list(range(killed_in, 5))  # continues at k + 1
    assert second.sent[0][0].kind == "train"  # no second round-0 evaluation
    assert history["status"] == "completed" and [r["round"] for r in history["rounds"]] == [0, 1, 2, 3, 4]
    assert history["resumed"][0]["from-round"] == killed_in
    straight, resumed = load_server_state(straight_dir), load_server_state(resumed_dir)
    assert list(straight.arrays) == list(resumed.arrays)
    for key in straight.arrays:
        assert np.array_equal(straight.arrays[key], resumed.arrays[key])  # FedAdam's moments were restored


def test_the_coordinator_imports_no_flower():
    """``fedllm.flower`` is the only package that imports ``flwr``: the round loop runs without it."""
    code = ("import sys, fedllm.coordinator.rounds, fedllm.coordinator.central_dp; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'flwr', 'ray'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=os.environ | {"PYTHONPATH": str(REPO)})
    assert done.stdout.strip() == "[]"
