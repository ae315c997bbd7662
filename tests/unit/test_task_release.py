"""Task metrics on the wire: their Gaussian release under "dp", the exact and "none" replies, the
history's aggregate and the run summary's columns (issue 15)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedllm import wire
from fedllm.coordinator.history import RunHistory
from fedllm.reports.summary import site_table, summary_text
from fedllm.site import metric_release


def test_task_metrics_widen_the_sensitivity_and_keep_one_gaussian_event():
    assert metric_release.sensitivity(0) == pytest.approx(math.sqrt(2))
    assert metric_release.sensitivity(2) == pytest.approx(2.0)
    sum_std, count_std = metric_release.noise_stds(noise_multiplier=3.0, loss_bound=10.0, num_task_metrics=2)
    assert (sum_std, count_std) == (pytest.approx(60.0), pytest.approx(6.0))
    # the ledger event does not depend on the number of metrics: (σ, q = 1, 1 step)
    assert metric_release.metric_event(3.0) == metric_release.DPEvent(3.0, 1.0, 1)


def test_the_released_task_means_are_noised_with_the_counts_std_and_unbiased():
    sigma, n = 0.5, 40
    scores = {wire.EXACT_MATCH: [1.0] * 30 + [0.0] * 10, wire.ROUGE_L: [0.5] * n}
    _, count_std = metric_release.noise_stds(noise_multiplier=sigma, loss_bound=10.0, num_task_metrics=2)
    rng = np.random.default_rng(7)
    draws = [metric_release.release_held_out_loss([2.0] * n, noise_multiplier=sigma, loss_bound=10.0, rng=rng,
                                                  task_scores=scores, max_scored=64) for _ in range(400)]
    em = np.array([d.task[wire.EXACT_MATCH] for d in draws])
    rouge = np.array([d.task[wire.ROUGE_L] for d in draws])
    assert not np.any(em == 0.75)  # never the exact value
    assert abs(em.mean() - 0.75) < 0.01 and abs(rouge.mean() - 0.5) < 0.01
    # the noisy sum over the estimated count: about count_std / n (plus the count's own noise)
    assert 0.7 * count_std / n < em.std() < 1.5 * count_std / n
    assert all(0.0 <= v <= 1.0 for v in em)
    assert {d.task_examples for d in draws} <= set(range(n - 8, n + 9))


def test_the_scored_count_is_capped_by_max_examples():
    rng = np.random.default_rng(0)
    release = metric_release.release_held_out_loss([1.0] * 100, noise_multiplier=0.01, loss_bound=10.0, rng=rng,
                                                   task_scores={wire.CHOICE: [1.0] * 16}, max_scored=16)
    assert release.task_examples == 16 and release.task[wire.CHOICE] == pytest.approx(1.0, abs=0.01)
    assert release.num_examples == 100


def test_without_task_metrics_the_release_is_what_it_was():
    a = metric_release.release_held_out_loss([1.0, 2.0], noise_multiplier=1.0, loss_bound=10.0,
                                             rng=np.random.default_rng(3))
    assert a.task == {} and a.task_examples == 0
    assert wire.TASK_EXAMPLES not in metric_release.dp_evaluate_metrics(a)


def test_exact_and_none_replies_carry_the_task_keys():
    exact = metric_release.exact_evaluate_metrics(num_examples=5, loss=1.0, perplexity=math.e, tokens=50,
                                                  task={wire.EXACT_MATCH: 0.6, wire.CHOICE: -1}, task_examples=5)
    assert exact[wire.EXACT_MATCH] == 0.6 and exact[wire.CHOICE] == -1 and exact[wire.TASK_EXAMPLES] == 5
    none = metric_release.no_evaluate_metrics((wire.EXACT_MATCH,))
    assert none[wire.EXACT_MATCH] == -1 and none[wire.TASK_EXAMPLES] == -1 and none[wire.NUM_EXAMPLES] == 0
    assert wire.EXACT_MATCH not in metric_release.no_evaluate_metrics()


def _eval(loss: float, em: float, scored: int, examples: int = 10) -> dict:
    return {wire.NUM_EXAMPLES: examples, wire.EVAL_LOSS: loss, wire.PERPLEXITY: math.exp(loss), wire.EVAL_TOKENS: 100,
            wire.METRICS_RELEASE: 0, wire.EXACT_MATCH: em, wire.TASK_EXAMPLES: scored}


def test_the_history_weights_task_metrics_by_the_records_each_site_scored(tmp_path):
    history = RunHistory(tmp_path / "history.json", run_id="r", num_rounds=1)
    agg = history.record_evaluate(1, sites={"a": _eval(2.0, 1.0, 30), "b": _eval(2.0, 0.0, 10),
                                            "c": _eval(2.0, -1, -1)}, failed=[])
    assert agg[wire.EXACT_MATCH] == pytest.approx(0.75)  # c did not release: left out
    assert wire.ROUGE_L not in agg


def test_the_summary_shows_task_metrics_before_and_after():
    history = {"run-id": "r", "status": "completed", "num-server-rounds": 1, "rounds": [
        {"round": 0, "evaluate": {"sites": {"a": _eval(3.0, 0.25, 8)}}},
        {"round": 1, "evaluate": {"sites": {"a": _eval(2.0, 0.5, 8)}}},
    ]}
    rows = site_table(history)
    assert rows[0]["task-before"] == {wire.EXACT_MATCH: 0.25} and rows[0]["task-after"] == {wire.EXACT_MATCH: 0.5}
    text = summary_text(history, output_dir=Path("/out"), privacy_enabled=True, max_epsilon=8)
    assert "exact-match" in text.splitlines()[2] and "0.25→0.50" in text
    plain = {**history, "rounds": [{"round": r["round"], "evaluate": {"sites": {"a": {
        k: v for k, v in r["evaluate"]["sites"]["a"].items() if k not in (wire.EXACT_MATCH, wire.TASK_EXAMPLES)}}}}
        for r in history["rounds"]]}
    assert "exact-match" not in summary_text(plain, output_dir=Path("/out"),
                                             privacy_enabled=True, max_epsilon=8)
