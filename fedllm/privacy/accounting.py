"""Record-level privacy accounting for DP-SGD: numbers in, numbers out.

Holds :class:`DPEvent` (one release), the composed ε of a history (:func:`epsilon_for`), the σ
that meets a target (:func:`noise_multiplier_for`), the steps that fit under a cap
(:func:`max_steps_under_cap`), and the Opacus calls behind them. The site-level ε of central DP is
in :mod:`fedllm.privacy.site_level`.

Assumptions (every ε this module returns rests on all of them):

* **Mechanism.** Each DP-SGD step is the Poisson-subsampled Gaussian mechanism: every record of the
  site is included in the step's batch independently with probability ``sample_rate`` (q), each
  per-example gradient is clipped to norm ``max_grad_norm`` (C), and Gaussian noise of standard
  deviation ``noise_multiplier * C`` is added to their sum. Shuffled or fixed-size batches are
  *not* covered (docs/notes/dp-lora.md P4).
* **Neighbouring relation.** Add/remove one record.
* **Unit of privacy.** One training record (one sequence) at one site. A person with many records
  is protected only through group privacy (P14).
* **What is released.** Each round's adapter update, i.e. the result of ``steps`` noisy steps.
  Everything after it (server aggregation, other sites' updates) is post-processing and free.
  Every release on the same data composes; :class:`DPEvent` is one release and a history is a
  list of them, heterogeneous (σ, q) allowed.
* **Accountants.**
  ``"prv"``: Opacus ``PRVAccountant`` (Gopi, Lee & Wutschitz 2021), reporting its *upper bound*
  (estimate + discretisation error, ``eps_error=0.01``). If the discretisation grid would exceed
  :data:`PRV_MAX_GRID` points (very large ε or very long histories, where Opacus would need many
  GiB), ``eps_error`` is widened until the grid fits; the result is still an upper bound, just a
  looser one. ``"rdp"``: Opacus RDP for the sampled Gaussian (Mironov, Talwar & Zhang 2019) with
  the RDP→(ε, δ) conversion of Balle et al. 2020 (Thm 21), over Opacus' default α grid widened to
  64…256, 512 and 1024 (P18). RDP is looser, especially for small ε (P11); use PRV for caps.
  Where PRV overflows (ε in the thousands) the RDP bound is returned instead.
* **Cross-check.** :func:`fedllm.privacy.pld_crosscheck.epsilon_pld_dp_accounting` computes the
  same ε with Google's ``dp_accounting`` PLD accountant, an implementation independent of Opacus.
  It is reported by ``fedllm audit`` and tested against PRV; it is never used for caps.

Events with ``steps == 0`` or ``sample_rate == 0`` touch no record and are ignored. A release
with ``noise_multiplier == 0`` and ``steps > 0`` has no DP guarantee: ε = ``math.inf``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from fedllm.errors import BudgetExceededError, ConfigError

logger = logging.getLogger(__name__)

ACCOUNTANTS = ("prv", "rdp")
PRV_EPS_ERROR = 0.01
PRV_MAX_GRID = 1_000_000  # ≈0.5 s and ≈0.5 GiB per PRV call on 2 CPU cores
RDP_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(12, 257),
    512,
    1024,
)
_SIGMA_RANGE = (2.0**-7, 2.0**14)  # bracket limits for noise_multiplier_for
_MAX_STEPS = 2**31 - 1  # max_steps_under_cap never searches past this


class PrivacyParameterError(ConfigError, ValueError):
    """A DP parameter (σ, q, steps, δ, ε, accountant) is out of range."""


@dataclass(frozen=True)
class DPEvent:
    """One DP release: ``steps`` DP-SGD steps with Poisson sample rate q and noise multiplier σ."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        _check_real("noise_multiplier", self.noise_multiplier, low=0.0)
        _check_real("sample_rate", self.sample_rate, low=0.0, high=1.0)
        if not isinstance(self.steps, numbers.Integral) or isinstance(self.steps, bool) or self.steps < 0:
            raise PrivacyParameterError(f"steps must be an integer >= 0, got {self.steps!r}")


def epsilon_for(events: Sequence[DPEvent], *, target_delta: float, accountant: str = "prv") -> float:
    """Composed ε of a whole history of releases at ``target_delta``.

    0.0 for an empty history (or one whose events all have zero steps or zero sample rate);
    ``math.inf`` if any release with steps > 0 had ``noise_multiplier == 0``. Never negative: at a
    large δ the PRV and RDP conversions can give ε < 0 (e.g. σ = 0.8, q = 0.04, 500 steps at
    δ = 0.9), and ε = 0 is the true bound there (any mechanism is (0, δ)-DP once δ covers it), so
    a negative value is returned as 0.0.
    """
    _check_accountant(accountant)
    _check_delta(target_delta)
    history = _history(events)
    if history is None:
        return math.inf
    if not history:
        return 0.0
    return _epsilon_of(tuple(history), target_delta, accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon_of(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """ε of a merged history, memoised: a pure function of its arguments. Calibrating σ calls it
    10-20 times per site, and in a simulation many sites share a history (same q, σ and steps):
    each PRV evaluation takes 0.1-0.4 s on this machine, which dominated a new site's first round."""
    if accountant == "prv":
        if any(q >= 1 for _, q, _ in history):  # Opacus' PRV takes log(1 - q) = log(0) = -inf, as intended, at q = 1
            with warnings.catch_warnings():  # (central DP's site-level releases: no amplification)
                warnings.filterwarnings("ignore", message="divide by zero encountered in log", category=RuntimeWarning)
                epsilon = _prv_epsilon(list(history), delta)
        else:
            epsilon = _prv_epsilon(list(history), delta)
    else:
        epsilon = _rdp_epsilon(list(history), delta)
    return max(0.0, epsilon)  # a δ so large that it alone covers the release: ε = 0, never negative


def prv_eps_error(events: Sequence[DPEvent], *, target_delta: float) -> float:
    """The discretisation margin the ``"prv"`` upper bound carries for this history.

    :data:`PRV_EPS_ERROR` unless the grid had to be widened (see the module docstring); 0.0 for
    an empty history or one without noise (nothing is discretised).
    """
    _check_delta(target_delta)
    history = _history(events)
    if not history:
        return 0.0
    return _prv_errors(history, target_delta)[0]



def _history(events: Sequence[DPEvent]) -> list[tuple[float, float, int]] | None:
    """Events merged by (σ, q) into ``[(σ, q, steps)]``; None if a release had no noise.

    Composition is commutative: merging equal (σ, q) is exact and makes PRV one FFT per group.
    Events with zero steps or zero sample rate touch no record and are dropped.
    """
    groups: dict[tuple[float, float], int] = {}
    for event in events:
        if not isinstance(event, DPEvent):
            raise PrivacyParameterError(f"expected DPEvent, got {event!r}")
        if event.steps == 0:
            continue
        if event.noise_multiplier == 0:
            return None
        if event.sample_rate == 0:
            continue
        key = (float(event.noise_multiplier), float(event.sample_rate))
        groups[key] = groups.get(key, 0) + int(event.steps)
    return [(sigma, q, steps) for (sigma, q), steps in groups.items()]


def noise_multiplier_for(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    spent: Sequence[DPEvent] = (),
    tolerance: float = 0.01,
) -> float:
    """Smallest σ such that ``spent`` plus ``steps`` steps at (σ, q) stays within ``target_epsilon``.

    Brackets σ by doubling/halving from 1, then bisects (in log σ) until the resulting ε lies in
    ``[target_epsilon - tolerance, target_epsilon]`` (absolute tolerance). Typically 10–20
    accountant calls. Raises :class:`BudgetExceededError` if ``spent`` already uses the target.
    """
    _check_real("target_epsilon", target_epsilon, low=0.0, low_open=True, finite=True)
    _check_real("tolerance", tolerance, low=0.0, low_open=True, finite=True)
    DPEvent(1.0, sample_rate, steps)  # validates q and steps
    if steps == 0 or sample_rate == 0:
        raise PrivacyParameterError(
            f"noise_multiplier_for needs steps > 0 and sample_rate > 0 (got steps={steps}, sample_rate={sample_rate})"
        )
    spent = list(spent)
    already = epsilon_for(spent, target_delta=target_delta, accountant=accountant)
    if already >= target_epsilon:
        raise BudgetExceededError(
            f"Nothing left of the privacy budget: already spent ε={already:.2f} of target ε={target_epsilon:.2f} "
            f"(δ={target_delta:g}, {accountant}). Raise the target ε or stop training on this data."
        )

    def eps(sigma: float) -> float:
        return epsilon_for([*spent, DPEvent(sigma, sample_rate, steps)], target_delta=target_delta, accountant=accountant)

    lo, hi = 1.0, 1.0  # invariant once bracketed: eps(lo) > target >= eps(hi)
    eps_hi = eps(hi)
    if eps_hi > target_epsilon:
        while eps_hi > target_epsilon:
            lo, hi = hi, hi * 2
            if hi > _SIGMA_RANGE[1]:
                msg = (
                    f"target ε={target_epsilon:g} cannot be reached with any noise_multiplier up to "
                    f"{_SIGMA_RANGE[1]:g} (spent ε={already:.4f}, δ={target_delta:g}, {accountant}"
                    + (f", whose upper bound carries a {PRV_EPS_ERROR} discretisation error" if accountant == "prv" else "")
                    + ")."
                )
                if spent:
                    raise BudgetExceededError(msg + " The remaining budget is too small for any release.")
                raise PrivacyParameterError(msg + " Choose a larger target ε.")
            eps_hi = eps(hi)
    else:
        while True:
            if lo / 2 < _SIGMA_RANGE[0]:
                return lo  # even tiny noise meets the (very large) target
            lo /= 2
            eps_lo = eps(lo)
            if eps_lo > target_epsilon:
                break
            hi, eps_hi = lo, eps_lo
    while target_epsilon - eps_hi > tolerance and hi / lo > 1 + 1e-4:
        mid = math.sqrt(lo * hi)
        eps_mid = eps(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi


def max_steps_under_cap(
    *,
    max_epsilon: float,
    noise_multiplier: float,
    sample_rate: float,
    target_delta: float,
    accountant: str = "prv",
    spent: Sequence[DPEvent] = (),
) -> int:
    """Largest n with ε(``spent`` + n steps at (σ, q)) <= ``max_epsilon``; 0 if not even one step fits.

    ε is monotone in n, so this is an exponential search followed by a binary search
    (docs/notes/dp-lora.md §2.3). The search stops at 2**31 - 1 steps.
    """
    _check_real("max_epsilon", max_epsilon, low=0.0, low_open=True, finite=True)
    DPEvent(noise_multiplier, sample_rate, 0)  # validates σ and q
    spent = list(spent)

    def fits(n: int) -> bool:
        events = [*spent, DPEvent(noise_multiplier, sample_rate, n)]
        return epsilon_for(events, target_delta=target_delta, accountant=accountant) <= max_epsilon

    if not fits(0) or not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        if hi >= _MAX_STEPS:
            return _MAX_STEPS
        lo, hi = hi, min(2 * hi, _MAX_STEPS)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# --------------------------------------------------------------------------------------------
# Opacus calls


def _prv_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus PRV upper bound; widens eps_error if the discretisation grid would not fit."""
    from opacus.accountants import PRVAccountant

    eps_error, delta_error = _prv_errors(history, delta)
    accountant = PRVAccountant()
    accountant.history = list(history)
    try:
        with _quiet_alpha_grid():
            epsilon = float(accountant.get_epsilon(delta, eps_error=eps_error, delta_error=delta_error))
    except (ValueError, RuntimeError) as exc:
        raise PrivacyParameterError(
            f"the PRV accountant cannot compute ε for history {history} at δ={delta:g}: {exc}. "
            "Use a larger target_delta or the 'rdp' accountant."
        ) from exc
    if not math.isfinite(epsilon):  # overflow at ε in the thousands; RDP is also an upper bound
        logger.warning("PRV overflowed for history %s; reporting the RDP bound instead", history)
        return _rdp_epsilon(history, delta)
    return epsilon


def _prv_errors(history: list[tuple[float, float, int]], delta: float) -> tuple[float, float]:
    """(eps_error, delta_error) for a PRV call: eps_error widened so the grid fits PRV_MAX_GRID."""
    return _prv_errors_cached(tuple(history), delta)


@functools.lru_cache(maxsize=256)
def _prv_errors_cached(history: tuple[tuple[float, float, int], ...], delta: float) -> tuple[float, float]:
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV
    from opacus.accountants.analysis.prv.domain import compute_safe_domain_size

    delta_error = delta / 1000  # Opacus' default
    total_steps = sum(steps for _, _, steps in history)
    with _quiet_alpha_grid():
        domain = compute_safe_domain_size(
            prvs=[PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history],
            max_self_compositions=[steps for _, _, steps in history],
            eps_error=PRV_EPS_ERROR,
            delta_error=delta_error,
        )
    # Same mesh as PRVAccountant._get_domain: the grid has 2L/mesh points, mesh ∝ eps_error.
    mesh = PRV_EPS_ERROR / math.sqrt(total_steps * math.log(12 / delta_error) / 2)
    grid = 2 * domain / mesh
    eps_error = PRV_EPS_ERROR * max(1.0, grid / PRV_MAX_GRID)
    if eps_error > PRV_EPS_ERROR:
        logger.debug("PRV grid of %.3g points too large; eps_error widened to %.4f", grid, eps_error)
    return eps_error, delta_error


@contextlib.contextmanager
def _quiet_alpha_grid() -> Iterator[None]:
    """Silence only Opacus' "optimal order is the largest/smallest alpha" warning.

    An RDP bound at the edge of the α grid could be tighter but is still a valid bound. PRV also
    sizes its discretisation grid with RDP at Opacus' default orders (up to 63), where this
    warning is routine and says nothing about the reported ε.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        yield


def _rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus RDP with the Balle et al. 2020 conversion over the widened α grid."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = list(history)
    with _quiet_alpha_grid():
        epsilon, _ = accountant.get_privacy_spent(delta=delta, alphas=list(RDP_ORDERS))
    return float(epsilon)


# --------------------------------------------------------------------------------------------
# validation


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyParameterError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}")


def _check_delta(delta: float) -> None:
    _check_real("target_delta", delta, low=0.0, high=1.0, low_open=True, high_open=True)


def _check_real(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value):
        raise PrivacyParameterError(f"{name} must be a number, got {value!r}")
    number = float(value)  # as math.isnan above reads it; numbers.Real declares no ordering to compare with
    if finite and math.isinf(number):
        raise PrivacyParameterError(f"{name} must be finite, got {value!r}")
    if low is not None and (number <= low if low_open else number < low):
        raise PrivacyParameterError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and (number >= high if high_open else number > high):
        raise PrivacyParameterError(f"{name} must be {'<' if high_open else '<='} {high:g}, got {value!r}")
