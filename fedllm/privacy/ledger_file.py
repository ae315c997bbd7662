"""The privacy ledger's file: its JSON format, reading a file into a checked document, and
building the version-2 document that :class:`fedllm.privacy.ledger.PrivacyLedger` writes.

Format::

    {"format": "fedllm-privacy-ledger", "version": 2, "site": "cardiology",
     "kind": "central-dp" (the coordinator's central-DP ledger only; absent for a site's),
     "dataset-fingerprint": "sha256:…", "public-key": "<base64>" (signed ledgers only),
     "held-out-split": {"eval-fraction": 0.1, "max-eval-examples": 64, "split-key-id": "<16 hex>"},
     "head": {"entries": 2, "entry-hash": "…"}, "head-signature": "…" (signed only),
     "entries": [{"run_id": …, …, "epsilon": …, "dataset-fingerprint": "sha256:…",
                  "prev-hash": "…", "entry-hash": "…", "signature": "…" (signed only)}, …]}

with ε = ∞ stored as the string ``"inf"`` (JSON has no infinity). Version-1 ledgers (the same
without the integrity fields) still load; the first release recorded converts the file to
version 2, chaining the old entries (each marked ``"migrated": true``, the header keeps a
``"migrated"`` note with the time) and binding it to the data of the site that records.

What an entry holds and how it is hashed and signed is :mod:`fedllm.privacy.ledger_chain`.
A file that is not a readable ledger is a ``LedgerError`` that says to restore it, never to delete
it: a fresh ledger would forget the site's spend.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.errors import LedgerError
from fedllm.privacy.ledger_chain import (
    LEDGER_FORMAT,
    LEDGER_KINDS,
    LEDGER_VERSION,
    READABLE_VERSIONS,
    LedgerEntry,
    chain_entry,
    genesis_hash,
    head_message,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

RESTORE_ADVICE = (
    "The file is corrupt or was edited by hand: restore it from a backup. Do not delete it: "
    "a fresh ledger would forget this site's privacy spend."
)
RESTORE_CHAIN_ADVICE = (
    "The ledger's hash chain is broken: it was edited after it was written. Restore it from a backup; "
    "do not delete it (a fresh ledger would forget this site's privacy spend). "
    "'fedllm ledger verify FILE' lists every problem."
)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON value {name}")


def read_document(path: Path) -> tuple[dict[str, Any], str]:
    """The ledger file's JSON object and its SHA-256; LedgerError if it is no readable ledger.

    Checks the header only (format, version, site, that ``entries`` is a list); the entries and the
    chain are :func:`fedllm.privacy.ledger_verification.inspect_document`'s job.
    """
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
        data = json.loads(text, parse_constant=_reject_constant)
    except OSError as exc:
        raise LedgerError(f"Privacy ledger {path} cannot be read: {exc}.") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise LedgerError(
            f"Privacy ledger {path} is not valid JSON ({exc}); it may be truncated. {RESTORE_ADVICE}") from exc
    if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
        raise LedgerError(
            f"{path} is not a fedllm privacy ledger (expected a JSON object with \"format\": \"{LEDGER_FORMAT}\"). "
            "Check the site's ledger path."
        )
    if data.get("version") not in READABLE_VERSIONS or isinstance(data.get("version"), bool):
        raise LedgerError(
            f"Privacy ledger {path} has version {data.get('version')!r}; this fedllm reads versions "
            f"{' and '.join(map(str, READABLE_VERSIONS))}. Use the fedllm version that wrote it."
        )
    if not isinstance(data.get("site"), str) or not data["site"]:
        raise LedgerError(f"Privacy ledger {path}: header field \"site\" must be a non-empty string, "
                          f"got {data.get('site')!r}. {RESTORE_ADVICE}")
    if data.get("kind", "site") not in LEDGER_KINDS:
        raise LedgerError(f"Privacy ledger {path}: header field \"kind\" must be one of {', '.join(LEDGER_KINDS)}, "
                          f"got {data.get('kind')!r}. {RESTORE_ADVICE}")
    if not isinstance(data.get("entries"), list):
        raise LedgerError(
            f"Privacy ledger {path}: \"entries\" must be a list, got {data.get('entries')!r}. {RESTORE_ADVICE}")
    return data, hashlib.sha256(raw).hexdigest()


def ledger_document(
    entries: Sequence[LedgerEntry], *, site: str, dataset_fingerprint: str | None,
    stored: Sequence[dict[str, Any]], to_migrate: int, migrated: dict[str, Any] | None,
    public_key: str | None, signing_key: Ed25519PrivateKey | None, kind: str = "site",
    held_out_split: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The version-2 file for ``entries``: the first ``len(stored)`` kept exactly as stored, new ones
    chained (and signed with ``signing_key``). ``to_migrate``: how many leading entries come from a
    version-1 file (marked ``migrated``, with a header note unless ``migrated`` already is one).
    ``public_key``: the header's (None: unsigned so far; set from ``signing_key`` when given).
    ``kind``: ``"site"`` (no ``kind`` in the header) or ``"central-dp"`` (the coordinator's).
    ``held_out_split``: the site's split policy (the header records it; older ledgers have none)."""
    key = signing_key
    if key is not None and public_key is None:
        from fedllm.privacy.signing import public_key_text

        public_key = public_key_text(key)
    if to_migrate and migrated is None:
        migrated = {"from-version": 1, "entries": to_migrate,
                    "time": datetime.now(UTC).isoformat(timespec="seconds")}
    prev = genesis_hash(site=site, dataset_fingerprint=dataset_fingerprint, kind=kind, held_out_split=held_out_split)
    chained: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        if index < len(stored):
            raw = stored[index]
        else:
            raw = chain_entry(entry, prev_hash=prev, dataset_fingerprint=dataset_fingerprint,
                              migrated=index < to_migrate, signing_key=key)
        chained.append(raw)
        prev = raw["entry-hash"]
    document: dict[str, Any] = {"format": LEDGER_FORMAT, "version": LEDGER_VERSION, "site": site}
    if kind != "site":
        document["kind"] = kind
    document["dataset-fingerprint"] = dataset_fingerprint
    if held_out_split is not None:
        document["held-out-split"] = held_out_split
    if public_key is not None:
        document["public-key"] = public_key
    if migrated is not None:
        document["migrated"] = migrated
    document["head"] = {"entries": len(chained), "entry-hash": prev}
    if key is not None:
        from fedllm.privacy.signing import sign

        document["head-signature"] = sign(key, head_message(site, len(chained), prev))
    document["entries"] = chained
    return document
