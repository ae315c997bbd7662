"""The coordinator's round loop: sample sites, send the global adapter, screen and aggregate the
updates, evaluate on every site's held-out data, checkpoint, and keep the history.

Round 0 is a federated evaluation of the initial adapter (the base model's loss before training).
Each round then trains, aggregates and evaluates. A site that refuses a round for its privacy
budget is recorded and the round goes on with the others; a site failure (a crash, a timeout)
beyond ``federation.tolerated-failures`` fails the run. If every site refuses, nothing more can be
trained and the run ends early as completed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedllm import keys
from fedllm.config import RunConfig, to_toml
from fedllm.errors import RunFailedError
from fedllm.history import RunHistory
from fedllm.model import get_adapter_state, save_adapter, shared_model
from fedllm.strategy import build_strategy, triage_replies

log = logging.getLogger(__name__)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def run_federation(grid: Grid, config: RunConfig, *, run_id: str) -> RunHistory:
    """Run ``config.num_server_rounds`` rounds; outputs go to ``config.output_dir``."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(to_toml(config, header=f"fedllm run {run_id}: fully resolved configuration"), encoding="utf-8")
    history = RunHistory(out / "history.json", run_id=run_id, num_rounds=config.num_server_rounds)
    peft_model, _ = shared_model(config)
    arrays = ArrayRecord(get_adapter_state(peft_model, trainable_only=True))
    strategy = build_strategy(config.strategy)
    timeout = config.federation.round_timeout
    names: dict[int, str] = {}
    rounds = config.num_server_rounds
    try:
        replies = list(grid.send_and_receive(strategy.configure_evaluate(0, arrays, ConfigRecord(), grid), timeout=timeout))
        _evaluate(history, 0, replies, names, config)
        for server_round in range(1, rounds + 1):
            start = time.perf_counter()
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            triage = triage_replies(replies, reference=arrays, names=names)
            answered = {m.metadata.src_node_id for m in replies}
            for msg in messages:  # a site that did not answer within round-timeout is a failure
                if msg.metadata.dst_node_id not in answered:
                    node = msg.metadata.dst_node_id
                    triage.failed.append({"site": names.get(node, f"node-{node}"), "code": -1,
                                          "reason": f"no reply within federation.round-timeout = {timeout:g}s"})
            if len(triage.failed) > config.federation.tolerated_failures:
                first = triage.failed[0]
                raise RunFailedError(f"round {server_round}: site {first['site']} failed: {first['reason']}")
            if triage.accepted:
                new_arrays, _ = strategy.aggregate_train(server_round, triage.accepted)
                arrays = new_arrays if new_arrays is not None else arrays
            agg = history.record_train(server_round, sites=triage.metrics, refused=triage.refused,
                                       rejected=triage.rejected, failed=triage.failed,
                                       seconds=time.perf_counter() - start)
            save_adapter(peft_model, arrays.to_torch_state_dict(), out / "checkpoints" / f"round-{server_round}")
            eval_replies = list(grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid), timeout=timeout))
            eval_agg = _evaluate(history, server_round, eval_replies, names, config)
            history.save()
            log.info("[round %d/%d] %d/%d sites trained%s | train loss %s | eval loss %s | ppl %s | max ε %s / %g",
                     server_round, rounds, len(triage.metrics), len(replies),
                     f" ({len(triage.refused)} refused)" if triage.refused else "",
                     _fmt(agg[keys.TRAIN_LOSS]), _fmt(eval_agg[keys.EVAL_LOSS]), _fmt(eval_agg[keys.PERPLEXITY], ".2f"),
                     _fmt(agg["max-epsilon"], ".2f"), config.privacy.max_epsilon)
            if not triage.accepted and triage.refused and not triage.failed and not triage.rejected:
                log.info("every sampled site refused round %d for its privacy budget; stopping the run", server_round)
                history.data["stopped-early"] = f"all sites refused round {server_round} (privacy budget)"
                break
        save_adapter(peft_model, arrays.to_torch_state_dict(), out / "adapter")
    except BaseException as exc:
        history.finish("failed", error=f"{exc.__class__.__name__}: {exc}")
        raise
    history.finish("completed")
    log.info("run %s completed: adapter in %s", run_id, out / "adapter")
    return history


def _evaluate(history: RunHistory, server_round: int, replies: list, names: dict[int, str], config: RunConfig) -> dict:
    triage = triage_replies(replies, reference=None, names=names)
    if len(triage.failed) > config.federation.tolerated_failures:
        first = triage.failed[0]
        raise RunFailedError(f"evaluation round {server_round}: site {first['site']} failed: {first['reason']}")
    agg = history.record_evaluate(server_round, sites=triage.metrics, failed=triage.failed)
    for name, metrics in sorted(triage.metrics.items()):
        log.info("[round %d/%d] site %s | held-out loss %.3f | ppl %.2f | %d examples", server_round,
                 config.num_server_rounds, name, metrics[keys.EVAL_LOSS], metrics[keys.PERPLEXITY],
                 int(metrics[keys.NUM_EXAMPLES]))
    return agg
