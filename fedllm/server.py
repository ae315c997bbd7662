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
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedllm import keys
from fedllm.config import CentralDPConfig, RunConfig, SiteConfig, to_toml
from fedllm.errors import ConfigError, RunFailedError
from fedllm.history import RunHistory
from fedllm.model import get_adapter_state, save_adapter, shared_model
from fedllm.model_card import write_model_card
from fedllm.privacy.accounting import site_level_epsilon
from fedllm.strategy import build_strategy, site_level_warning, triage_replies, with_central_dp

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
    central: CentralDP | None = None
    try:
        if config.central_dp.enabled:
            central = _start_central_dp(grid, config, history)
            strategy = with_central_dp(strategy, config.central_dp, sites_per_round=central.sites_per_round)
        replies = list(grid.send_and_receive(strategy.configure_evaluate(0, arrays, ConfigRecord(), grid), timeout=timeout))
        _evaluate(history, 0, replies, names, config)
        for server_round in range(1, rounds + 1):
            start = time.perf_counter()
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            triage = triage_replies(replies, reference=arrays, names=names, require_change=central is not None)
            answered = {m.metadata.src_node_id for m in replies}
            for msg in messages:  # a site that did not answer within round-timeout is a failure
                if msg.metadata.dst_node_id not in answered:
                    node = msg.metadata.dst_node_id
                    triage.failed.append({"site": names.get(node, f"node-{node}"), "code": -1,
                                          "reason": f"no reply within federation.round-timeout = {timeout:g}s"})
            if len(triage.failed) > config.federation.tolerated_failures:
                first = triage.failed[0]
                raise RunFailedError(f"round {server_round}: site {first['site']} failed: {first['reason']}")
            released = False
            if triage.accepted:
                new_arrays, _ = strategy.aggregate_train(server_round, triage.accepted)
                released = new_arrays is not None
                arrays = new_arrays if new_arrays is not None else arrays
            if central is not None:
                central.record_round(history, server_round, strategy, asked=len(messages),
                                     connected=len(list(grid.get_node_ids())), released=released)
            agg = history.record_train(server_round, sites=triage.metrics, refused=triage.refused,
                                       rejected=triage.rejected, failed=triage.failed,
                                       seconds=time.perf_counter() - start)
            save_adapter(peft_model, arrays.to_torch_state_dict(), out / "checkpoints" / f"round-{server_round}")
            eval_replies = list(grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid), timeout=timeout))
            eval_agg = _evaluate(history, server_round, eval_replies, names, config)
            history.save()
            log.info("[round %d/%d] %d/%d sites trained%s | train loss %s | eval loss %s | ppl %s | max ε %s / %g%s",
                     server_round, rounds, len(triage.metrics), len(replies),
                     f" ({len(triage.refused)} refused)" if triage.refused else "",
                     _fmt(agg[keys.TRAIN_LOSS]), _fmt(eval_agg[keys.EVAL_LOSS]), _fmt(eval_agg[keys.PERPLEXITY], ".2f"),
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


def _start_central_dp(grid: Grid, config: RunConfig, history: RunHistory) -> CentralDP:
    """Wait for the sites, plan m and N, check δ < 1/N, and warn when the planned ε is too large."""
    cdp, strat = config.central_dp, config.strategy
    minimum = max(strat.min_available_sites, strat.min_train_sites)
    waited = False
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if not waited:
            log.info("central DP: waiting for %d sites to connect (%d so far)", minimum, len(nodes))
            waited = True
        time.sleep(1)
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
