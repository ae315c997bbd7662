"""The site's own held-out split: which records it trains on and which it holds out for evaluation.

Held-out records are evaluated on whatever adapter the coordinator sends, so which records they
are is a privacy decision, and it is the site's alone (its ``eval-fraction`` and
``max-eval-examples``; no run-config key moves a record). Membership is decided by a keyed hash of
each record's content:

* **Split key**: 32 random bytes (``os.urandom``) kept beside the site's ledger, in
  ``<ledger folder>/<site>.split-key`` as 64 hex digits, file mode 0600. It is created atomically
  on first use (written to a temporary file, then hard-linked to its name, which fails if the name
  exists) and never overwritten. Without the key nobody (the coordinator included) can tell which
  records are held out, nor choose them.
* **Score** of a record: ``HMAC-SHA256(key, canonical bytes)`` read as a big-endian integer, where
  the canonical bytes are the normalised record's canonical JSON
  (:func:`fedllm.data.fingerprint.canonical_record_bytes`, the bytes the dataset fingerprint hashes).
* A record is **held out** when ``score / 2^256 < eval-fraction``. Its side depends on its content
  and the key only: shuffling the file changes nothing, inserting or removing a record moves no
  other record, and duplicates of one record's content land on the same side.
* ``max-eval-examples`` (> 0) keeps the held-out records with the smallest scores (whole groups of
  duplicates that fit under the cap, stable); the others train. When that cap binds, a record inserted with a smaller
  score pushes the largest-scored held-out record into training.
* Small files: when ``eval-fraction > 0``, the file has 2 or more distinct records and the threshold
  holds none out, the record(s) with the smallest score are held out (a site that asks for
  evaluation gets it); when every record would be held out, the largest-scored stay for training.

The split is fixed for the ledger's lifetime: the ledger records the policy (``eval-fraction``,
``max-eval-examples`` and the key's id, the first 16 hex digits of SHA-256 of the key, never the
key) and is bound to the fingerprint of the training subset; a site whose policy changed refuses
to train (:class:`fedllm.privacy.ledger.PrivacyLedger`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.data.fingerprint import canonical_record_bytes
from fedllm.errors import LedgerError

KEY_BYTES = 32
KEY_SUFFIX = ".split-key"
_SCALE = 1 << 256


@dataclass(frozen=True)
class HoldoutPolicy:
    """What a ledger records of the split it was written under."""

    eval_fraction: float
    max_eval_examples: int
    split_key_id: str

    def to_json(self) -> dict[str, Any]:
        return {"eval-fraction": self.eval_fraction, "max-eval-examples": self.max_eval_examples,
                "split-key-id": self.split_key_id}


@dataclass(frozen=True)
class HoldoutSplit:
    """Record indices (source order) of the training subset and the held-out records."""

    train: list[int]
    held_out: list[int]


def fresh_split_key() -> bytes:
    """A new split key: 32 bytes from the operating system's entropy pool."""
    return os.urandom(KEY_BYTES)


def split_key_path(ledger_path: Path | str, site: str) -> Path:
    """Where the split key of ``site`` lives: beside its ledger."""
    return Path(ledger_path).parent / f"{site}{KEY_SUFFIX}"


def split_key_id(key: bytes) -> str:
    """The key's public id (first 16 hex digits of its SHA-256), recorded in the ledger."""
    return hashlib.sha256(key).hexdigest()[:16]


def read_split_key(path: Path | str) -> bytes:
    """The key in ``path``; ``LedgerError`` when it is missing or not 64 hex digits."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise LedgerError(f"split key {path}: no such file. It is created beside the site's ledger when the site "
                          "first trains; restore it from a backup if it was lost.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"split key {path} cannot be read: {exc}. Restore it from a backup.") from None
    if len(text) != 2 * KEY_BYTES or any(c not in "0123456789abcdef" for c in text):
        raise LedgerError(f"split key {path}: expected {2 * KEY_BYTES} lowercase hex digits; the file was edited or "
                          "is not a split key. Restore it from a backup (never edit it).")
    return bytes.fromhex(text)


def load_or_create_split_key(path: Path | str) -> bytes:
    """The key in ``path``, created first (32 random bytes, mode 0600) when there is none.

    Creation is atomic and never overwrites: the key goes to a temporary file in the same folder
    (flushed, fsynced), which is then hard-linked to ``path``; when another process created
    ``path`` first, its key is used."""
    path = Path(path)
    if path.exists():
        return read_split_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(fresh_split_key().hex() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # fails when the name exists: never overwrites a key
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return read_split_key(path)


def ledger_records_split(ledger_path: Path | str) -> bool:
    """Whether the ledger file at ``ledger_path`` records a held-out split (best effort: an
    unreadable file says no, and opening the ledger reports it)."""
    try:
        data = json.loads(Path(ledger_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("held-out-split") is not None


def site_split_key(ledger_path: Path | str, site: str) -> bytes:
    """The site's split key, beside its ledger; created on first use. A ledger that recorded a
    split and whose key file is gone is a ``LedgerError`` (a new key would move records)."""
    path = split_key_path(ledger_path, site)
    if not path.exists() and ledger_records_split(ledger_path):
        raise LedgerError(
            f"Site '{site}': its ledger {ledger_path} was written under the split key {path}, which is missing. "
            "Refusing to create a new key (it would move records between training and held-out under the same "
            "privacy history): restore the key file from a backup.")
    return load_or_create_split_key(path)


def record_scores(records: Sequence[Mapping[str, Any]], key: bytes) -> list[int]:
    """Each record's ``HMAC-SHA256(key, canonical bytes)`` as an integer in [0, 2^256)."""
    return [int.from_bytes(hmac.new(key, canonical_record_bytes(r), hashlib.sha256).digest(), "big")
            for r in records]


def split_records(records: Sequence[Mapping[str, Any]], *, key: bytes, eval_fraction: float,
                  max_eval: int = 0) -> HoldoutSplit:
    """The site's split of ``records`` (see the module docstring for the rule)."""
    scores = record_scores(records, key)
    held = {s for s in scores if s < eval_fraction * _SCALE}  # exact: int < float compares exactly
    distinct = sorted(set(scores))
    if eval_fraction > 0 and len(distinct) >= 2 and not held:
        held = {distinct[0]}
    if max_eval > 0 and held:
        count = {s: 0 for s in held}
        for s in scores:
            if s in count:
                count[s] += 1
        kept: set[int] = set()
        total = 0
        for s in sorted(held):  # whole groups of duplicates, smallest scores first
            if total + count[s] > max_eval:
                break
            kept.add(s)
            total += count[s]
        held = kept
    if held and len(held) == len(distinct):  # nothing would train: the largest-scored stay for training
        held.discard(distinct[-1])
    return HoldoutSplit(train=[i for i, s in enumerate(scores) if s not in held],
                        held_out=[i for i, s in enumerate(scores) if s in held])


def policy_for(site: Any, key: bytes) -> HoldoutPolicy:
    """The ``HoldoutPolicy`` of a ``SiteConfig`` with its key."""
    return HoldoutPolicy(eval_fraction=float(site.eval_fraction), max_eval_examples=int(site.max_eval_examples),
                         split_key_id=split_key_id(key))
