"""The privacy ledger's entries and their chain: schema, canonical form, hashes, signatures.

:mod:`fedllm.privacy.ledger` reads, writes and uses ledgers; this module says what a valid entry
is (:func:`parse_entry`) and how entries are chained and signed (:func:`chain_entry`);
:mod:`fedllm.privacy.ledger_verification` finds every way a given ledger is not valid.

* **Canonical form** of a JSON value: ``json.dumps(value, sort_keys=True, separators=(",", ":"),
  ensure_ascii=True, allow_nan=False)``. Entries are hashed after parsing, in their normalised
  form (floats as Python floats, so ``1`` and ``1.0`` hash alike; ε = ∞ as ``"inf"``): JSON
  floats are written with Python's shortest round-trip ``repr``, so a value read back hashes
  exactly as it was written.
* **Genesis hash**: SHA-256 (hex) of the canonical ``{"format", "site", "dataset-fingerprint"}``
  of the header, plus ``"held-out-split"`` when the header records the site's split policy. It is entry 1's ``prev-hash``, so editing the site name or the fingerprint in
  the header (or its held-out split policy) breaks the chain at entry 1.
* **Entry hash**: SHA-256 (hex) of the canonical entry without ``entry-hash`` and
  ``signature`` (so it covers ``prev-hash``, the dataset fingerprint and ``migrated``).
* **Kinds**: a site's ledger (``"kind"`` absent from the header, or ``"site"``), and the
  coordinator's central-DP ledger (``"kind": "central-dp"``, :mod:`fedllm.coordinator.central_dp`):
  one entry per noisy aggregate the coordinator released, ``steps`` = 1 and ``sample_rate`` = 1
  (one Gaussian release, no amplification), ``noise_multiplier`` z, ``max_grad_norm`` the clipping
  norm S_t, ``num_examples`` N (the federation's sites), and a ``central_dp`` object with m (sites
  asked), N, the site sampling and the clipping mode. A central-DP ledger's genesis hash covers
  its kind, so a header edited from one kind to the other breaks the chain at entry 1.
* **Signatures**: Ed25519 over ``b"fedllm-privacy-ledger/v2 entry " + entry-hash`` for each
  entry, and over ``b"fedllm-privacy-ledger/v2 head " + canonical({"site", "entries",
  "entry-hash"})`` for the header's head; domain-separated so neither can stand in for the other.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fedllm.data.fingerprint import is_fingerprint
from fedllm.privacy.accounting import ACCOUNTANTS, DPEvent

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

LEDGER_FORMAT = "fedllm-privacy-ledger"
LEDGER_VERSION = 2
READABLE_VERSIONS = (1, 2)

_ENTRY_DOMAIN = b"fedllm-privacy-ledger/v2 entry "
_HEAD_DOMAIN = b"fedllm-privacy-ledger/v2 head "


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
    # central-DP ledger only: {"sites_per_round": m, "total_sites": N, "sampling", "clipping"}
    central_dp: dict[str, Any] | None = None
    # the site's privacy policy when it recorded the entry (issue 13); None in entries written before
    site_max_delta: float | None = None  # the site's δ: the entry's ε, and every total, are at most at this δ
    site_max_epsilon: float | None = None  # the site's own cap on its cumulative ε
    # what was released: "update" (a round's adapter update; the field is then left out of the
    # stored entry, so entries written before it existed hash alike) or "metrics" (held-out metrics
    # released with the Gaussian mechanism, fedllm.site.metric_release: 1 step, q = 1)
    release: str = "update"

    @property
    def event(self) -> DPEvent:
        return DPEvent(self.noise_multiplier, self.sample_rate, self.steps)


class FieldError(Exception):
    """A field of a ledger entry is missing, unknown or has a bad value."""

    def __init__(self, field: str, expected: str, value: object) -> None:
        super().__init__(f"field '{field}': expected {expected}, got {value!r}")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 0


def _is_timestamp(value: Any) -> bool:
    try:
        return isinstance(value, str) and datetime.fromisoformat(value) is not None
    except ValueError:
        return False


def _is_hash(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


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
_INTEGRITY: dict[str, tuple[str, Callable[[Any], bool], bool]] = {  # name: (expected, check, required)
    "dataset-fingerprint": ("'sha256:<64 hex digits>' or null", lambda v: v is None or is_fingerprint(v), True),
    "migrated": ("true (or no such field)", lambda v: v is True, False),
    "prev-hash": ("64 lowercase hex digits", _is_hash, True),
    "entry-hash": ("64 lowercase hex digits", _is_hash, True),
    "signature": ("a base64 string", lambda v: isinstance(v, str) and v != "", False),
}
LEDGER_KINDS = ("site", "central-dp")
CENTRAL_DP_SAMPLING = ("all", "fixed-subset")
CENTRAL_DP_CLIPPING = ("fixed", "adaptive")
_CENTRAL_KEYS = ("sites_per_round", "total_sites", "sampling", "clipping")


def _is_central_block(value: Any) -> bool:
    if not isinstance(value, dict) or sorted(value) != sorted(_CENTRAL_KEYS):
        return False
    m, n = value["sites_per_round"], value["total_sites"]
    return (_is_count(m) and _is_count(n) and 1 <= m <= n and value["sampling"] in CENTRAL_DP_SAMPLING
            and value["clipping"] in CENTRAL_DP_CLIPPING and (value["sampling"] != "all" or m == n))


_CENTRAL_EXPECTED = ("an object {sites_per_round: m >= 1, total_sites: N >= m, sampling: all (m = N) or "
                     "fixed-subset, clipping: fixed or adaptive}")


RELEASES = ("update", "metrics")
_OPTIONAL: dict[str, tuple[str, Callable[[Any], bool]]] = {  # may be absent (older entries); hashed when present
    "site_max_delta": ("a number in (0, 1)", lambda v: _is_real(v) and 0 < v < 1),
    "site_max_epsilon": ("a finite number > 0", lambda v: _is_real(v) and v > 0),
    "release": (f"one of {', '.join(RELEASES)}", lambda v: v in RELEASES),
}
_FLOATS = ("sample_rate", "noise_multiplier", "max_grad_norm", "target_delta", "epsilon")
_INTS = ("server_round", "steps", "num_examples")


def parse_entry(raw: Any, *, integrity: bool = False) -> LedgerEntry:
    """A validated entry from its JSON object; ``integrity``: a version-2 entry (the chain fields
    are checked and required, then set aside). Raises :class:`FieldError`."""
    if not isinstance(raw, dict):
        raise FieldError("(entry)", "a JSON object", raw)
    known = [*_FIELDS, "central_dp", *_OPTIONAL, *(_INTEGRITY if integrity else ())]
    for name in raw:
        if name not in known:
            raise FieldError(name, "no such field (known: " + ", ".join(known) + ")", raw[name])
    for name, (expected, is_valid) in _FIELDS.items():
        if name not in raw:
            raise FieldError(name, f"{expected} (the field is missing)", None)
        if not is_valid(raw[name]):
            raise FieldError(name, expected, raw[name])
    for name, (expected, is_valid) in _OPTIONAL.items():
        if name in raw and not is_valid(raw[name]):
            raise FieldError(name, expected, raw[name])
    if integrity:
        for name, (expected, is_valid, required) in _INTEGRITY.items():
            if name not in raw:
                if required:
                    raise FieldError(name, f"{expected} (the field is missing)", None)
            elif not is_valid(raw[name]):
                raise FieldError(name, expected, raw[name])
    central = raw.get("central_dp")
    if "central_dp" in raw and not _is_central_block(central):
        raise FieldError("central_dp", _CENTRAL_EXPECTED, central)
    optional: dict[str, Any] = {name: (raw[name] if name == "release" else float(raw[name]))
                                for name in _OPTIONAL if name in raw}
    fields = {name: raw[name] for name in _FIELDS}
    floats = {name: (math.inf if fields[name] == "inf" else float(fields[name])) for name in _FLOATS}
    if central is not None:
        central = {k: (int(v) if k in ("sites_per_round", "total_sites") else v) for k, v in central.items()}
    return LedgerEntry(**{**fields, **floats, **{name: int(fields[name]) for name in _INTS}}, central_dp=central,
                       **optional)


def entry_json(entry: LedgerEntry) -> dict[str, Any]:
    """The entry's own fields as JSON values (ε = ∞ as ``"inf"``)."""
    # a site's entry without the optional fields (central_dp, the policy, a non-update release) is
    # hashed exactly as before those fields existed
    data = {name: value for name, value in asdict(entry).items()
            if not ((name in _OPTIONAL or name == "central_dp") and value is None)}
    if entry.release == "update":
        del data["release"]
    if math.isinf(entry.epsilon):
        data["epsilon"] = "inf"
    return data


def canonical(value: Any) -> str:
    """The one serialisation that is hashed and signed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def genesis_hash(*, site: str, dataset_fingerprint: str | None, kind: str = "site",
                 held_out_split: dict[str, Any] | None = None) -> str:
    """Entry 1's ``prev-hash``: the hash of the header fields that name the ledger: its kind too,
    unless it is a site's ledger, and the site's held-out split policy when the header records one
    (ledgers from before kinds and splits existed keep their genesis)."""
    header: dict[str, Any] = {"format": LEDGER_FORMAT, "site": site, "dataset-fingerprint": dataset_fingerprint}
    if kind != "site":
        header["kind"] = kind
    if held_out_split is not None:
        header["held-out-split"] = held_out_split
    return _sha256(canonical(header))


def entry_hash(entry: LedgerEntry, *, prev_hash: str, dataset_fingerprint: str | None, migrated: bool) -> str:
    """``entry-hash`` of an entry: everything in it but ``entry-hash`` and ``signature``."""
    content = {**entry_json(entry), "dataset-fingerprint": dataset_fingerprint, "prev-hash": prev_hash}
    if migrated:
        content["migrated"] = True
    return _sha256(canonical(content))


def entry_message(entry_hash_hex: str) -> bytes:
    """What an entry's signature signs."""
    return _ENTRY_DOMAIN + entry_hash_hex.encode("ascii")


def head_message(site: str, entries: int, last_hash: str) -> bytes:
    """What the header's ``head-signature`` signs."""
    return _HEAD_DOMAIN + canonical({"site": site, "entries": entries, "entry-hash": last_hash}).encode("ascii")


def held_out_split_problem(value: Any) -> str | None:
    """What is wrong with a header's ``held-out-split`` (None: fine)."""
    if not isinstance(value, dict) or set(value) != {"eval-fraction", "max-eval-examples", "split-key-id"}:
        return "expected {\"eval-fraction\", \"max-eval-examples\", \"split-key-id\"}"
    if not (_is_real(value["eval-fraction"]) and 0 <= value["eval-fraction"] <= 1):
        return "eval-fraction: expected a number in [0, 1]"
    if not _is_count(value["max-eval-examples"]):
        return "max-eval-examples: expected an integer >= 0"
    key_id = value["split-key-id"]
    if not (isinstance(key_id, str) and len(key_id) == 16 and all(c in "0123456789abcdef" for c in key_id)):
        return "split-key-id: expected 16 lowercase hex digits"
    return None


def chain_entry(entry: LedgerEntry, *, prev_hash: str, dataset_fingerprint: str | None, migrated: bool,
                signing_key: Ed25519PrivateKey | None) -> dict[str, Any]:
    """The stored (version-2) form of a new entry: its fields, fingerprint, hashes and signature."""
    raw: dict[str, Any] = {**entry_json(entry), "dataset-fingerprint": dataset_fingerprint}
    if migrated:
        raw["migrated"] = True
    raw["prev-hash"] = prev_hash
    raw["entry-hash"] = entry_hash(entry, prev_hash=prev_hash, dataset_fingerprint=dataset_fingerprint,
                                   migrated=migrated)
    if signing_key is not None:
        from fedllm.privacy.signing import sign

        raw["signature"] = sign(signing_key, entry_message(raw["entry-hash"]))
    return raw
