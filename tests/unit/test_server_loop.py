"""The coordinator's transport and round checks: over Flower's Grid (``FlowerFederation``) a site
that never answers is charged to that site, as is an error the SuperLink writes for it; a round
that lost too many sites fails with a clear reason."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata

from fedllm import wire
from fedllm.config import RunConfig
from fedllm.coordinator.protocol import Reply, Task
from fedllm.coordinator.rounds import _check_round
from fedllm.coordinator.screening import Triage, triage_replies
from fedllm.errors import RunFailedError
from fedllm.flower.grid import FlowerFederation

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


class _Grid:
    """Answers only the messages for ``answering`` nodes (like a SuperLink whose other nodes are gone);
    for ``unreachable`` nodes it writes an error reply itself (source node 0)."""

    def __init__(self, answering: set[int], unreachable: set[int] = frozenset()) -> None:
        self.answering, self.unreachable = answering, unreachable
        self.sent: list[Message] = []

    def get_node_ids(self):
        return sorted(self.answering | self.unreachable)

    def send_and_receive(self, messages, timeout):
        out = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.answering:
                content = RecordDict({wire.METRICS: MetricRecord({"x": 1.0}),
                                      wire.SITE: ConfigRecord({wire.SITE_NAME: f"site{node}"})})
                out.append(Message(content, reply_to=msg))
            elif node in self.unreachable:
                meta = Metadata(run_id=1, message_id=f"r{i}", src_node_id=0, dst_node_id=0,
                                reply_to_message_id=f"m{i}", group_id="1", created_at=time.time(), ttl=60.0,
                                message_type=MessageType.TRAIN)
                out.append(make_message(meta, error=Error(code=3, reason="node unavailable")))
        return out


def _tasks(*nodes: int) -> list[Task]:
    arrays = {"w": np.zeros((2, 2), np.float32)}
    return [Task(node, "train", arrays, {wire.SERVER_ROUND: 1}) for node in nodes]


def test_a_site_that_never_answers_is_charged_to_that_site():
    grid = _Grid({11})
    replies = FlowerFederation(grid).send_and_receive(_tasks(11, 22), timeout=5.0)
    assert [r.node_id for r in replies] == [11, 22] and replies[0].site == "site11" and not replies[0].has_error
    missing = replies[1]
    assert missing.has_error and "federation.round-timeout = 5s" in missing.error_reason
    triage = triage_replies([missing], reference=None, names={22: "lakeside"})
    assert triage.failed == [{"site": "lakeside", "code": missing.error_code, "reason": missing.error_reason}]
    sent = grid.sent[0]  # what went out: the task as a Flower message
    assert (sent.metadata.dst_node_id, sent.metadata.message_type) == (11, "train")
    assert sent.content[wire.CONFIG][wire.SERVER_ROUND] == 1 and list(sent.content[wire.ARRAYS].keys()) == ["w"]


def test_a_reply_is_charged_to_the_node_its_message_was_sent_to():
    """An error the SuperLink writes for an unreachable node may not carry that node as source."""
    replies = FlowerFederation(_Grid({1}, unreachable={9})).send_and_receive(_tasks(9, 1), timeout=5.0)
    assert [r.node_id for r in replies] == [9, 1]
    triage = triage_replies(replies, reference=None, names={9: "radiology"}, kind="train")
    assert triage.failed == [{"site": "radiology", "code": 3, "reason": "node unavailable"}]
    assert list(triage.metrics) == ["site1"]


def test_a_round_fails_only_past_the_configured_losses():
    failed = [{"site": "c", "code": 5, "reason": "Node Unavailable"}]
    ok = Triage(accepted=[Reply(1), Reply(2)], failed=list(failed))
    deploy = RunConfig.from_flat({"federation.tolerated-failures": -1, "federation.min-completed-sites": 2})
    _check_round(ok, deploy, 1, asked=3)  # any number of failures, two usable updates: fine
    with pytest.raises(RunFailedError, match="only 1 of 3 sites.*min-completed-sites = 2.*--resume"):
        _check_round(Triage(accepted=[Reply(1)], failed=list(failed)), deploy, 1, asked=3)
    strict = RunConfig.from_flat({})  # simulation default: no failure tolerated
    with pytest.raises(RunFailedError, match="site c failed: Node Unavailable"):
        _check_round(ok, strict, 1, asked=3)
    refused = Triage(refused={"a": "budget", "b": "budget"})
    _check_round(refused, deploy, 4, asked=2)  # everyone refused for budget: the run ends early, not failed
