"""The privacy report's plot (``epsilon.png``): each site's cumulative ε after each round, with the caps.

A function of the report dict that :func:`fedllm.reports.privacy_report.build_privacy_report`
returns; its only side effect is the PNG's atomic write. matplotlib is imported inside
:func:`write_epsilon_plot` (the Agg canvas directly: no pyplot, no global backend switch, no GUI),
so importing this module stays cheap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedllm.files import write_bytes_atomic
from fedllm.reports.numbers import to_float

PLOT_SIZE = (8.0, 4.5)  # inches, at PLOT_DPI: 800 × 450 pixels
PLOT_DPI = 100


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
        points = [(p["round"], to_float(p["epsilon"])) for p in s["epsilon-per-round"]]
        if any(math.isinf(v) for _, v in points) or s["no-dp"]:
            no_dp.append(s["site"])
            continue
        if points:
            first = points[0][0] - 1
            xs, ys = [first] + [x for x, _ in points], [to_float(s["epsilon-before-run"])] + [y for _, y in points]
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
        ax.plot([p["round"] for p in per_round], [to_float(p["epsilon"]) for p in per_round], color="black",
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

