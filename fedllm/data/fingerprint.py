"""A fingerprint of a site's dataset, to bind its privacy ledger to the data the budget was spent on.

``dataset_fingerprint(records)`` is computed from the site's loaded records, as
:func:`fedllm.data.loading.load_records` returns them (normalised to ``{"messages": [...]}`` or
``{"text": ...}``), before tokenization. So it:

* covers every record of the site's data file: the training records *and* the ones the run holds
  out for evaluation (which ones are held out depends on ``data.eval-fraction`` and ``data.seed``,
  which do not change what the data is);
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


def record_digest(record: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of one record's canonical JSON."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


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
