"""The privacy report as people read it: Markdown and a PNG plot, plus the plain-language privacy
statement (:func:`privacy_statement`), which the model card repeats word for word.

Pure functions of the report dict that :func:`fedllm.reports.privacy_report.build_privacy_report` returns
(ε = ∞ as ``"inf"``): no clock, no file system except the PNG's own atomic write, so the Markdown
is golden-tested byte for byte. matplotlib is imported inside :func:`write_epsilon_plot`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedllm.files import write_bytes_atomic

MEANINGLESS_SITE_EPSILON = 10.0  # a site-level ε above this is called meaningless
PLOT_SIZE = (8.0, 4.5)  # inches, at PLOT_DPI: 800 × 450 pixels
PLOT_DPI = 100


# --------------------------------------------------------------------------------------------
# the plain-language statement (shared with the model card)


def privacy_statement(*, accountant: str, sites_without_dp: Sequence[str] = (), all_without_dp: bool = False,
                      central_dp: Mapping[str, Any] | None = None) -> str:
    """What is guaranteed and what is not, in Markdown; the same words in the report and the card."""
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
        "* The metrics each site sends with its update: number of training examples, train loss, examples seen, "
        "token count and training time are exact, not noised.",
        "* Held-out records and the evaluation metrics computed on them (eval loss, perplexity, token and example "
        "counts).",
        "* The base model and what it already contains.",
        "* Anything outside the released updates: the sites' data files, ledgers, logs and output folders; side "
        "channels such as timing and message sizes; the security of the machines and of the network; the "
        "random number generator (torch's standard one, not cryptographically secure).",
    ]
    return "\n".join(lines) + "\n"


def _central_dp_sentence(central_dp: Mapping[str, Any] | None) -> str:
    if not central_dp or not central_dp.get("enabled"):
        return "Central (site-level) DP was not used in this run."
    eps = _float(central_dp.get("epsilon"))
    text = (f"Central DP was on: the aggregated adapter is ({_eps(eps)}, {_g(central_dp.get('delta'))})-DP with "
            "respect to one whole site (the coordinator itself still sees each site's own update).")
    if eps > MEANINGLESS_SITE_EPSILON:
        text += f" This site-level ε = {_eps(eps)} is too large to mean anything."
    return text


# --------------------------------------------------------------------------------------------
# Markdown


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown (deterministic: golden-tested byte for byte)."""
    sites, tol = report["sites"], report["tolerances"]
    rounds = f"{report['rounds-trained']}/{report['num-server-rounds']} rounds"
    out = [f"# Privacy report: run {report['run-id']}", "",
           f"Run `{report['run-id']}` ({report['status']}, {rounds}), base model `{report['base-model']}`, "
           f"{len(sites)} site{'s' if len(sites) != 1 else ''}. Record-level DP-SGD at each site: "
           f"{'on' if report['privacy-enabled'] else '**off** (privacy.enabled = false)'}; run cap ε = "
           f"{_g(report['max-epsilon'])}, δ = {_g(report['target-delta'])}, enforced accountant "
           f"{report['accountant'].upper()}.", ""]
    if report.get("stopped-early"):
        out += [f"Stopped early: {report['stopped-early']}.", ""]
    if report["ok"]:
        out += ["**Audit result: every check passed.** Every ledger verified, every recorded ε matched its "
                "recomputation, and the enforced accountant agreed with the independent one.", ""]
    else:
        out += ["**Audit result: FAILED.** The problems:", ""] + [f"* {p}" for p in report["problems"]] + [""]
    if sites and all(s["no-dp"] for s in sites):
        out += ["**No differential-privacy guarantee holds for this run:** every site released updates without "
                "noise (ε = ∞).", ""]
    out += ["## Summary", "",
            "| site | releases | steps | ε PRV | ε RDP | ε PLD (dp-accounting) | PRV vs PLD | δ | cap | headroom "
            "| refused rounds | ledger |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sites:
        e = s["epsilon"]
        out.append(f"| {s['site']} | {s['releases']} | {s['steps']} | {_eps(e['prv'])} | {_eps(e['rdp'])} | "
                   f"{_eps(e['pld'])} | {_pct(s['discrepancy-prv-pld'])} | {_g(s['target-delta'])} | {_g(s['cap'])} | "
                   f"{_eps(s['headroom']) if s['headroom'] is not None else '-'} | "
                   f"{', '.join(str(r['round']) for r in s['refused-rounds']) or 'none'} | {_ledger_word(s['ledger'])} |")
    out += ["", "ε is each site's total over every release in its ledger (all rounds of all runs on the same data), "
            "at the δ shown. PRV is the enforced value (Opacus PRV accountant, upper bound); RDP is a looser, "
            "conservative second opinion; PLD is Google dp-accounting's accountant, an independent implementation. "
            "Headroom = cap − enforced ε.", ""]
    out += _central_markdown(report)
    out += ["## Per site", ""]
    for s in sites:
        out += _site_markdown(s, tol)
    out += ["## What this guarantees", "",
            privacy_statement(accountant=report["accountant"],
                              sites_without_dp=[s["site"] for s in sites if s["no-dp"]],
                              all_without_dp=bool(sites) and all(s["no-dp"] for s in sites),
                              central_dp=report.get("central-dp")).rstrip("\n"), ""]
    out += ["## How the numbers were computed", "",
            "* **PRV** (enforced unless the run chose RDP): Opacus `PRVAccountant`, reporting its upper bound "
            "(estimate + discretisation margin, 0.01 unless widened for very long histories).",
            "* **RDP**: Opacus RDP of the sampled Gaussian mechanism (Mironov, Talwar & Zhang 2019), orders up to "
            "1024, converted with Balle et al. 2020.",
            "* **PLD**: Google `dp-accounting`, `PLDAccountant` with `PoissonSampledDpEvent(q, GaussianDpEvent(σ))` "
            "self-composed once per step, add/remove-one relation, discretisation chosen so its error stays below "
            "≈0.1% of ε.",
            f"* **PRV vs PLD** = (PRV − PLD) / PLD. The check passes when PRV is within ±{tol['cross-check']:.0%} "
            "of PLD, plus PRV's discretisation margin above it (at small ε that margin alone is several percent).",
            f"* **Recorded vs recomputed**: each ledger's last cumulative ε must equal its recomputation from the "
            f"recorded (σ, q, steps) within a relative {tol['recompute']:g}; the ε each site reported to the "
            "coordinator in each round must equal its ledger entry.",
            f"* **δ ≪ 1/n** when δ·n ≤ {_g(tol['delta-times-n'])}, with n the site's number of training records.", ""]
    return "\n".join(out)


def _central_markdown(report: Mapping[str, Any]) -> list[str]:
    out = ["## Record-level and site-level guarantees", ""]
    sites = [s for s in report["sites"] if s["releases"]]
    finite = [s for s in sites if not s["no-dp"]]
    worst = max(finite, key=lambda s: _float(s["epsilon"]["enforced"]), default=None)
    record = ("∞ (no DP)" if sites and not finite else
              f"{_eps(worst['epsilon']['enforced'])} (site {worst['site']})" if worst else "0 (nothing released)")
    central = report.get("central-dp")
    out += ["| guarantee | protects | ε | δ | accountant |", "|---|---|---|---|---|",
            f"| record-level (DP-SGD at each site; worst site) | one training record at one site | {record} | "
            f"{_g(report['target-delta'])} | {report['accountant'].upper()} |"]
    if not central or not central.get("enabled"):
        out += ["| site-level (central DP) | one whole site | not used | - | - |", "",
                "Central (site-level) DP was not used in this run: the guarantee is record-level only. Nothing bounds "
                "what can be inferred about a site as a whole (whether it took part, its aggregate statistics).", ""]
        return out
    out += [f"| site-level (central DP) | one whole site | {_eps(central['epsilon'])} | {_g(central.get('delta'))} | "
            f"{str(central.get('accountant', '?')).upper()} |", "",
            f"Central DP: {central.get('clipping', '?')} clipping (initial norm {_g(central.get('clipping-norm'))}), "
            f"noise multiplier {_g(central.get('noise-multiplier'))}, {central.get('sites-per-round', '?')} of "
            f"{central.get('total-sites', '?')} sites per round ({central.get('sampling', '?')}), "
            f"{central.get('rounds', '?')} rounds. The site-level ε is as recorded by the coordinator.", ""]
    if central.get("meaningless"):
        out += [f"**Warning: this site-level ε ({_eps(central['epsilon'])}) is too large to mean anything.** It does "
                "not stop anyone who sees the aggregated adapter from telling whether a site took part or learning "
                "its aggregate statistics. With few sites, server-side noise cannot give a useful site-level "
                "guarantee; the record-level guarantee above is the one that holds.", ""]
    return out


def _site_markdown(s: Mapping[str, Any], tol: Mapping[str, float]) -> list[str]:
    e, ledger = s["epsilon"], s["ledger"]
    earlier = s["releases"] - s["releases-this-run"]
    rounds = ", ".join(map(str, s["rounds-this-run"])) or "none"
    out = [f"### {s['site']}", ""]
    if not s["releases"]:
        refused = "; ".join(f"round {r['round']}: {r['reason'].rstrip('.')}" for r in s["refused-rounds"])
        return out + ["* Nothing released from this site's data: ε = 0.",
                      f"* Refused rounds: {refused or 'none'}.",
                      f"* Ledger: {_ledger_sentence(s['ledger'])}",
                      *[f"* **Problem:** {p}." for p in s["problems"]], ""]
    source = "" if s["source"] == "ledger" else " (from the metrics the site sent in this run: no ledger)"
    runs = s["runs"] - (1 if s["releases-this-run"] else 0)
    before = "none from earlier runs" if not earlier else f"{earlier} from {runs} earlier run{'s' if runs != 1 else ''}"
    out.append(f"* Releases: {s['releases']}{source}; {s['releases-this-run']} in this run (rounds {rounds}), "
               f"{before}.")
    out.append(f"* Steps: {s['steps']} in total. Sample rate q: {_list(s['sample-rates'], '.4g')}. Noise multiplier "
               f"σ: {_list(s['noise-multipliers'], '.4g')}. Clipping norm C: {_list(s['max-grad-norms'], 'g')}.")
    verdict = ("δ ≪ 1/n" if s["delta-ok"] else
               f"**warning: δ is not ≪ 1/n** (δ·n > {_g(tol['delta-times-n'])}); choose δ well below 1/{s['num-examples']}")
    out.append(f"* δ = {_g(s['target-delta'])}, n = {s['num-examples']} training records: δ·n = "
               f"{s['delta-times-n']:.2g}, {verdict}.")
    if s["no-dp"]:
        out.append("* ε = ∞ under every accountant: a release without noise (σ = 0) is in the ledger. "
                   "**No differential-privacy guarantee holds for this site.**")
    else:
        recorded = (f"recorded in the ledger {_eps(e['recorded'])}, recomputed "
                    f"{'✓' if s['recompute-ok'] else '✗ (mismatch)'}"
                    if s["source"] == "ledger" else "recomputed from the reported metrics")
        out.append(f"* ε: PRV {_eps(e['prv'])}{' (enforced)' if s['accountant'] == 'prv' else ''}, "
                   f"RDP {_eps(e['rdp'])}{' (enforced)' if s['accountant'] == 'rdp' else ''}, "
                   f"PLD {_eps(e['pld'])}; {recorded}. PRV vs PLD {_pct(s['discrepancy-prv-pld'])} "
                   f"({'within' if s['cross-check-ok'] else '**outside**'} tolerance).")
    cap = f"* Cap ε = {_g(s['cap'])} ({'the site' if s['cap-source'] == 'site' else 'the run'}'s)"
    if s["headroom"] is not None:
        cap += (f", headroom {_eps(s['headroom'])}." if not s["over-cap"] else
                f": **ε is above the cap** by {_eps(-_float(s['headroom']))} (the cap may have been raised or "
                "lowered between runs).")
    out.append(cap if s["headroom"] is not None else cap + ".")
    refused = "; ".join(f"round {r['round']}: {r['reason'].rstrip('.')}" for r in s["refused-rounds"])
    out.append(f"* Refused rounds: {refused or 'none'}.")
    if s["rejected-rounds"]:
        out.append("* Updates rejected by the coordinator (the spend still counts): "
                   + "; ".join(f"round {r['round']}: {r['reason'].rstrip('.')}" for r in s["rejected-rounds"]) + ".")
    out.append(f"* Ledger: {_ledger_sentence(ledger)}")
    for p in s["problems"]:
        out.append(f"* **Problem:** {p}.")
    return out + [""]


def _ledger_word(ledger: Mapping[str, Any]) -> str:
    if not ledger["found"]:
        return "missing"
    if not ledger["ok"]:
        return "**FAILED**"
    return "verified, signed" if ledger["signature-checked"] else "verified" + (", signed" if ledger["signed"] else "")


def _ledger_sentence(ledger: Mapping[str, Any]) -> str:
    if not ledger["found"]:
        return f"`{ledger['path']}` not found."
    chain = ("hash chain intact" if ledger["ok"] else
             "**fails verification**" + (f" at entry {ledger['first-bad-entry']} (1-based)"
                                         if ledger["first-bad-entry"] else ""))
    if ledger["signature-checked"]:
        signature = "signed, signature checked against the given public key"
    elif ledger["signed"]:
        signature = "signed, signature not checked against a key given by you (pass --public-key SITE=PEM)"
    else:
        signature = "unsigned"
    fingerprint = f"dataset fingerprint `{ledger['dataset-fingerprint']}`" if ledger["dataset-fingerprint"] else \
        "no dataset fingerprint"
    return f"`{ledger['path']}`, {ledger['entries']} entries, {chain}, {signature}, {fingerprint}."


# --------------------------------------------------------------------------------------------
# plot


def write_epsilon_plot(report: Mapping[str, Any], path: Path | str) -> Path:
    """PNG of each site's cumulative ε after each round of this run, with the caps (800 × 450 px).

    The points are the cumulative ε recorded in the ledgers (their last value is checked against
    a recomputation in the report). Sites without DP (ε = ∞) are listed in the title instead.
    """
    try:  # the Agg canvas directly: no pyplot, no global backend switch, no GUI
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ImportError(f"the ε plot needs matplotlib: pip install 'matplotlib>=3.8' ({exc})") from exc
    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    no_dp = []
    for s in report["sites"]:
        points = [(p["round"], _float(p["epsilon"])) for p in s["epsilon-per-round"]]
        if any(math.isinf(v) for _, v in points) or s["no-dp"]:
            no_dp.append(s["site"])
            continue
        if points:
            first = points[0][0] - 1
            xs, ys = [first] + [x for x, _ in points], [_float(s["epsilon-before-run"])] + [y for _, y in points]
            ax.plot(xs, ys, marker="o", label=s["site"])
    caps: dict[float, list[str]] = {}
    for s in report["sites"]:
        if s["epsilon-per-round"] and not s["no-dp"]:
            caps.setdefault(float(s["cap"]), []).append(s["site"])
    for cap, names in sorted(caps.items()):
        ax.axhline(cap, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"cap {cap:g}" + ("" if len(caps) == 1 else f" ({', '.join(names)})"), (0, cap),
                    xycoords=("axes fraction", "data"), xytext=(4, 3), textcoords="offset points", fontsize=7,
                    color="grey")
    central = report.get("central-dp") or {}
    per_round = central.get("per-round") if central.get("enabled") else None
    if per_round:
        ax.plot([p["round"] for p in per_round], [_float(p["epsilon"]) for p in per_round], color="black",
                linestyle="--", label="site-level ε (central DP)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("server round")
    ax.set_ylabel("cumulative ε (record-level, per site)")
    title = f"Run {report['run-id']}: cumulative ε per site after each round"
    if no_dp:
        title += f"\nno DP (ε = ∞): {', '.join(no_dp)}"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PLOT_DPI)
    write_bytes_atomic(path, buffer.getvalue())
    return path


# --------------------------------------------------------------------------------------------
# small helpers

def _float(value: Any) -> float:
    if value is None:
        return math.nan
    return math.inf if value == "inf" else float(value)


def _eps(value: Any) -> str:
    v = _float(value)
    return "∞" if math.isinf(v) else "-" if math.isnan(v) else f"{v:.3f}"


def _g(value: Any) -> str:
    return "-" if value is None else format(value, "g") if isinstance(value, (int, float)) else str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def _list(values: Sequence[float], spec: str) -> str:
    return ", ".join(format(v, spec) for v in values) if values else "-"
