"""The privacy report as people read it (``privacy-report.md``).

A pure function of the report dict that :func:`fedllm.reports.privacy_report.build_privacy_report`
returns (ε = ∞ as ``"inf"``): no clock, no file system, so the Markdown is golden-tested byte for
byte. Numbers are written by :mod:`fedllm.reports.numbers`; the closing statement of what is and
is not guaranteed is :func:`fedllm.reports.privacy_statement.privacy_statement`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedllm.reports.numbers import format_change, format_epsilon, format_g, format_list, to_float
from fedllm.reports.privacy_statement import privacy_statement


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown (deterministic: golden-tested byte for byte)."""
    sites, tol = report["sites"], report["tolerances"]
    rounds = f"{report['rounds-trained']}/{report['num-server-rounds']} rounds"
    out = [f"# Privacy report: run {report['run-id']}", "",
           f"Run `{report['run-id']}` ({report['status']}, {rounds}), base model `{report['base-model']}`, "
           f"{len(sites)} site{'s' if len(sites) != 1 else ''}. Record-level DP-SGD at each site: "
           f"{'on' if report['privacy-enabled'] else '**off** (privacy.enabled = false)'}; run cap ε = "
           f"{format_g(report['max-epsilon'])} (it can only tighten a site's own cap), run δ = "
           f"{format_g(report['target-delta'])} (each site's ε below is at the site's own δ), enforced accountant "
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
        out.append(f"| {s['site']} | {s['releases']} | {s['steps']} | {format_epsilon(e['prv'])} | "
                   f"{format_epsilon(e['rdp'])} | {format_epsilon(e['pld'])} | "
                   f"{format_change(s['discrepancy-prv-pld'])} | {format_g(s['target-delta'])} | "
                   f"{format_g(s['cap'])} | {format_epsilon(s['headroom'])} | "
                   f"{', '.join(str(r['round']) for r in s['refused-rounds']) or 'none'} | {ledger_word(s['ledger'])} |")
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
                              central_dp=report.get("central-dp"),
                              metrics_release={s["site"]: s["metrics-release"] for s in report["sites"]
                                               if s.get("metrics-release", "unknown") != "unknown"}).rstrip("\n"), ""]
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
            f"* **δ ≪ 1/n** when δ·n ≤ {format_g(tol['delta-times-n'])}, with n the site's number of training "
            "records.", ""]
    return "\n".join(out)


def _central_markdown(report: Mapping[str, Any]) -> list[str]:
    out = ["## Record-level and site-level guarantees", ""]
    sites = [s for s in report["sites"] if s["releases"]]
    finite = [s for s in sites if not s["no-dp"]]
    worst = max(finite, key=lambda s: to_float(s["epsilon"]["enforced"]), default=None)
    record = ("∞ (no DP)" if sites and not finite else
              f"{format_epsilon(worst['epsilon']['enforced'])} (site {worst['site']})" if worst else
              "0 (nothing released)")
    central = report.get("central-dp")
    out += ["| guarantee | protects | ε | δ | accountant |", "|---|---|---|---|---|",
            f"| record-level (DP-SGD at each site; worst site) | one training record at one site | {record} | "
            f"{format_g(report['target-delta'])} | {report['accountant'].upper()} |"]
    if not central or not central.get("enabled"):
        out += ["| site-level (central DP) | one whole site | not used | - | - |", "",
                "Central (site-level) DP was not used in this run: the guarantee is record-level only. Nothing bounds "
                "what can be inferred about a site as a whole (whether it took part, its aggregate statistics).", ""]
        return out
    out += [f"| site-level (central DP) | one whole site | {format_epsilon(central['epsilon'])} | "
            f"{format_g(central.get('delta'))} | {str(central.get('accountant', '?')).upper()} |", "",
            f"Central DP: {central.get('clipping', '?')} clipping "
            f"(initial norm {format_g(central.get('clipping-norm'))}), "
            f"noise multiplier {format_g(central.get('noise-multiplier'))}, {central.get('sites-per-round', '?')} of "
            f"{central.get('total-sites', '?')} sites per round ({central.get('sampling', '?')}), "
            f"{central.get('rounds', '?')} rounds. The site-level ε is as recorded by the coordinator.", ""]
    if central.get("meaningless"):
        out += [f"**Warning: this site-level ε ({format_epsilon(central['epsilon'])}) is too large to mean "
                "anything.** It does not stop anyone who sees the aggregated adapter from telling whether a site "
                "took part or learning its aggregate statistics. With few sites, server-side noise cannot give a "
                "useful site-level guarantee; the record-level guarantee above is the one that holds.", ""]
    return out


def _metrics_sentence(s: Mapping[str, Any]) -> str:
    """What the site's metrics let leave (its release-metrics) and its held-out releases."""
    mode, count = s.get("metrics-release", "unknown"), s.get("metric-releases", 0)
    paid = (f" {count} held-out release{'s' if count != 1 else ''} (Gaussian mechanism, q = 1, one step each) "
            f"{'are' if count != 1 else 'is'} in its ledger and in its ε." if count else "")
    if mode == "exact":
        return ("* Metrics: release-metrics = \"exact\": **exact, unprotected** train and held-out metrics left this "
                "site (train loss, examples seen, tokens, seconds, held-out loss, perplexity, counts)." + paid)
    if mode == "dp":
        return ("* Metrics: release-metrics = \"dp\": no exact train metric left this site; its held-out loss left "
                "only noised." + paid)
    if mode == "none":
        return "* Metrics: release-metrics = \"none\": nothing beyond aggregation's weight left this site." + paid
    return "* Metrics: not known (the site sent no reply in this run)." + paid


def _site_markdown(s: Mapping[str, Any], tol: Mapping[str, float]) -> list[str]:
    e, ledger = s["epsilon"], s["ledger"]
    earlier = s["releases"] - s["releases-this-run"]
    rounds = ", ".join(map(str, s["rounds-this-run"])) or "none"
    out = [f"### {s['site']}", ""]
    if not s["releases"] and not s.get("metric-releases"):
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
    out.append(f"* Steps: {s['steps']} in total. Sample rate q: {format_list(s['sample-rates'], '.4g')}. "
               f"Noise multiplier σ: {format_list(s['noise-multipliers'], '.4g')}. "
               f"Clipping norm C: {format_list(s['max-grad-norms'], 'g')}.")
    out.append(_metrics_sentence(s))
    verdict = ("δ ≪ 1/n" if s["delta-ok"] else
               f"**warning: δ is not ≪ 1/n** (δ·n > {format_g(tol['delta-times-n'])}); "
               f"choose δ well below 1/{s['num-examples']}")
    out.append(f"* δ = {format_g(s['target-delta'])}, n = {s['num-examples']} training records: δ·n = "
               f"{s['delta-times-n']:.2g}, {verdict}.")
    if s["no-dp"]:
        out.append("* ε = ∞ under every accountant: a release without noise (σ = 0) is in the ledger. "
                   "**No differential-privacy guarantee holds for this site.**")
    else:
        recorded = (f"recorded in the ledger {format_epsilon(e['recorded'])}, recomputed "
                    f"{'✓' if s['recompute-ok'] else '✗ (mismatch)'}"
                    if s["source"] == "ledger" else "recomputed from the reported metrics")
        out.append(f"* ε: PRV {format_epsilon(e['prv'])}{' (enforced)' if s['accountant'] == 'prv' else ''}, "
                   f"RDP {format_epsilon(e['rdp'])}{' (enforced)' if s['accountant'] == 'rdp' else ''}, "
                   f"PLD {format_epsilon(e['pld'])}; {recorded}. "
                   f"PRV vs PLD {format_change(s['discrepancy-prv-pld'])} "
                   f"({'within' if s['cross-check-ok'] else '**outside**'} tolerance).")
    cap_from = {"site": "the site's own", "ledger": "the site's, as recorded in its ledger",
                "history": "the site's, as it reported it", "run": "the run's: the site stated none"}
    cap = (f"* Cap ε = {format_g(s['cap'])} ({cap_from.get(s['cap-source'], s['cap-source'])}), at the site's own "
           f"δ = {format_g(s['target-delta'])}")
    if s["headroom"] is not None:
        cap += (f", headroom {format_epsilon(s['headroom'])}." if not s["over-cap"] else
                f": **ε is above the cap** by {format_epsilon(-to_float(s['headroom']))} "
                "(the cap may have been raised or lowered between runs).")
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


def ledger_word(ledger: Mapping[str, Any]) -> str:
    """The ledger's state in a word or two (the summary table, and ``fedllm audit``'s console line)."""
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

