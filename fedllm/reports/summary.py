"""Run history -> the end-of-run summary that ``fedllm simulate`` and ``fedllm run`` print.

Per site: held-out loss and perplexity before and after, the run's task metrics (``[evaluate]``)
before and after, rounds trained and refused, ε spent at
the site's own δ against the site's own (effective) cap, as the site reported them;
then the privacy line and where the run's files are. Pure (stdlib only; numbers written by
:mod:`fedllm.reports.numbers`), so the CLI tests pin its text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedllm import wire
from fedllm.reports.numbers import format_loss, format_metric, format_perplexity
from fedllm.reports.privacy_statement import MEANINGLESS_SITE_EPSILON


def site_table(history: dict[str, Any]) -> list[dict[str, Any]]:
    """Per site: held-out loss/perplexity before (round 0) and after (last evaluated round),
    rounds trained and refused, and the cumulative ε after its last release."""
    rounds = history.get("rounds", [])
    names: list[str] = []
    for r in rounds:
        for part in ("evaluate", "train"):
            for name in r.get(part, {}).get("sites", {}):
                if name not in names:
                    names.append(name)
    rows = []
    for name in sorted(names):
        evals = [(r["round"], r["evaluate"]["sites"][name]) for r in rounds if name in r.get("evaluate", {}).get("sites", {})]
        trains = [r["train"]["sites"][name] for r in rounds if name in r.get("train", {}).get("sites", {})]
        refused = [r["round"] for r in rounds if name in r.get("train", {}).get("refused", {})]
        before = next((m for rnd, m in evals if rnd == 0), None)
        after = evals[-1][1] if evals and evals[-1][0] > 0 else None
        rows.append({
            "site": name,
            "loss-before": before[wire.EVAL_LOSS] if before else None,
            "ppl-before": before[wire.PERPLEXITY] if before else None,
            "loss-after": after[wire.EVAL_LOSS] if after else None,
            "ppl-after": after[wire.PERPLEXITY] if after else None,
            "rounds-trained": len(trains),
            "rounds-refused": refused,
            "epsilon": trains[-1][wire.EPSILON] if trains else None,
            "delta": trains[-1][wire.DELTA] if trains else None,
            "cap": trains[-1].get(wire.EPSILON_CAP) if trains else None,  # the site's effective cap (older: absent)
            "noise-multiplier": trains[-1][wire.NOISE_MULTIPLIER] if trains else None,
            "task-before": _task_metrics(before),
            "task-after": _task_metrics(after),
        })
    return rows


def _task_metrics(metrics: dict[str, Any] | None) -> dict[str, float | None]:
    """The task metrics (``[evaluate]``) in one evaluate reply; None where not released (-1)."""
    if not metrics:
        return {}
    return {key: (metrics[key] if metrics[key] >= 0 else None) for key in wire.TASK_METRIC_KEYS if key in metrics}


def task_metric_names(rows: list[dict[str, Any]]) -> list[str]:
    """The task metrics any site reported, in ``wire.TASK_METRIC_KEYS`` order."""
    seen = {key for r in rows for part in ("task-before", "task-after") for key in r[part]}
    return [key for key in wire.TASK_METRIC_KEYS if key in seen]


def _before_after(before: float | None, after: float | None) -> str:
    return f"{format_metric(before, '.2f')}→{format_metric(after, '.2f')}"


def summary_text(history: dict[str, Any], *, output_dir: Path, privacy_enabled: bool, max_epsilon: float,
                 ledger_dir: Path | None = None, deployment: bool = False) -> str:
    """The short summary printed at the end of ``fedllm simulate`` and ``fedllm run`` (``deployment``:
    the ledgers are at the sites, not in the run folder)."""
    rows = site_table(history)
    lines = [f"Run {history.get('run-id', '?')}: {history.get('status', '?')}, "
             f"{len([r for r in history.get('rounds', []) if r['round'] > 0])}/{history.get('num-server-rounds', '?')} rounds"]
    if history.get("stopped-early"):
        lines.append(f"Stopped early: {history['stopped-early']}")
    lines.append("")
    tasks = task_metric_names(rows)
    header = (f"{'site':<24} {'loss before':>11} {'after':>7} {'ppl before':>10} {'after':>7} "
              + "".join(f"{name:>12} " for name in tasks) + f"{'rounds':>6} {'ε spent':>8} {'cap':>6} {'δ':>8}")
    lines += [header, "-" * len(header)]
    for r in rows:
        eps = "no DP" if not privacy_enabled else format_metric(r["epsilon"], ".2f")
        cap = "-" if r["cap"] is None else f"{r['cap']:g}"
        delta = "-" if not r["delta"] or not privacy_enabled else f"{r['delta']:.2g}"
        refused = f"  (refused round {', '.join(map(str, r['rounds-refused']))})" if r["rounds-refused"] else ""
        lines.append(f"{r['site']:<24} {format_loss(r['loss-before']):>11} {format_loss(r['loss-after']):>7} "
                     f"{format_perplexity(r['ppl-before']):>10} {format_perplexity(r['ppl-after']):>7} "
                     + "".join(f"{_before_after(r['task-before'].get(n), r['task-after'].get(n)):>12} " for n in tasks)
                     + f"{r['rounds-trained']:>6} {eps:>8} {cap:>6} {delta:>8}{refused}")
    if tasks:
        lines.append(f"Task metrics ({', '.join(tasks)}): before→after, mean over each site's scored held-out records "
                     "(-: not released or nothing scored).")
    lines.append("")
    if privacy_enabled:
        trained = [r for r in rows if r["delta"]]
        if not trained:
            lines.append("Privacy: no site released an update.")
        elif all(r["cap"] is not None for r in trained):
            lines.append("Privacy: record-level DP-SGD at each site; ε is each site's total over every release in its "
                         "ledger, at the site's own δ and against its own cap (columns 'cap' and 'δ'; the run's "
                         f"privacy.max-epsilon = {max_epsilon:g} can only tighten a site's cap).")
        else:  # a history from sites that did not report their cap
            deltas = sorted({r["delta"] for r in trained})
            lines.append(f"Privacy: record-level DP-SGD at each site; ε is each site's total over every release in its "
                         f"ledger (δ={', '.join(f'{d:g}' for d in deltas)}; each site's own cap applies, not "
                         f"shown by these sites; the run's cap {max_epsilon:g} can only tighten it).")
    else:
        lines.append("Privacy: DISABLED (privacy.enabled = false). No differential-privacy guarantee holds for this run.")
    central = history.get("central-dp") or {}
    if central.get("enabled"):
        site_eps = central.get("epsilon")
        lines.append(f"Central DP: site-level ε = {format_metric(site_eps, '.2f')} (δ={central.get('delta', 0):g}) after "
                     f"{central.get('rounds', 0)} noisy rounds, noise {central.get('noise-multiplier')}, "
                     f"{central.get('clipping')} clipping" + ("  -- too large to mean anything"
                        if isinstance(site_eps, (int, float)) and site_eps > MEANINGLESS_SITE_EPSILON else ""))
    lines += [
        f"Adapter:  {output_dir / 'adapter'}  (PeftModel.from_pretrained(base, this folder))",
        f"History:  {output_dir / 'history.json'}",
        (f"Ledgers:  at each site (its ledger-path); to audit, copy them into {output_dir / 'ledgers'}"
         if deployment else
         f"Ledgers:  {ledger_dir or output_dir / 'ledgers'}  (fedllm ledger show FILE; fedllm ledger verify FILE)"),
        f"Audit:    fedllm audit {output_dir}  (privacy report: ε per site under three accountants)",
        f"Config:   {output_dir / 'config.toml'}",
        f"Logs:     {output_dir / 'logs'}",
    ]
    return "\n".join(lines)
