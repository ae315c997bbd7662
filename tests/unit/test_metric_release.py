"""The held-out release mechanism of ``release-metrics = "dp"`` (``fedllm.site.metric_release``):
clipping, the noise it adds, the ledger entry it writes, its ε composed with training, and the
refusal at the site's cap; the train metrics each setting lets leave."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedllm import wire
from fedllm.errors import BudgetExceededError
from fedllm.privacy.accounting import DPEvent, epsilon_for
from fedllm.privacy.ledger import PrivacyLedger, verify_ledger
from fedllm.site import metric_release as mr
from tests.helpers import record_release

DELTA = 1e-5


def _gaussian_mechanism_epsilon(sigma: float, delta: float) -> float:
    """ε of the Gaussian mechanism with noise multiplier σ at δ, from the exact (analytic)
    privacy profile of Balle & Wang 2018, Thm 8: δ(ε) = Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ).
    Independent of Opacus."""
    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def profile(eps: float) -> float:
        return phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(-1 / (2 * sigma) - eps * sigma)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if profile(mid) > delta else (lo, mid)
    return hi


def test_each_record_loss_is_clipped_to_the_bound():
    clipped = mr.clip_losses([-1.0, 3.0, 25.0, math.nan, math.inf], loss_bound=10.0)
    assert clipped.tolist() == [0.0, 3.0, 10.0, 10.0, 10.0]
    # the sum one record can move is bounded by B whatever its loss: the released sum sees at most B
    rng = np.random.default_rng(0)
    big = mr.release_held_out_loss([2.0] * 9 + [1e9], noise_multiplier=1e-9, loss_bound=10.0, rng=rng)
    assert big.noisy_sum == pytest.approx(18.0 + 10.0, abs=1e-6)
    assert big.loss == pytest.approx(2.8, abs=1e-6) and big.perplexity == pytest.approx(math.exp(2.8))


def test_the_noise_has_the_calibrated_standard_deviations():
    sigma, bound = 2.0, 10.0
    sum_std, count_std = mr.noise_stds(noise_multiplier=sigma, loss_bound=bound)
    assert sum_std == pytest.approx(sigma * math.sqrt(2) * bound) and count_std == pytest.approx(sigma * math.sqrt(2))
    losses = [1.0, 2.0, 3.0, 4.0] * 5  # sum 50, n 20
    rng = np.random.default_rng(1234)
    draws = [mr.release_held_out_loss(losses, noise_multiplier=sigma, loss_bound=bound, rng=rng) for _ in range(4000)]
    sums = np.array([d.noisy_sum for d in draws]) - 50.0
    counts = np.array([d.noisy_count for d in draws]) - 20.0
    assert abs(sums.mean()) < 4 * sum_std / math.sqrt(len(draws))
    assert abs(counts.mean()) < 4 * count_std / math.sqrt(len(draws))
    assert sums.std() == pytest.approx(sum_std, rel=0.05) and counts.std() == pytest.approx(count_std, rel=0.05)
    assert all(0.0 <= d.loss <= bound for d in draws)
    assert all(d.num_examples == max(0, round(d.noisy_count)) for d in draws)


def test_one_release_is_the_gaussian_mechanism_and_its_epsilon_matches_an_independent_computation():
    assert mr.metric_event(20.0) == DPEvent(20.0, 1.0, 1)
    for sigma in (5.0, 20.0):
        accounted = mr.metric_release_epsilon(noise_multiplier=sigma, target_delta=DELTA)
        exact = _gaussian_mechanism_epsilon(sigma, DELTA)
        assert exact <= accounted <= exact + 0.011  # PRV's upper bound: exact + its discretisation margin
    # the default costs little: ε ≈ 0.17 per release on its own (documented in the module and the rule)
    assert mr.metric_release_epsilon(noise_multiplier=20.0, target_delta=DELTA) == pytest.approx(0.17, abs=0.01)


def test_a_release_is_recorded_in_the_ledger_and_composed_into_the_sites_epsilon(tmp_path):
    path = tmp_path / "site.json"
    ledger = PrivacyLedger.open(path, site="site")
    train = record_release(ledger, run_id="run-a", server_round=1)
    entry = mr.record_metric_release(ledger, run_id="run-a", server_round=1, noise_multiplier=20.0, loss_bound=10.0,
                                     num_examples=12, target_delta=DELTA, max_epsilon=8.0)
    assert (entry.release, entry.steps, entry.sample_rate, entry.noise_multiplier, entry.max_grad_norm,
            entry.num_examples) == ("metrics", 1, 1.0, 20.0, 10.0, 12)
    composed = epsilon_for([train.event, DPEvent(20.0, 1.0, 1)], target_delta=DELTA)
    assert entry.epsilon == pytest.approx(composed) and entry.epsilon > train.epsilon
    assert mr.metric_release_recorded(ledger, run_id="run-a", server_round=1)
    assert not mr.metric_release_recorded(ledger, run_id="run-a", server_round=2)

    reopened = PrivacyLedger.open(path, site="site")  # on disk, chained, verified: the audit recomputes it too
    assert [e.release for e in reopened.entries] == ["update", "metrics"]
    assert reopened.epsilon(target_delta=DELTA) == pytest.approx(composed)
    result = verify_ledger(path)
    assert result.ok, result.problems
    stored = json.loads(path.read_text())["entries"]
    assert "release" not in stored[0] and stored[1]["release"] == "metrics"  # older entries hash as before


def test_a_release_that_would_cross_the_cap_is_refused_and_nothing_is_recorded(tmp_path):
    path = tmp_path / "site.json"
    ledger = PrivacyLedger.open(path, site="site")
    spent = record_release(ledger, steps=375).epsilon  # ε_PRV ≈ 0.936
    before = path.read_bytes()
    after = epsilon_for([DPEvent(1.0, 0.008, 375), DPEvent(20.0, 1.0, 1)], target_delta=DELTA)
    cap = (spent + after) / 2
    with pytest.raises(BudgetExceededError, match=r"refuses to release its held-out metrics for round 3 .* over its cap"):
        mr.record_metric_release(ledger, run_id="run-a", server_round=3, noise_multiplier=20.0, loss_bound=10.0,
                                 num_examples=12, target_delta=DELTA, max_epsilon=cap)
    assert path.read_bytes() == before and len(PrivacyLedger.open(path, site="site").entries) == 1
    entry = mr.record_metric_release(ledger, run_id="run-a", server_round=3, noise_multiplier=20.0, loss_bound=10.0,
                                     num_examples=12, target_delta=DELTA, max_epsilon=after + 1e-9)  # it fits exactly
    assert entry.epsilon == pytest.approx(after)


EXACT_TRAIN = {wire.NUM_EXAMPLES: 90, wire.TRAIN_LOSS: 1.7, wire.LOCAL_STEPS: 6, wire.EXAMPLES_SEEN: 47,
               wire.TOKENS: 4100, wire.TRAIN_SECONDS: 3.2, wire.EPSILON: 1.3, wire.DELTA: 1e-5,
               wire.NOISE_MULTIPLIER: 1.1, wire.SAMPLE_RATE: 8 / 90, wire.MAX_GRAD_NORM: 1.0, wire.EPSILON_CAP: 8.0}


def test_train_metrics_under_each_setting():
    dp = mr.train_metrics("dp", EXACT_TRAIN)
    assert set(dp) == set(wire.TRAIN_METRIC_KEYS)
    assert dp[wire.NUM_EXAMPLES] == 1 and dp[wire.METRICS_RELEASE] == wire.RELEASE_CODES["dp"]
    assert all(dp[k] == -1 for k in (wire.TRAIN_LOSS, wire.EXAMPLES_SEEN, wire.TOKENS, wire.TRAIN_SECONDS))
    assert all(dp[k] == EXACT_TRAIN[k] for k in (wire.LOCAL_STEPS, wire.MAX_GRAD_NORM, wire.DELTA, wire.EPSILON_CAP, wire.EPSILON,
                                                 wire.NOISE_MULTIPLIER, wire.SAMPLE_RATE))
    none = mr.train_metrics("none", EXACT_TRAIN)
    assert set(none) == set(wire.TRAIN_METRIC_KEYS)
    assert {k: v for k, v in none.items() if v != -1} == {wire.NUM_EXAMPLES: 1, wire.METRICS_RELEASE: 2}
    assert mr.train_metrics("exact", EXACT_TRAIN) == {**EXACT_TRAIN, wire.METRICS_RELEASE: 0}
    with pytest.raises(ValueError, match="release-metrics"):
        mr.train_metrics("noisy", EXACT_TRAIN)
