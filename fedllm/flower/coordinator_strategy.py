"""The coordinator's ``Strategy`` (``fedllm.coordinator.protocol``) over Flower's own strategies.

:class:`FlowerStrategy` wraps a strategy from :func:`fedllm.flower.strategies.build_strategy`
(FedAvg, FedProx, FedAdam), optionally inside fedllm's site-level DP wrappers
(``with_central_dp``), and translates: the numpy adapter to an ``ArrayRecord`` and the strategy's
messages to ``Task``s (sampling stays Flower's: ``fraction-train`` of the connected nodes, at
least ``min-train-sites``, waiting for ``min_available_nodes``), accepted ``Reply``s back to
messages for Flower's ``aggregate_train``, and the strategy's state to and from the checkpoint
(``fedllm.flower.strategy_state``). Nothing here changes what the Flower strategies compute.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategyBase

from fedllm import wire
from fedllm.config import RunConfig
from fedllm.coordinator.protocol import Arrays, Federation, Reply, Task
from fedllm.flower.grid import arrays_from_record, record_from_arrays, task_from_message
from fedllm.flower.strategies import (
    SiteLevelAdaptiveClipping,
    SiteLevelFixedClipping,
    build_strategy,
    with_central_dp,
)
from fedllm.flower.strategy_state import class_label, describe_strategy, restore_flower_strategy


class _NodeView:
    """Just what Flower's sampling asks of a ``Grid``: the connected node ids."""

    def __init__(self, federation: Federation) -> None:
        self.federation = federation

    def get_node_ids(self) -> list[int]:
        return list(self.federation.node_ids())


def _as_grid(federation: Federation) -> Grid:
    """The federation as the ``Grid`` Flower's sampling expects (it calls only ``get_node_ids``)."""
    return _NodeView(federation)  # type: ignore[return-value]  # duck-typed: only get_node_ids is used


class FlowerStrategy:
    """A Flower strategy (``self.strategy``) as the round loop's ``Strategy``."""

    def __init__(self, strategy: FlowerStrategyBase) -> None:
        self.strategy = strategy
        self.label = class_label(strategy)

    def configure_train(self, server_round: int, arrays: Arrays, config: dict[str, Any],
                        federation: Federation) -> list[Task]:
        messages = self.strategy.configure_train(server_round, record_from_arrays(arrays), ConfigRecord(dict(config)),
                                                 _as_grid(federation))
        return [task_from_message(m, arrays) for m in messages]

    def configure_evaluate(self, server_round: int, arrays: Arrays, federation: Federation) -> list[Task]:
        messages = self.strategy.configure_evaluate(server_round, record_from_arrays(arrays), ConfigRecord(),
                                                    _as_grid(federation))
        return [task_from_message(m, arrays) for m in messages]

    def aggregate_train(self, server_round: int, replies: list[Reply]) -> Arrays | None:
        messages = [_train_message(server_round, index, reply) for index, reply in enumerate(replies)]
        aggregated, _ = self.strategy.aggregate_train(server_round, messages)
        return None if aggregated is None else arrays_from_record(aggregated)

    def central_dp_round(self, *, released: bool) -> tuple[float, int]:
        if not isinstance(self.strategy, (SiteLevelFixedClipping, SiteLevelAdaptiveClipping)):
            raise ValueError(f"{self.label} is not a central-DP strategy")
        if released:
            return self.strategy.round_clipping_norm, self.strategy.round_sites
        return self.strategy.clipping_norm, 0

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return describe_strategy(self.strategy)

    def restore(self, description: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        restore_flower_strategy(self.strategy, description, tensors)


def _train_message(server_round: int, index: int, reply: Reply) -> Message:
    """An accepted train reply as the Flower message a strategy aggregates (arrays and metrics)."""
    if reply.arrays is None:
        raise ValueError(f"the train reply of node {reply.node_id} holds no arrays")
    meta = Metadata(run_id=0, message_id=f"r{server_round}-{index}", src_node_id=reply.node_id,
                    dst_node_id=SUPERLINK_NODE_ID, reply_to_message_id="", group_id=str(server_round),
                    created_at=time.time(), ttl=0.0, message_type=MessageType.TRAIN)
    content = RecordDict({wire.ARRAYS: record_from_arrays(reply.arrays), wire.METRICS: MetricRecord(dict(reply.metrics))})
    return make_message(meta, content=content)


def make_strategy(config: RunConfig, *, sites_per_round: int | None) -> FlowerStrategy:
    """The run's strategy (``StrategyFactory``): ``strategy.*``, wrapped for site-level DP with m =
    ``sites_per_round`` when that is given (``central-dp.enabled``)."""
    strategy = build_strategy(config.strategy)
    if sites_per_round is None:
        return FlowerStrategy(strategy)
    return FlowerStrategy(with_central_dp(strategy, config.central_dp, sites_per_round=sites_per_round))
