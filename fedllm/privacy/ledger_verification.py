"""Verifying a privacy ledger: every way a given ledger document is not what it claims to be.

:func:`verify_ledger` (``fedllm ledger verify``, re-exported by :mod:`fedllm.privacy.ledger`) checks
a file, :func:`inspect_document` a parsed document (``PrivacyLedger.open`` runs it too, without
recomputing ε). Every finding is recorded against the entry it concerns, entries **numbered from
1**; nothing raises for a bad ledger. Valid entries, hashes and signatures are defined in
:mod:`fedllm.privacy.ledger_chain`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.data.fingerprint import is_fingerprint
from fedllm.privacy.accounting import DPEvent, PrivacyParameterError, epsilon_for
from fedllm.privacy.ledger_chain import (
    FieldError,
    LedgerEntry,
    _is_count,
    _is_hash,
    entry_hash,
    entry_message,
    genesis_hash,
    head_message,
    held_out_split_problem,
    parse_entry,
)
from fedllm.privacy.ledger_file import read_document

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

EPSILON_RTOL = 1e-6  # recorded vs recomputed cumulative ε (the accountants are deterministic)

_HEADER_KEYS = ("format", "version", "site", "kind", "dataset-fingerprint", "held-out-split", "public-key", "migrated", "head",
                "head-signature", "entries")


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
    kind: str = "site"  # "central-dp": the coordinator's ledger of site-level releases
    site_delta: float | None = None  # the site's δ policy (given, or last recorded); final_epsilon is at it
    site_max_epsilon: float | None = None  # the site's cap (given, or last recorded)
    held_out_split: dict[str, Any] | None = None  # the site's split policy (None: an older ledger without one)

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
    kind: str = "site"
    dataset_fingerprint: str | None = None
    held_out_split: dict[str, Any] | None = None
    public_key: str | None = None
    entries: list[LedgerEntry | None] = field(default_factory=list)
    found: list[_Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    signature_checked: bool = False
    final_epsilon: float = 0.0
    site_delta: float | None = None
    site_max_epsilon: float | None = None

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
            recorded_epsilon=last.epsilon if last else 0.0,
            target_delta=(self.site_delta if self.site_delta is not None else last.target_delta) if last else None,
            accountant=last.accountant if last else None, site=self.site, version=self.version,
            key_id=from_key, notes=list(self.notes), kind=self.kind, site_delta=self.site_delta,
            site_max_epsilon=self.site_max_epsilon, held_out_split=self.held_out_split,
        )


def inspect_document(data: dict[str, Any], *, recompute_epsilon: bool,
                     public_key: Ed25519PublicKey | None = None,
                     dataset_fingerprint: str | None = None) -> Inspection:
    """Check a ledger document (format, version, site and ``entries`` already checked by the reader).

    Every finding is recorded against the entry it concerns; nothing raises for a bad ledger.
    ``public_key`` / ``dataset_fingerprint``: what the ledger must have been signed with / bound to.
    """
    ins = Inspection(version=data["version"], site=data["site"], kind=str(data.get("kind", "site")))
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
    genesis = genesis_hash(site=ins.site, dataset_fingerprint=fp, kind=ins.kind,
                           held_out_split=data.get("held-out-split"))
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
            _check_kind(ins, index, entry)
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


def _check_kind(ins: Inspection, index: int, entry: LedgerEntry) -> None:
    """A central-DP ledger's entries are single Gaussian releases over the federation's sites (steps 1,
    q 1, a ``central_dp`` block agreeing with ``num_examples`` = N); a site's entries have no such block."""
    if ins.kind != "central-dp":
        if entry.central_dp is not None:
            ins.add(index, f"entry {index} carries a central_dp block, but this is a site's ledger (no \"kind\": "
                           "\"central-dp\" in the header)")
        return
    block = entry.central_dp
    if block is None:
        ins.add(index, f"entry {index} has no central_dp block (sites asked, sites, sampling), which every entry of "
                       "a central-DP ledger records")
    elif block["total_sites"] != entry.num_examples:
        ins.add(index, f"entry {index}: central_dp.total_sites = {block['total_sites']} differs from num_examples = "
                       f"{entry.num_examples} (both are N, the federation's sites)")
    if entry.steps != 1 or entry.sample_rate != 1.0:
        ins.add(index, f"entry {index}: a central-DP release is one Gaussian mechanism without amplification "
                       f"(steps 1, sample_rate 1), got steps {entry.steps}, sample_rate {entry.sample_rate:g}")


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
    split = data.get("held-out-split")
    if split is not None:
        why = held_out_split_problem(split)
        if why:
            ins.add(None, f"header field 'held-out-split': {why}, got {split!r}", "field")
        else:
            ins.held_out_split = split
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


def _check_policy(ins: Inspection, *, max_delta: float | None, max_epsilon: float | None) -> None:
    """Against the site's privacy policy (given, else the last one an entry records): flag every entry
    recorded at a larger δ than the site's, and a cumulative ε at the site's δ above its cap; set
    ``final_epsilon`` to the cumulative ε at the site's δ. Only for verification: a site opening its
    own ledger keeps training at its δ, whatever older entries were recorded at."""
    readable = [(i, e) for i, e in enumerate(ins.entries, start=1) if e is not None]
    recorded = next(((e.site_max_delta, e.site_max_epsilon) for _, e in reversed(readable)
                     if e.site_max_delta is not None), None)
    delta = max_delta if max_delta is not None else (recorded[0] if recorded else None)
    cap = max_epsilon if max_epsilon is not None else (recorded[1] if recorded else None)
    ins.site_delta, ins.site_max_epsilon = delta, cap
    if delta is None or not readable:
        return
    source = "given" if max_delta is not None else "the site's policy recorded in the ledger"
    for index, entry in readable:
        if entry.target_delta > delta:
            ins.add(index, f"entry {index}: recorded at δ={entry.target_delta:g}, larger than the site's δ={delta:g} "
                           f"({source}): its ε={_fmt(entry.epsilon)} understates the spend; the cumulative ε at the "
                           "site's δ is what counts", "policy")
    try:
        total = epsilon_for([e.event for _, e in readable], target_delta=delta, accountant=readable[-1][1].accountant)
    except PrivacyParameterError as exc:
        ins.add(None, f"the cumulative ε at the site's δ={delta:g} cannot be computed: {exc}", "epsilon")
        return
    ins.final_epsilon = total
    if cap is not None and total > cap * (1 + EPSILON_RTOL):
        ins.add(None, f"the cumulative ε at the site's δ={delta:g} is {_fmt(total)}, above the site's cap "
                      f"max-epsilon = {cap:g}", "policy")


def verify_ledger(
    path: Path | str, *, public_key: Ed25519PublicKey | Path | str | None = None,
    dataset_fingerprint: str | None = None, max_delta: float | None = None, max_epsilon: float | None = None,
) -> LedgerVerification:
    """Check a ledger file completely; the result says what is wrong, naming the first bad entry (1-based).

    Checks: every entry's fields; the hash chain (an edited, deleted, inserted or reordered entry,
    an edited header); the head (entries deleted from the end); that every entry and the header
    carry the same dataset fingerprint, and that it equals ``dataset_fingerprint`` when given; the
    signatures (against ``public_key`` when given: an Ed25519 public key or the path of its PEM
    file; else against the key in the header, which only shows consistency); and every cumulative
    ε, recomputed from the recorded parameters of all entries up to it (relative tolerance
    ``EPSILON_RTOL``). Against the site's privacy policy (``max_delta`` / ``max_epsilon`` when given,
    else the last policy an entry records): every entry recorded at a larger δ than the site's is a
    problem, and so is a cumulative ε at the site's δ above its cap; ``final_epsilon`` is then the
    cumulative ε at the site's δ (``site_delta``).

    Raises ``LedgerError`` when the file is no readable ledger (missing, not JSON, another format
    or version) and ``ConfigError`` for an unreadable public key; every other finding is in the
    result (``ok`` False).
    """
    path = Path(path)
    key: Ed25519PublicKey | None
    if isinstance(public_key, (str, Path)):  # the path of a PEM file
        from fedllm.privacy.signing import load_public_key

        key = load_public_key(public_key)
    else:
        key = public_key
    if dataset_fingerprint is not None and not is_fingerprint(dataset_fingerprint):
        raise PrivacyParameterError(
            f"dataset_fingerprint must be 'sha256:<64 hex digits>', got {dataset_fingerprint!r}")
    data, _ = read_document(path)
    inspection = inspect_document(data, recompute_epsilon=True, public_key=key,
                                  dataset_fingerprint=dataset_fingerprint)
    _check_policy(inspection, max_delta=max_delta, max_epsilon=max_epsilon)
    return inspection.verification(str(path))
