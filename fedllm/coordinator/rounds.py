"""The coordinator's round loop: sample sites, send the global adapter, screen and aggregate the
updates, evaluate on every site's held-out data, checkpoint, and keep the history.

Round 0 is a federated evaluation of the initial adapter (the base model's loss before training).
Each round then trains, aggregates and evaluates. A site that refuses a round for its privacy
budget is recorded and the round goes on with the others; a site failure (a crash, a timeout)
beyond ``federation.tolerated-failures`` fails the run. If every site refuses, nothing more can be
trained and the run ends early as completed.

With ``central-dp.enabled`` the strategy is wrapped for site-level DP (``strategy.py``). Before
round 0 the loop waits for the sites, checks δ < 1/N, and warns when the planned site-level ε
is too large to mean anything; every round that releases a noisy aggregate adds to the site-level
ε recorded in ``history.json`` (top-level and per round ``"central-dp"``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedllm import wire
from fedllm.config import CentralDPConfig, RunConfig, SiteConfig, to_toml
from fedllm.coordinator.checkpoint import (
    clear_server_state,
    load_server_state,
    restore_strategy,
    save_server_state,
)
from fedllm.coordinator.history import RunHistory
from fedllm.coordinator.screening import triage_replies
from fedllm.errors import ConfigError, RunFailedError
from fedllm.files import write_text_atomic
from fedllm.flower.strategies import build_strategy, site_level_warning, with_central_dp
from fedllm.model.lora import get_adapter_state, save_adapter, shared_model
from fedllm.privacy.site_level import site_level_epsilon
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


def run_federation(grid: Grid, config: RunConfig, *, run_id: str) -> RunHistory:
    """Run ``config.num_server_rounds`` rounds; outputs go to ``config.output_dir``.

    With ``federation.resume`` the run continues from the last round completed in ``output-dir``
    (``server_state``): global adapter, strategy and server-optimizer state, central-DP state,
    round counter and history."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fed = config.federation
    state = load_server_state(out) if fed.resume else None
    if fed.resume and state is None:
        log.info("resume: no completed round in %s; starting from round 1", out)
    if state is None:
        clear_server_state(out)  # a crash in round 1 must not resume from an older run's state
    write_text_atomic(out / "config.toml", to_toml(config, header=f"fedllm run {run_id}: fully resolved configuration"))
    if state is not None:
        history = RunHistory.load(out / "history.json", keep_rounds=state.server_round, run_id=run_id)
    else:
        # the run's id in history.json is the one the sites' ledgers use (the audit matches them)
        history = RunHistory(out / "history.json", run_id=fed.run_id or run_id, num_rounds=config.num_server_rounds)
        if fed.run_id:
            history.data["flower-run-id"] = run_id
    history.data["num-server-rounds"] = config.num_server_rounds
    peft_model, _ = shared_model(config)
    arrays = state.arrays if state is not None else ArrayRecord(get_adapter_state(peft_model, trainable_only=True))
    strategy = build_strategy(config.strategy)
    timeout = fed.round_timeout
    names: dict[int, str] = dict(state.names) if state is not None else {}
    rounds = config.num_server_rounds
    first_round = state.server_round + 1 if state is not None else 1
    central: CentralDP | None = None
    try:
        _wait_for_sites(grid, config)
        if config.central_dp.enabled:
            central = _start_central_dp(grid, config, history, saved=state.central if state is not None else None)
            strategy = with_central_dp(strategy, config.central_dp, sites_per_round=central.sites_per_round)
        if state is not None:
            restore_strategy(strategy, state)
            log.info("resuming run %s at round %d/%d (rounds 1-%d completed before)", fed.run_id or run_id,
                     first_round, rounds, state.server_round)
        else:
            replies, node_of = _send(grid, strategy.configure_evaluate(0, arrays, ConfigRecord(), grid), timeout)
            _evaluate(history, 0, replies, names, config, node_of)
        for server_round in range(first_round, rounds + 1):
            start = time.perf_counter()
            train_config = ConfigRecord({wire.RUN_ID: history.data["run-id"]})
            messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
            replies, node_of = _send(grid, messages, timeout)
            triage = triage_replies(replies, reference=arrays, names=names, node_of=node_of,
                                    require_change=central is not None, max_update_norm=fed.max_update_norm)
            _check_round(triage, config, server_round, asked=len(messages))
            released = False
            if triage.accepted:
                new_arrays, _ = strategy.aggregate_train(server_round, triage.accepted)
                released = new_arrays is not None
                arrays = _same_dtypes(new_arrays, arrays) if new_arrays is not None else arrays
            if central is not None:
                central.record_round(history, server_round, strategy, asked=len(messages),
                                     connected=len(list(grid.get_node_ids())), released=released)
            agg = history.record_train(server_round, sites=triage.metrics, refused=triage.refused,
                                       rejected=triage.rejected, failed=triage.failed,
                                       seconds=time.perf_counter() - start)
            save_adapter(peft_model, arrays.to_torch_state_dict(), out / "checkpoints" / f"round-{server_round}")
            eval_replies, node_of = _send(grid, strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
                                          timeout)
            eval_agg = _evaluate(history, server_round, eval_replies, names, config, node_of)
            history.save()
            save_server_state(out, server_round=server_round, arrays=arrays, strategy=strategy, names=names,
                              central=central.block() if central is not None else None, run_id=run_id)
            log.info("[round %d/%d] %d/%d sites trained%s%s | train loss %s | eval loss %s | ppl %s | max ε %s / %g%s",
                     server_round, rounds, len(triage.metrics), len(messages),
                     f" ({len(triage.refused)} refused)" if triage.refused else "",
                     f" ({len(triage.failed)} failed, {len(triage.rejected)} rejected)"
                     if triage.failed or triage.rejected else "",
                     _fmt(agg[wire.TRAIN_LOSS]), _fmt(eval_agg[wire.EVAL_LOSS]), _fmt(eval_agg[wire.PERPLEXITY], ".2f"),
                     _fmt(agg["max-epsilon"], ".2f"), config.privacy.max_epsilon,
                     f" | site-level ε {central.epsilon:.2f}" if central is not None else "")
            if not triage.accepted and triage.refused and not triage.failed and not triage.rejected:
                log.info("every sampled site refused round %d for its privacy budget; stopping the run", server_round)
                history.data["stopped-early"] = f"all sites refused round {server_round} (privacy budget)"
                break
        # export: the final global adapter (PEFT format) in OUTPUT/adapter
        save_adapter(peft_model, arrays.to_torch_state_dict(), out / "adapter")
        write_model_card(out / "adapter", config=config, history=history.data, sites=_site_configs(config))
    except BaseException as exc:
        history.finish("failed", error=f"{exc.__class__.__name__}: {exc}")
        raise
    history.finish("completed")
    log.info("run %s completed: adapter in %s", run_id, out / "adapter")
    return history


def _same_dtypes(new: ArrayRecord, old: ArrayRecord) -> ArrayRecord:
    """The aggregate in the global adapter's dtypes and key order: FedAdam's server step computes
    in float64, and the sites' float32 replies would then be rejected as the wrong dtype."""
    return ArrayRecord({k: Array(np.ascontiguousarray(new[k].numpy().astype(old[k].numpy().dtype, copy=False)))
                        for k in old})


def _send(grid: Grid, messages, timeout: float) -> tuple[list[Message], dict[str, int]]:
    """Send and wait; the replies, and which node each sent message went to (by message id), so a
    reply the SuperLink writes for an unreachable node is charged to that node."""
    messages = list(messages)
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    answered = {r.metadata.reply_to_message_id for r in replies}
    for msg in messages:  # no reply at all within round-timeout: the SuperLink gave up on it too
        if msg.metadata.message_id not in answered:
            replies.append(Message(Error(code=ErrorCode.NODE_UNAVAILABLE,
                                         reason=f"no reply within federation.round-timeout = {timeout:g}s"),
                                   reply_to=msg))
    return replies, node_of


def _check_round(triage, config: RunConfig, server_round: int, *, asked: int) -> None:
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


def _wait_for_sites(grid: Grid, config: RunConfig) -> None:
    """Before the first round: wait until ``strategy.min-available-sites`` sites are connected
    (at most ``federation.connect-timeout`` seconds), saying who is missing."""
    minimum = max(config.strategy.min_available_sites, config.strategy.min_train_sites)
    limit = config.federation.connect_timeout
    start = time.monotonic()
    last = -math.inf
    while len(nodes := list(grid.get_node_ids())) < minimum:
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


def _evaluate(history: RunHistory, server_round: int, replies: list, names: dict[int, str], config: RunConfig,
              node_of: dict[str, int]) -> dict:
    triage = triage_replies(replies, reference=None, names=names, node_of=node_of)
    if 0 <= config.federation.tolerated_failures < len(triage.failed):
        first = triage.failed[0]
        raise RunFailedError(f"evaluation round {server_round}: site {first['site']} failed: {first['reason']}")
    agg = history.record_evaluate(server_round, sites=triage.metrics, failed=triage.failed, rejected=triage.rejected)
    for name, metrics in sorted(triage.metrics.items()):
        log.info("[round %d/%d] site %s | held-out loss %.3f | ppl %.2f | %d examples", server_round,
                 config.num_server_rounds, name, metrics[wire.EVAL_LOSS], metrics[wire.PERPLEXITY],
                 int(metrics[wire.NUM_EXAMPLES]))
    return agg


# --------------------------------------------------------------------------------------------
# central (site-level) DP


@dataclass
class CentralDP:
    """The run's site-level DP bookkeeping: the plan, then what every round released."""

    config: CentralDPConfig
    sites_per_round: int  # m: Flower's sample size (the largest asked in a round so far)
    total_sites: int  # N: connected sites (the most seen so far)
    sampling: str  # "all" while every round asked every connected site, else "fixed-subset"
    rounds: int = 0  # noisy aggregates released
    epsilon: float = 0.0

    def epsilon_after(self, rounds: int) -> float:
        return site_level_epsilon(noise_multiplier=self.config.noise_multiplier, sites_per_round=self.sites_per_round,
                                  total_sites=self.total_sites, rounds=rounds, target_delta=self.config.target_delta,
                                  accountant="prv", sampling=self.sampling)

    def block(self) -> dict:
        """The top-level ``"central-dp"`` entry of history.json."""
        return {"enabled": True, "clipping": self.config.clipping, "noise-multiplier": self.config.noise_multiplier,
                "clipping-norm": self.config.clipping_norm, "sites-per-round": self.sites_per_round,
                "total-sites": self.total_sites, "rounds": self.rounds, "sampling": self.sampling,
                "epsilon": self.epsilon, "delta": self.config.target_delta, "accountant": "prv"}

    def record_round(self, history: RunHistory, server_round: int, strategy, *, asked: int, connected: int,
                     released: bool) -> None:
        """Account one round (ε grows only when a noisy aggregate was released) and record it."""
        self.total_sites = max(self.total_sites, connected, asked)
        self.sites_per_round = max(self.sites_per_round, asked)
        if asked < connected:
            self.sampling = "fixed-subset"
        if self.sampling == "all" and self.sites_per_round != self.total_sites:
            self.sampling = "fixed-subset"
        if released:
            self.rounds += 1
            self.epsilon = self.epsilon_after(self.rounds)
        history.record_central_dp(server_round, epsilon=self.epsilon,
                                  clipping_norm=strategy.round_clipping_norm if released else strategy.clipping_norm,
                                  sites=strategy.round_sites if released else 0)
        history.set_central_dp(self.block())


def _start_central_dp(grid: Grid, config: RunConfig, history: RunHistory, *, saved: dict | None = None) -> CentralDP:
    """Plan m and N from the connected sites, check δ < 1/N, and warn when the planned ε is too
    large; on resume, continue from the saved accounting (``saved``: ``CentralDP.block()``)."""
    cdp, strat = config.central_dp, config.strategy
    if saved is not None:
        central = CentralDP(cdp, int(saved["sites-per-round"]), int(saved["total-sites"]), str(saved["sampling"]),
                            rounds=int(saved["rounds"]), epsilon=float(saved["epsilon"]))
        history.set_central_dp(central.block())
        return central
    nodes = list(grid.get_node_ids())
    sites_per_round = max(int(len(nodes) * strat.fraction_train), strat.min_train_sites)
    total = max(len(nodes), sites_per_round)
    if cdp.target_delta >= 1 / total:
        raise ConfigError(
            f"central-dp.target-delta = {cdp.target_delta:g} is not below 1/N = {1 / total:g} for N = {total} sites: "
            "at δ ≥ 1/N, publishing one whole site's update would satisfy the definition. "
            "Use a δ much smaller than 1/N (the default is 1e-05)."
        )
    central = CentralDP(cdp, sites_per_round, total, "all" if sites_per_round == total else "fixed-subset")
    planned = central.epsilon_after(config.num_server_rounds)
    warning = site_level_warning(epsilon=planned, rounds=config.num_server_rounds, total_sites=total,
                                 noise_multiplier=cdp.noise_multiplier)
    if warning:
        log.warning("WARNING: %s", warning)
    log.info("central DP (%s clipping, S=%g, z=%g): %d of %d sites per round; planned site-level ε = %.2f "
             "after %d rounds (δ=%g, prv)", cdp.clipping, cdp.clipping_norm, cdp.noise_multiplier, sites_per_round,
             total, planned, config.num_server_rounds, cdp.target_delta)
    history.set_central_dp(central.block())
    return central
