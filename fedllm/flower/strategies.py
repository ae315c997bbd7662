"""Server-side aggregation: Flower strategies over adapter tensors, and central (site-level) DP.

Strategies are Flower's own (``flwr.serverapp.strategy``): FedAvg weighted by each site's number
of training examples, FedProx (the site adds the proximal term), FedAdam (server optimiser on the
adapter's pseudo-gradient). Replies are screened first (``fedllm.coordinator.screening``); the
round loop reaches these strategies through ``fedllm.flower.coordinator_strategy``, their state is
saved for ``--resume`` by ``fedllm.flower.strategy_state``, and the site-level ε is accounted in
``fedllm.coordinator.central_dp``.

Central (site-level) DP, optional (``central-dp.enabled``; docs/notes/dp-lora.md §3.1–3.2): the strategy is
wrapped in Flower's own ``DifferentialPrivacyServerSideFixedClipping`` or
``...ServerSideAdaptiveClipping``. Each site's update *relative to the global adapter it was sent*
(``configure_train`` stores it) is clipped to L2 norm S over all exchanged tensors (the B tensors
under FFA-LoRA), the clipped updates are averaged, and Gaussian noise of std z·S/m is added to the
mean. Unit of privacy: one site; the ε is :func:`fedllm.privacy.site_level.site_level_epsilon`
(q = 1: Flower samples a fixed number of sites, so there is no amplification). Server-side
clipping protects against whoever sees the *global* adapter (sites, the exported adapter), not
against the coordinator, which sees every site's individual (record-level DP) update.

fedllm adapts the wrappers in six small ways (:class:`_SiteLevelDP`), because as shipped in
Flower 1.42 they would not give the guarantee fedllm reports:

* **Equal weights.** The wrappers average with the inner strategy's weights, but the noise
  z·S/m is calibrated to an *unweighted* mean (sensitivity S/m). The train replies handed to the
  wrapper carry ``num-examples = 1`` (the history keeps the true counts, copied at triage).
* **A fixed denominator: m is the number of sites asked.** As shipped, FedAvg divides by the
  number of replies while the wrapper's noise uses ``num_sampled_clients``; setting either to the
  number of *accepted* replies makes the mechanism depend on the data: which sites refused for
  their budget or were rejected by screening would change the denominator, and the per-coordinate
  noise std z·S/m would be readable from consecutive global adapters (5 vs 4 updates: 0.20 vs
  0.25 for z·S = 1). Here m is the number of sites the round *asked* (the strategy's own sampled
  set, counted in ``configure_train``: the plan, never the replies). A site that was asked and
  sent nothing usable (missing, failed, refused, rejected) counts as a zero update: the clipped
  updates that did arrive are summed and divided by m (``current + (k/m)·mean_k``), and the noise
  is z·S/m whatever k is. Under the zero-out relation (one site's update replaced by zero) every
  round is then one Gaussian mechanism with multiplier z and a data-independent shape.
* **A round with no update still releases.** When every asked site is missing, the round
  releases the global adapter plus noise of std z·S/m, exactly as if the k = 0 updates were
  averaged: releasing nothing instead would make *whether* a round released depend on the data
  (a neighbour in which one site's update is zeroed out could then produce an output the real
  run never can, an unbounded privacy loss).
* **Tensor order.** The wrappers pair reply and global tensors by position; replies are
  re-keyed in the global adapter's order first.
* **Adaptive clipping, direction** (Flower 1.42 bug): the wrapper counts the updates that *were
  clipped* and then applies Andrew et al.'s rule C ← C·exp(−η(b̃ − γ)), which expects the fraction
  *not* clipped, so C shrinks when every update is clipped (measured: 0.1 → 0.061 in 5 rounds for
  updates of norm 2). :meth:`SiteLevelAdaptiveClipping._noisy_fraction` returns the unclipped
  fraction (the count noise is symmetric, so its distribution is unchanged), over the m sites
  asked (a missing site's zero update is not clipped), not over the replies.
* **Adaptive clipping, noise scale** (Flower 1.42 bug): the wrapper updates C *before* adding the
  noise, so the noise is scaled by next round's C instead of the C the updates were clipped to;
  when C shrinks that is too little noise. The noise here uses the round's own C.

The clipped-count noise of adaptive clipping is σ_b = max(m/20, z): Flower's default m/20
(Andrew et al.) is below z/2 for cross-silo m (5 sites: 0.25) and then cannot keep the total
noise multiplier at z; with σ_b ≥ z the update noise is z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) ≤ 1.155·z.
The wrappers draw from NumPy's global generator; it is reseeded from 256 bits of OS entropy
before every aggregation, so no configuration seed can make the noise reproducible (it is still
not a cryptographically secure generator, like the sites' noise).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from fedllm import wire
from fedllm.config import CentralDPConfig, StrategyConfig

log = logging.getLogger(__name__)


def build_strategy(config: StrategyConfig) -> FedAvg:
    """The configured Flower strategy; minimums of 1 so a 1-site federation never hangs.

    ``strategy.min-available-sites`` is waited for once, before round 0 (``rounds._wait_for_sites``);
    Flower's own ``min_available_nodes`` (checked every round, forever) is only ``min-train-sites``,
    so a site that crashed does not block the next round until it comes back."""
    common: dict[str, Any] = dict(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_train_sites,
        min_evaluate_nodes=config.min_evaluate_sites,
        min_available_nodes=config.min_train_sites,
        weighted_by_key=wire.NUM_EXAMPLES,
        arrayrecord_key=wire.ARRAYS,
        configrecord_key=wire.CONFIG,
    )
    if config.name == "fedprox":
        return FedProx(proximal_mu=config.proximal_mu, **common)
    if config.name == "fedadam":
        return FedAdam(eta=config.server_learning_rate, beta_1=config.beta_1, beta_2=config.beta_2,
                       tau=config.tau, **common)
    return FedAvg(**common)


# --------------------------------------------------------------------------------------------
# central (site-level) DP


def clipped_count_stddev(*, noise_multiplier: float, sites_per_round: int) -> float:
    """σ_b of adaptive clipping's noisy clipped count: max(m/20, z) (see the module docstring)."""
    return max(sites_per_round / 20, noise_multiplier)


def with_central_dp(strategy: FedAvg, config: CentralDPConfig, *, sites_per_round: int) -> Strategy:
    """``strategy`` wrapped in Flower's server-side DP wrapper for ``config.clipping``.

    ``sites_per_round`` (m, Flower's sample size) sizes adaptive clipping's count noise; the update
    noise is recalibrated to the number of updates actually averaged in every round. z = 0 is
    accepted here (clipping without noise, for tests); the run configuration requires z > 0.
    """
    if isinstance(strategy, FedAdam):
        raise ValueError("central DP needs a FedAvg aggregate (fedavg or fedprox), not FedAdam's server step")
    z = config.noise_multiplier
    if config.clipping == "adaptive":
        return SiteLevelAdaptiveClipping(
            strategy, z, sites_per_round,
            initial_clipping_norm=config.clipping_norm,
            target_clipped_quantile=config.target_quantile,
            clip_norm_lr=config.clip_norm_lr,
            clipped_count_stddev=clipped_count_stddev(noise_multiplier=z, sites_per_round=sites_per_round),
        )
    return SiteLevelFixedClipping(strategy, z, config.clipping_norm, sites_per_round)


class _SiteLevelDP:
    """What fedllm adds to Flower's server-side DP wrappers (mixed in before them; see the module
    docstring): equal weights, m = the sites asked (missing ones count as zero updates), a release
    in every round that asked anyone, tensor order, fresh noise seed, and the round's clipping norm
    and site count kept for the history."""

    current_arrays: ArrayRecord
    clipping_norm: float
    num_sampled_clients: int
    noise_multiplier: float

    def _init_round_state(self) -> None:
        self.round_clipping_norm: float = self.clipping_norm  # S_t of the last aggregated round
        self.round_sites: int = 0  # m_t of the last aggregated round: the sites asked (the denominator)
        self.round_updates: int = 0  # k_t: the updates that arrived and were summed
        self.asked: int = 0  # sites asked by the last configure_train (the plan)
        self._scale: float = 1.0  # k/m for the round being aggregated

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self.asked = len(messages)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        received = list(replies)
        if self.asked < 1:
            raise ValueError(f"round {server_round}: aggregate_train before configure_train asked any site")
        if len(received) > self.asked:
            raise ValueError(f"round {server_round}: {len(received)} updates for {self.asked} sites asked")
        order = list(self.current_arrays.keys())
        for reply in received:
            _prepare_for_dp_mean(reply, order)
        m = self.asked
        # Flower checks the replies against num_sampled_clients (and warns of a mismatch): the k that
        # arrived here; the noise below is z·S/m with m from the plan (_add_noise_to_aggregated_arrays)
        self.num_sampled_clients = max(1, len(received))
        self.round_clipping_norm = self.clipping_norm
        self.round_sites, self.round_updates = m, len(received)
        self._scale = len(received) / m
        np.random.seed(os_entropy_seed())
        if not received:  # nobody sent a usable update: the release is the zero sum plus the same noise
            if isinstance(self, DifferentialPrivacyServerSideAdaptiveClipping):
                self._geometric_update(self._noisy_fraction(0, 0))
            current = ArrayRecord({k: Array(np.array(v.numpy(), copy=True)) for k, v in self.current_arrays.items()})
            return self._add_noise_to_aggregated_arrays(current), None
        # a mixin: the Flower DP wrapper after it in the MRO has aggregate_train, mypy cannot see it
        return super().aggregate_train(server_round, received)  # type: ignore[misc]

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        """current + (k/m)·(mean of the k clipped updates) = the sum over the m sites asked / m,
        then Flower's noise z·S/m (``num_sampled_clients`` = m)."""
        if self._scale != 1.0:
            scaled = {}
            for key, value in aggregated.items():
                now = self.current_arrays[key].numpy()
                mean = value.numpy()
                scaled[key] = Array(np.asarray(now + (mean - now) * self._scale, dtype=mean.dtype))
            aggregated = ArrayRecord(scaled)
        self.num_sampled_clients = self.round_sites  # the noise: z·S/m, m = the sites asked, whatever arrived
        return super()._add_noise_to_aggregated_arrays(aggregated)  # type: ignore[misc]

    @property
    def noise_stddev(self) -> float:
        """Std of the noise added to the last round's release: z_update · S_t / m_t (m_t: sites asked)."""
        return self.noise_multiplier * self.round_clipping_norm / max(1, self.round_sites)


def os_entropy_seed() -> np.ndarray:
    """A seed from the OS entropy pool for numpy's global generator, which Flower's DP wrappers draw
    their noise from: reseeded every round, so no one can reproduce the noise from earlier draws."""
    return np.frombuffer(os.urandom(32), dtype=np.uint32)


def _prepare_for_dp_mean(reply: Message, order: list[str]) -> None:
    """Equal weight (num-examples = 1) and the global adapter's tensor order, in place."""
    if wire.ARRAYS in reply.content and order:
        record = reply.content[wire.ARRAYS]
        reply.content[wire.ARRAYS] = ArrayRecord({k: record[k] for k in order})
    if wire.METRICS in reply.content:
        record = reply.content[wire.METRICS]
        if not isinstance(record, MetricRecord):
            raise TypeError(f"record {wire.METRICS!r} is a {type(record).__name__}, expected a MetricRecord")
        metrics = dict(record)
        metrics[wire.NUM_EXAMPLES] = 1
        reply.content[wire.METRICS] = MetricRecord(metrics)


class SiteLevelFixedClipping(_SiteLevelDP, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping (norm S every round) with fedllm's adaptations."""

    def __init__(self, strategy: Strategy, noise_multiplier: float, clipping_norm: float,
                 num_sampled_clients: int) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self._init_round_state()


class SiteLevelAdaptiveClipping(_SiteLevelDP, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping (Andrew et al. 2021) with fedllm's adaptations and
    its two fixes: C moves toward the ``target_clipped_quantile`` of update norms (the fraction of
    updates left unclipped), and the noise uses the C the round was clipped to."""

    def __init__(self, strategy: Strategy, noise_multiplier: float, num_sampled_clients: int, *,
                 initial_clipping_norm: float, target_clipped_quantile: float, clip_norm_lr: float,
                 clipped_count_stddev: float) -> None:
        super().__init__(strategy, noise_multiplier, num_sampled_clients, initial_clipping_norm,
                         target_clipped_quantile, clip_norm_lr, clipped_count_stddev)
        self._init_round_state()

    def _noisy_fraction(self, count: int, total: int) -> float:
        # Flower passes the number of updates that were clipped and the number of replies; the rule
        # wants the fraction not clipped, over the m sites asked (a missing site's zero update is
        # not clipped), so that neither the fraction nor C depends on how many replies arrived.
        return 1.0 - super()._noisy_fraction(count, self.round_sites)

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        next_norm = self.clipping_norm
        self.clipping_norm = self.round_clipping_norm
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)
        finally:
            self.clipping_norm = next_norm
