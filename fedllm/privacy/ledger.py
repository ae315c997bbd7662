"""A site's privacy ledger: every DP release made from the site's data, on disk.

One JSON file per site (per dataset), kept at the site. It survives rounds, runs and restarts:
every run on the same data spends from the same budget, and Flower's per-run ``Context.state``
cannot hold that (dp-lora.md P13). Each :class:`LedgerEntry` records one release (one round's
adapter update): run, round, steps, sample rate q, noise multiplier σ, clipping norm C, δ, the
accountant, the number of examples and the cumulative ε after it.

* The cumulative ε is always recomputed from the whole history (all entries, composed by
  :func:`~fedllm.privacy.accounting.epsilon_for`), never taken from one round's ε.
* ``noise_multiplier == 0`` records a release without differential privacy (privacy disabled):
  its ε, and the cumulative ε of everything after it, is ``math.inf``.
* The spend is recorded *before* the update leaves the site; :meth:`PrivacyLedger.check` refuses
  a release that would cross the site's cap.
* Writes are atomic: the whole file goes to a temporary file in the same folder, is flushed and
  fsynced, then renamed over the old one, so a crash leaves either the old or the new ledger.
* A ledger that cannot be read is an error, never a fresh start: a fresh ledger would forget the
  spend. Its format::

    {"format": "fedllm-privacy-ledger", "version": 1, "site": "cardiology", "entries": [{...}, ...]}

  with ε = ∞ stored as the string ``"inf"`` (JSON has no infinity).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedllm.errors import BudgetExceededError, LedgerError
from fedllm.privacy.accounting import ACCOUNTANTS, DPEvent, PrivacyParameterError, epsilon_for

LEDGER_FORMAT = "fedllm-privacy-ledger"
LEDGER_VERSION = 1

_RESTORE = (
    "The file is corrupt or was edited by hand: restore it from a backup. Do not delete it: "
    "a fresh ledger would forget this site's privacy spend."
)


@dataclass(frozen=True)
class LedgerEntry:
    """One release. ``epsilon`` is the cumulative ε after it (``math.inf`` if any release had σ = 0)."""

    run_id: str
    server_round: int
    steps: int
    sample_rate: float
    noise_multiplier: float  # 0.0: this release had no differential privacy
    max_grad_norm: float
    target_delta: float
    accountant: str
    epsilon: float
    num_examples: int
    timestamp: str  # ISO-8601, UTC

    @property
    def event(self) -> DPEvent:
        return DPEvent(self.noise_multiplier, self.sample_rate, self.steps)


class _FieldError(Exception):
    def __init__(self, field: str, expected: str, value: object) -> None:
        super().__init__(f"field '{field}': expected {expected}, got {value!r}")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _is_timestamp(value: Any) -> bool:
    try:
        return isinstance(value, str) and datetime.fromisoformat(value) is not None
    except ValueError:
        return False


_COUNT = ("an integer >= 0", _is_count)
_NON_NEGATIVE = ("a finite number >= 0", lambda v: _is_real(v) and v >= 0)
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {  # name: (what is expected, check)
    "run_id": ("a non-empty string", lambda v: isinstance(v, str) and v != ""),
    "server_round": _COUNT,
    "steps": _COUNT,
    "sample_rate": ("a number in [0, 1]", lambda v: _is_real(v) and 0 <= v <= 1),
    "noise_multiplier": _NON_NEGATIVE,
    "max_grad_norm": _NON_NEGATIVE,
    "target_delta": ("a number in (0, 1)", lambda v: _is_real(v) and 0 < v < 1),
    "accountant": (f"one of {', '.join(ACCOUNTANTS)}", lambda v: v in ACCOUNTANTS),
    "epsilon": ('a finite number >= 0 or "inf"', lambda v: v == "inf" or (_is_real(v) and v >= 0)),
    "num_examples": _COUNT,
    "timestamp": ("an ISO-8601 timestamp", _is_timestamp),
}
_FLOATS = ("sample_rate", "noise_multiplier", "max_grad_norm", "target_delta", "epsilon")
_INTS = ("server_round", "steps", "num_examples")


def _parse_entry(raw: Any) -> LedgerEntry:
    if not isinstance(raw, dict):
        raise _FieldError("(entry)", "a JSON object", raw)
    for name in raw:
        if name not in _FIELDS:
            raise _FieldError(name, "no such field (known: " + ", ".join(_FIELDS) + ")", raw[name])
    for name, (expected, is_valid) in _FIELDS.items():
        if name not in raw:
            raise _FieldError(name, f"{expected} (the field is missing)", None)
        if not is_valid(raw[name]):
            raise _FieldError(name, expected, raw[name])
    floats = {name: (math.inf if raw[name] == "inf" else float(raw[name])) for name in _FLOATS}
    return LedgerEntry(**{**raw, **floats, **{name: int(raw[name]) for name in _INTS}})


def _entry_json(entry: LedgerEntry) -> dict[str, Any]:
    data = asdict(entry)
    if math.isinf(entry.epsilon):
        data["epsilon"] = "inf"
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON value {name}")


def _read_entries(path: Path, site: str) -> tuple[LedgerEntry, ...]:
    """Entries of the ledger file at ``path``, validated; LedgerError names file, entry and field."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except OSError as exc:
        raise LedgerError(f"Privacy ledger {path} cannot be read: {exc}.") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise LedgerError(f"Privacy ledger {path} is not valid JSON ({exc}); it may be truncated. {_RESTORE}") from exc
    if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
        raise LedgerError(
            f"{path} is not a fedllm privacy ledger (expected a JSON object with \"format\": \"{LEDGER_FORMAT}\"). "
            "Check the site's ledger path."
        )
    if data.get("version") != LEDGER_VERSION:
        raise LedgerError(
            f"Privacy ledger {path} has version {data.get('version')!r}; this fedllm reads version {LEDGER_VERSION}. "
            "Use the fedllm version that wrote it."
        )
    if data.get("site") != site:
        raise LedgerError(
            f"Privacy ledger {path} belongs to site {data.get('site')!r}, not '{site}'. "
            "Each site needs its own ledger path; check the site's configuration."
        )
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, list):
        raise LedgerError(f"Privacy ledger {path}: \"entries\" must be a list, got {raw_entries!r}. {_RESTORE}")
    entries = []
    for index, raw in enumerate(raw_entries):
        try:
            entries.append(_parse_entry(raw))
        except _FieldError as exc:
            raise LedgerError(f"Privacy ledger {path}: entry {index}, {exc}. {_RESTORE}") from None
    return tuple(entries)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a fsynced temporary file in the same folder and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError, AttributeError):  # make the rename durable (POSIX only)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _fmt_eps(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:.2f}"


class PrivacyLedger:
    """The releases made from one site's data, with their composed ε; persisted at ``path``."""

    def __init__(self, path: Path, *, site: str, entries: Sequence[LedgerEntry] = ()) -> None:
        if not isinstance(site, str) or not site:
            raise PrivacyParameterError(f"site must be a non-empty string, got {site!r}")
        self.path = Path(path)
        self.site = site
        self._entries = tuple(entries)

    @classmethod
    def open(cls, path: Path | str, *, site: str) -> PrivacyLedger:
        """Load the ledger at ``path`` (validated), or an empty one if the file does not exist yet."""
        path = Path(path)
        entries = _read_entries(path, site) if path.exists() else ()
        return cls(path, site=site, entries=entries)

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return self._entries

    def events(self) -> list[DPEvent]:
        return [entry.event for entry in self._entries]

    def epsilon(self, *, target_delta: float, accountant: str = "prv") -> float:
        """Cumulative ε of every release recorded so far."""
        return epsilon_for(self.events(), target_delta=target_delta, accountant=accountant)

    def epsilon_after(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, target_delta: float, accountant: str = "prv"
    ) -> float:
        """Cumulative ε if one more release of ``steps`` steps at (σ, q) were made."""
        planned = DPEvent(noise_multiplier, sample_rate, steps)
        return epsilon_for([*self.events(), planned], target_delta=target_delta, accountant=accountant)

    def check(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, target_delta: float, max_epsilon: float,
        accountant: str = "prv",
    ) -> float:
        """ε after the planned release; BudgetExceededError if it would exceed ``max_epsilon``.

        ``max_epsilon`` <= 0 or ``math.inf`` means no cap. A release without noise (σ = 0) is
        never refused here: whether to allow it is the caller's decision.
        """
        if isinstance(max_epsilon, bool) or not isinstance(max_epsilon, numbers.Real) or math.isnan(max_epsilon):
            raise PrivacyParameterError(f"max_epsilon must be a number, got {max_epsilon!r}")
        after = self.epsilon_after(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                                   target_delta=target_delta, accountant=accountant)
        if noise_multiplier == 0 or max_epsilon <= 0 or math.isinf(max_epsilon) or after <= max_epsilon:
            return after
        spent = self.epsilon(target_delta=target_delta, accountant=accountant)
        if math.isinf(spent):  # an earlier release had no DP: show this round's own ε
            planned = DPEvent(noise_multiplier, sample_rate, steps)
            increment = epsilon_for([planned], target_delta=target_delta, accountant=accountant)
        else:
            increment = after - spent
        raise BudgetExceededError(
            f"Site '{self.site}' would exceed its privacy budget: spent ε={_fmt_eps(spent)}, "
            f"this round +{_fmt_eps(increment)}, cap {max_epsilon:.2f} (δ={target_delta:g}, {accountant}). "
            "Refusing to train; raise privacy.max-epsilon or stop the run."
        )

    def record(
        self, *, run_id: str, server_round: int, steps: int, sample_rate: float, noise_multiplier: float,
        max_grad_norm: float, target_delta: float, num_examples: int, accountant: str = "prv",
    ) -> LedgerEntry:
        """Append one release with its cumulative ε (from the whole history) and rewrite the file atomically."""
        epsilon = self.epsilon_after(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                                     target_delta=target_delta, accountant=accountant)
        raw = dict(
            run_id=run_id, server_round=server_round, steps=steps, sample_rate=sample_rate,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, target_delta=target_delta,
            accountant=accountant, epsilon="inf" if math.isinf(epsilon) else epsilon, num_examples=num_examples,
            timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        try:
            entry = _parse_entry(raw)
        except _FieldError as exc:
            raise PrivacyParameterError(f"cannot record a release for site '{self.site}': {exc}") from None
        if self.path.exists() and _read_entries(self.path, self.site) != self._entries:
            raise LedgerError(
                f"Privacy ledger {self.path} changed on disk since it was opened (another process recording "
                "for the same site?). Reopen the ledger; never run two trainings on one ledger at once."
            )
        entries = (*self._entries, entry)
        document = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "site": self.site,
                    "entries": [_entry_json(e) for e in entries]}
        _write_atomic(self.path, json.dumps(document, indent=2, allow_nan=False) + "\n")
        self._entries = entries
        return entry

    def summary_lines(self) -> list[str]:
        """Human-readable table for ``fedllm ledger show``: one row per release, then the total."""
        lines = [f"Privacy ledger of site '{self.site}': {self.path}"]
        if not self._entries:
            return [*lines, "no releases recorded", "cumulative ε = 0.00 (nothing released)"]
        header = ("run", "round", "steps", "q", "σ", "C", "δ", "accountant", "cumulative ε")
        rows = [
            (e.run_id, str(e.server_round), str(e.steps), f"{e.sample_rate:.4g}", f"{e.noise_multiplier:.4g}",
             f"{e.max_grad_norm:g}", f"{e.target_delta:g}", e.accountant,
             "inf (no DP)" if math.isinf(e.epsilon) else f"{e.epsilon:.2f}")
            for e in self._entries
        ]
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *rows)]
        last = self._entries[-1]
        total = self.epsilon(target_delta=last.target_delta, accountant=last.accountant)
        if math.isinf(total):
            lines.append("cumulative ε = inf: no DP guarantee (a release without noise)")
        else:
            lines.append(f"cumulative ε = {total:.2f} (δ={last.target_delta:g}, {last.accountant})")
        return lines
