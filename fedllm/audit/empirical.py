"""The statistics of an empirical privacy audit: numbers in, numbers out (numpy/scipy, no torch).

* **Exposure** (Carlini et al. 2019, "The Secret Sharer", arXiv:1802.08232): a canary's secret is
  ranked by the model's likelihood among every candidate of its space R (here all 10^4 four-digit
  codes); exposure = log2|R| - log2 rank. It is log2|R| (13.29 bits for 10^4) when the secret is
  the model's first choice. For a secret the model never saw, the rank is uniform on 1..|R|, so
  P(exposure >= x) = 2^-x (mean ≈ 1.44 bits): single values are noisy, compare distributions.
* **AUC** of a membership score (members should score higher), with a DeLong (1988) 95% interval.
* **One-run ε lower bound** (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1)
  Training Run", arXiv:2305.08846, Thm 5.2). m canaries are each included independently with
  probability ½; the auditor guesses "in" or "out" for r of them (abstaining on the rest) and v
  guesses are correct. If the training run is (ε, δ)-DP, then for all v

      P[W >= v] <= β(ε) + 2mδ · α(ε),   β = P[Bin(r, p) >= v],   p = e^ε / (1 + e^ε),
      α = max_{i=1..v} P[v - i <= Bin(r, p) < v] / i

  (the max over i in 1..m of (f(v-i) - f(v))/i with f(x) = P[Bin(r, p) >= x]; terms with i > v
  are no larger than the one at i = v). The lower bound at confidence c is the largest ε whose
  p-value β + 2mδα is still below 1 - c, i.e. the largest ε the observation rejects; it is found
  by bisection over ε. The guesses (which canaries, how many) must be fixed before the scores
  are seen, or the confidence is void.

The bound is capped by the number of guesses: even with every guess correct, m = 100 and
r = 10/20/50/100 guesses give at most 1.05/1.82/2.78/3.49 at 95% (δ = 0), see
:func:`ceiling_table`. Wrong guesses lower it quickly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

_EPS_SEARCH_MAX = 100.0  # no audit with fewer than ~10^40 guesses can reject ε this large
_BISECTION_STEPS = 60


def exposure(rank: float, space_size: int) -> float:
    """Exposure in bits of a secret of rank ``rank`` (1 = most likely) in a space of ``space_size``."""
    if space_size < 1:
        raise ValueError(f"space_size must be >= 1, got {space_size}")
    if not 1 <= rank <= space_size:
        raise ValueError(f"rank must be in 1..{space_size}, got {rank}")
    return math.log2(space_size) - math.log2(rank)


def rank_of(score: float, all_scores: Sequence[float] | np.ndarray) -> int:
    """1-based rank of ``score`` among ``all_scores`` (which include it; higher = more likely).
    Other candidates that tie with it count as ranked above it, so the rank, and the p-value
    rank/|R| of :func:`exposure_null_p_value`, err on the side of less exposure."""
    scores = np.asarray(all_scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError("all_scores must be a non-empty 1-D sequence")
    at_least = int(np.sum(scores >= score))
    if at_least == 0 or not np.any(scores == score):
        raise ValueError("all_scores must contain the canary's own score (the whole candidate space)")
    return at_least


def exposure_from_scores(canary_score: float, all_scores: Sequence[float] | np.ndarray) -> float:
    """Exposure of a canary whose secret scores ``canary_score`` (log-likelihood) among the scores
    of every candidate secret of its space (``all_scores``, including the canary's own)."""
    return exposure(rank_of(canary_score, all_scores), len(all_scores))


@dataclass(frozen=True)
class AUCResult:
    """Area under the ROC curve of a membership score, with a two-sided 95% DeLong interval.

    At perfect separation (AUC 0 or 1) the DeLong variance is 0 and the interval collapses to the
    point; read it together with the sample sizes."""

    auc: float
    ci_low: float
    ci_high: float
    n_members: int
    n_nonmembers: int


def auc(member_scores: Sequence[float] | np.ndarray, nonmember_scores: Sequence[float] | np.ndarray, *,
        confidence: float = 0.95) -> AUCResult:
    """P(member score > non-member score) + ½ P(tie), with a DeLong interval."""
    from scipy.stats import norm

    x = np.asarray(member_scores, dtype=np.float64)
    y = np.asarray(nonmember_scores, dtype=np.float64)
    if x.size == 0 or y.size == 0:
        raise ValueError("auc needs at least one member and one non-member score")
    # psi[i, j] = 1 if x_i > y_j, ½ if equal, 0 otherwise
    psi = (x[:, None] > y[None, :]).astype(np.float64) + 0.5 * (x[:, None] == y[None, :])
    value = float(psi.mean())
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    var = 0.0
    if x.size > 1:
        var += float(np.var(v10, ddof=1)) / x.size
    if y.size > 1:
        var += float(np.var(v01, ddof=1)) / y.size
    half = float(norm.ppf(0.5 + confidence / 2)) * math.sqrt(var)
    return AUCResult(value, max(0.0, value - half), min(1.0, value + half), int(x.size), int(y.size))


def mann_whitney_greater(treated: Sequence[float] | np.ndarray, controls: Sequence[float] | np.ndarray) -> float:
    """One-sided Mann-Whitney U p-value for "``treated`` tends to be larger than ``controls``".

    Exact when there are no ties and the samples are small, otherwise the normal approximation
    with tie correction (scipy's ``method="auto"``). With 3 treated values above all of 40
    controls the exact p-value is 1/C(43, 3) = 8.1e-5."""
    from scipy.stats import mannwhitneyu

    if len(treated) == 0 or len(controls) == 0:
        raise ValueError("mann_whitney_greater needs non-empty samples")
    return float(mannwhitneyu(list(treated), list(controls), alternative="greater", method="auto").pvalue)


def exposure_null_p_value(exposures: Sequence[float] | np.ndarray) -> float:
    """p-value of "these canaries leaked nothing", from their exposures alone (Fisher's method).

    A canary whose secret left no trace in the model is a uniform random code independent of the
    model's scores, so its rank is uniform on 1..|R| and P(exposure >= x) = 2^-x exactly, whatever
    the model: 2^-exposure = rank/|R| is an exact p-value (conservative with ties). Fisher's
    statistic -2 Σ ln p_i is then at most χ² with 2n degrees of freedom. Never-inserted controls
    follow this null by construction; they check the scoring, not the null."""
    from scipy.stats import chi2

    values = np.asarray(exposures, dtype=np.float64)
    if values.size == 0 or np.any(values < 0):
        raise ValueError("exposure_null_p_value needs one or more exposures >= 0")
    statistic = 2 * math.log(2) * float(values.sum())  # -2 Σ ln 2^-e_i
    return float(chi2.sf(statistic, 2 * values.size))


# ------------------------------------------------------------------------------ one-run audit


def _check_counts(correct: int, guesses: int, canaries: int) -> None:
    for name, value in (("correct", correct), ("guesses", guesses), ("canaries", canaries)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}")


def one_run_p_value(*, correct: int, guesses: int, canaries: int, epsilon: float, delta: float = 0.0) -> float:
    """Probability of ``correct`` or more right guesses out of ``guesses`` if the training run is
    (``epsilon``, ``delta``)-DP (Steinke, Nasr & Jagielski 2023, Thm 5.2); at most 1."""
    from scipy.stats import binom

    _check_counts(correct, guesses, canaries)
    if not epsilon >= 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    if correct == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomized response
    beta = float(binom.sf(correct - 1, guesses, p))  # P[Bin(r, p) >= v]
    alpha = 0.0
    if delta > 0:
        below = binom.pmf(np.arange(correct - 1, -1, -1), guesses, p)  # pmf at v-1, v-2, ..., 0
        alpha = float(np.max(np.cumsum(below) / np.arange(1, correct + 1)))  # max_i P[v-i <= B < v]/i
    return min(1.0, beta + 2 * canaries * delta * alpha)


def one_run_epsilon_lower_bound(
    *, correct: int, guesses: int, canaries: int, delta: float = 0.0, confidence: float = 0.95
) -> float:
    """Largest ε that ``correct`` right guesses out of ``guesses`` (with ``canaries`` canaries, each
    included with probability ½) reject at ``confidence``; 0.0 if not even ε = 0 is rejected.

    Bisection over ε on the exact binomial p-value of :func:`one_run_p_value` (to ~1e-9)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    level = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return one_run_p_value(correct=correct, guesses=guesses, canaries=canaries, epsilon=eps, delta=delta) < level

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0  # invariant: rejected(lo), not rejected(hi)
    while rejected(hi):
        lo, hi = hi, 2 * hi
        if hi > _EPS_SEARCH_MAX:
            return _EPS_SEARCH_MAX
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def ceiling_table(
    canaries: Iterable[int] = (100, 1000, 10000),
    guesses: Iterable[int] = (10, 20, 50, 100, 200, 1000),
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
) -> dict[int, dict[int, float]]:
    """The largest one-run lower bound reachable (every guess correct): ``{m: {r: ε}}``, r <= m."""
    rs = list(guesses)
    return {
        m: {r: one_run_epsilon_lower_bound(correct=r, guesses=r, canaries=m, delta=delta, confidence=confidence)
            for r in rs if r <= m}
        for m in canaries
    }
