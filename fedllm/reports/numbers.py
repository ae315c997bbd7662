"""How every report writes a number: ε, δ, loss, perplexity, counts, percentages, seconds.

One convention for all of ``fedllm/reports/`` (run summary, privacy report, model card, canary
audit), so the same value reads the same everywhere:

* a missing value prints as :data:`MISSING` (``-``);
* ε = ∞ (a release without noise) prints as :data:`INFINITY` (``∞``). In JSON (history, ledgers,
  the privacy report) ε = ∞ is the string ``"inf"``; on the wire a site sends ε = -1 for it
  (:func:`epsilon_from_wire`);
* ε has a fixed number of decimals (3 in the privacy report and model card, 2 in the run summary
  and the canary audit); δ, caps and configuration values use the shortest form (``format(v, "g")``:
  ``1e-05``, ``8``, ``0.015``).

Pure, stdlib only. The reports are golden-tested byte for byte, so a change here shows up there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

MISSING = "-"
INFINITY = "∞"


def to_float(value: Any) -> float:
    """A number read from a report or history dict: None -> NaN (missing), ``"inf"`` -> ∞."""
    if value is None:
        return math.nan
    return math.inf if value == "inf" else float(value)


def epsilon_to_json(value: float) -> float | str:
    """ε for JSON, which has no infinity: ∞ -> ``"inf"`` (as in the ledger)."""
    return "inf" if math.isinf(value) else float(value)


def epsilon_from_wire(value: Any) -> float:
    """ε as a site sends it in its metrics: -1 (or absent) means ∞ (a release without DP)."""
    return math.inf if value is None or float(value) < 0 else float(value)


def format_epsilon(value: Any, *, digits: int = 3) -> str:
    """ε with ``digits`` decimals; ∞ (or ``"inf"``) -> ``∞``; None -> ``-``."""
    v = to_float(value)
    if math.isinf(v):
        return INFINITY
    return MISSING if math.isnan(v) else f"{v:.{digits}f}"


def format_g(value: Any) -> str:
    """δ, a cap, a configuration value: the shortest form (``1e-05``, ``8``); None -> ``-``;
    anything that is not a number as it is."""
    if value is None:
        return MISSING
    return format(value, "g") if isinstance(value, (int, float)) else str(value)


def format_metric(value: Any, spec: str = ".3f") -> str:
    """A metric a site reported (loss, perplexity, ε in the run summary) with format ``spec``;
    None or a negative value (the wire's "no value") -> ``-``."""
    if value is None or (isinstance(value, (int, float)) and value < 0):
        return MISSING
    return format(value, spec)


def format_loss(value: Any) -> str:
    """A loss: 3 decimals; missing -> ``-``."""
    return format_metric(value, ".3f")


def format_perplexity(value: Any) -> str:
    """A perplexity: 2 decimals; missing -> ``-``."""
    return format_metric(value, ".2f")


def format_count(value: Any) -> str:
    """A number of records: an integer; None -> ``-``."""
    return MISSING if value is None else str(int(value))


def format_change(value: float | None) -> str:
    """A relative difference with its sign (``+1.2%``); None -> ``-``."""
    return MISSING if value is None else f"{value:+.1%}"


def format_list(values: Iterable[Any], spec: str) -> str:
    """Comma-separated values, each with format ``spec``; none -> ``-``."""
    return ", ".join(format(v, spec) for v in values) or MISSING


def format_seconds(value: float | None) -> str:
    """A duration in whole seconds (``12s``); None -> ``-``."""
    return MISSING if value is None else f"{value:.0f}s"
