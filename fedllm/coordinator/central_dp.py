"""Central (site-level) DP bookkeeping on the coordinator: the plan at run start and what every
round released.

The noise itself is added by the strategy (``fedllm.flower.strategies``: Flower's server-side DP
wrappers as fedllm adapts them). Here: before round 0 the run plans m (sites per round: Flower's
sample size, ``strategy.fraction-train`` of the connected sites, at least
``strategy.min-train-sites``) and N (the connected sites), refuses δ ≥ 1/N, and warns when the
planned site-level ε is too large to mean anything. Every round that releases a noisy aggregate
adds to the site-level ε (:func:`fedllm.privacy.site_level.site_level_epsilon`, PRV accountant;
q = 1 because Flower samples a fixed number of sites), recorded in ``history.json`` (top-level and
per round ``"central-dp"``). Unit of privacy: one site; see docs/notes/dp-lora.md §3.1–3.2.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from fedllm.config import CentralDPConfig, RunConfig
from fedllm.coordinator.history import RunHistory
from fedllm.errors import ConfigError
from fedllm.privacy.site_level import site_level_epsilon

log = logging.getLogger(__name__)


@dataclass
class CentralDP:
    """The run's site-level DP bookkeeping: the plan, then what every round released."""

    config: CentralDPConfig
    sites_per_round: int  # m: Flower's sample size (the largest asked in a round so far)
    total_sites: int  # N: connected sites (the most seen so far)
    sampling: str  # "all" while every round asked every connected site, else "fixed-subset"
    rounds: int = 0  # noisy aggregates released
    epsilon: float = 0.0

    def epsilon_after(self, rounds: int) -> float:
        return site_level_epsilon(noise_multiplier=self.config.noise_multiplier, sites_per_round=self.sites_per_round,
                                  total_sites=self.total_sites, rounds=rounds, target_delta=self.config.target_delta,
                                  accountant="prv", sampling=self.sampling)

    def block(self) -> dict:
        """The top-level ``"central-dp"`` entry of history.json."""
        return {"enabled": True, "clipping": self.config.clipping, "noise-multiplier": self.config.noise_multiplier,
                "clipping-norm": self.config.clipping_norm, "sites-per-round": self.sites_per_round,
                "total-sites": self.total_sites, "rounds": self.rounds, "sampling": self.sampling,
                "epsilon": self.epsilon, "delta": self.config.target_delta, "accountant": "prv"}

    def record_round(self, history: RunHistory, server_round: int, *, asked: int, connected: int, released: bool,
                     clipping_norm: float, sites: int) -> None:
        """Account one round (ε grows only when a noisy aggregate was released) and record it with
        the strategy's ``central_dp_round``: the norm S_t the updates were clipped to and m_t, the
        number averaged (0 when nothing was released)."""
        self.total_sites = max(self.total_sites, connected, asked)
        self.sites_per_round = max(self.sites_per_round, asked)
        if asked < connected:
            self.sampling = "fixed-subset"
        if self.sampling == "all" and self.sites_per_round != self.total_sites:
            self.sampling = "fixed-subset"
        if released:
            self.rounds += 1
            self.epsilon = self.epsilon_after(self.rounds)
        history.record_central_dp(server_round, epsilon=self.epsilon, clipping_norm=clipping_norm, sites=sites)
        history.set_central_dp(self.block())


def start_central_dp(config: RunConfig, history: RunHistory, *, connected: int,
                     saved: dict | None = None) -> CentralDP:
    """Plan m and N from the ``connected`` sites, check δ < 1/N, and warn when the planned ε is
    too large; on resume, continue from the saved accounting (``saved``: ``CentralDP.block()``)."""
    cdp, strat = config.central_dp, config.strategy
    if saved is not None:
        central = CentralDP(cdp, int(saved["sites-per-round"]), int(saved["total-sites"]), str(saved["sampling"]),
                            rounds=int(saved["rounds"]), epsilon=float(saved["epsilon"]))
        history.set_central_dp(central.block())
        return central
    sites_per_round = max(int(connected * strat.fraction_train), strat.min_train_sites)
    total = max(connected, sites_per_round)
    if cdp.target_delta >= 1 / total:
        raise ConfigError(
            f"central-dp.target-delta = {cdp.target_delta:g} is not below 1/N = {1 / total:g} for N = {total} sites: "
            "at δ ≥ 1/N, publishing one whole site's update would satisfy the definition. "
            "Use a δ much smaller than 1/N (the default is 1e-05)."
        )
    central = CentralDP(cdp, sites_per_round, total, "all" if sites_per_round == total else "fixed-subset")
    planned = central.epsilon_after(config.num_server_rounds)
    warning = site_level_warning(epsilon=planned, rounds=config.num_server_rounds, total_sites=total,
                                 noise_multiplier=cdp.noise_multiplier)
    if warning:
        log.warning("WARNING: %s", warning)
    log.info("central DP (%s clipping, S=%g, z=%g): %d of %d sites per round; planned site-level ε = %.2f "
             "after %d rounds (δ=%g, prv)", cdp.clipping, cdp.clipping_norm, cdp.noise_multiplier, sites_per_round,
             total, planned, config.num_server_rounds, cdp.target_delta)
    history.set_central_dp(central.block())
    return central


def site_level_warning(*, epsilon: float, rounds: int, total_sites: int, noise_multiplier: float,
                       threshold: float = 10.0) -> str | None:
    """The plain warning logged at run start when the planned site-level ε exceeds ``threshold``."""
    if epsilon <= threshold:
        return None
    shown = "∞" if math.isinf(epsilon) else f"{epsilon:.1f}"
    return (
        f"site-level ε would be {shown} after {rounds} rounds with {total_sites} sites at noise "
        f"{noise_multiplier:g}: too large to mean anything; central DP only protects a site when "
        "hundreds of sites take part per round. Raise central-dp.noise-multiplier (at a heavy cost in "
        "accuracy), run fewer rounds, or rely on the record-level guarantee of each site (privacy.*); "
        "see docs/privacy.md"
    )
