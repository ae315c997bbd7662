"""Screening of site replies before they reach the strategy (``triage_replies``).

Before a reply reaches the strategy it is triaged: a site refusing a
round for its privacy budget is recorded, a failed site is counted, and a reply that is not
exactly what a site sends is rejected, naming the reason: records other than the adapter arrays
(train only), the metrics and the site's name; a site name that is not a short safe string
(``[A-Za-z0-9._-]{1,64}``; the reply is then filed under ``node-<id>``) or that another reply of
the round already used; metrics other than exactly ``wire.TRAIN_METRIC_KEYS`` /
``wire.EVALUATE_METRIC_KEYS`` or not finite scalars; an update with wrong keys, shapes, dtypes or
non-finite values, or (``federation.max-update-norm`` > 0) whose L2 distance from the global
adapter it was sent exceeds that bound. The rest are aggregated.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedllm import wire
from fedllm.errors import InvalidUpdateError

log = logging.getLogger(__name__)

SAFE_SITE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
REPLY_KINDS = ("train", "evaluate")


def update_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of ``arrays − reference`` over all of the reference's tensors, in float64."""
    total = 0.0
    for key in reference:
        diff = (arrays[key].numpy().astype(np.float64) - reference[key].numpy().astype(np.float64)).ravel()
        total += float(np.dot(diff, diff))
    return math.sqrt(total)


def validate_update(arrays: ArrayRecord, reference: ArrayRecord, *, require_change: bool = False,
                    max_update_norm: float = 0.0) -> None:
    """Raise ``InvalidUpdateError`` unless ``arrays`` has exactly the reference's keys, shapes
    and dtypes, and only finite values; with ``require_change`` (central DP, whose clipping
    divides by the update's norm) also unless some value differs from the reference; with
    ``max_update_norm`` > 0 also when :func:`update_norm` exceeds it (a norm equal to the bound
    passes)."""
    got, want = set(arrays.keys()), set(reference.keys())
    if got != want:
        missing, extra = sorted(want - got)[:2], sorted(got - want)[:2]
        raise InvalidUpdateError(f"wrong adapter keys (missing {missing}, unexpected {extra})")
    for key in reference.keys():
        a, r = arrays[key], reference[key]
        if tuple(a.shape) != tuple(r.shape):
            raise InvalidUpdateError(f"{key}: shape {tuple(a.shape)}, expected {tuple(r.shape)}")
        if a.dtype != r.dtype:
            raise InvalidUpdateError(f"{key}: dtype {a.dtype}, expected {r.dtype}")
        if not np.isfinite(a.numpy()).all():
            raise InvalidUpdateError(f"{key}: contains NaN or Inf")
    if require_change and all(np.array_equal(arrays[k].numpy(), reference[k].numpy()) for k in reference.keys()):
        raise InvalidUpdateError("identical to the global adapter it was sent: no update (nothing was trained)")
    if max_update_norm > 0:
        norm = update_norm(arrays, reference)
        if norm > max_update_norm:
            shown, bound = f"{norm:.6g}", f"{max_update_norm:.6g}"
            if shown == bound:  # just above the bound: show every digit
                shown, bound = repr(norm), repr(float(max_update_norm))
            raise InvalidUpdateError(
                f"update norm {shown} (L2 over all tensors, relative to the global adapter it was sent) exceeds "
                f"the bound {bound} set by federation.max-update-norm")


def validate_metrics(metrics: MetricRecord, *, kind: str) -> None:
    """Raise ``InvalidUpdateError`` unless ``metrics`` holds exactly the agreed keys for ``kind``
    (``wire.TRAIN_METRIC_KEYS`` / ``wire.EVALUATE_METRIC_KEYS``), each a finite int or float (a
    site sends -1 for "not defined"), with ``num-examples`` an int > 0 for train and >= 0 for
    evaluate (a site without held-out data, ``data.eval-fraction = 0``, evaluates 0 examples)."""
    expected = wire.TRAIN_METRIC_KEYS if kind == "train" else wire.EVALUATE_METRIC_KEYS
    got = list(metrics.keys())
    missing = [k for k in expected if k not in got]
    extra = sorted(k for k in got if k not in expected)
    if missing or extra:
        parts = ([f"missing {', '.join(repr(k) for k in missing)}"] if missing else []) + (
            [f"unexpected {', '.join(repr(k[:64]) for k in extra[:3])}"] if extra else [])
        raise InvalidUpdateError(f"metrics: {'; '.join(parts)} (the {kind} metrics are exactly {list(expected)})")
    for key in expected:
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidUpdateError(f"metrics: {key!r} is {type(value).__name__} {repr(value)[:80]}, "
                                     "expected one number")
        if not math.isfinite(value):
            raise InvalidUpdateError(f"metrics: {key!r} is {value!r}, expected a finite number (-1 for not defined)")
    examples = metrics[wire.NUM_EXAMPLES]
    least = 1 if kind == "train" else 0
    if not isinstance(examples, int) or examples < least:
        raise InvalidUpdateError(f"metrics: {wire.NUM_EXAMPLES!r} is {examples!r}, expected an int >= {least}")


def _claimed_name(msg: Message) -> str | None:
    """The site name a reply carries, when its ``wire.SITE`` record is well-formed and safe."""
    if not msg.has_content() or wire.SITE not in msg.content:
        return None
    record = msg.content[wire.SITE]
    if not isinstance(record, ConfigRecord) or list(record.keys()) != [wire.SITE_NAME]:
        return None
    value = record[wire.SITE_NAME]
    return value if isinstance(value, str) and SAFE_SITE_NAME.fullmatch(value) else None


def validate_reply_records(msg: Message, *, kind: str) -> None:
    """Raise ``InvalidUpdateError`` unless the reply holds exactly what a site sends: one
    ``ArrayRecord`` under ``wire.ARRAYS`` (train only), one ``MetricRecord`` under
    ``wire.METRICS``, and optionally ``wire.SITE``, a ``ConfigRecord`` of exactly
    ``{wire.SITE_NAME: str}`` with a name matching ``[A-Za-z0-9._-]{1,64}``."""
    content = msg.content
    allowed: dict[str, type] = {wire.METRICS: MetricRecord, wire.SITE: ConfigRecord}
    if kind == "train":
        allowed[wire.ARRAYS] = ArrayRecord
    for what, records, most in (("ArrayRecords", content.array_records, 1 if kind == "train" else 0),
                                ("MetricRecords", content.metric_records, 1)):
        if len(records) > most:
            raise InvalidUpdateError(f"{len(records)} {what} in the {kind} reply ({', '.join(sorted(records))}), "
                                     f"expected {most or 'none'}")
    for name in content:
        if name not in allowed:
            raise InvalidUpdateError(f"unexpected record {name!r} in the {kind} reply (expected only "
                                     f"{', '.join(repr(k) for k in allowed)})")
        if not isinstance(content[name], allowed[name]):
            raise InvalidUpdateError(f"record {name!r} is a {type(content[name]).__name__}, "
                                     f"expected a {allowed[name].__name__}")
    for name in allowed:
        if name != wire.SITE and name not in content:
            raise InvalidUpdateError(f"no {name!r} record in the {kind} reply")
    if wire.SITE in content and _claimed_name(msg) is None:
        record = content[wire.SITE]
        if list(record.keys()) != [wire.SITE_NAME]:
            raise InvalidUpdateError(f"record {wire.SITE!r} has keys {sorted(record.keys())[:4]}, "
                                     f"expected exactly [{wire.SITE_NAME!r}]")
        value = record[wire.SITE_NAME]
        if not isinstance(value, str):
            raise InvalidUpdateError(f"site name is a {type(value).__name__}, expected a string")
        raise InvalidUpdateError(f"site name {value[:80]!r} is not 1-64 characters of A-Z a-z 0-9 . _ -")


@dataclass
class Triage:
    """Replies of one round sorted by what happened at each site."""

    accepted: list[Message] = field(default_factory=list)
    metrics: dict[str, dict] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    failed: list[dict] = field(default_factory=list)


def _reply_name(msg: Message, names: dict[int, str], node: int) -> tuple[str, bool]:
    """(name, whether the reply itself claimed it); see :func:`site_name`."""
    if msg.has_content() and wire.SITE in msg.content:
        claimed = _claimed_name(msg)
        return (claimed, True) if claimed is not None else (f"node-{node}", False)
    return names.get(node, f"node-{node}"), False


def site_name(msg: Message, names: dict[int, str]) -> str:
    """The site a reply came from: the name it sent when that is a safe string (remembered in
    ``names``), ``node-<id>`` when it sent a malformed or unsafe one, else a known name or
    ``node-<id>``."""
    name, claimed = _reply_name(msg, names, msg.metadata.src_node_id)
    if claimed:
        names[msg.metadata.src_node_id] = name
    return name


def triage_replies(replies: list[Message], *, reference: ArrayRecord | None, names: dict[int, str],
                   require_change: bool = False, max_update_norm: float = 0.0, kind: str | None = None,
                   node_of: dict[str, int] | None = None) -> Triage:
    """Sort one round's replies into accepted (with their metrics), refused, rejected and failed.

    ``kind`` is "train" or "evaluate" (default: "train" when ``reference``, the arrays sent, is
    given, else "evaluate"). Evaluate replies, and train replies when ``reference`` is given, are
    validated (records, site name, metrics; for train also the update against ``reference`` with
    ``require_change`` and ``max_update_norm``); a reply that fails goes to ``rejected`` with the
    reason. A second reply of the round claiming a name already used is rejected under its
    ``node-<id>`` name. ``node_of`` (message id sent → node it was sent to) charges a reply to the
    node its ``reply_to_message_id`` was sent to (an error the SuperLink wrote for an unreachable
    node); without it, or for an unknown id, a reply belongs to its ``src_node_id``.
    """
    kind = kind or ("train" if reference is not None else "evaluate")
    if kind not in REPLY_KINDS:
        raise ValueError(f"kind must be one of {', '.join(REPLY_KINDS)}, not {kind!r}")
    validate = kind == "evaluate" or reference is not None
    out = Triage()
    used: set[str] = set()
    for msg in replies:
        node = (node_of or {}).get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        name, claimed = _reply_name(msg, names, node)
        if name in used:
            out.rejected[f"node-{node}"] = f"site name {name!r} was already used by another reply in this round"
            log.error("rejected %s reply from node %s: site name %r already used in this round", kind, node, name)
            continue
        used.add(name)
        if claimed:
            names[node] = name
        if msg.has_error():
            if msg.error.code == wire.BUDGET_REFUSED:
                out.refused[name] = msg.error.reason
                log.info("site %s refused the round: %s", name, msg.error.reason)
            else:
                out.failed.append({"site": name, "code": int(msg.error.code), "reason": msg.error.reason})
                log.error("site %s failed: %s", name, msg.error.reason)
            continue
        if validate:
            try:
                validate_reply_records(msg, kind=kind)
                if kind == "train":
                    validate_update(msg.content[wire.ARRAYS], reference, require_change=require_change,
                                    max_update_norm=max_update_norm)
                validate_metrics(msg.content[wire.METRICS], kind=kind)
            except InvalidUpdateError as exc:
                out.rejected[name] = str(exc)
                log.error("rejected %s reply from site %s: %s", kind, name, exc)
                continue
        out.accepted.append(msg)
        out.metrics[name] = dict(msg.content[wire.METRICS])
    return out
