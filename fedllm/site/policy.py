"""A site's privacy policy against the run it is asked to serve (issue 13, "site sovereignty").

The run config is the coordinator's; the site's privacy policy is its own (``SiteConfig``: its site
file, node config or scenario ``[[site]]`` table). :class:`SitePolicy` is that policy resolved for
the site's data, and :meth:`SitePolicy.check_run` refuses a run that asks for more than it allows:

* ``privacy.enabled = false`` while the site has ``require-dp = true``;
* ``privacy.target-delta`` larger than the site's δ (``max-delta``, or the automatic
  min(1e-5, 1/(10·n)) for n training records), or not a number in (0, 1);
* ``privacy.max-epsilon`` that is not a finite number > 0 (the site could not honour it: its own
  cap always applies, and the run's can only tighten it).

Each refusal is a :class:`SitePolicyError` naming the setting, the run's value and the site's
limit, and saying what to do. ``SiteRuntime`` runs the check at the start of every training round,
before any training step and before its ledger is opened for writing; the site's records have been
read and split once before (at start-up) because the automatic δ needs n, the number of training
records, and the ledger's dataset binding needs their fingerprint.

What the site then enforces at its own δ (``site δ``):

* σ is calibrated at min(run δ, site δ) (never a larger δ than the site's: more noise, never less);
* the cap check, every ledger entry (its ``target_delta``, with the policy in ``site_max_delta`` /
  ``site_max_epsilon``) and every cumulative total are computed at the site δ;
* the cap is the site's ``max-epsilon``, tightened by the run's ``privacy.max-epsilon`` when that
  is smaller (:meth:`SitePolicy.cap`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedllm.config import SiteConfig
from fedllm.config.run import PrivacyConfig
from fedllm.config.site import automatic_delta
from fedllm.errors import BudgetExceededError


class SitePolicyError(BudgetExceededError):
    """A site refuses a run whose configuration asks for more than the site's privacy policy allows.

    A refusal, not a failure: a real site reports it to the coordinator with ``wire.POLICY_REFUSED``
    and writes nothing to its ledger."""


@dataclass(frozen=True)
class SitePolicy:
    """One site's privacy policy, resolved for its data: cap, δ, whether DP is required."""

    site: str
    max_epsilon: float  # the site's own cap on its cumulative ε (at ``delta``)
    delta: float  # the δ at which the site computes and enforces its ε
    delta_automatic: bool  # ``max-delta = 0``: δ = min(1e-5, 1/(10·n))
    require_dp: bool
    num_examples: int  # n: the site's training records (the automatic δ depends on it)

    @classmethod
    def of(cls, site: SiteConfig, *, num_examples: int) -> SitePolicy:
        """The policy of ``site`` with ``num_examples`` training records."""
        return cls(site=site.name, max_epsilon=site.max_epsilon, delta=site.delta(num_examples),
                   delta_automatic=site.max_delta <= 0, require_dp=site.require_dp, num_examples=num_examples)

    @property
    def delta_source(self) -> str:
        """Where the site's δ comes from, for messages."""
        if self.delta_automatic:
            return (f"automatic: the smaller of 1e-5 and 1/(10·n) for its n = {self.num_examples} training records; "
                    "max-delta = 0 in its site file")
        return "max-delta in its site file"

    def problems(self, privacy: PrivacyConfig) -> list[str]:
        """Why the site refuses a run with these privacy settings (empty: it accepts)."""
        who = f"Site '{self.site}' refuses this run"
        if not privacy.enabled:
            if self.require_dp:
                return [f"{who}: privacy.enabled = false, but the site requires differential privacy (require-dp = "
                        "true in its site file). The coordinator must enable privacy (privacy.enabled = true), or "
                        "the site must set require-dp = false."]
            return []
        found = []
        delta = privacy.target_delta
        if not (isinstance(delta, (int, float)) and 0 < delta < 1) or delta > self.delta:
            found.append(f"{who}: privacy.target-delta = {delta:g} exceeds its max-delta = {self.delta:g} "
                         f"({self.delta_source}). The coordinator must lower privacy.target-delta to at most "
                         f"{self.delta:g}.")
        cap = privacy.max_epsilon
        if not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0):
            found.append(f"{who}: privacy.max-epsilon = {cap!r} is not a finite number > 0, so the site cannot "
                         f"honour it; the site's own cap is max-epsilon = {self.max_epsilon:g} (site file). The "
                         "coordinator must set privacy.max-epsilon to a finite number > 0.")
        return found

    def check_run(self, privacy: PrivacyConfig) -> None:
        """Raise :class:`SitePolicyError` (every problem, one per line) unless the site accepts the run."""
        found = self.problems(privacy)
        if found:
            raise SitePolicyError("\n".join(found))

    def cap(self, privacy: PrivacyConfig) -> float:
        """The cap the site enforces: its own ``max-epsilon``, tightened by the run's when that is smaller."""
        run_cap = privacy.max_epsilon
        if isinstance(run_cap, (int, float)) and math.isfinite(run_cap) and run_cap > 0:
            return min(self.max_epsilon, float(run_cap))
        return self.max_epsilon

    def calibration_delta(self, privacy: PrivacyConfig) -> float:
        """The δ at which σ is calibrated: the run's when it is smaller than the site's, else the site's."""
        return min(privacy.target_delta, self.delta)


__all__ = ["SitePolicy", "SitePolicyError", "automatic_delta"]
