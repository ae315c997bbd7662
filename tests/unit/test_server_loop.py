"""The coordinator's round loop helpers: a site that never answers is charged to that site, and a
round that lost too many sites fails with a clear reason."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedllm.config import RunConfig
from fedllm.coordinator.rounds import _check_round, _send
from fedllm.coordinator.screening import Triage, triage_replies
from fedllm.errors import RunFailedError

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/unit/conftest.py


class _Grid:
    """Answers only the messages for ``answering`` nodes (like a SuperLink whose other nodes are gone)."""

    def __init__(self, answering: set[int]) -> None:
        self.answering = answering

    def send_and_receive(self, messages, timeout):
        out = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            if msg.metadata.dst_node_id in self.answering:
                reply = Message(RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=msg)
                out.append(reply)
        return out


def test_a_site_that_never_answers_is_charged_to_that_site():
    messages = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in (11, 22)]
    replies, node_of = _send(_Grid({11}), messages, timeout=5.0)
    assert len(replies) == 2 and node_of == {"m0": 11, "m1": 22}
    missing = [r for r in replies if r.has_error()]
    assert len(missing) == 1 and missing[0].metadata.reply_to_message_id == "m1"
    assert "federation.round-timeout = 5s" in missing[0].error.reason
    triage = triage_replies(missing, reference=None, names={22: "lakeside"}, node_of=node_of)
    assert triage.failed == [{"site": "lakeside", "code": missing[0].error.code, "reason": missing[0].error.reason}]


def test_a_round_fails_only_past_the_configured_losses():
    failed = [{"site": "c", "code": 5, "reason": "Node Unavailable"}]
    ok = Triage(accepted=[object(), object()], failed=list(failed))
    deploy = RunConfig.from_flat({"federation.tolerated-failures": -1, "federation.min-completed-sites": 2})
    _check_round(ok, deploy, 1, asked=3)  # any number of failures, two usable updates: fine
    with pytest.raises(RunFailedError, match="only 1 of 3 sites.*min-completed-sites = 2.*--resume"):
        _check_round(Triage(accepted=[object()], failed=list(failed)), deploy, 1, asked=3)
    strict = RunConfig.from_flat({})  # simulation default: no failure tolerated
    with pytest.raises(RunFailedError, match="site c failed: Node Unavailable"):
        _check_round(ok, strict, 1, asked=3)
    refused = Triage(refused={"a": "budget", "b": "budget"})
    _check_round(refused, deploy, 4, asked=2)  # everyone refused for budget: the run ends early, not failed
