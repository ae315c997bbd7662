"""The privacy ledger's entries and its integrity: schema, canonical form, hash chain, signatures.

:mod:`fedllm.privacy.ledger` reads, writes and uses ledgers; this module says what a valid ledger
is, and finds every way a given one is not (:func:`inspect_document`). Split off so that each
module holds one job (docs/architecture.md, "Module map").

* **Canonical form** of a JSON value: ``json.dumps(value, sort_keys=True, separators=(",", ":"),
  ensure_ascii=True, allow_nan=False)``. Entries are hashed after parsing, in their normalised
  form (floats as Python floats, so ``1`` and ``1.0`` hash alike; ε = ∞ as ``"inf"``): JSON
  floats are written with Python's shortest round-trip ``repr``, so a value read back hashes
  exactly as it was written.
* **Genesis hash**: SHA-256 (hex) of the canonical ``{"format", "site", "dataset-fingerprint"}``
  of the header. It is entry 1's ``prev-hash``, so editing the site name or the fingerprint in
  the header breaks the chain at entry 1.
* **Entry hash**: SHA-256 (hex) of the canonical entry without ``entry-hash`` and
  ``signature`` (so it covers ``prev-hash``, the dataset fingerprint and ``migrated``).
* **Signatures**: Ed25519 over ``b"fedllm-privacy-ledger/v2 entry " + entry-hash`` for each
  entry, and over ``b"fedllm-privacy-ledger/v2 head " + canonical({"site", "entries",
  "entry-hash"})`` for the header's head; domain-separated so neither can stand in for the other.
* **Entries are numbered from 1** in every message.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fedllm.data.fingerprint import is_fingerprint
from fedllm.privacy.accounting import (
    ACCOUNTANTS,
    DPEvent,
    PrivacyParameterError,
    epsilon_for,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

LEDGER_FORMAT = "fedllm-privacy-ledger"
LEDGER_VERSION = 2
READABLE_VERSIONS = (1, 2)
EPSILON_RTOL = 1e-6  # recorded vs recomputed cumulative ε (the accountants are deterministic)

_ENTRY_DOMAIN = b"fedllm-privacy-ledger/v2 entry "
_HEAD_DOMAIN = b"fedllm-privacy-ledger/v2 head "
_HEADER_KEYS = ("format", "version", "site", "dataset-fingerprint", "public-key", "migrated", "head",
                "head-signature", "entries")


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


class FieldError(Exception):
    """A field of a ledger entry is missing, unknown or has a bad value."""

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
_FLOATS = ("sample_rate", "noise_multiplier", "max_grad_norm", "target_delta", "epsilon")
_INTS = ("server_round", "steps", "num_examples")


def parse_entry(raw: Any, *, integrity: bool = False) -> LedgerEntry:
    """A validated entry from its JSON object; ``integrity``: a version-2 entry (the chain fields
    are checked and required, then set aside). Raises :class:`FieldError`."""
    if not isinstance(raw, dict):
        raise FieldError("(entry)", "a JSON object", raw)
    known = [*_FIELDS, *(_INTEGRITY if integrity else ())]
    for name in raw:
        if name not in known:
            raise FieldError(name, "no such field (known: " + ", ".join(known) + ")", raw[name])
    for name, (expected, is_valid) in _FIELDS.items():
        if name not in raw:
            raise FieldError(name, f"{expected} (the field is missing)", None)
        if not is_valid(raw[name]):
            raise FieldError(name, expected, raw[name])
    if integrity:
        for name, (expected, is_valid, required) in _INTEGRITY.items():
            if name not in raw:
                if required:
                    raise FieldError(name, f"{expected} (the field is missing)", None)
            elif not is_valid(raw[name]):
                raise FieldError(name, expected, raw[name])
    fields = {name: raw[name] for name in _FIELDS}
    floats = {name: (math.inf if fields[name] == "inf" else float(fields[name])) for name in _FLOATS}
    return LedgerEntry(**{**fields, **floats, **{name: int(fields[name]) for name in _INTS}})


def entry_json(entry: LedgerEntry) -> dict[str, Any]:
    """The entry's own fields as JSON values (ε = ∞ as ``"inf"``)."""
    data = asdict(entry)
    if math.isinf(entry.epsilon):
        data["epsilon"] = "inf"
    return data


def canonical(value: Any) -> str:
    """The one serialisation that is hashed and signed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def genesis_hash(*, site: str, dataset_fingerprint: str | None) -> str:
    """Entry 1's ``prev-hash``: the hash of the header fields that name the ledger."""
    return _sha256(canonical({"format": LEDGER_FORMAT, "site": site, "dataset-fingerprint": dataset_fingerprint}))


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


def _fmt(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:.8g}"


def _span(first: int, last: int, verb: str = "") -> str:
    """``entry 3`` or ``entries 3–5``, with ``verb`` ("was"/"were"-style pair "is|are") agreeing."""
    single, plural = verb.split("|") if verb else ("", "")
    text = f"entry {first}" if first == last else f"entries {first}–{last}"
    return f"{text} {single if first == last else plural}".rstrip()


@dataclass(frozen=True)
class LedgerVerification:
    """What :func:`fedllm.privacy.ledger.verify_ledger` found. Entries are numbered from 1.

    ``ok``: nothing wrong. ``problems``: one line each, header problems first, then by entry.
    ``first_bad_entry``: the lowest entry a problem names (None: none does, e.g. only the header).
    ``signed``: the header carries a public key. ``signature_checked``: the signatures were checked
    against a public key the caller gave (the outcome is in ``ok``); without one they are only
    checked against the key in the file itself, which anyone rewriting the file could replace.
    ``dataset_fingerprint``: the header's ("" when not bound to a dataset). ``final_epsilon``: the
    cumulative ε recomputed over every readable entry, at the last entry's δ and accountant (0.0
    for an empty ledger); ``recorded_epsilon``: the last entry's recorded value. ``notes``: facts
    that are not problems (entries migrated from version 1, entries from before signing began).
    """

    path: str
    ok: bool
    problems: list[str]
    first_bad_entry: int | None
    entries: int
    signed: bool
    signature_checked: bool
    dataset_fingerprint: str
    final_epsilon: float
    recorded_epsilon: float
    target_delta: float | None
    accountant: str | None
    site: str
    version: int
    key_id: str  # "" when unsigned
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (kebab-case keys, ε = ∞ as ``"inf"``)."""
        out = {}
        for name, value in asdict(self).items():
            if isinstance(value, float) and math.isinf(value):
                value = "inf"
            out[name.replace("_", "-")] = value
        return out


@dataclass
class _Problem:
    entry: int | None
    text: str
    kind: str  # "field" (unreadable value), "chain" (integrity), "epsilon" (recomputation)


@dataclass
class Inspection:
    """Everything :func:`inspect_document` learnt about one ledger document."""

    version: int
    site: str
    dataset_fingerprint: str | None = None
    public_key: str | None = None
    entries: list[LedgerEntry | None] = field(default_factory=list)
    found: list[_Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    signature_checked: bool = False
    final_epsilon: float = 0.0

    def add(self, entry: int | None, text: str, kind: str = "chain") -> None:
        self.found.append(_Problem(entry, text, kind))

    @property
    def problems(self) -> list[tuple[int | None, str]]:
        """(entry or None, text), header problems first, then by entry (stable)."""
        ordered = sorted(self.found, key=lambda p: 0 if p.entry is None else p.entry)
        return [(p.entry, p.text) for p in ordered]

    @property
    def field_problem(self) -> bool:
        """Whether the first problem is an unreadable value (rather than a broken chain)."""
        ordered = sorted(self.found, key=lambda p: 0 if p.entry is None else p.entry)
        return bool(ordered) and ordered[0].kind == "field"

    def verification(self, path: str) -> LedgerVerification:
        found = list(self.found)
        if self.version == 1:
            found.insert(0, _Problem(None, "version 1 ledger: it has no hash chain, dataset binding or signature, so "
                                           "only its ε values can be checked; it becomes a chained version 2 ledger "
                                           "when the site records its next release", "chain"))
        ordered = sorted(found, key=lambda p: 0 if p.entry is None else p.entry)
        numbered = [p.entry for p in ordered if p.entry is not None]
        readable = [e for e in self.entries if e is not None]
        last = readable[-1] if readable else None
        from_key = ""
        if self.public_key is not None:
            from fedllm.privacy.signing import key_id

            from_key = key_id(self.public_key)
        return LedgerVerification(
            path=path, ok=not ordered, problems=[p.text for p in ordered],
            first_bad_entry=min(numbered) if numbered else None, entries=len(self.entries),
            signed=self.public_key is not None, signature_checked=self.signature_checked,
            dataset_fingerprint=self.dataset_fingerprint or "", final_epsilon=self.final_epsilon,
            recorded_epsilon=last.epsilon if last else 0.0, target_delta=last.target_delta if last else None,
            accountant=last.accountant if last else None, site=self.site, version=self.version,
            key_id=from_key, notes=list(self.notes),
        )


def inspect_document(data: dict[str, Any], *, recompute_epsilon: bool,
                     public_key: Ed25519PublicKey | None = None,
                     dataset_fingerprint: str | None = None) -> Inspection:
    """Check a ledger document (format, version, site and ``entries`` already checked by the reader).

    Every finding is recorded against the entry it concerns; nothing raises for a bad ledger.
    ``public_key`` / ``dataset_fingerprint``: what the ledger must have been signed with / bound to.
    """
    ins = Inspection(version=data["version"], site=data["site"])
    raw_entries = data["entries"]
    if ins.version == 1:
        for index, raw in enumerate(raw_entries, start=1):
            try:
                ins.entries.append(parse_entry(raw))
            except FieldError as exc:
                ins.entries.append(None)
                ins.add(index, f"entry {index}, {exc}", "field")
        if public_key is not None or dataset_fingerprint is not None:
            ins.add(None, "a version 1 ledger carries no dataset fingerprint or signature to check against", "chain")
        if recompute_epsilon:
            _recompute(ins)
        return ins
    _check_header(data, ins)
    header_key_obj, verify_key, key_mismatch = _signature_keys(ins, public_key)
    fp = ins.dataset_fingerprint  # None when the header's is null, missing or malformed
    fp_ok = "dataset-fingerprint" in data and (data["dataset-fingerprint"] is None or is_fingerprint(fp))
    genesis = genesis_hash(site=ins.site, dataset_fingerprint=fp)
    expected_prev: str | None = genesis if fp_ok else None
    seen: dict[str, int] = {}
    first_signed: int | None = None
    fp_mismatch: list[int] = []
    migrated: list[int] = []
    for index, raw in enumerate(raw_entries, start=1):
        try:
            entry: LedgerEntry | None = parse_entry(raw, integrity=True)
        except FieldError as exc:
            entry = None
            ins.add(index, f"entry {index}, {exc}", "field")
        ins.entries.append(entry)
        stored = raw.get("entry-hash") if isinstance(raw, dict) and _is_hash(raw.get("entry-hash")) else None
        if entry is not None:
            if raw.get("migrated"):
                migrated.append(index)
            if fp_ok and raw["dataset-fingerprint"] != fp:
                fp_mismatch.append(index)
            if raw["entry-hash"] in seen:
                ins.add(index, f"entry {index} is a copy of entry {seen[raw['entry-hash']]} (the same entry-hash): "
                               "an entry was inserted")
            elif expected_prev is not None and raw["prev-hash"] != expected_prev:
                if index == 1:
                    ins.add(1, "entry 1: its prev-hash does not match the ledger header (format, site, dataset "
                               "fingerprint): the header was edited, or entries before it were deleted")
                else:
                    ins.add(index, f"entry {index}: its prev-hash does not match the entry-hash of entry {index - 1}: "
                                   f"an entry was deleted before entry {index}, entry {index - 1} was inserted or "
                                   "replaced, or entries were reordered")
            computed = entry_hash(entry, prev_hash=raw["prev-hash"], dataset_fingerprint=raw["dataset-fingerprint"],
                                  migrated=bool(raw.get("migrated")))
            if computed != raw["entry-hash"]:
                ins.add(index, f"entry {index}: its content does not match its entry-hash: a field was edited after "
                               "it was written")
            first_signed = _check_entry_signature(ins, index, raw, first_signed, header_key_obj, verify_key,
                                                  key_mismatch, public_key)
        expected_prev = stored
        if stored is not None:
            seen.setdefault(stored, index)
    if fp_mismatch:
        first = fp_mismatch[0]
        more = f" ({len(fp_mismatch)} entries differ)" if len(fp_mismatch) > 1 else ""
        ins.add(first, f"entry {first}: its dataset fingerprint {raw_entries[first - 1]['dataset-fingerprint']} "
                       f"differs from the header's {fp}{more}")
    if ins.public_key is not None and first_signed is None and raw_entries:
        ins.add(None, "the header has a public key, but no entry is signed (signatures were removed)")
    if public_key is not None and ins.public_key is None:
        if raw_entries:
            ins.add(1, "entry 1 is not signed, but a public key was given: this ledger is unsigned (never signed by "
                       "the site, or its signatures and public key were removed)")
        else:
            ins.add(None, "the ledger is unsigned, but a public key was given")
    if first_signed is not None and first_signed > 1:
        ins.notes.append(f"{_span(1, first_signed - 1, 'was|were')} written before the site began signing; the "
                         f"signature of entry {first_signed} covers {'it' if first_signed == 2 else 'them'} through "
                         "the hash chain")
    if migrated:
        when = data.get("migrated", {}).get("time", "?") if isinstance(data.get("migrated"), dict) else "?"
        them = "it" if len(migrated) == 1 else "them"
        ins.notes.append(f"{_span(migrated[0], migrated[-1], 'was|were')} recorded in a version 1 ledger (no hash "
                         f"chain) and chained when it was converted ({when}): the chain protects {them} from then "
                         "on, not before")
    _check_head(data, ins, genesis, verify_key, key_mismatch)
    if dataset_fingerprint is not None and fp_ok and fp != dataset_fingerprint:
        bound = "is not bound to any dataset" if fp is None else f"is bound to the dataset {fp}"
        ins.add(1 if raw_entries else None,
                f"{'entry 1: ' if raw_entries else ''}the ledger {bound}, but the given data has the fingerprint "
                f"{dataset_fingerprint}: this ledger was not written for this data")
    if recompute_epsilon:
        _recompute(ins)
    return ins


def _check_header(data: dict[str, Any], ins: Inspection) -> None:
    for name in data:
        if name not in _HEADER_KEYS:
            ins.add(None, f"header field '{name}': no such field (known: {', '.join(_HEADER_KEYS)})", "field")
    fp = data.get("dataset-fingerprint")
    if "dataset-fingerprint" not in data:
        ins.add(None, "header field 'dataset-fingerprint': missing (expected 'sha256:<64 hex digits>' or null)",
                "field")
    elif fp is not None and not is_fingerprint(fp):
        ins.add(None, f"header field 'dataset-fingerprint': expected 'sha256:<64 hex digits>' or null, got {fp!r}",
                "field")
    else:
        ins.dataset_fingerprint = fp
    key = data.get("public-key")
    if key is not None:
        from fedllm.privacy.signing import public_key_from_text

        try:
            public_key_from_text(key)
            ins.public_key = key
        except (ValueError, TypeError) as exc:
            ins.add(None, f"header field 'public-key': not an Ed25519 public key ({exc})", "field")
    migrated = data.get("migrated")
    if migrated is not None and not isinstance(migrated, dict):
        ins.add(None, f"header field 'migrated': expected an object, got {migrated!r}", "field")


def _signature_keys(ins: Inspection, given: Ed25519PublicKey | None) -> tuple[Any, Any, bool]:
    """(the header's key, the key to verify with, whether the given key differs from the header's)."""
    if ins.public_key is None:
        return None, None, False
    from fedllm.privacy.signing import public_key_from_text, public_key_text

    header_key = public_key_from_text(ins.public_key)
    if given is None:
        return header_key, header_key, False
    ins.signature_checked = True
    if public_key_text(given) != ins.public_key:
        return header_key, None, True
    return header_key, given, False


def _check_entry_signature(ins: Inspection, index: int, raw: dict[str, Any], first_signed: int | None,
                           header_key: Any, verify_key: Any, key_mismatch: bool, given: Any) -> int | None:
    signature = raw.get("signature")
    if signature is None:
        if first_signed is not None:
            ins.add(index, f"entry {index} is not signed, but entry {first_signed} before it is: it was added or "
                           "altered by someone without the site's key")
        return first_signed
    if first_signed is None:
        first_signed = index
    if header_key is None:
        ins.add(index, f"entry {index} is signed, but the header has no public key (it was removed)")
        return first_signed
    from fedllm.privacy.signing import key_id, verify_signature

    if key_mismatch:
        if index == first_signed:
            ins.add(index, f"entry {index} is signed with key {key_id(ins.public_key or '')}, not with the given key "
                           f"{key_id(given)}: this ledger was not signed by that site")
        return first_signed
    if not verify_signature(verify_key, entry_message(raw["entry-hash"]), signature):
        ins.add(index, f"entry {index}: its signature does not verify with key {key_id(verify_key)}: the entry was "
                       "changed after it was signed, or signed with another key")
    return first_signed


def _check_head(data: dict[str, Any], ins: Inspection, genesis: str, verify_key: Any, key_mismatch: bool) -> None:
    head = data.get("head")
    if not (isinstance(head, dict) and set(head) == {"entries", "entry-hash"} and _is_count(head["entries"])
            and _is_hash(head["entry-hash"])):
        ins.add(None, f"header field 'head': expected {{\"entries\": <count>, \"entry-hash\": <hash>}}, got {head!r}",
                "field")
        return
    count, raw_entries = head["entries"], data["entries"]
    n = len(raw_entries)
    if count > n:
        ins.add(n + 1, f"{_span(n + 1, count, 'is|are')} missing: the header records {count} entries, the file has {n} "
                       "(entries were deleted from the end)")
    elif count < n:
        ins.add(count + 1, f"{_span(count + 1, n, 'is|are')} not covered by the header, which records {count} entries: "
                           "added after fedllm last wrote the ledger")
    else:
        last = raw_entries[-1].get("entry-hash") if n and isinstance(raw_entries[-1], dict) else genesis
        if head["entry-hash"] != last:
            ins.add(n if n else None, f"{'entry ' + str(n) + ': ' if n else ''}the header's head records another "
                                      "last entry-hash: the last entry was replaced")
    if verify_key is not None and not key_mismatch:
        from fedllm.privacy.signing import verify_signature

        if not verify_signature(verify_key, head_message(ins.site, count, head["entry-hash"]),
                                data.get("head-signature")):
            ins.add(None, "the header's head-signature does not verify: the head (number of entries, last "
                          "entry-hash) was changed by someone without the site's key, e.g. to hide entries deleted "
                          "from the end")


def _recompute(ins: Inspection) -> None:
    """Recompute every readable entry's cumulative ε over the readable entries up to it."""
    cache: dict[tuple[Any, ...], float] = {}
    events: list[DPEvent] = []
    last = None
    for index, entry in enumerate(ins.entries, start=1):
        if entry is None:
            continue
        events.append(entry.event)
        key = (tuple(events), entry.target_delta, entry.accountant)
        try:
            if key not in cache:
                cache[key] = epsilon_for(events, target_delta=entry.target_delta, accountant=entry.accountant)
        except PrivacyParameterError as exc:
            ins.add(index, f"entry {index}: its cumulative ε cannot be recomputed: {exc}", "epsilon")
            continue
        value = last = cache[key]
        recorded = entry.epsilon
        same = (math.isinf(value) and math.isinf(recorded)) or (
            math.isfinite(value) and math.isfinite(recorded)
            and abs(value - recorded) <= EPSILON_RTOL * max(abs(value), abs(recorded)) + 1e-12)
        if not same:
            ins.add(index, f"entry {index}: its cumulative ε {_fmt(recorded)} does not match {_fmt(value)} recomputed "
                           f"from the recorded parameters of {_span(1, index)} ({entry.accountant}, "
                           f"δ={entry.target_delta:g})", "epsilon")
    ins.final_epsilon = 0.0 if last is None else last
