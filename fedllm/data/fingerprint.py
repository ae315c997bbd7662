"""A fingerprint of a site's dataset, to bind its privacy ledger to the data the budget was spent on.

``dataset_fingerprint(records)`` is computed from loaded records, as
:func:`fedllm.data.loading.load_records` returns them (normalised to ``{"messages": [...]}`` or
``{"text": ...}``), before tokenization. A site's ledger is bound to the fingerprint of its
**training subset**: the records its own held-out split (:mod:`fedllm.site.holdout`, keyed by the
site's split key) leaves for training. Records held out for evaluation are never trained on and
are not part of it. The fingerprint:

* covers every record it is given (a site gives it its training subset; ``fedllm ledger verify
  --data`` recomputes that subset with the site's split key);
* does not depend on the model, tokenizer, ``data.max-length`` or the run configuration: the same
  data trained under another model is the same dataset and spends from the same budget;
* does not depend on the order of the records, nor on the file type (a JSON Lines file and the
  CSV with the same records have the same fingerprint), but counts duplicates (it fingerprints a
  multiset);
* changes when any record is added, removed or edited, even by one character.

Construction: each record's canonical JSON (``sort_keys``, no spaces, ``ensure_ascii``) is hashed
with SHA-256; the sorted per-record hex digests and the record count are hashed again. The result
is ``"sha256:<64 hex digits>"``. It reveals nothing about the records beyond their number being
part of the preimage; it is stored only in the site's own ledger.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

FINGERPRINT_PREFIX = "sha256:"
_DOMAIN = b"fedllm-dataset-fingerprint/v1\n"


def canonical_record_bytes(record: Mapping[str, Any]) -> bytes:
    """One normalised record's canonical JSON (``sort_keys``, no spaces, ``ensure_ascii``): the
    bytes that identify its content (fingerprints, the site's keyed held-out split)."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.encode("ascii")


def record_digest(record: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of one record's canonical JSON."""
    return hashlib.sha256(canonical_record_bytes(record)).hexdigest()


def dataset_fingerprint(records: Iterable[Mapping[str, Any]]) -> str:
    """``"sha256:<hex>"`` of a dataset's records, independent of their order (see the module doc)."""
    digests = sorted(record_digest(record) for record in records)
    outer = hashlib.sha256(_DOMAIN)
    outer.update(f"{len(digests)}\n".encode("ascii"))
    for digest in digests:
        outer.update(digest.encode("ascii") + b"\n")
    return FINGERPRINT_PREFIX + outer.hexdigest()


def is_fingerprint(value: object) -> bool:
    """True for a string of the form ``"sha256:<64 lowercase hex digits>"``."""
    if not isinstance(value, str) or not value.startswith(FINGERPRINT_PREFIX):
        return False
    digest = value[len(FINGERPRINT_PREFIX):]
    return len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
