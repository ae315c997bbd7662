"""The canary audit's report (``canary-audit.md``) and its console summary: pure functions of the
report dictionary that :func:`fedllm.audit.canary_run.run_canary_audit` builds (golden-tested).

Every privacy statement here says what was measured, under which mechanism, and what the
measurement can and cannot show; numbers carry their confidence and sample sizes.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from fedllm.reports.numbers import format_epsilon

_eps = partial(format_epsilon, digits=2)  # ε in this report: 2 decimals, ∞ as ∞


def _mechanism_line(mech: dict[str, Any]) -> str:
    common = (f"{mech['steps']} steps, batch {mech['batch_size']} of {mech['num_examples']} records "
              f"(q = {mech['sample_rate']:.4g}), C = {mech['max_grad_norm']:g}")
    if mech["kind"] == "dp-sgd":
        return (f"DP-SGD with σ = {mech['noise_multiplier']:.4g}, {common}: theoretical "
                f"ε = {_eps(mech['epsilon_theory'])} at δ = {mech['target_delta']:g} (PRV accountant).")
    if mech["kind"] == "clipping-only":
        return (f"clipping without noise (--no-noise, σ = 0), {common}: no DP guarantee (ε = ∞), although "
                f"the run configuration claims ε = {_eps(mech['claimed_epsilon'])}.")
    return f"no DP (privacy.enabled = false: no clipping, no noise), {common}: ε = ∞."


def verdict_line(report: dict[str, Any]) -> str:
    """One sentence: flagged or not, and what that means for this mechanism."""
    verdict, mech = report["verdict"], report["mechanism"]
    if verdict["flagged"]:
        if verdict["violation"]:
            return ("FLAGGED: the empirical lower bound exceeds the theoretical ε; the privacy accounting does "
                    "not hold for this training run. Do not rely on the claimed ε until this is explained.")
        if mech["dp_claimed"]:
            return ("FLAGGED: single records leak measurably although the run claims "
                    f"ε = {_eps(mech['epsilon_theory'])}. DP-SGD at this ε keeps canaries at the chance "
                    "level; check that noise, clipping and sampling really are applied.")
        return "FLAGGED, as expected for a mechanism without noise: the audit detects it."
    if mech["dp_claimed"]:
        return ("Not flagged: no leakage above chance was detected. This is consistent with the claimed ε; "
                "it does not prove it (see below).")
    return ("Not flagged, although the mechanism has no noise: at these settings the audit is too weak to "
            "detect it (more steps, a higher learning rate or more canaries make it stronger).")


def can_and_cannot(report: dict[str, Any]) -> list[str]:
    """What an audit with this many canaries can and cannot show (golden-tested)."""
    one = report["one_run"]
    m, r = one["canaries"], one["guesses"]
    return [
        f"With m = {m} one-run canaries and r = {r} guesses, the largest lower bound reachable is "
        f"ε = {_eps(one['ceiling'])} (every guess correct, {one['confidence']:.0%} confidence). The audit can catch "
        "gross failures (noise off, clipping off, a wrong sampling rate, noise off by 10×) and a claimed ε "
        "below that ceiling that does not hold. It cannot certify that a larger ε is tight, or that the "
        "mechanism is private: a lower bound of 0 means nothing was detected, not that nothing leaks.",
        "Black-box canaries in the input space are known to give loose bounds (Steinke, Nasr & Jagielski "
        "2023); tighter audits need gradient canaries, many thousands of canaries or an f-DP analysis.",
    ]


def release_note(report: dict[str, Any]) -> str:
    """The audit is itself a release from the site's data."""
    return (f"This audit trained on site {report['site']}'s training records: its adapter, and every score "
            f"derived from it, is a release of that data, recorded in the audit's own ledger ({report['ledger']}), "
            "not in the site's. The membership-inference AUC also reads the training and held-out records "
            "directly, so it is not covered by the DP guarantee. Run audits on the shipped demo data or a "
            "public dataset, and keep this report at the site.")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The console summary printed by ``fedllm audit --canaries``."""
    one, exp, mech = report["one_run"], report["exposure"], report["mechanism"]
    groups = " / ".join(f"×{g['copies']} {g['mean']:.2f}" for g in exp["groups"])
    lines = [
        f"Mechanism: {_mechanism_line(mech)}",
        f"One-run: {one['correct']}/{one['guesses']} guesses correct -> ε ≥ {_eps(one['epsilon_lower_bound'])} "
        f"({one['confidence']:.0%}; ceiling {_eps(one['ceiling'])}) vs theoretical ε = {_eps(mech['epsilon_theory'])}",
        f"Exposure (bits, max {exp['max_bits']:.2f}): {groups}; controls mean {exp['controls']['mean']:.2f}, "
        f"95th pct {exp['controls']['p95']:.2f} (n = {exp['controls']['count']})",
    ]
    mia = report["membership_inference"]
    if "skipped" not in mia:
        lines.append(f"MIA AUC: raw {mia['auc_raw']['auc']:.3f}, calibrated {mia['auc_calibrated']['auc']:.3f} "
                     f"({mia['members']} members / {mia['nonmembers']} held-out)")
    lines.append(verdict_line(report))
    lines += [f"  - {reason}" for reason in report["verdict"]["reasons"]]
    return lines


def _alarm_sentence(one: dict[str, Any]) -> str:
    need = one.get("alarm_needs_correct")
    level = f"{1 - one['alarm_confidence']:g}"
    if need is None:
        return (f"With only {one['guesses']} guesses even all correct cannot reach the alarm level ({level}): here "
                "only the exposure test can raise the alarm; use more canaries.")
    return f"The alarm (level {level}) needs at least {need} of {one['guesses']} correct."


def _values(canaries: list[dict[str, Any]]) -> str:
    return ", ".join(f"{c['exposure']:.2f}" for c in canaries)


def _auc_cell(result: dict[str, Any]) -> str:
    return f"{result['auc']:.3f} [{result['ci_low']:.3f}, {result['ci_high']:.3f}]"


def render_markdown(report: dict[str, Any]) -> str:
    """The whole ``canary-audit.md``."""
    one, exp, mech, mia = report["one_run"], report["exposure"], report["mechanism"], report["membership_inference"]
    verdict = report["verdict"]
    out = [
        f"# Canary audit: site {report['site']} ({report['scenario']}, {report['model']})",
        "",
        f"**Verdict.** {verdict_line(report)}",
        *([""] + [f"* {reason}" for reason in verdict["reasons"]] if verdict["reasons"] else []),
        "",
        f"**Mechanism audited.** One site's whole run: {_mechanism_line(mech)} The training set was "
        f"{mech['real_examples']} of the site's records plus {mech['canary_examples']} canary copies; learning "
        f"rate {mech['learning_rate']:g} ({mech['optimizer']}). Between rounds the server only aggregates "
        "releases (post-processing), so one site's steps are the mechanism its ε describes.",
        "",
        "## Empirical lower bound beside the theoretical ε",
        "",
        "| | ε |",
        "|---|---|",
        f"| theoretical (PRV, δ = {mech['target_delta']:g}) | {_eps(mech['epsilon_theory'])} |",
        f"| one-run lower bound, {one['confidence']:.0%} confidence | {_eps(one['epsilon_lower_bound'])} |",
        f"| largest lower bound this audit can reach (m = {one['canaries']}, r = {one['guesses']}) | {_eps(one['ceiling'])} |",
        "",
        f"One-run test (Steinke, Nasr & Jagielski 2023): {one['canaries']} canaries, each inserted with "
        f"probability ½ from OS entropy ({one['included_count']} inserted); score = log-likelihood of the "
        f"canary's response under the trained adapter minus under the base model; {one['guesses_per_side']} "
        f"guesses \"in\" (highest scores) and {one['guesses_per_side']} \"out\" (lowest), fixed before training. "
        f"{one['correct']} of {one['guesses']} correct; p-value against ε = 0: {one['p_value_at_zero']:.3g}. "
        + _alarm_sentence(one),
        "",
        "## Exposure (Carlini et al. 2019)",
        "",
        f"Each inserted code is ranked against all {exp['space_size']:,} four-digit codes; exposure = log2 |R| − "
        f"log2 rank (maximum {exp['max_bits']:.2f} bits). A code the model never saw has P(exposure ≥ x) = 2^−x "
        f"(mean 1.44 bits) whatever the model. Each never-inserted control is ranked among its own code and "
        f"{exp['controls']['candidates'] - 1} random others (the same null, up to {exp['controls']['max_bits']:.2f} bits).",
        "",
        "| canaries | exposures (bits) | mean |",
        "|---|---|---|",
        *[f"| inserted ×{g['copies']} | {_values(g['canaries'])} | {g['mean']:.2f} |" for g in exp["groups"]],
        f"| never inserted (n = {exp['controls']['count']}) | median {exp['controls']['median']:.2f}, 95th pct "
        f"{exp['controls']['p95']:.2f}, max {exp['controls']['max']:.2f} | {exp['controls']['mean']:.2f} |",
        "",
        f"Test of the ×{exp['test']['copies']} canaries against the exact null: p = {exp['test']['p_value']:.3g} "
        f"(alarm below {exp['test']['alpha']:g}); one-sided Mann-Whitney against the controls: "
        f"p = {exp['test']['mann_whitney_vs_controls']:.3g}.",
    ]
    if not exp["controls"]["consistent_with_null"]:
        out += ["", f"**Warning:** the never-inserted controls look exposed (p = {exp['controls']['null_p_value']:.3g}), "
                "which no model can cause: the scoring is broken; do not trust this report."]
    out += ["", "## Membership inference", ""]
    if "skipped" in mia:
        out.append(f"Skipped: {mia['skipped']}.")
    else:
        out += [
            f"The site's training records ({mia['members']}) against its held-out records ({mia['nonmembers']}), "
            "scored by log-likelihood per response token; calibrated = minus the base model's. AUC with 95% "
            "DeLong interval (0.5 = chance):",
            "",
            "| score | AUC |",
            "|---|---|",
            f"| raw | {_auc_cell(mia['auc_raw'])} |",
            f"| calibrated | {_auc_cell(mia['auc_calibrated'])} |",
        ]
        if one.get("canary_auc"):
            out.append(f"| one-run canaries, inserted vs not | {_auc_cell(one['canary_auc'])} |")
    out += ["", "## What this audit can and cannot show", "", "\n\n".join(can_and_cannot(report)), "",
            "Largest reachable lower bound (every guess correct), by canaries m and guesses r "
            f"({one['confidence']:.0%}, δ = {mech['target_delta']:g}):", "",
            *_ceiling_rows(report["ceiling_table"]), "",
            "## This audit is a release", "", release_note(report), ""]
    return "\n".join(out)


def _ceiling_rows(table: dict[str, dict[str, float]]) -> list[str]:
    rs = sorted({int(r) for row in table.values() for r in row})
    rows = ["| m | " + " | ".join(f"r = {r}" for r in rs) + " |", "|---" * (len(rs) + 1) + "|"]
    for m, row in table.items():
        rows.append(f"| {m} | " + " | ".join(_eps(row[str(r)]) if str(r) in row else "–" for r in rs) + " |")
    return rows
