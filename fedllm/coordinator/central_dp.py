"""Central (site-level) DP bookkeeping on the coordinator: the plan at run start, what every
round released, and the coordinator's own ledger of releases across runs.

The noise itself is added by the strategy (``fedllm.flower.strategies``: Flower's server-side DP
wrappers as fedllm adapts them). Here: before round 0 the run plans m (sites per round: Flower's
sample size, ``strategy.fraction-train`` of the connected sites, at least
``strategy.min-train-sites``) and N (the connected sites), refuses δ ≥ 1/N, and warns when the
planned site-level ε is too large to mean anything. Unit of privacy: one site; see
docs/notes/dp-lora.md §3.1–3.2.

**A fixed denominator.** Every round that asked sites releases one noisy aggregate: the clipped
updates that arrived summed over the m_t sites *asked* (from the plan; a missing, failed,
refused or rejected site counts as a zero update), plus noise of std z·S/m_t, so neither the
mean nor the noise depends on who replied, and a round in which no update arrived releases noise
too. Each such round adds to the site-level ε (:func:`fedllm.privacy.site_level.site_level_epsilon`,
PRV accountant; q = 1 because Flower samples a fixed number of sites).

**The coordinator's ledger.** Site-level ε is a property of every release ever made about the
federation's sites, not of one run. Each release is recorded, *before* the new global adapter
leaves the coordinator, in a central-DP ledger (``fedllm.privacy.ledger``, ``kind =
"central-dp"``: the hash chain and file format of a site's ledger; one entry per release with z,
S_t, m_t, N, the sampling, δ, and the cumulative ε composed over *every* entry, all runs). Its
path is ``central-dp.ledger-path`` (default ``OUTPUT/ledgers/_coordinator.json``: a resumed run,
in the same folder, continues it; point separate runs on the same federation at one file outside
the run folders to compose them). ``fedllm ledger verify FILE`` checks it like a site's ledger.
``history.json`` reports both: ``"epsilon"`` (this run's releases) and ``"cumulative-epsilon"``
(the ledger's), top-level and per round (``"central-dp"``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from fedllm.config import CentralDPConfig, RunConfig
from fedllm.coordinator.history import RunHistory
from fedllm.errors import ConfigError
from fedllm.privacy.ledger import PrivacyLedger
from fedllm.privacy.site_level import site_level_epsilon

LEDGER_NAME = "coordinator"  # the "site" field of the coordinator's central-DP ledger
DEFAULT_LEDGER = Path("ledgers") / "_coordinator.json"  # under the run's output folder

log = logging.getLogger(__name__)


@dataclass
class CentralDP:
    """The run's site-level DP bookkeeping: the plan, then what every round released."""

    config: CentralDPConfig
    sites_per_round: int  # m: Flower's sample size (the largest asked in a round so far)
    total_sites: int  # N: connected sites (the most seen so far)
    sampling: str  # "all" while every round asked every connected site, else "fixed-subset"
    rounds: int = 0  # noisy aggregates released
    epsilon: float = 0.0  # this run's site-level ε
    ledger: PrivacyLedger | None = None  # the coordinator's central-DP ledger (None: not kept, tests only)

    @property
    def cumulative_epsilon(self) -> float:
        """Site-level ε of every release in the coordinator's ledger (all runs), at this run's δ;
        this run's ε when no ledger is kept."""
        if self.ledger is None:
            return self.epsilon
        return self.ledger.epsilon(target_delta=self.config.target_delta, accountant="prv")

    def epsilon_after(self, rounds: int) -> float:
        return site_level_epsilon(noise_multiplier=self.config.noise_multiplier, sites_per_round=self.sites_per_round,
                                  total_sites=self.total_sites, rounds=rounds, target_delta=self.config.target_delta,
                                  accountant="prv", sampling=self.sampling)

    def block(self) -> dict:
        """The top-level ``"central-dp"`` entry of history.json."""
        return {"enabled": True, "clipping": self.config.clipping, "noise-multiplier": self.config.noise_multiplier,
                "clipping-norm": self.config.clipping_norm, "sites-per-round": self.sites_per_round,
                "total-sites": self.total_sites, "rounds": self.rounds, "sampling": self.sampling,
                "epsilon": self.epsilon, "cumulative-epsilon": self.cumulative_epsilon,
                "ledger": None if self.ledger is None else str(self.ledger.path),
                "ledger-releases": len(self.ledger.entries) if self.ledger is not None else self.rounds,
                "delta": self.config.target_delta, "accountant": "prv"}

    def record_round(self, history: RunHistory, server_round: int, *, asked: int, connected: int, released: bool,
                     clipping_norm: float, sites: int) -> None:
        """Account one round (ε grows only when a noisy aggregate was released) and record it with
        the strategy's ``central_dp_round``: the norm S_t the updates were clipped to and m_t, the
        sites asked (the denominator; 0 when nothing was released). A release goes into the
        coordinator's ledger first (call this before the new global adapter is sent anywhere)."""
        self.total_sites = max(self.total_sites, connected, asked)
        self.sites_per_round = max(self.sites_per_round, asked)
        if asked < connected:
            self.sampling = "fixed-subset"
        if self.sampling == "all" and self.sites_per_round != self.total_sites:
            self.sampling = "fixed-subset"
        if released:
            if self.ledger is not None:
                m = max(1, sites)
                self.ledger.record(
                    run_id=str(history.data.get("run-id") or "run"), server_round=server_round, steps=1,
                    sample_rate=1.0, noise_multiplier=self.config.noise_multiplier, max_grad_norm=clipping_norm,
                    target_delta=self.config.target_delta, num_examples=self.total_sites, accountant="prv",
                    central_dp={"sites_per_round": m, "total_sites": self.total_sites,
                                "sampling": "all" if m == self.total_sites else "fixed-subset",
                                "clipping": self.config.clipping})
            self.rounds += 1
            self.epsilon = self.epsilon_after(self.rounds)
        history.record_central_dp(server_round, epsilon=self.epsilon, clipping_norm=clipping_norm, sites=sites,
                                  cumulative_epsilon=self.cumulative_epsilon)
        history.set_central_dp(self.block())


def ledger_path(config: RunConfig) -> Path:
    """The coordinator's central-DP ledger: ``central-dp.ledger-path``, else OUTPUT/ledgers/_coordinator.json."""
    if config.central_dp.ledger_path:
        return Path(config.central_dp.ledger_path).expanduser()
    return Path(config.output_dir) / DEFAULT_LEDGER


def open_ledger(path: Path) -> PrivacyLedger:
    """The coordinator's central-DP ledger at ``path`` (chain checked; a new one if there is no file)."""
    return PrivacyLedger.open(path, site=LEDGER_NAME, kind="central-dp")


def start_central_dp(config: RunConfig, history: RunHistory, *, connected: int,
                     saved: dict | None = None, ledger: Path | None = None) -> CentralDP:
    """Plan m and N from the ``connected`` sites, check δ < 1/N, and warn when the planned ε is
    too large; on resume, continue from the saved accounting (``saved``: ``CentralDP.block()``,
    whose ledger path wins over ``ledger``). ``ledger``: the coordinator's central-DP ledger file
    (:func:`ledger_path`; None keeps no ledger, for unit tests of the bookkeeping)."""
    cdp, strat = config.central_dp, config.strategy
    if saved is not None:
        if saved.get("ledger"):
            ledger = Path(saved["ledger"])
        central = CentralDP(cdp, int(saved["sites-per-round"]), int(saved["total-sites"]), str(saved["sampling"]),
                            rounds=int(saved["rounds"]), epsilon=float(saved["epsilon"]),
                            ledger=open_ledger(ledger) if ledger is not None else None)
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
    central = CentralDP(cdp, sites_per_round, total, "all" if sites_per_round == total else "fixed-subset",
                        ledger=open_ledger(ledger) if ledger is not None else None)
    if central.ledger is not None and central.ledger.entries:
        before = central.cumulative_epsilon
        after = central.ledger.epsilon_after(noise_multiplier=cdp.noise_multiplier, sample_rate=1.0,
                                             steps=config.num_server_rounds, target_delta=cdp.target_delta)
        log.info("central-DP ledger %s: %d releases before this run, site-level ε = %.2f; with this run's %d rounds "
                 "it would be %.2f (δ=%g, prv)", central.ledger.path, len(central.ledger.entries), before,
                 config.num_server_rounds, after, cdp.target_delta)
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
