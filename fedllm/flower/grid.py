"""The coordinator's ``Federation`` (``fedllm.coordinator.protocol``) over Flower's ``Grid``.

Converts the round loop's plain ``Task``/``Reply`` objects to and from Flower ``Message``s:

* a task becomes a ``train``/``evaluate`` message holding the global adapter (``ArrayRecord``
  under ``wire.ARRAYS``) and its config (``ConfigRecord`` under ``wire.CONFIG``);
* a reply is charged to the node its message was sent to (a reply the SuperLink writes for an
  unreachable node may not carry that node as its source), and a message with no reply within
  ``federation.round-timeout`` comes back as a ``NODE_UNAVAILABLE`` error reply for that node;
* a reply's records are checked here, where their Flower types are known: exactly one
  ``ArrayRecord`` under ``wire.ARRAYS`` (train only), one ``MetricRecord`` under
  ``wire.METRICS``, and optionally ``wire.SITE``, a ``ConfigRecord`` of exactly
  ``{wire.SITE_NAME: str}``. Anything else is reported in ``Reply.malformed`` (the screening
  rejects the reply with that reason); the name's own safety is checked by the screening.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedllm import wire
from fedllm.coordinator.protocol import Arrays, Reply, Task


def arrays_from_record(record: ArrayRecord) -> Arrays:
    """The record's tensors as numpy arrays, in its key order."""
    return {key: array.numpy() for key, array in record.items()}


def record_from_arrays(arrays: Arrays) -> ArrayRecord:
    """An ``ArrayRecord`` of the tensors, in their key order."""
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def record_problem(content: RecordDict, *, kind: str) -> str | None:
    """Why ``content`` is not what a site sends in a ``kind`` reply (None when it is): records
    other than the arrays (train only), the metrics and the site's name, records of the wrong
    type, a missing record, or a ``wire.SITE`` record that is not ``{wire.SITE_NAME: str}``."""
    allowed: dict[str, type] = {wire.METRICS: MetricRecord, wire.SITE: ConfigRecord}
    if kind == "train":
        allowed[wire.ARRAYS] = ArrayRecord
    for what, records, most in (("ArrayRecords", content.array_records, 1 if kind == "train" else 0),
                                ("MetricRecords", content.metric_records, 1)):
        if len(records) > most:
            return (f"{len(records)} {what} in the {kind} reply ({', '.join(sorted(records))}), "
                    f"expected {most or 'none'}")
    for name in content:
        if name not in allowed:
            return f"unexpected record {name!r} in the {kind} reply (expected only {', '.join(repr(k) for k in allowed)})"
        if not isinstance(content[name], allowed[name]):
            return f"record {name!r} is a {type(content[name]).__name__}, expected a {allowed[name].__name__}"
    for name in allowed:
        if name != wire.SITE and name not in content:
            return f"no {name!r} record in the {kind} reply"
    if wire.SITE in content:
        record = content[wire.SITE]
        if list(record.keys()) != [wire.SITE_NAME]:
            return f"record {wire.SITE!r} has keys {sorted(record.keys())[:4]}, expected exactly [{wire.SITE_NAME!r}]"
        if not isinstance(record[wire.SITE_NAME], str):
            return f"site name is a {type(record[wire.SITE_NAME]).__name__}, expected a string"
    return None


def reply_from_message(msg: Message, *, kind: str, node_id: int) -> Reply:
    """The protocol's ``Reply`` for a Flower reply to a ``kind`` task sent to ``node_id``."""
    if msg.has_error():
        return Reply(node_id, error_code=int(msg.error.code), error_reason=msg.error.reason or "")
    content = msg.content
    site = None
    if wire.SITE in content:  # "" when the name cannot be read: the reply is filed under node-<id>
        record = content[wire.SITE]
        readable = isinstance(record, ConfigRecord) and list(record.keys()) == [wire.SITE_NAME]
        name = record[wire.SITE_NAME] if readable else None
        site = name if isinstance(name, str) else ""
    arrays = content.get(wire.ARRAYS)
    metrics = content.get(wire.METRICS)
    return Reply(node_id, site=site,
                 arrays=arrays_from_record(arrays) if isinstance(arrays, ArrayRecord) else None,
                 metrics=dict(metrics) if isinstance(metrics, MetricRecord) else {},
                 malformed=record_problem(content, kind=kind))


def message_from_task(task: Task, records: dict[int, ArrayRecord] | None = None) -> Message:
    """The Flower message for a task; ``records`` caches each arrays object's ``ArrayRecord`` (the
    tasks of a round share one)."""
    records = {} if records is None else records
    if id(task.arrays) not in records:
        records[id(task.arrays)] = record_from_arrays(task.arrays)
    content = RecordDict({wire.ARRAYS: records[id(task.arrays)], wire.CONFIG: ConfigRecord(dict(task.config))})
    return Message(content=content, message_type=task.kind, dst_node_id=task.node_id)


def task_from_message(msg: Message, arrays: Arrays) -> Task:
    """The task a strategy's message stands for (``arrays``: what it carries, as numpy arrays)."""
    config: dict[str, Any] = dict(msg.content[wire.CONFIG]) if wire.CONFIG in msg.content else {}
    return Task(msg.metadata.dst_node_id, msg.metadata.message_type, arrays, config)


class FlowerFederation:
    """``Federation`` over a Flower ``Grid`` (the ServerApp's)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def node_ids(self) -> list[int]:
        return list(self.grid.get_node_ids())

    def send_and_receive(self, tasks: Sequence[Task], *, timeout: float) -> list[Reply]:
        """Send and wait; a reply is charged to the node its message was sent to, and a message
        with no reply within ``timeout`` becomes an error reply for its node."""
        records: dict[int, ArrayRecord] = {}
        messages = [message_from_task(task, records) for task in tasks]
        received = list(self.grid.send_and_receive(messages, timeout=timeout))
        sent = {m.metadata.message_id: task for m, task in zip(messages, tasks, strict=True)}
        replies = []
        for msg in received:
            task = sent.get(msg.metadata.reply_to_message_id)
            node = task.node_id if task is not None else msg.metadata.src_node_id
            kind = task.kind if task is not None else msg.metadata.message_type
            replies.append(reply_from_message(msg, kind=kind, node_id=node))
        answered = {r.metadata.reply_to_message_id for r in received}
        for msg, task in zip(messages, tasks, strict=True):  # no reply at all: the SuperLink gave up on it too
            if msg.metadata.message_id not in answered:
                replies.append(Reply(task.node_id, error_code=int(ErrorCode.NODE_UNAVAILABLE),
                                     error_reason=f"no reply within federation.round-timeout = {timeout:g}s"))
        return replies
