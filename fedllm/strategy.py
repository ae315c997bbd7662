"""Server-side aggregation: Flower strategies over adapter tensors, and update screening.

Strategies are Flower's own (``flwr.serverapp.strategy``): FedAvg weighted by each site's number
of training examples, FedProx (the site adds the proximal term), FedAdam (server optimiser on the
adapter's pseudo-gradient). Before a reply reaches the strategy it is triaged: a site refusing a
round for its privacy budget is recorded, a failed site is counted, and an update with wrong
keys, shapes, dtypes or non-finite values is rejected; the rest are aggregated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from fedllm import keys
from fedllm.config import StrategyConfig
from fedllm.errors import InvalidUpdateError

log = logging.getLogger(__name__)


def build_strategy(config: StrategyConfig) -> FedAvg:
    """The configured Flower strategy; minimums of 1 so a 1-site federation never hangs."""
    common = dict(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_train_sites,
        min_evaluate_nodes=config.min_evaluate_sites,
        min_available_nodes=config.min_available_sites,
        weighted_by_key=keys.NUM_EXAMPLES,
        arrayrecord_key=keys.ARRAYS,
        configrecord_key=keys.CONFIG,
    )
    if config.name == "fedprox":
        return FedProx(proximal_mu=config.proximal_mu, **common)
    if config.name == "fedadam":
        return FedAdam(eta=config.server_learning_rate, beta_1=config.beta_1, beta_2=config.beta_2,
                       tau=config.tau, **common)
    return FedAvg(**common)


def validate_update(arrays: ArrayRecord, reference: ArrayRecord) -> None:
    """Raise ``InvalidUpdateError`` unless ``arrays`` has exactly the reference's keys, shapes
    and dtypes, and only finite values."""
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


@dataclass
class Triage:
    """Replies of one round sorted by what happened at each site."""

    accepted: list[Message] = field(default_factory=list)
    metrics: dict[str, dict] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    failed: list[dict] = field(default_factory=list)


def site_name(msg: Message, names: dict[int, str]) -> str:
    """The site a reply came from (its own name when it sent one, else a known or a node id)."""
    node = msg.metadata.src_node_id
    if msg.has_content() and keys.SITE in msg.content:
        names[node] = str(msg.content[keys.SITE][keys.SITE_NAME])
    return names.get(node, f"node-{node}")


def triage_replies(replies: list[Message], *, reference: ArrayRecord | None, names: dict[int, str]) -> Triage:
    """Sort replies; ``reference`` (the arrays sent) enables update validation for train."""
    out = Triage()
    for msg in replies:
        name = site_name(msg, names)
        if msg.has_error():
            if msg.error.code == keys.BUDGET_REFUSED:
                out.refused[name] = msg.error.reason
                log.info("site %s refused the round: %s", name, msg.error.reason)
            else:
                out.failed.append({"site": name, "code": int(msg.error.code), "reason": msg.error.reason})
                log.error("site %s failed: %s", name, msg.error.reason)
            continue
        if reference is not None:
            try:
                if keys.ARRAYS not in msg.content:
                    raise InvalidUpdateError("no adapter arrays in the reply")
                validate_update(msg.content[keys.ARRAYS], reference)
            except InvalidUpdateError as exc:
                out.rejected[name] = str(exc)
                log.error("rejected update from site %s: %s", name, exc)
                continue
        out.accepted.append(msg)
        out.metrics[name] = dict(msg.content[keys.METRICS])
    return out
