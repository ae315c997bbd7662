"""ε, σ and step budgets against published values and independent implementations.

Reference values are from docs/notes/dp-lora.md §2.1 and §2.3: "MS PRV upper" is Microsoft's
``prv_accountant`` upper bound and "Google RDP" is ``dp_accounting``'s RDP accountant (orders up to
1024, Balle et al. 2020 conversion), both implemented independently of Opacus.
"""

from __future__ import annotations

import math

import pytest

from fedllm.errors import BudgetExceededError, ConfigError
from fedllm.privacy.accounting import (
    ACCOUNTANTS,
    DPEvent,
    PrivacyParameterError,
    epsilon_for,
    max_steps_under_cap,
    noise_multiplier_for,
)

MNIST_Q = 256 / 60000

# (q, σ, steps, δ, Google RDP ε, MS PRV upper-bound ε)
REFERENCE_ROWS = [
    pytest.param(0.01, 4.0, 100, 1e-5, 0.090, 0.090, id="abadi-E1"),  # needs α up to ~132 (P18)
    pytest.param(0.01, 4.0, 10000, 1e-5, 1.035, 0.957, id="abadi-E100"),
    pytest.param(0.01, 4.0, 40000, 1e-5, 2.210, 2.043, id="abadi-E400"),
    pytest.param(MNIST_Q, 1.12, 14062, 1e-5, 2.519, 2.320, id="tfp-mnist-60ep"),
    pytest.param(MNIST_Q, 0.6, 7031, 1e-5, 8.777, 7.700, id="tfp-mnist-sigma0.6"),
    pytest.param(MNIST_Q, 1.2, 2343, 1e-5, 0.932, 0.802, id="tfp-mnist-sigma1.2"),
    pytest.param(0.004, 1.3, 3750, 1e-5, 0.922, 0.844, id="opacus-mnist"),
    pytest.param(0.008, 1.0, 375, 1e-5, 1.316, 0.936, id="llm-site"),
    pytest.param(0.04, 1.0, 125, 1e-4, 2.976, 2.520, id="small-site"),
    pytest.param(0.1, 0.8, 100, 1e-5, 12.41, 10.99, id="q0.1"),
]


@pytest.mark.parametrize(("q", "sigma", "steps", "delta", "google_rdp", "ms_prv"), REFERENCE_ROWS)
def test_epsilon_matches_independent_accountants(q, sigma, steps, delta, google_rdp, ms_prv):
    events = [DPEvent(noise_multiplier=sigma, sample_rate=q, steps=steps)]
    assert epsilon_for(events, target_delta=delta, accountant="rdp") == pytest.approx(google_rdp, rel=0.01)
    assert epsilon_for(events, target_delta=delta, accountant="prv") == pytest.approx(ms_prv, rel=0.01)


def _independent_rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    """Sampled-Gaussian RDP over integer orders 2..256 (Mironov, Talwar & Zhang 2019, eq. for
    integer α), Balle et al. 2020 conversion; written from the papers, not from Opacus."""
    best = math.inf
    for alpha in range(2, 257):
        terms = [
            math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
            + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
            for k in range(alpha + 1)
        ]
        top = max(terms)
        log_a = top + math.log(sum(math.exp(t - top) for t in terms))
        rdp = steps * log_a / (alpha - 1)
        eps = rdp - (math.log(delta) + math.log(alpha)) / (alpha - 1) + math.log((alpha - 1) / alpha)
        best = min(best, eps)
    return best


def test_rdp_matches_a_from_scratch_implementation():
    # σ=1.5, q=0.04, 90 epochs = 2250 steps, δ=1e-5: our RDP 7.3291 (optimal α=3.9); integer orders
    # alone give 7.3299. Fractional orders can only make ours smaller, never larger.
    ours = epsilon_for([DPEvent(1.5, 0.04, 2250)], target_delta=1e-5, accountant="rdp")
    independent = _independent_rdp_epsilon(0.04, 1.5, 2250, 1e-5)
    assert ours <= independent + 1e-9
    assert ours == pytest.approx(independent, rel=0.002)
    assert ours == pytest.approx(7.329, abs=0.001)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_rounds_compose_like_one_long_release(accountant):
    # docs/notes/dp-lora.md §2.3: 20 rounds × 25 steps == one 500-step run (RDP 1.4012, PRV 1.0562).
    rounds = [DPEvent(1.0, 0.008, 25)] * 20
    whole = [DPEvent(1.0, 0.008, 500)]
    expected = {"rdp": 1.4012, "prv": 1.0562}[accountant]
    eps_rounds = epsilon_for(rounds, target_delta=1e-5, accountant=accountant)
    assert eps_rounds == pytest.approx(epsilon_for(whole, target_delta=1e-5, accountant=accountant), rel=1e-9)
    assert eps_rounds == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(("accountant", "expected"), [("rdp", 1.268), ("prv", 0.862)])
def test_heterogeneous_releases_compose(accountant, expected):
    # docs/notes/dp-lora.md §2.3: σ raised from 1.0 to 1.5 half-way through 500 steps at q=0.008.
    history = [DPEvent(1.0, 0.008, 250), DPEvent(1.5, 0.008, 250)]
    eps = epsilon_for(history, target_delta=1e-5, accountant=accountant)
    assert eps == pytest.approx(expected, abs=0.001)
    assert epsilon_for(history[::-1], target_delta=1e-5, accountant=accountant) == pytest.approx(eps, rel=1e-9)
    low = epsilon_for([DPEvent(1.5, 0.008, 500)], target_delta=1e-5, accountant=accountant)
    high = epsilon_for([DPEvent(1.0, 0.008, 500)], target_delta=1e-5, accountant=accountant)
    assert low < eps < high


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_nothing_released_costs_nothing(accountant):
    assert epsilon_for([], target_delta=1e-5, accountant=accountant) == 0.0  # PRV alone raises on this (P2)
    assert epsilon_for([DPEvent(1.0, 0.01, 0), DPEvent(0.0, 0.01, 0)], target_delta=1e-5, accountant=accountant) == 0.0
    one = [DPEvent(1.0, 0.01, 100)]
    with_idle = [*one, DPEvent(1.0, 0.0, 50), DPEvent(2.0, 0.5, 0)]
    assert epsilon_for(with_idle, target_delta=1e-5, accountant=accountant) == epsilon_for(
        one, target_delta=1e-5, accountant=accountant
    )


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_release_without_noise_has_no_guarantee(accountant):
    history = [DPEvent(1.0, 0.01, 100), DPEvent(0.0, 0.01, 1)]
    assert epsilon_for(history, target_delta=1e-5, accountant=accountant) == math.inf


def test_huge_epsilon_stays_finite_and_bounded():
    # Opacus' PRV grid for this history would need many GiB; the widened grid must still give an
    # upper bound above the (tighter-than-RDP) truth and not exceed RDP by much.
    event = [DPEvent(0.3, 0.5, 100)]
    prv = epsilon_for(event, target_delta=1e-5, accountant="prv")
    rdp = epsilon_for(event, target_delta=1e-5, accountant="rdp")
    assert math.isfinite(prv) and 0.8 * rdp < prv <= rdp * 1.01


@pytest.mark.parametrize(
    "call",
    [
        lambda: epsilon_for([DPEvent(1.0, 0.01, 10)], target_delta=1e-5, accountant="gdp"),
        lambda: epsilon_for([DPEvent(1.0, 0.01, 10)], target_delta=0.0),
        lambda: epsilon_for([DPEvent(1.0, 0.01, 10)], target_delta=1.0),
        lambda: epsilon_for([DPEvent(1.0, 0.01, 10)], target_delta=float("nan")),
        lambda: epsilon_for([(1.0, 0.01, 10)], target_delta=1e-5),
        lambda: DPEvent(1.0, 1.5, 10),
        lambda: DPEvent(1.0, -0.1, 10),
        lambda: DPEvent(-1.0, 0.01, 10),
        lambda: DPEvent(float("nan"), 0.01, 10),
        lambda: DPEvent(1.0, 0.01, -1),
        lambda: DPEvent(1.0, 0.01, 2.5),
        lambda: noise_multiplier_for(target_epsilon=0.0, target_delta=1e-5, sample_rate=0.01, steps=10),
        lambda: noise_multiplier_for(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01, steps=0),
        lambda: max_steps_under_cap(max_epsilon=-1.0, noise_multiplier=1.0, sample_rate=0.01, target_delta=1e-5),
        lambda: max_steps_under_cap(max_epsilon=1.0, noise_multiplier=1.0, sample_rate=0.01, target_delta=2.0),
    ],
)
def test_bad_parameters_are_refused(call):
    with pytest.raises(PrivacyParameterError) as info:
        call()
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(("accountant", "expected_sigma"), [("prv", 0.7007), ("rdp", 0.7556)])
def test_noise_multiplier_round_trip(accountant, expected_sigma):
    # docs/notes/dp-lora.md §2.3: σ for ε=3 over 20×25 steps at q=0.008, δ=1e-5.
    kwargs = {"target_delta": 1e-5, "accountant": accountant}
    sigma = noise_multiplier_for(target_epsilon=3.0, sample_rate=0.008, steps=500, tolerance=0.01, **kwargs)
    assert 3.0 - 0.01 <= epsilon_for([DPEvent(sigma, 0.008, 500)], **kwargs) <= 3.0
    assert epsilon_for([DPEvent(0.97 * sigma, 0.008, 500)], **kwargs) > 3.0
    assert sigma == pytest.approx(expected_sigma, rel=0.01)


def test_noise_multiplier_accounts_for_what_was_spent():
    spent = [DPEvent(1.0, 0.008, 250)]
    kwargs = {"target_delta": 1e-5, "sample_rate": 0.008, "steps": 250}
    fresh = noise_multiplier_for(target_epsilon=2.0, **kwargs)
    sigma = noise_multiplier_for(target_epsilon=2.0, spent=spent, **kwargs)
    eps = epsilon_for([*spent, DPEvent(sigma, 0.008, 250)], target_delta=1e-5)
    assert 1.99 <= eps <= 2.0
    assert epsilon_for([*spent, DPEvent(0.97 * sigma, 0.008, 250)], target_delta=1e-5) > 2.0
    assert sigma > fresh


def test_noise_multiplier_refuses_when_nothing_is_left():
    spent = [DPEvent(1.0, 0.008, 5000)]  # ε_PRV ≈ 3.9
    with pytest.raises(BudgetExceededError, match=r"already spent ε=3\.\d\d of target ε=3\.00"):
        noise_multiplier_for(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.008, steps=10, spent=spent)


def test_noise_multiplier_refuses_a_target_below_prv_resolution():
    with pytest.raises(PrivacyParameterError, match="cannot be reached"):
        noise_multiplier_for(target_epsilon=0.005, target_delta=1e-5, sample_rate=0.01, steps=10)


# docs/notes/dp-lora.md §2.3, q=16/2000, σ=1, δ=1e-5. RDP is analytic: exact. PRV's discretisation grid
# depends on n, so its upper bound is a slightly jagged function of n: allow ±2 steps.
@pytest.mark.parametrize(
    ("accountant", "cap", "expected", "slack"),
    [("rdp", 1.0, 22, 0), ("rdp", 3.0, 3565, 0), ("prv", 1.0, 439, 2), ("prv", 3.0, 4243, 2)],
)
def test_max_steps_under_cap_matches_reference(accountant, cap, expected, slack):
    kwargs = {"noise_multiplier": 1.0, "sample_rate": 0.008, "target_delta": 1e-5, "accountant": accountant}
    n = max_steps_under_cap(max_epsilon=cap, **kwargs)
    assert abs(n - expected) <= slack
    eps = lambda steps: epsilon_for([DPEvent(1.0, 0.008, steps)], target_delta=1e-5, accountant=accountant)
    assert eps(n) <= cap < eps(n + 1)


def test_max_steps_under_cap_counts_the_spent_history():
    # After 10 rounds of 25 steps (ε_RDP = 1.225), 3315 more steps fit under ε=3 (docs/notes/dp-lora.md §2.3).
    spent = [DPEvent(1.0, 0.008, 25)] * 10
    kwargs = {"noise_multiplier": 1.0, "sample_rate": 0.008, "target_delta": 1e-5, "accountant": "rdp"}
    assert epsilon_for(spent, target_delta=1e-5, accountant="rdp") == pytest.approx(1.225, abs=0.001)
    assert max_steps_under_cap(max_epsilon=3.0, spent=spent, **kwargs) == 3315
    over = [DPEvent(1.0, 0.008, 5000)]
    assert max_steps_under_cap(max_epsilon=3.0, spent=over, **kwargs) == 0
    assert max_steps_under_cap(max_epsilon=0.5, **kwargs) == 0  # one RDP step already costs 0.90 (P11)
    assert max_steps_under_cap(max_epsilon=3.0, **{**kwargs, "noise_multiplier": 0.0}) == 0


def test_epsilon_is_memoised_per_history_and_unchanged_by_it():
    """Sites with the same history (same σ, q, steps) share one accountant evaluation."""
    from fedllm.privacy.accounting import _epsilon_of

    events = [DPEvent(1.1, 0.02, 40), DPEvent(0.9, 0.05, 7)]
    first = epsilon_for(events, target_delta=1e-5)
    hits = _epsilon_of.cache_info().hits
    assert epsilon_for([DPEvent(1.1, 0.02, 40), DPEvent(0.9, 0.05, 7)], target_delta=1e-5) == first
    assert _epsilon_of.cache_info().hits == hits + 1
    _epsilon_of.cache_clear()
    assert epsilon_for(events, target_delta=1e-5) == first  # recomputed: the same value
