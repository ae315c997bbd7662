"""The coordinator's round loop: sample sites, send the global adapter, screen and aggregate the
updates, evaluate on every site's held-out data, checkpoint, and keep the history.

Round 0 is a federated evaluation of the initial adapter (the base model's loss before training).
Each round then trains, aggregates and evaluates. A site that refuses a round for its privacy
budget or its privacy policy is recorded and the round goes on with the others; a site failure (a
crash, a timeout) beyond ``federation.tolerated-failures`` fails the run. If every site refuses a
round, nothing more can be trained: when some earlier round trained, the run ends early as
completed, with the real reason ("privacy budget" or "site privacy policy") and each site's stated
reason in ``stopped-early``; when no round of the run trained any site, the run fails
(``RunFailedError`` with each site's reason: history status "failed", a non-zero exit) instead of
exporting an untrained adapter as if it were a result.

With ``central-dp.enabled`` the strategy is built for site-level DP. Before round 0 the loop
waits for the sites, checks δ < 1/N, and warns when the planned site-level ε is too large to mean
anything (``central_dp.py``). Every round that asked sites releases a noisy aggregate, divided
by the sites asked (a missing update counts as zero), even when no update arrived; the release
is recorded in the coordinator's central-DP ledger before the new adapter leaves, and the
site-level ε of the run and of the ledger (all runs) go into ``history.json`` (top-level and per
round ``"central-dp"``).

The loop speaks only the plain protocol of ``protocol.py``: a ``Federation`` (the sites and the
transport: ``fedllm.flower.grid`` over Flower's Grid, or a fake in unit tests) and a ``Strategy``
built by the caller's factory (``fedllm.flower.coordinator_strategy.make_strategy``: Flower's own
strategies). It imports nothing from Flower.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from fedllm import wire
from fedllm.config import RunConfig, SiteConfig, to_toml
from fedllm.coordinator.central_dp import CentralDP, start_central_dp
from fedllm.coordinator.central_dp import ledger_path as central_ledger_path
from fedllm.coordinator.checkpoint import (
    clear_server_state,
    load_server_state,
    restore_strategy,
    save_server_state,
)
from fedllm.coordinator.history import RunHistory
from fedllm.coordinator.protocol import Arrays, Federation, Reply, Strategy, StrategyFactory, Task
from fedllm.coordinator.screening import Triage, triage_replies
from fedllm.errors import RunFailedError
from fedllm.files import write_text_atomic
from fedllm.model.lora import get_adapter_state, save_adapter, shared_model
from fedllm.reports.model_card import write_model_card

log = logging.getLogger(__name__)


def _site_configs(config: RunConfig) -> list[SiteConfig] | None:
    """The simulated sites (their data formats go in the model card); None in a deployment, where
    the coordinator does not know the sites' files."""
    path = Path(config.simulation.sites_file) if config.simulation.sites_file else None
    if path is None or not path.is_file():
        return None
    return [SiteConfig.from_dict(e) for e in json.loads(path.read_text(encoding="utf-8"))]


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def run_federation(federation: Federation, make_strategy: StrategyFactory, config: RunConfig, *,
                   run_id: str) -> RunHistory:
    """Run ``config.num_server_rounds`` rounds; outputs go to ``config.output_dir``.

    ``make_strategy(config, sites_per_round=m)`` builds the strategy once the sites are connected
    (m is given with central DP). With ``federation.resume`` the run continues from the last round
    completed in ``output-dir`` (``checkpoint``): global adapter, strategy state, central-DP
    state, round counter and history."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fed = config.federation
    state = load_server_state(out) if fed.resume else None
    if fed.resume and state is None:
        log.info("resume: no completed round in %s; starting from round 1", out)
    if state is None:
        clear_server_state(out)  # a crash in round 1 must not resume from an older run's state
    resolved = to_toml(config, header=f"fedllm run {run_id}: fully resolved configuration")
    write_text_atomic(out / "config.toml", resolved)
    if state is not None:
        history = RunHistory.load(out / "history.json", keep_rounds=state.server_round, run_id=run_id)
    else:
        # the run's id in history.json is the one the sites' ledgers use (the audit matches them)
        history = RunHistory(out / "history.json", run_id=fed.run_id or run_id, num_rounds=config.num_server_rounds)
        if fed.run_id:
            history.data["flower-run-id"] = run_id
    history.data["num-server-rounds"] = config.num_server_rounds
    peft_model, _ = shared_model(config)
    arrays: Arrays = state.arrays if state is not None else {
        k: v.numpy() for k, v in get_adapter_state(peft_model, trainable_only=True).items()}
    timeout = fed.round_timeout
    names: dict[int, str] = dict(state.names) if state is not None else {}
    rounds = config.num_server_rounds
    first_round = state.server_round + 1 if state is not None else 1
    central: CentralDP | None = None
    try:
        _wait_for_sites(federation, config)
        if config.central_dp.enabled:
            central = start_central_dp(config, history, connected=len(federation.node_ids()),
                                       saved=state.central if state is not None else None,
                                       ledger=central_ledger_path(config))
        strategy: Strategy = make_strategy(config, sites_per_round=central.sites_per_round if central else None)
        if state is not None:
            restore_strategy(strategy, state)
            log.info("resuming run %s at round %d/%d (rounds 1-%d completed before)", fed.run_id or run_id,
                     first_round, rounds, state.server_round)
        else:
            eval_tasks = _evaluate_tasks(strategy, 0, arrays, federation, history.data["run-id"])
            _evaluate(history, 0, _send(federation, eval_tasks, timeout), names, config)
        for server_round in range(first_round, rounds + 1):
            start = time.perf_counter()
            train_tasks = strategy.configure_train(server_round, arrays, {wire.RUN_ID: history.data["run-id"]},
                                                   federation)
            replies = _send(federation, train_tasks, timeout)
            triage = triage_replies(replies, reference=arrays, names=names, require_change=central is not None,
                                    max_update_norm=fed.max_update_norm)
            _check_round(triage, config, server_round, asked=len(train_tasks))
            released = False
            # central DP: every round that asked sites releases (a missing update counts as zero, the
            # denominator is the sites asked), so whether a round released never depends on the replies
            if triage.accepted or (central is not None and train_tasks):
                new_arrays = strategy.aggregate_train(server_round, triage.accepted)
                released = new_arrays is not None
                arrays = _same_dtypes(new_arrays, arrays) if new_arrays is not None else arrays
            if central is not None:
                clipping_norm, sites = strategy.central_dp_round(released=released)
                central.record_round(history, server_round, asked=len(train_tasks), connected=len(federation.node_ids()),
                                     released=released, clipping_norm=clipping_norm, sites=sites)
            agg = history.record_train(server_round, sites=triage.metrics, refused=triage.refused,
                                       rejected=triage.rejected, failed=triage.failed,
                                       seconds=time.perf_counter() - start)
            save_adapter(peft_model, _torch_state(arrays), out / "checkpoints" / f"round-{server_round}")
            eval_tasks = _evaluate_tasks(strategy, server_round, arrays, federation, history.data["run-id"])
            eval_agg = _evaluate(history, server_round, _send(federation, eval_tasks, timeout), names, config)
            history.save()
            save_server_state(out, server_round=server_round, arrays=arrays, strategy=strategy, names=names,
                              central=central.block() if central is not None else None, run_id=run_id)
            caps = [m[wire.EPSILON_CAP] for m in triage.metrics.values() if wire.EPSILON_CAP in m]
            log.info("[round %d/%d] %d/%d sites trained%s%s | train loss %s | eval loss %s | ppl %s | max ε %s / %s%s",
                     server_round, rounds, len(triage.metrics), len(train_tasks),
                     f" ({len(triage.refused)} refused)" if triage.refused else "",
                     f" ({len(triage.failed)} failed, {len(triage.rejected)} rejected)"
                     if triage.failed or triage.rejected else "",
                     _fmt(agg[wire.TRAIN_LOSS]), _fmt(eval_agg[wire.EVAL_LOSS]), _fmt(eval_agg[wire.PERPLEXITY], ".2f"),
                     _fmt(agg["max-epsilon"], ".2f"), _caps_text(caps),
                     f" | site-level ε {central.epsilon:.2f}" if central is not None else "")
            if not triage.accepted and triage.refused and not triage.failed and not triage.rejected:
                reasons = _refusal_text(triage)
                if not _any_site_trained(history):
                    raise RunFailedError(
                        f"no site trained: every site refused every round up to round {server_round}, so there is "
                        f"nothing to aggregate and the adapter is untrained. The sites' reasons: {reasons}")
                log.info("every sampled site refused round %d (%s); stopping the run", server_round,
                         _refusal_kinds(triage))
                history.data["stopped-early"] = (f"all sites refused round {server_round} ({_refusal_kinds(triage)}): "
                                                 f"{reasons}")
                break
        # export: the final global adapter (PEFT format) in OUTPUT/adapter
        save_adapter(peft_model, _torch_state(arrays), out / "adapter")
        write_model_card(out / "adapter", config=config, history=history.data, sites=_site_configs(config))
    except BaseException as exc:
        history.finish("failed", error=f"{exc.__class__.__name__}: {exc}")
        raise
    history.finish("completed")
    log.info("run %s completed: adapter in %s", run_id, out / "adapter")
    return history


def _caps_text(caps: list[float]) -> str:
    """The caps the sites reported (each site's own, tightened by the run's): one value, or a range."""
    if not caps:
        return "site caps"
    low, high = min(caps), max(caps)
    return f"{low:g}" if low == high else f"{low:g}-{high:g} (each site's cap)"


def _any_site_trained(history: RunHistory) -> bool:
    """Whether any round of this run (history.json, resumed rounds included) aggregated a site's update."""
    return any(r.get("train", {}).get("sites") for r in history.data.get("rounds", []) if r.get("round", 0) > 0)


def _refusal_kinds(triage: Triage) -> str:
    """Why the sites refused, in a few words: their privacy budget, their privacy policy, or both."""
    kinds = {wire.BUDGET_REFUSED: "privacy budget", wire.POLICY_REFUSED: "site privacy policy"}
    found = sorted({kinds.get(code, "refused") for code in triage.refusal_codes.values()}) or ["refused"]
    return " and ".join(found)


def _refusal_text(triage: Triage) -> str:
    """Each refusing site with its own stated reason."""
    return "; ".join(f"{name}: {reason}" for name, reason in sorted(triage.refused.items()))


def _evaluate_tasks(strategy: Strategy, server_round: int, arrays: Arrays, federation: Federation,
                    run_id: str) -> list[Task]:
    """The strategy's evaluate tasks, each carrying the server round and the run id: a site answers
    at most one evaluation per (run, server round) (``fedllm.site.metric_release``)."""
    tasks = strategy.configure_evaluate(server_round, arrays, federation)
    for task in tasks:
        task.config[wire.SERVER_ROUND] = server_round
        task.config[wire.RUN_ID] = run_id
    return tasks


def _same_dtypes(new: Arrays, old: Arrays) -> Arrays:
    """The aggregate in the global adapter's dtypes and key order: FedAdam's server step computes
    in float64, and the sites' float32 replies would then be rejected as the wrong dtype."""
    return {k: np.ascontiguousarray(np.asarray(new[k]).astype(old[k].dtype, copy=False)) for k in old}


def _torch_state(arrays: Arrays) -> dict:
    """The adapter as torch tensors (copies), for ``save_adapter``."""
    import torch

    return {k: torch.tensor(v) for k, v in arrays.items()}


def _send(federation: Federation, tasks: list[Task], timeout: float) -> list[Reply]:
    """Send and wait: one reply per task (the federation charges a missing one to its node)."""
    return list(federation.send_and_receive(list(tasks), timeout=timeout)) if tasks else []


def _check_round(triage: Triage, config: RunConfig, server_round: int, *, asked: int) -> None:
    """Fail the run when a round lost more sites than it may (``federation.*``)."""
    fed = config.federation
    if fed.tolerated_failures >= 0 and len(triage.failed) > fed.tolerated_failures:
        first = triage.failed[0]
        raise RunFailedError(f"round {server_round}: site {first['site']} failed: {first['reason']} "
                             f"({len(triage.failed)} failed; federation.tolerated-failures = {fed.tolerated_failures})")
    everyone_refused = not triage.accepted and triage.refused and not triage.failed and not triage.rejected
    if len(triage.accepted) < fed.min_completed_sites and not everyone_refused:
        lost = [f"{f['site']} ({f['reason']})" for f in triage.failed] + [f"{n} (rejected: {r})"
                                                                          for n, r in triage.rejected.items()]
        raise RunFailedError(
            f"round {server_round}: only {len(triage.accepted)} of {asked} sites sent a usable update, fewer than "
            f"federation.min-completed-sites = {fed.min_completed_sites}; lost: {'; '.join(lost) or 'none'}. "
            "The last completed round is saved: continue with fedllm run --resume RUN_DIR")


def _wait_for_sites(federation: Federation, config: RunConfig) -> None:
    """Before the first round: wait until ``strategy.min-available-sites`` sites are connected
    (at most ``federation.connect-timeout`` seconds), saying who is missing."""
    minimum = max(config.strategy.min_available_sites, config.strategy.min_train_sites)
    limit = config.federation.connect_timeout
    start = time.monotonic()
    last = -math.inf
    while len(nodes := federation.node_ids()) < minimum:
        waited = time.monotonic() - start
        if limit and waited > limit:
            raise RunFailedError(
                f"only {len(nodes)} of {minimum} sites connected within federation.connect-timeout = {limit:g}s: "
                "check that every site runs `fedllm site start` with the coordinator's address and that its key "
                "is registered, or lower strategy.min-available-sites")
        if waited - last >= 30:
            log.info("waiting for sites to connect: %d of %d (strategy.min-available-sites)", len(nodes), minimum)
            last = waited
        time.sleep(1)


def _evaluate(history: RunHistory, server_round: int, replies: list[Reply], names: dict[int, str],
              config: RunConfig) -> dict:
    triage = triage_replies(replies, reference=None, names=names)
    if 0 <= config.federation.tolerated_failures < len(triage.failed):
        first = triage.failed[0]
        raise RunFailedError(f"evaluation round {server_round}: site {first['site']} failed: {first['reason']}")
    agg = history.record_evaluate(server_round, sites=triage.metrics, failed=triage.failed, rejected=triage.rejected)
    for name, metrics in sorted(triage.metrics.items()):
        log.info("[round %d/%d] site %s | held-out loss %.3f | ppl %.2f | %d examples", server_round,
                 config.num_server_rounds, name, metrics[wire.EVAL_LOSS], metrics[wire.PERPLEXITY],
                 int(metrics[wire.NUM_EXAMPLES]))
    return agg
