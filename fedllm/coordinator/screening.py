"""Screening of site replies before they reach the strategy (``triage_replies``).

Before a reply reaches the strategy it is triaged: a site refusing a
round for its privacy budget (``wire.BUDGET_REFUSED``) or because the run is outside its privacy
policy (``wire.POLICY_REFUSED``) is recorded with its reason, a failed site is counted, and a reply that is not
exactly what a site sends is rejected, naming the reason: what the transport found malformed
(``Reply.malformed``: records other than the adapter arrays (train only), the metrics and the
site's name); a site name that breaks the one site-name rule (``fedllm.config.site.SITE_NAME_RE``; the reply
is then filed under ``node-<id>``) or that another reply of the round already used; metrics other
than exactly ``wire.TRAIN_METRIC_KEYS`` / ``wire.EVALUATE_METRIC_KEYS`` or not finite scalars; an
update with wrong keys, shapes, dtypes or non-finite values, or (``federation.max-update-norm`` >
0) whose L2 distance from the global adapter it was sent exceeds that bound. The rest are
aggregated. Works on the protocol's plain ``Reply`` objects (numpy arrays, dicts).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedllm import wire
from fedllm.config.site import SITE_NAME_RE
from fedllm.coordinator.protocol import Arrays, Reply
from fedllm.errors import InvalidUpdateError

log = logging.getLogger(__name__)

REPLY_KINDS = ("train", "evaluate")


def update_norm(arrays: Arrays, reference: Arrays) -> float:
    """L2 norm of ``arrays − reference`` over all of the reference's tensors, in float64."""
    total = 0.0
    for key in reference:
        diff = (np.asarray(arrays[key], dtype=np.float64) - np.asarray(reference[key], dtype=np.float64)).ravel()
        total += float(np.dot(diff, diff))
    return math.sqrt(total)


def validate_update(arrays: Arrays, reference: Arrays, *, require_change: bool = False,
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
    for key in reference:
        a, r = np.asarray(arrays[key]), np.asarray(reference[key])
        if tuple(a.shape) != tuple(r.shape):
            raise InvalidUpdateError(f"{key}: shape {tuple(a.shape)}, expected {tuple(r.shape)}")
        if a.dtype != r.dtype:
            raise InvalidUpdateError(f"{key}: dtype {a.dtype}, expected {r.dtype}")
        if not np.isfinite(a).all():
            raise InvalidUpdateError(f"{key}: contains NaN or Inf")
    if require_change and all(np.array_equal(arrays[k], reference[k]) for k in reference):
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


def validate_metrics(metrics: Mapping[str, Any], *, kind: str) -> None:
    """Raise ``InvalidUpdateError`` unless ``metrics`` holds exactly the agreed keys for ``kind``
    (``wire.TRAIN_METRIC_KEYS`` / ``wire.EVALUATE_METRIC_KEYS``), each a finite int or float (a
    site sends -1 for "not defined" or not released), ``metrics-release`` one of ``wire.RELEASE_CODES``, with ``num-examples`` an int > 0 for train and >= 0 for
    evaluate (a site without held-out data, ``data.eval-fraction = 0``, evaluates 0 examples)."""
    expected = wire.TRAIN_METRIC_KEYS if kind == "train" else wire.EVALUATE_METRIC_KEYS
    optional = () if kind == "train" else wire.OPTIONAL_EVALUATE_KEYS  # the run's task metrics
    got = list(metrics.keys())
    missing = [k for k in expected if k not in got]
    extra = sorted(k for k in got if k not in expected and k not in optional)
    if missing or extra:
        parts = ([f"missing {', '.join(repr(k) for k in missing)}"] if missing else []) + (
            [f"unexpected {', '.join(repr(k[:64]) for k in extra[:3])}"] if extra else [])
        also = f", and optionally {list(optional)}" if optional else ""
        raise InvalidUpdateError(f"metrics: {'; '.join(parts)} (the {kind} metrics are exactly {list(expected)}{also})")
    for key in [*expected, *(k for k in optional if k in metrics)]:
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidUpdateError(f"metrics: {key!r} is {type(value).__name__} {repr(value)[:80]}, "
                                     "expected one number")
        if not math.isfinite(value):
            raise InvalidUpdateError(f"metrics: {key!r} is {value!r}, expected a finite number (-1 for not defined)")
    if metrics[wire.METRICS_RELEASE] not in wire.RELEASE_CODES.values():
        raise InvalidUpdateError(f"metrics: {wire.METRICS_RELEASE!r} is {metrics[wire.METRICS_RELEASE]!r}, expected one "
                                 f"of {sorted(wire.RELEASE_CODES.values())} (the site's release-metrics: "
                                 + ", ".join(f"{code} = {mode}" for mode, code in wire.RELEASE_CODES.items()) + ")")
    for key in wire.TASK_METRIC_KEYS:  # a mean of per-record scores in [0, 1], or -1 (not released)
        if key in metrics and metrics[key] != -1 and not 0 <= metrics[key] <= 1:
            raise InvalidUpdateError(f"metrics: {key!r} is {metrics[key]!r}, expected a score in [0, 1] "
                                     "(-1 for not released)")
    if wire.TASK_EXAMPLES in metrics and (not isinstance(metrics[wire.TASK_EXAMPLES], int)
                                          or metrics[wire.TASK_EXAMPLES] < -1):
        raise InvalidUpdateError(f"metrics: {wire.TASK_EXAMPLES!r} is {metrics[wire.TASK_EXAMPLES]!r}, expected an "
                                 "int >= 0 (-1 for not released)")
    examples = metrics[wire.NUM_EXAMPLES]
    least = 1 if kind == "train" else 0
    if not isinstance(examples, int) or examples < least:
        raise InvalidUpdateError(f"metrics: {wire.NUM_EXAMPLES!r} is {examples!r}, expected an int >= {least}")


@dataclass
class Triage:
    """Replies of one round sorted by what happened at each site."""

    accepted: list[Reply] = field(default_factory=list)
    metrics: dict[str, dict] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    refusal_codes: dict[str, int] = field(default_factory=dict)  # wire.BUDGET_REFUSED or wire.POLICY_REFUSED
    rejected: dict[str, str] = field(default_factory=dict)
    failed: list[dict] = field(default_factory=list)


def _reply_name(reply: Reply, names: dict[int, str]) -> tuple[str, bool]:
    """(name, whether the reply itself claimed it): the name it sent when that is a safe string,
    ``node-<id>`` when it sent a malformed or unsafe one, else a known name or ``node-<id>``."""
    if reply.site is not None:
        if SITE_NAME_RE.fullmatch(reply.site):
            return reply.site, True
        return f"node-{reply.node_id}", False
    return names.get(reply.node_id, f"node-{reply.node_id}"), False


def _check_records(reply: Reply, *, kind: str) -> None:
    """Raise ``InvalidUpdateError`` unless the reply holds what a site sends: nothing the transport
    found malformed, a safe site name (when it sent one), arrays for train and none for evaluate."""
    if reply.malformed:
        raise InvalidUpdateError(reply.malformed)
    if reply.site is not None and not SITE_NAME_RE.fullmatch(reply.site):
        raise InvalidUpdateError(f"site name {reply.site[:80]!r} is not 1-64 characters of A-Z a-z 0-9 . _ - "
                                 "(not starting with .)")
    if kind == "train" and reply.arrays is None:
        raise InvalidUpdateError(f"no {wire.ARRAYS!r} record in the train reply")
    if kind == "evaluate" and reply.arrays is not None:
        raise InvalidUpdateError("the evaluate reply carries tensors, expected none")


def triage_replies(replies: list[Reply], *, reference: Arrays | None, names: dict[int, str],
                   require_change: bool = False, max_update_norm: float = 0.0, kind: str | None = None) -> Triage:
    """Sort one round's replies into accepted (with their metrics), refused, rejected and failed.

    ``kind`` is "train" or "evaluate" (default: "train" when ``reference``, the arrays sent, is
    given, else "evaluate"). Evaluate replies, and train replies when ``reference`` is given, are
    validated (records, site name, metrics; for train also the update against ``reference`` with
    ``require_change`` and ``max_update_norm``); a reply that fails goes to ``rejected`` with the
    reason. A second reply of the round claiming a name already used is rejected under its
    ``node-<id>`` name. A reply belongs to its ``node_id`` (the node its task was sent to).
    """
    kind = kind or ("train" if reference is not None else "evaluate")
    if kind not in REPLY_KINDS:
        raise ValueError(f"kind must be one of {', '.join(REPLY_KINDS)}, not {kind!r}")
    validate = kind == "evaluate" or reference is not None
    out = Triage()
    used: set[str] = set()
    for reply in replies:
        node = reply.node_id
        name, claimed = _reply_name(reply, names)
        if name in used:
            out.rejected[f"node-{node}"] = f"site name {name!r} was already used by another reply in this round"
            log.error("rejected %s reply from node %s: site name %r already used in this round", kind, node, name)
            continue
        used.add(name)
        if claimed:
            names[node] = name
        if reply.error_code is not None:  # reply.has_error, spelled out so the type narrows
            if reply.error_code in wire.REFUSAL_CODES:
                out.refused[name] = reply.error_reason
                out.refusal_codes[name] = int(reply.error_code)
                log.info("site %s refused the round: %s", name, reply.error_reason)
            else:
                out.failed.append({"site": name, "code": int(reply.error_code), "reason": reply.error_reason})
                log.error("site %s failed: %s", name, reply.error_reason)
            continue
        if validate:
            try:
                _check_records(reply, kind=kind)
                if kind == "train":
                    # _check_records ensured the arrays; validating a train reply implies a reference
                    assert reply.arrays is not None and reference is not None
                    validate_update(reply.arrays, reference, require_change=require_change,
                                    max_update_norm=max_update_norm)
                validate_metrics(reply.metrics, kind=kind)
            except InvalidUpdateError as exc:
                out.rejected[name] = str(exc)
                log.error("rejected %s reply from site %s: %s", kind, name, exc)
                continue
        out.accepted.append(reply)
        out.metrics[name] = dict(reply.metrics)
    return out
