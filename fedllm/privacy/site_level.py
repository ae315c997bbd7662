"""Site-level ε of central DP (DP-FedAvg): the guarantee for one whole site, not one record.

The record-level accounting of a site's own DP-SGD is :mod:`fedllm.privacy.accounting`; this
module accounts the server's noisy aggregate instead (docs/notes/dp-lora.md §3.1).

Assumptions (see :func:`site_level_epsilon` for the details):

* **Unit of privacy.** One *site* (all its records); zero-out relation (one site's clipped update
  replaced by none; the number of sampled sites m is public).
* **Mechanism.** Each round the server clips every sampled site's update to S, averages the m
  clipped updates and adds Gaussian noise of standard deviation ``noise_multiplier`` · S / m.
* **No amplification.** Flower samples a fixed number of sites, not Poisson, so every round is
  accounted with q = 1 (exact when all sites take part, an upper bound otherwise).
* **Accountant.** The same PRV/RDP accountants as record-level ε (:func:`~fedllm.privacy.accounting.epsilon_for`).
"""

from __future__ import annotations

import numbers
import warnings

from fedllm.privacy.accounting import DPEvent, PrivacyParameterError, epsilon_for

SITE_SAMPLING = ("all", "fixed-subset")


def site_level_epsilon(
    *,
    noise_multiplier: float,
    sites_per_round: int,
    total_sites: int,
    rounds: int,
    target_delta: float,
    accountant: str = "prv",
    sampling: str = "fixed-subset",
) -> float:
    """Site-level ε of central DP (DP-FedAvg) after ``rounds`` noisy aggregates (docs/notes/dp-lora.md §3.1).

    Unit of privacy: one *site* (all its records). Each round the server clips every sampled
    site's update to S, averages the m = ``sites_per_round`` clipped updates and adds Gaussian
    noise of standard deviation ``noise_multiplier`` · S / m: a Gaussian mechanism with noise
    multiplier z under the zero-out relation (one site's contribution replaced by none; m public).
    Flower samples a *fixed number* of sites (``random.sample``), not Poisson, so there is no
    subsampling amplification: every round is accounted with q = 1, whatever
    ``total_sites`` is (``sampling="fixed-subset"``). That is exact when all sites take part
    every round (``sampling="all"``) and an upper bound otherwise. Adaptive clipping is covered
    when z is its *total* noise multiplier (update and clipped-count noise together, §3.2).
    ``math.inf`` if ``noise_multiplier == 0`` and ``rounds > 0``; 0.0 for no rounds.
    """
    if sampling not in SITE_SAMPLING:
        raise PrivacyParameterError(f"sampling must be one of {', '.join(SITE_SAMPLING)}; got {sampling!r}")
    for name, value, low in (("sites_per_round", sites_per_round, 1), ("total_sites", total_sites, 1),
                             ("rounds", rounds, 0)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
            raise PrivacyParameterError(f"{name} must be an integer >= {low}, got {value!r}")
    if sites_per_round > total_sites:
        raise PrivacyParameterError(f"sites_per_round ({sites_per_round}) exceeds total_sites ({total_sites})")
    if sampling == "all" and sites_per_round != total_sites:
        raise PrivacyParameterError(
            f"sampling='all' needs sites_per_round == total_sites (got {sites_per_round} of {total_sites})"
        )
    event = DPEvent(noise_multiplier, 1.0, int(rounds))  # q = 1: no amplification (validates σ)
    with warnings.catch_warnings():  # Opacus' PRV takes log(1 - q) = log(0) = -inf, as intended, at q = 1
        warnings.filterwarnings("ignore", message="divide by zero encountered in log", category=RuntimeWarning)
        return epsilon_for([event], target_delta=target_delta, accountant=accountant)
