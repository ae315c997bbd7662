"""Aggregation maths and update screening on hand-made adapter updates (no processes): Flower's
strategies directly, and through the coordinator's strategy protocol (``FlowerStrategy``)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    MetricRecord,
    RecordDict,
)

from fedllm import wire
from fedllm.config import RunConfig, StrategyConfig
from fedllm.coordinator.screening import triage_replies, validate_update
from fedllm.errors import InvalidUpdateError
from fedllm.flower.coordinator_strategy import FlowerStrategy, make_strategy
from fedllm.flower.grid import reply_from_message
from fedllm.flower.strategies import build_strategy
from tests.helpers import SMALL_ADAPTER, FakeGrid, FakeNodes, filled_adapter, reply_message

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


def _ar(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _arrays(fill: float) -> ArrayRecord:
    return _ar(filled_adapter(fill))


def _plain(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def _reply(node: int, *, arrays: ArrayRecord | None = None, examples: int = 10, name: str = "", error: Error | None = None):
    if error is not None:
        return reply_message(node, error=error)
    metrics = dict.fromkeys(wire.TRAIN_METRIC_KEYS, 1.0) | {wire.NUM_EXAMPLES: examples, wire.TRAIN_LOSS: 1.0 * node}
    content = RecordDict({wire.METRICS: MetricRecord(metrics),
                          wire.SITE: ConfigRecord({wire.SITE_NAME: name or f"site{node}"})})
    if arrays is not None:
        content[wire.ARRAYS] = arrays
    return reply_message(node, content)


def test_fedavg_weights_updates_by_examples():
    strategy = build_strategy(StrategyConfig(name="fedavg"))
    replies = [_reply(1, arrays=_arrays(1.0), examples=10), _reply(2, arrays=_arrays(4.0), examples=30)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    for key in SMALL_ADAPTER:
        np.testing.assert_allclose(arrays[key].numpy(), np.full(SMALL_ADAPTER[key], (1 * 10 + 4 * 30) / 40))
    assert metrics[wire.TRAIN_LOSS] == pytest.approx((1 * 10 + 2 * 30) / 40)


def test_fedadam_moves_the_global_adapter_towards_the_average():
    strategy = build_strategy(StrategyConfig(name="fedadam", server_learning_rate=0.1))
    current = _arrays(0.0)
    list(strategy.configure_train(1, current, ConfigRecord(), FakeGrid([1, 2])))
    arrays, _ = strategy.aggregate_train(1, [_reply(1, arrays=_arrays(1.0)), _reply(2, arrays=_arrays(1.0))])
    values = arrays["layer.lora_A.weight"].numpy()
    assert np.all(values > 0) and np.all(values <= 1.0)  # an Adam step of size ~eta towards +1


def test_fedprox_sends_the_proximal_term():
    strategy = build_strategy(StrategyConfig(name="fedprox", proximal_mu=0.25))
    messages = list(strategy.configure_train(3, _arrays(0.0), ConfigRecord(), FakeGrid([7])))
    assert messages[0].content[wire.CONFIG][wire.PROXIMAL_MU] == 0.25
    assert messages[0].content[wire.CONFIG][wire.SERVER_ROUND] == 3


def test_a_one_site_federation_is_sampled_without_waiting():
    strategy = build_strategy(StrategyConfig())
    messages = list(strategy.configure_train(1, _arrays(0.0), ConfigRecord(), FakeGrid([42])))
    assert [m.metadata.dst_node_id for m in messages] == [42]


def test_the_protocol_strategy_samples_and_configures_like_flowers_own():
    """Through ``FlowerStrategy`` the tasks are Flower's messages: its sampling, its config keys."""
    run = RunConfig.from_flat({"strategy.name": "fedprox", "strategy.proximal-mu": 0.25,
                               "strategy.fraction-train": 0.5, "strategy.fraction-evaluate": 0.25})
    strategy = make_strategy(run, sites_per_round=None)
    assert strategy.label == "FedProx"
    arrays = {k: np.zeros(s, np.float32) for k, s in SMALL_ADAPTER.items()}
    tasks = strategy.configure_train(2, arrays, {wire.RUN_ID: "trial"}, FakeNodes(range(1, 9)))
    assert len(tasks) == 4 and len({t.node_id for t in tasks}) == 4 and {t.node_id for t in tasks} <= set(range(1, 9))
    assert all(t.kind == "train" and t.arrays is arrays for t in tasks)
    assert tasks[0].config == {wire.RUN_ID: "trial", wire.SERVER_ROUND: 2, wire.PROXIMAL_MU: 0.25}
    evaluate = strategy.configure_evaluate(2, arrays, FakeNodes(range(1, 9)))
    assert len(evaluate) == 2 and all(t.kind == "evaluate" for t in evaluate)


def test_the_protocol_strategy_aggregates_replies_like_flowers_own():
    replies = [_reply(1, arrays=_arrays(1.0), examples=10), _reply(2, arrays=_arrays(4.0), examples=30)]
    expected, _ = build_strategy(StrategyConfig()).aggregate_train(1, replies)
    plain = [reply_from_message(m, kind="train", node_id=m.metadata.src_node_id) for m in replies]
    arrays = FlowerStrategy(build_strategy(StrategyConfig())).aggregate_train(1, plain)
    assert list(arrays) == list(SMALL_ADAPTER)
    for key in SMALL_ADAPTER:
        np.testing.assert_array_equal(arrays[key], expected[key].numpy())


@pytest.mark.parametrize(
    "bad, reason",
    [
        (_ar({"layer.lora_A.weight": np.zeros((2, 3), np.float32)}), "keys"),
        (_ar({"layer.lora_A.weight": np.zeros((3, 3), np.float32), "layer.lora_B.weight": np.zeros((3, 2), np.float32)}), "shape"),
        (_ar({"layer.lora_A.weight": np.zeros((2, 3), np.float64), "layer.lora_B.weight": np.zeros((3, 2), np.float32)}), "dtype"),
        (_ar({"layer.lora_A.weight": np.full((2, 3), np.nan, np.float32), "layer.lora_B.weight": np.zeros((3, 2), np.float32)}), "NaN"),
        (_ar({"layer.lora_A.weight": np.full((2, 3), np.inf, np.float32), "layer.lora_B.weight": np.zeros((3, 2), np.float32)}), "Inf"),
    ],
)
def test_invalid_updates_are_rejected(bad, reason):
    with pytest.raises(InvalidUpdateError, match=reason):
        validate_update(_plain(bad), _plain(_arrays(0.0)))
    validate_update(_plain(_arrays(2.0)), _plain(_arrays(0.0)))  # a well-formed update passes


def test_triage_separates_refusals_failures_and_bad_updates_and_aggregates_the_rest():
    names: dict[int, str] = {}
    bad = _ar({"layer.lora_A.weight": np.full((2, 3), np.nan, np.float32),
                       "layer.lora_B.weight": np.zeros((3, 2), np.float32)})
    replies = [
        _reply(1, arrays=_arrays(1.0), name="good-a"),
        _reply(2, arrays=_arrays(3.0), name="good-b"),
        _reply(3, error=Error(code=wire.BUDGET_REFUSED, reason="Site 'capped' would exceed its privacy budget")),
        _reply(4, error=Error(code=2, reason="boom")),
        _reply(5, arrays=bad, name="poisoned"),
    ]
    names[3] = "capped"
    plain = [reply_from_message(m, kind="train", node_id=m.metadata.src_node_id) for m in replies]
    triage = triage_replies(plain, reference=_plain(_arrays(0.0)), names=names)
    assert sorted(triage.metrics) == ["good-a", "good-b"]
    assert list(triage.refused) == ["capped"] and "privacy budget" in triage.refused["capped"]
    assert triage.failed == [{"site": "node-4", "code": 2, "reason": "boom"}]
    assert "NaN" in triage.rejected["poisoned"]
    arrays = FlowerStrategy(build_strategy(StrategyConfig())).aggregate_train(1, triage.accepted)
    np.testing.assert_allclose(arrays["layer.lora_B.weight"], 2.0)
