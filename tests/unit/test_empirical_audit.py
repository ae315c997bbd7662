"""The audit's statistics against published and closed-form values (docs/notes/dp-lora.md §4, Steinke, Nasr &
Jagielski 2023, Carlini et al. 2019)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom, norm

from fedllm.audit.empirical import (
    auc,
    ceiling_table,
    exposure,
    exposure_from_scores,
    exposure_null_p_value,
    mann_whitney_greater,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    rank_of,
)


def test_ceiling_table_matches_the_published_values():
    # docs/notes/dp-lora.md §4 (audit_lib.py, an independent implementation): m = 100, δ = 0, 95%
    table = ceiling_table((100,), (10, 20, 50, 100))
    assert {r: round(v, 2) for r, v in table[100].items()} == {10: 1.05, 20: 1.82, 50: 2.78, 100: 3.49}
    # δ = 1e-5: the 2mδ term of Thm 5.2 matters once m is large
    with_delta = ceiling_table((1000, 10000), (10, 1000), delta=1e-5)
    assert round(with_delta[1000][10], 2) == 1.01 and round(with_delta[1000][1000], 2) == 5.78
    assert round(with_delta[10000][10], 2) == 0.61 and round(with_delta[10000][1000], 2) == 5.53
    assert 100 not in ceiling_table((10,), (10, 100))[10]  # no more guesses than canaries


def test_all_correct_bound_has_a_closed_form():
    # δ = 0, v = r: p-value = p^r with p = e^ε/(1+e^ε), so the bound is logit(0.05^(1/r))
    for r in (10, 37):
        p = 0.05 ** (1 / r)
        expected = math.log(p / (1 - p))
        assert one_run_epsilon_lower_bound(correct=r, guesses=r, canaries=100) == pytest.approx(expected, abs=1e-6)


def test_partly_correct_guesses_match_the_published_values():
    # docs/notes/dp-lora.md §4: 90% correct gives 1.30 (m = 100, r = 40) and 2.02 (m = 1000, r = 1000)
    assert round(one_run_epsilon_lower_bound(correct=36, guesses=40, canaries=100), 2) == 1.30
    assert round(one_run_epsilon_lower_bound(correct=900, guesses=1000, canaries=1000), 2) == 2.02
    # and the measured rows of its table (δ = 1e-5): 19/20 -> 1.29, 32/40 -> 0.70
    assert round(one_run_epsilon_lower_bound(correct=19, guesses=20, canaries=100, delta=1e-5), 2) == 1.29
    assert round(one_run_epsilon_lower_bound(correct=32, guesses=40, canaries=100, delta=1e-5), 2) == 0.70


def test_bound_is_zero_at_chance_and_grows_with_correct_guesses():
    for r in (10, 20, 40):
        assert one_run_epsilon_lower_bound(correct=r // 2, guesses=r, canaries=100) == 0.0
        assert one_run_epsilon_lower_bound(correct=0, guesses=r, canaries=100) == 0.0
    bounds = [one_run_epsilon_lower_bound(correct=v, guesses=20, canaries=100) for v in range(10, 21)]
    assert bounds == sorted(bounds) and bounds[-1] > bounds[-3] > 0


def test_p_value_is_the_binomial_tail_plus_the_delta_term():
    p = 1 / (1 + math.exp(-0.7))
    assert one_run_p_value(correct=15, guesses=20, canaries=100, epsilon=0.7) == pytest.approx(binom.sf(14, 20, p))
    # the δ term: 2mδ · max_i P[v-i <= Bin < v] / i, here computed term by term
    alpha = max(sum(binom.pmf(j, 20, p) for j in range(15 - i, 15)) / i for i in range(1, 16))
    with_delta = one_run_p_value(correct=15, guesses=20, canaries=100, epsilon=0.7, delta=1e-3)
    assert with_delta == pytest.approx(binom.sf(14, 20, p) + 2 * 100 * 1e-3 * alpha)
    # at the bound the p-value crosses 1 - confidence
    eps = one_run_epsilon_lower_bound(correct=18, guesses=20, canaries=100, delta=1e-5)
    assert one_run_p_value(correct=18, guesses=20, canaries=100, epsilon=eps, delta=1e-5) < 0.05
    assert one_run_p_value(correct=18, guesses=20, canaries=100, epsilon=eps + 1e-6, delta=1e-5) >= 0.05


def test_bound_rejects_impossible_counts():
    with pytest.raises(ValueError):
        one_run_epsilon_lower_bound(correct=11, guesses=10, canaries=100)
    with pytest.raises(ValueError):
        one_run_epsilon_lower_bound(correct=5, guesses=200, canaries=100)
    with pytest.raises(ValueError):
        one_run_epsilon_lower_bound(correct=5, guesses=10, canaries=100, confidence=1.0)


def test_exposure_of_rank_one_in_ten_thousand_is_13_29_bits():
    assert exposure(1, 10**4) == pytest.approx(13.2877, abs=1e-4)
    assert exposure(10**4, 10**4) == 0.0
    assert exposure(16, 1024) == pytest.approx(6.0)
    with pytest.raises(ValueError):
        exposure(0, 10)


def test_rank_counts_ties_against_the_canary():
    scores = np.array([0.1, 0.5, 0.5, 0.9, 0.3])
    assert rank_of(0.9, scores) == 1
    assert rank_of(0.5, scores) == 3  # one other candidate ties: counted above
    assert exposure_from_scores(0.1, scores) == pytest.approx(math.log2(5) - math.log2(5))
    with pytest.raises(ValueError):
        rank_of(0.2, scores)  # the canary's own score must be among the candidates


def test_exposure_null_p_value_is_uniform_for_codes_the_model_never_saw():
    rng = np.random.default_rng(7)
    space = 10**4
    ps = []
    for _ in range(4000):
        ranks = rng.integers(1, space + 1, size=3)  # a never-seen code's rank is uniform
        ps.append(exposure_null_p_value([exposure(r, space) for r in ranks]))
    ps = np.array(ps)
    for level in (0.01, 0.05, 0.5):
        assert abs(np.mean(ps < level) - level) < max(0.01, 0.2 * level)
    assert exposure_null_p_value([exposure(1, space)] * 3) < 1e-9  # three codes ranked first


def test_auc_of_separable_and_identical_scores():
    assert auc([3, 4, 5], [0, 1, 2]).auc == 1.0
    assert auc([0, 1, 2], [3, 4, 5]).auc == 0.0
    same = auc([1.0, 1.0, 2.0], [1.0, 1.0, 2.0])
    assert same.auc == 0.5
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=50), rng.normal(size=60)
    # equals the Mann-Whitney U statistic / (n1 n0)
    u = sum((a > b) + 0.5 * (a == b) for a in x for b in y)
    assert auc(x, y).auc == pytest.approx(u / (50 * 60))


def test_auc_interval_covers_the_true_auc_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    true_auc = norm.cdf(1 / math.sqrt(2))  # members ~ N(1, 1), non-members ~ N(0, 1)
    covered = 0
    for _ in range(400):
        result = auc(rng.normal(1, 1, size=30), rng.normal(0, 1, size=30))
        covered += result.ci_low <= true_auc <= result.ci_high
    assert 0.90 <= covered / 400 <= 0.985


def test_mann_whitney_exact_p_value():
    assert mann_whitney_greater([50, 51, 52], list(range(40))) == pytest.approx(1 / math.comb(43, 3))
    assert mann_whitney_greater([-3, -2, -1], list(range(40))) == pytest.approx(1.0)
