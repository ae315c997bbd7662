"""Hostile-coordinator suite, issue 13 finding 7: the canary audit's mechanism must not depend on
the secret inclusion draw.

The one-run test (Steinke et al. 2023) assumes the mechanism is fixed before the canaries are
drawn: each one-run canary is included with probability ½ and the mechanism (sample rate q,
steps, σ) is the same whatever the draw. fedllm used to compute q = batch / (real records +
*included* copies), and σ from q: both moved with the number of canaries included, so the audited
mechanism depended on the secret inclusion vector. q now comes from the planned totals (real
records + every canary as if included).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedllm.audit import canaries as audit
from fedllm.audit.canary_run import planned_examples
from fedllm.cli.main import main
from fedllm.site import holdout, training
from tests.unit.test_canary_audit import CANARIES, scenario, tiny_model_dir  # noqa: F401  (fixtures)

REAL_TRAIN_LOCAL = training.train_local
EXPOSURE_COPIES = sum(audit.EXPOSURE_REPEATS) * audit.CANARIES_PER_REPEAT


class _Stop(Exception):
    """Ends the audit after its first training step: the mechanism is all this test looks at."""


def _mechanism_for_draw(scenario, tmp_path, monkeypatch, seed: int) -> dict:  # noqa: F811 (the fixture)
    """Run the audit with the canaries (names, codes, inclusion) drawn from ``seed``; return the
    mechanism train_local actually ran (q from its own result, σ, steps) and the draw's inclusion count."""
    seen: dict = {}

    def capture(model, examples, **kw):
        result = REAL_TRAIN_LOCAL(model, examples, **{**kw, "steps": 1})  # one real DP step: the q it sampled at
        seen.update(sample_rate=result.sample_rate, noise_multiplier=kw["dp"].noise_multiplier, steps=kw["steps"],
                    examples=len(examples), planned=kw.get("planned_examples"))
        raise _Stop

    monkeypatch.setattr(audit, "os_entropy_rng", lambda: np.random.default_rng(seed))
    monkeypatch.setattr(training, "fresh_generator", lambda device="cpu": __import__("torch").Generator(device=device).manual_seed(seed))
    monkeypatch.setattr(training, "train_local", capture)
    # one split key for both runs: the real records' train/held-out split is the site's, not part of the draw
    monkeypatch.setattr(holdout, "fresh_split_key", lambda: bytes(range(32)))
    with pytest.raises(_Stop):
        main(["audit", "--canaries", str(CANARIES), "--scenario", str(scenario), "--output", str(tmp_path / str(seed))])
    return seen


def test_two_inclusion_draws_give_the_same_sample_rate_sigma_and_steps(scenario, tmp_path, monkeypatch):  # noqa: F811
    first = _mechanism_for_draw(scenario, tmp_path, monkeypatch, seed=1)
    second = _mechanism_for_draw(scenario, tmp_path, monkeypatch, seed=3)
    # the two secret draws include different numbers of one-run canaries (the training sets differ) ...
    assert first["examples"] != second["examples"], "pick seeds whose draws include different numbers of canaries"
    # ... and the mechanism is the same: q from the planned totals, σ calibrated from it, the steps
    assert first["sample_rate"] == second["sample_rate"]
    assert first["noise_multiplier"] == second["noise_multiplier"] > 0
    assert first["steps"] == second["steps"]
    assert first["planned"] == second["planned"] >= max(first["examples"], second["examples"])
    assert first["sample_rate"] == pytest.approx(16 / first["planned"])  # batch 16 over the planned total


def test_the_planned_total_counts_every_canary_whatever_the_draw():
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(2)
    a = audit.build_canaries(one_run=50, rng=rng_a)
    b = audit.build_canaries(one_run=50, rng=rng_b)
    assert a.included.sum() != b.included.sum()
    assert planned_examples(100, a) == planned_examples(100, b) == 100 + EXPOSURE_COPIES + 50
    assert len(a.training_records()) <= a.planned_records  # the included copies never exceed the plan


def test_train_local_refuses_a_plan_smaller_than_the_data():
    with pytest.raises(ValueError, match="planned_examples = 1 is below the 2 examples given"):
        training.train_local(None, [object(), object()], steps=1, batch_size=1, learning_rate=0.1, pad_id=0, dp=None,
                             planned_examples=1)
