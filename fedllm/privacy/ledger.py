"""A site's privacy ledger: every DP release made from the site's data, on disk, hash-chained.

One JSON file per site (per dataset), kept at the site. It survives rounds, runs and restarts:
every run on the same data spends from the same budget, and Flower's per-run ``Context.state``
cannot hold that (docs/notes/dp-lora.md P13). Each :class:`LedgerEntry` records one release
(one round's adapter update, or held-out metrics released with the Gaussian mechanism,
``release = "metrics"``): run, round, steps, sample rate q, noise multiplier σ, clipping norm C,
δ, the accountant, the number of examples and the cumulative ε after it.

* The cumulative ε is always recomputed from the whole history (all entries, composed by
  :func:`~fedllm.privacy.accounting.epsilon_for`), never taken from one round's ε.
* ``noise_multiplier == 0`` records a release without differential privacy (privacy disabled):
  its ε, and the cumulative ε of everything after it, is ``math.inf``.
* The spend is recorded *before* the update leaves the site; :meth:`PrivacyLedger.check` refuses
  a release that would cross the site's cap.
* Writes are atomic: the whole file goes to a temporary file in the same folder, is flushed and
  fsynced, then renamed over the old one, so a crash leaves either the old or the new ledger.
* A ledger that cannot be read, or whose hash chain is broken, is an error, never a fresh start:
  a fresh ledger would forget the spend.

Integrity (format version 2; the chain is :mod:`fedllm.privacy.ledger_chain`, the checks
:mod:`fedllm.privacy.ledger_verification`):

* **Dataset-bound.** The header and every entry carry the fingerprint of the site's data
  (:func:`fedllm.data.fingerprint.dataset_fingerprint`). Opening the ledger with another
  fingerprint is an error naming both, so a budget stays tied to the data it was spent on, and
  two runs on the same data draw from the same budget.
* **Hash-chained.** Each entry carries ``prev-hash`` (the previous entry's ``entry-hash``; for the
  first entry the *genesis* hash of the header: format, site, dataset fingerprint) and its own
  ``entry-hash`` (SHA-256 of its canonical JSON: every field but ``entry-hash`` and
  ``signature``). The header's ``head`` records the number of entries and the last entry-hash,
  so an entry deleted from the end is noticed too. Opening the ledger checks the chain.
* **Optionally signed.** A site with a signing key (Ed25519, :mod:`fedllm.privacy.signing`)
  signs every new entry's hash and the head; its public key goes into the header at the first
  signature. Once a ledger is signed, only that key may write to it.
* **Split-bound.** The header records the site's held-out split policy (``held-out-split``:
  eval-fraction, max-eval-examples and the id of the site's split key, :mod:`fedllm.site.holdout`),
  covered by the genesis hash, and the fingerprint is that of the site's training subset. A site
  opening its ledger under another split policy is refused, as is a ledger with entries but no
  split policy (written before sites owned their split: bound to the whole data file).
* :func:`verify_ledger` (``fedllm ledger verify``) checks all of that and recomputes every
  cumulative ε from the recorded parameters.

What it does not prove: the site holds the key and the file, so it can always rewrite and re-sign
its whole chain; an unsigned chain stops only naive or accidental edits, since anyone can
recompute SHA-256. Restoring an older copy of the whole file (a rollback) is not detectable from
the file alone. See docs/privacy.md, "Ledger integrity".

The file format (JSON, version 2; version-1 files still load) is in :mod:`fedllm.privacy.ledger_file`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import numbers
import os
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.data.fingerprint import is_fingerprint
from fedllm.errors import BudgetExceededError, LedgerError
from fedllm.files import write_text_atomic
from fedllm.privacy.accounting import DPEvent, PrivacyParameterError, epsilon_for
from fedllm.privacy.ledger_chain import (
    LEDGER_FORMAT,
    LEDGER_KINDS,
    LEDGER_VERSION,
    FieldError,
    LedgerEntry,
    parse_entry,
)
from fedllm.privacy.ledger_file import (
    RESTORE_ADVICE,
    RESTORE_CHAIN_ADVICE,
    ledger_document,
    read_document,
)
from fedllm.privacy.ledger_verification import (
    EPSILON_RTOL,
    LedgerVerification,
    inspect_document,
    verify_ledger,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "EPSILON_RTOL",
    "LEDGER_FORMAT",
    "LEDGER_VERSION",
    "LedgerEntry",
    "LedgerVerification",
    "PrivacyLedger",
    "verify_ledger",
]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (POSIX): no other fedllm process writes a ledger in it
    between our changed-on-disk check and our rename. Where locking is unavailable, best effort."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - unusual filesystems
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fmt_eps(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:.2f}"


def _short(fingerprint: str | None) -> str:
    return "(none: not bound to a dataset)" if fingerprint is None else fingerprint


class PrivacyLedger:
    """The releases made from one site's data, with their composed ε; persisted at ``path``.

    ``dataset_fingerprint`` binds the ledger to the site's data (None: an unbound ledger, for
    tools and tests; a site always binds). ``signing_key`` (Ed25519) signs every new entry; a
    ledger that is signed can only be written with the key it was signed with.
    """

    def __init__(self, path: Path, *, site: str, entries: Sequence[LedgerEntry] = (),
                 dataset_fingerprint: str | None = None, signing_key: Ed25519PrivateKey | None = None,
                 kind: str = "site", held_out_split: dict[str, Any] | None = None) -> None:
        if not isinstance(site, str) or not site:
            raise PrivacyParameterError(f"site must be a non-empty string, got {site!r}")
        if dataset_fingerprint is not None and not is_fingerprint(dataset_fingerprint):
            raise PrivacyParameterError(
                "dataset_fingerprint must be 'sha256:<64 hex digits>' (fedllm.data.fingerprint), "
                f"got {dataset_fingerprint!r}")
        if kind not in LEDGER_KINDS:
            raise PrivacyParameterError(f"kind must be one of {', '.join(LEDGER_KINDS)}, got {kind!r}")
        self.path = Path(path)
        self.site = site
        self.kind = kind  # "central-dp": the coordinator's ledger of site-level releases (central_dp.py)
        self._entries = tuple(entries)
        self._fingerprint = dataset_fingerprint
        self._signing_key = signing_key
        self._public_key: str | None = None  # the header's; set at the first signed write
        self._stored: tuple[dict[str, Any], ...] = ()  # chained entries exactly as on disk
        self._version_read: int | None = None  # version of the file as opened (None: no file)
        self._migrated: dict[str, Any] | None = None  # header note of a version-1 conversion
        self._to_migrate = 0  # version-1 entries still to be chained at the next write
        self._disk_digest: str | None = None  # SHA-256 of the file as last read or written
        self._split = held_out_split  # the site's held-out split policy, recorded in the header

    @classmethod
    def open(cls, path: Path | str, *, site: str, dataset_fingerprint: str | None = None,
             signing_key: Ed25519PrivateKey | None = None, kind: str | None = "site",
             held_out_split: dict[str, Any] | None = None) -> PrivacyLedger:
        """Load the ledger at ``path`` (validated, chain checked), or an empty one if there is no file yet.

        ``dataset_fingerprint``: the site's data; a ledger bound to other data is a ``LedgerError``
        naming both fingerprints. ``signing_key``: the site's key; a ledger signed by another key is
        a ``LedgerError``. ε values are not recomputed here (:func:`verify_ledger` does that).
        ``kind``: ``"site"`` or ``"central-dp"`` (the coordinator's); a file of the other kind is a
        ``LedgerError``; None takes the file's kind (for tools that show any ledger).
        ``held_out_split``: the site's split policy (:mod:`fedllm.site.holdout`); a ledger with entries
        written under another policy, or under none (an older ledger), is a ``LedgerError``.
        """
        if kind is None:
            kind = "site"
            if Path(path).is_file():
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    kind = str(json.loads(Path(path).read_text(encoding="utf-8")).get("kind", "site"))
        ledger = cls(Path(path), site=site, dataset_fingerprint=dataset_fingerprint, signing_key=signing_key,
                     kind=kind, held_out_split=held_out_split)
        if ledger.path.exists():
            ledger._load(dataset_fingerprint, held_out_split)
        if signing_key is not None and ledger._public_key is not None:
            from fedllm.privacy.signing import key_id, public_key_text

            if public_key_text(signing_key) != ledger._public_key:
                raise LedgerError(
                    f"Privacy ledger {ledger.path} is signed with key {key_id(ledger._public_key)}, but the site's "
                    f"signing key is {key_id(signing_key)}. A ledger can only be continued with the key that signed "
                    "it: set the site's signing-key to that key's file.")
        return ledger

    def _load(self, dataset_fingerprint: str | None, held_out_split: dict[str, Any] | None = None) -> None:
        data, digest = read_document(self.path)
        if data["site"] != self.site:
            raise LedgerError(
                f"Privacy ledger {self.path} belongs to site {data['site']!r}, not '{self.site}'. "
                "Each site needs its own ledger path; check the site's configuration."
            )
        if data.get("kind", "site") != self.kind:
            raise LedgerError(
                f"Privacy ledger {self.path} is a {data.get('kind', 'site')} ledger, not a {self.kind} ledger: a site's "
                "ledger and the coordinator's central-DP ledger must be separate files; check the ledger paths.")
        inspection = inspect_document(data, recompute_epsilon=False)
        if inspection.problems:
            _, text = inspection.problems[0]
            hint = RESTORE_ADVICE if inspection.field_problem else RESTORE_CHAIN_ADVICE
            raise LedgerError(f"Privacy ledger {self.path}: {text}. {hint}")
        self._entries = tuple(inspection.entries)  # type: ignore[arg-type] # all parsed: no problems
        if held_out_split is not None and self._entries:
            self._check_split(inspection.held_out_split, held_out_split)
        if inspection.held_out_split is not None:
            self._split = inspection.held_out_split
        self._version_read = data["version"]
        self._disk_digest = digest
        if data["version"] == 1:
            self._to_migrate = len(self._entries)
            self._fingerprint = dataset_fingerprint  # bound when the first new release converts the file
            return
        self._stored = tuple(data["entries"])
        self._public_key = inspection.public_key
        self._migrated = data.get("migrated")
        stored_fp = inspection.dataset_fingerprint
        if dataset_fingerprint is not None and stored_fp != dataset_fingerprint:
            if stored_fp is None:
                what = "is not bound to any dataset (it was written by a tool, not by a site)"
            else:
                what = f"was written for the dataset with fingerprint {stored_fp}"
            raise LedgerError(
                f"Privacy ledger {self.path} of site '{self.site}' {what}, but the site's data "
                f"({dataset_fingerprint}) is different. Refusing to train: its spend would be charged to the wrong "
                "data. If this is other data, give the site its own ledger (ledger-path). If it is the same data, "
                "changed (records added, removed or edited), the earlier spend still covers every record that "
                "remains and fedllm cannot split it: restore the data the ledger was written for, or keep the "
                "ledger and use a new one only for data that shares no record with the old. Never delete a ledger."
            )
        self._fingerprint = stored_fp

    def _check_split(self, recorded: dict[str, Any] | None, current: dict[str, Any]) -> None:
        """LedgerError unless this ledger's entries were recorded under the site's current split."""
        if recorded is None:
            raise LedgerError(
                f"Privacy ledger {self.path} of site '{self.site}' was written before sites owned their held-out "
                "split: it records no split policy, its binding was to the whole data file, and which records were "
                "held out was set by the run (data.eval-fraction, data.seed). fedllm now binds a ledger to the "
                "training subset of the site's own keyed split (eval-fraction, max-eval-examples and the split key "
                "beside the ledger). Refusing to train on it. Keep this ledger (never delete it: it is the spend on "
                "every record of that file). To train again, give the site a new ledger-path: a new ledger is a new "
                "privacy history, which does not count the spend recorded here (ε so far: 'fedllm ledger show "
                f"{self.path}'); account for it yourself, or train only on data that shares no record with the old.")
        if recorded == current:
            return
        names = {"eval-fraction": "eval-fraction", "max-eval-examples": "max-eval-examples",
                 "split-key-id": "split key (id)"}
        changed = "; ".join(f"{names[k]} {recorded.get(k)!r} when the ledger was written, now {current.get(k)!r}"
                            for k in names if recorded.get(k) != current.get(k))
        raise LedgerError(
            f"Privacy ledger {self.path} of site '{self.site}' was written under another held-out split: {changed}. "
            "Refusing to train: the split is fixed for a ledger's lifetime (another split would move records "
            "between training and held-out under one privacy history). Restore the site's eval-fraction and "
            f"max-eval-examples, and its split key file ({self.site}.split-key beside the ledger), to the recorded "
            "values. To use the new split instead, give the site a new ledger-path: a new ledger is a new privacy "
            "history, which does not count the spend recorded in this one (keep it; never delete a ledger).")

    # -- reading ---------------------------------------------------------------------------------

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return self._entries

    @property
    def dataset_fingerprint(self) -> str | None:
        """The fingerprint of the data this ledger is bound to (None: not bound)."""
        return self._fingerprint

    @property
    def held_out_split(self) -> dict[str, Any] | None:
        """The site's held-out split policy the ledger records (None: none recorded)."""
        return self._split

    @property
    def public_key(self) -> str | None:
        """Base64 Ed25519 public key of a signed ledger (None: unsigned)."""
        return self._public_key

    @property
    def policy(self) -> tuple[float, float | None] | None:
        """(δ, cap) of the site's privacy policy as last recorded in an entry (None: no entry records one,
        e.g. a ledger written before sites recorded their policy)."""
        for entry in reversed(self._entries):
            if entry.site_max_delta is not None:
                return entry.site_max_delta, entry.site_max_epsilon
        return None

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
            "Refusing to train; the site's budget is spent (only the site can raise its max-epsilon), "
            "or stop the run."
        )

    # -- writing ---------------------------------------------------------------------------------

    def require_writable(self) -> None:
        """LedgerError if :meth:`record` could not write: a signed ledger needs the key that signed it."""
        if self._public_key is not None and self._signing_key is None:
            from fedllm.privacy.signing import key_id

            raise LedgerError(
                f"Privacy ledger {self.path} is signed (key {key_id(self._public_key)}), but no signing key was given: "
                "an unsigned entry would break it. Set the site's signing-key to the key that signed it.")

    def record(
        self, *, run_id: str, server_round: int, steps: int, sample_rate: float, noise_multiplier: float,
        max_grad_norm: float, target_delta: float, num_examples: int, accountant: str = "prv",
        central_dp: dict[str, Any] | None = None,
        site_max_delta: float | None = None, site_max_epsilon: float | None = None,
        release: str = "update",
    ) -> LedgerEntry:
        """Append one release with its cumulative ε (from the whole history, at ``target_delta``) and
        rewrite the file atomically. ``central_dp``: required in (and only in) a central-DP ledger
        (``ledger_chain``: m, N, sampling, clipping). ``site_max_delta`` / ``site_max_epsilon``: the
        site's privacy policy (its δ and cap), recorded in the entry so that ``fedllm ledger verify``
        can flag an entry at a larger δ than the site's.

        ``release``: "update" (a round's adapter update) or "metrics" (held-out metrics released
        with the Gaussian mechanism: ``steps`` = 1, ``sample_rate`` = 1, ``max_grad_norm`` = the
        loss bound, ``num_examples`` = the held-out records; :mod:`fedllm.site.metric_release`)."""
        self.require_writable()
        if (central_dp is not None) != (self.kind == "central-dp"):
            raise PrivacyParameterError(f"a {self.kind} ledger's entries {'need' if central_dp is None else 'have no'} "
                                        "a central_dp block")
        epsilon = self.epsilon_after(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                                     target_delta=target_delta, accountant=accountant)
        raw = dict(
            run_id=run_id, server_round=server_round, steps=steps, sample_rate=sample_rate,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, target_delta=target_delta,
            accountant=accountant, epsilon="inf" if math.isinf(epsilon) else epsilon, num_examples=num_examples,
            timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        if central_dp is not None:
            raw["central_dp"] = dict(central_dp)
        if site_max_delta is not None:
            raw["site_max_delta"] = site_max_delta
        if site_max_epsilon is not None:
            raw["site_max_epsilon"] = site_max_epsilon
        if release != "update":
            raw["release"] = release
        try:
            entry = parse_entry(raw)
        except FieldError as exc:
            raise PrivacyParameterError(f"cannot record a release for site '{self.site}': {exc}") from None
        entries = (*self._entries, entry)
        document = ledger_document(
            entries, site=self.site, dataset_fingerprint=self._fingerprint, stored=self._stored,
            to_migrate=self._to_migrate, migrated=self._migrated, public_key=self._public_key,
            signing_key=self._signing_key, kind=self.kind, held_out_split=self._split)
        text = json.dumps(document, indent=2, allow_nan=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _folder_lock(self.path.parent):
            self._check_unchanged_on_disk()
            write_text_atomic(self.path, text)
        self._entries = entries
        self._stored = tuple(document["entries"])
        self._public_key = document.get("public-key")
        self._migrated = document.get("migrated")
        self._to_migrate = 0
        self._version_read = LEDGER_VERSION
        self._disk_digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return entry

    def _check_unchanged_on_disk(self) -> None:
        if not self.path.exists():
            if self._disk_digest is not None:
                log.warning("privacy ledger %s disappeared since it was opened; writing it again from memory",
                            self.path)
            return
        try:
            current = hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError as exc:
            raise LedgerError(f"Privacy ledger {self.path} cannot be read: {exc}.") from exc
        if current != self._disk_digest:
            raise LedgerError(
                f"Privacy ledger {self.path} changed on disk since it was opened (another process recording "
                "for the same site?). Reopen the ledger; never run two trainings on one ledger at once."
            )

    # -- showing ---------------------------------------------------------------------------------

    def integrity_line(self) -> str:
        """One line on the ledger's binding and integrity, for ``fedllm ledger show``."""
        if self._version_read is None:
            return "integrity: nothing written yet"
        if self._version_read == 1:
            return ("integrity: version 1 ledger without a hash chain; it is converted to a chained "
                    "version 2 ledger when the site records its next release")
        text = f"integrity: hash chain of {len(self._entries)} entries intact (checked on opening)"
        if self._public_key is None:
            return text + "; unsigned"
        from fedllm.privacy.signing import key_id

        return text + f"; signed by {key_id(self._public_key)} (check: fedllm ledger verify FILE --public-key SITE.pub)"

    def _split_lines(self) -> list[str]:
        if self._split is None:  # unbound tool ledgers, and ledgers from before sites owned their split
            return []
        s = self._split
        return [f"held-out split: eval-fraction {s['eval-fraction']:g}, max-eval-examples {s['max-eval-examples']}, "
                f"split key {s['split-key-id']} (the dataset fingerprint is that of the training subset)"]

    def summary_lines(self) -> list[str]:
        """Human-readable table for ``fedllm ledger show``: one row per release, then the total."""
        title = (f"Central-DP ledger of coordinator '{self.site}' (site-level ε: one site is the unit of privacy)"
                 if self.kind == "central-dp" else f"Privacy ledger of site '{self.site}'")
        lines = [f"{title}: {self.path}",
                 f"dataset: {_short(self._fingerprint)}", *self._split_lines(), self.integrity_line()]
        if not self._entries:
            return [*lines, "no releases recorded", "cumulative ε = 0.00 (nothing released)"]
        header = ("run", "round", "steps", "q", "σ", "C", "δ", "accountant", "cumulative ε")
        rows = [
            (e.run_id, str(e.server_round) + (" (metrics)" if e.release == "metrics" else ""), str(e.steps), f"{e.sample_rate:.4g}", f"{e.noise_multiplier:.4g}",
             f"{e.max_grad_norm:g}", f"{e.target_delta:g}", e.accountant,
             "inf (no DP)" if math.isinf(e.epsilon) else f"{e.epsilon:.2f}")
            for e in self._entries
        ]
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *rows)]
        last = self._entries[-1]
        policy = self.policy
        delta = policy[0] if policy is not None else last.target_delta
        total = self.epsilon(target_delta=delta, accountant=last.accountant)
        if math.isinf(total):
            lines.append("cumulative ε = inf: no DP guarantee (a release without noise)")
        elif policy is not None:
            cap = "" if policy[1] is None else f", cap {policy[1]:g}" + (" EXCEEDED" if total > policy[1] else "")
            lines.append(f"cumulative ε = {total:.2f} at the site's own δ={delta:g} ({last.accountant}{cap})")
        else:
            lines.append(f"cumulative ε = {total:.2f} (δ={delta:g}, {last.accountant}; the ledger records no site "
                         "δ policy: check it with 'fedllm ledger verify FILE --max-delta SITE_DELTA')")
        above = [i for i, e in enumerate(self._entries, start=1) if e.target_delta > delta]
        if above:
            lines.append(f"WARNING: {len(above)} entr{'y' if len(above) == 1 else 'ies'} (first: entry {above[0]}) "
                         f"recorded at a δ larger than the site's δ={delta:g}; the total above is at the site's δ")
        return lines
