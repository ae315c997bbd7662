"""The plain-language privacy statement: what a run's DP guarantees and what it does not.

The privacy report (:mod:`fedllm.reports.privacy_markdown`) and the model card
(:mod:`fedllm.reports.model_card`) print it word for word, so both are golden-tested against the
same text. Assumptions stated: record-level DP-SGD at each site (Poisson sampling, add/remove-one
neighbouring relation, one training record at one site as the unit of privacy, each round's
adapter update released), composed over every release in the site's ledger; optionally
site-level (central) DP on the aggregate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedllm import wire
from fedllm.reports.numbers import format_epsilon, format_g, to_float

MEANINGLESS_SITE_EPSILON = 10.0  # a site-level ε above this is called meaningless


_MODE_BY_CODE = {code: mode for mode, code in wire.RELEASE_CODES.items()}
EXACT_METRICS_TEXT = ("number of training examples, train loss, examples seen, token count and training time, and "
                      "the held-out loss, perplexity, token and example counts")


def metrics_release_by_site(history: Mapping[str, Any], site_settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each site's ``release-metrics`` ("exact", "dp" or "none") as its replies in ``history`` state it
    (``wire.METRICS_RELEASE``; a reply without it came from a site that sent everything exact), else
    as ``site_settings`` (site → setting, a simulation's sites) says."""
    modes = dict(site_settings or {})
    for rnd in history.get("rounds", []):
        for part in ("train", "evaluate"):
            for name, metrics in rnd.get(part, {}).get("sites", {}).items():
                code = metrics.get(wire.METRICS_RELEASE)
                modes[name] = "exact" if code is None else _MODE_BY_CODE.get(int(code), "exact")
    return modes


def privacy_statement(*, accountant: str, sites_without_dp: Sequence[str] = (), all_without_dp: bool = False,
                      central_dp: Mapping[str, Any] | None = None,
                      metrics_release: Mapping[str, str] | None = None) -> str:
    """What is guaranteed and what is not, in Markdown; the same words in the report and the card.
    ``metrics_release``: each site's ``release-metrics`` (:func:`metrics_release_by_site`); None:
    not known, every site's metrics are stated as exact."""
    lines = ["**What is guaranteed.** "]
    if all_without_dp:
        lines[0] += ("Nothing. Differential privacy was off (noise multiplier σ = 0) for the releases of every "
                     "site, so no differential-privacy guarantee holds for this run, and none can hold for any "
                     "later release on the same data (an ∞ in a ledger is permanent).")
    else:
        enforced = ("the Opacus PRV accountant's upper bound" if accountant == "prv"
                    else "the Opacus RDP accountant (Balle et al. 2020 conversion)")
        lines[0] += (
            "For each site, the adapter updates it released, over every round of every run recorded in its "
            "privacy ledger, are (ε, δ)-differentially private with the ε and δ given for that site. In plain "
            "words: adding or removing any one training record of that site changes the probability of anything "
            "that can be learnt from those updates by at most a factor e^ε, except with probability δ. This "
            "holds against anyone who sees the updates, the coordinator included, and for everything computed "
            "from them (the aggregated and exported adapter, checkpoints, other sites' later training).")
        if sites_without_dp:
            lines[0] += (" It does **not** hold for " + ", ".join(f"`{s}`" for s in sites_without_dp)
                         + ": a release without noise (σ = 0) is in its ledger, so its ε is ∞.")
        lines += [
            "",
            "* Unit of privacy: one training record (one sequence) at one site.",
            "* Neighbouring datasets: one record added or removed.",
            "* Mechanism: DP-SGD at every local step: Poisson sampling at rate q, each record's gradient clipped "
            "to norm C, Gaussian noise of standard deviation σ·C added to the sum.",
            "* Composition: every release in the site's ledger, across rounds and runs on the same data.",
            f"* Accounting: {enforced}, the value enforced against the cap; RDP and Google dp-accounting's PLD "
            "accountant are independent cross-checks.",
        ]
    lines += [
        "",
        "**What is not guaranteed.**",
        "",
        "* A person with many records. The guarantee is per record; a person with k records is protected only "
        "through group privacy, which degrades roughly linearly: about k·ε, with δ growing to k·e^((k−1)ε)·δ.",
        "* Site-level inference: whether a site (a hospital, a bank) took part, how much data it has, or its "
        "aggregate statistics. Record-level DP does not hide these. " + _central_dp_sentence(central_dp),
        *_metrics_lines(metrics_release),
        "* The base model and what it already contains.",
        "* Anything outside the released updates: the sites' data files, ledgers, logs and output folders; side "
        "channels such as timing and message sizes; the security of the machines and of the network; the "
        "random number generator (torch's standard one, not cryptographically secure).",
    ]
    return "\n".join(lines) + "\n"


def _metrics_lines(modes: Mapping[str, str] | None) -> list[str]:
    """What the sites' metrics leave unprotected, by their release-metrics."""
    if modes is None:
        return ["* The metrics each site sends with its update: number of training examples, train loss, examples "
                "seen, token count and training time are exact, not noised.",
                "* Held-out records and the evaluation metrics computed on them (eval loss, perplexity, token and "
                "example counts)."]

    def named(mode: str) -> str:
        return ", ".join(f"`{site}`" for site in sorted(modes) if modes[site] == mode)

    lines = []
    if named("exact"):
        lines.append(f"* The metrics of {named('exact')} (release-metrics = \"exact\", written in the site's own "
                     f"file): {EXACT_METRICS_TEXT} left these sites exact, computed on their records and **not "
                     "protected** by any differential-privacy guarantee.")
    if named("dp"):
        lines.append(f"* Nothing is exempt for {named('dp')} (release-metrics = \"dp\"): no exact train metric "
                     "left them (ε, σ and the sample rate q do, and q = batch size / number of training records); "
                     "their held-out loss left only through the Gaussian mechanism and is part of their ε above.")
    if named("none"):
        lines.append(f"* {named('none')} (release-metrics = \"none\") sent no metric beyond aggregation's weight.")
    return lines


def _central_dp_sentence(central_dp: Mapping[str, Any] | None) -> str:
    if not central_dp or not central_dp.get("enabled"):
        return "Central (site-level) DP was not used in this run."
    eps = to_float(central_dp.get("epsilon"))
    text = (f"Central DP was on: the aggregated adapter is ({format_epsilon(eps)}, {format_g(central_dp.get('delta'))})-DP with "
            "respect to one whole site (the coordinator itself still sees each site's own update).")
    if eps > MEANINGLESS_SITE_EPSILON:
        text += f" This site-level ε = {format_epsilon(eps)} is too large to mean anything."
    return text

