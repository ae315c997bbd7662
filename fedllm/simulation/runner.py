"""Run a federation on Flower's simulation engine (Ray backend), as real processes, and clean up.

``flwr run`` alone is not enough for users and scripts: it returns 0 when a run fails and leaves a
background SuperLink behind. So this module:

1. starts a private ``flower-superlink --simulation`` on a free 127.0.0.1 port with its own
   ``FLWR_HOME`` (telemetry, update check and per-run dependency installation off; Ray bound to
   the loopback address);
2. submits the fedllm app with ``flwr run`` (a generated app folder whose components point at the
   installed ``fedllm`` package; the run config goes as a TOML file of overrides);
3. follows the run's log stream, keeps all of it in ``logs/flower.log`` and shows fedllm's own
   progress lines;
4. reads the run's final status from the SuperLink and the run's ``history.json``;
5. stops the SuperLink and every process it started (its process group), even on Ctrl-C.

Virtual sites map to the scenario's site list by ``partition-id`` through ``sites.json`` in the
output folder. Each Ray actor keeps the base model loaded across the sites and rounds it serves.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from fedllm.config import RunConfig, SiteConfig
from fedllm.errors import RunFailedError
from fedllm.flower.processes import (
    Connection,
    flower_env,
    follow_log,
    free_port,
    run_status,
    start_process,
    stop_group,
    submit_run,
    tool,
    wait_for_port,
    write_app_folder,
    write_run_overrides,
)

log = logging.getLogger(__name__)

RUN_MARKER = "FEDLLM_SIMULATION_ID"


def _kill_marked(marker: str, grace: float = 20.0) -> None:
    """Kill what is left of the run outside the SuperLink's process group and wait until it is gone.

    Ray starts its worker processes in their own sessions; they exit by themselves when the raylet
    dies, but only after a while (longer on a loaded machine). Every process of the run carries
    ``RUN_MARKER`` in its environment, so find them in /proc (Linux; elsewhere this is a no-op)."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return
    needle = f"{RUN_MARKER}={marker}".encode()
    deadline = time.monotonic() + grace
    while True:
        alive = []
        for entry in proc_dir.iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes():
                    alive.append(int(entry.name))
            except OSError:
                continue
        if not alive:
            return
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            log.warning("processes of the run still alive after SIGKILL: %s", alive)
            return
        time.sleep(0.2)


def client_cpus_for(config: RunConfig, num_sites: int, cores: int | None = None) -> int:
    """``simulation.client-cpus`` as set, or for 0 (automatic) the cores of this machine shared by the
    sites trained in one round: each gets ``cores // min(sites per round, cores)`` (at least 1), so
    that every core trains, one thread per site when there are more sites than cores (a site's torch
    threads scale below linearly: 2 threads gave 1.5x 1 thread's tokens/s on SmolLM2-135M, 2-core
    AMD EPYC, bench/bench_real.py), and a lone site uses them all."""
    if config.simulation.client_cpus:
        return config.simulation.client_cpus
    cores = cores or _cores()
    return max(1, cores // max(1, min(_sites_per_round(config, num_sites), cores)))


def simulation_cpus(config: RunConfig, num_sites: int, cores: int | None = None) -> int:
    """The CPUs Ray is told the machine has (its pool runs that many / client-cpus sites at once).
    The machine's cores, except with automatic client-cpus when a round's sites outnumber the cores
    by less than two to one and not by a multiple: then every site of the round runs at once (one
    thread each, the cores shared by the OS), so that no core idles while a last wave of fewer
    sites than cores trains (3 sites on 2 cores, second round: 0.83x the tokens/s of one process in
    two waves, with the AVX2 limit of docs/performance.md; 1.07x all at once)."""
    cores = cores or _cores()
    per_round = _sites_per_round(config, num_sites)
    if config.simulation.client_cpus == 0 and cores < per_round <= 2 * cores and per_round % cores:
        return per_round
    return cores


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _sites_per_round(config: RunConfig, num_sites: int) -> int:
    s = config.strategy
    return min(num_sites, max(s.min_train_sites, math.ceil(s.fraction_train * num_sites)))


def run_simulation(
    config: RunConfig,
    sites: Sequence[SiteConfig],
    *,
    echo: Callable[[str], None] = print,
    verbose: bool = False,
) -> dict:
    """Run the federation; return the history dict. Raises ``RunFailedError`` if the run failed."""
    ray_cpus = simulation_cpus(config, len(sites))
    if not config.simulation.client_cpus:
        config = config.with_overrides({"simulation.client-cpus": client_cpus_for(config, len(sites))})
    out = Path(config.output_dir)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sites_file = Path(config.simulation.sites_file)
    sites_file.write_text(json.dumps([s.to_dict() for s in sites], indent=2) + "\n", encoding="utf-8")
    work = Path(tempfile.mkdtemp(prefix="fedllm-sim-"))
    marker = uuid.uuid4().hex  # inherited by every process the run starts, Ray's workers included
    env = flower_env(work / "flwr-home", **{RUN_MARKER: marker})
    port = free_port()
    Connection(f"127.0.0.1:{port}", insecure=True).write(work / "flwr-home")
    write_app_folder(work / "app", RunConfig().to_flat())
    overrides = work / "run-config.toml"
    write_run_overrides(overrides, config.to_flat())
    superlink_log = logs / "superlink.log"
    superlink = start_process(
        [tool("flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
         "--host", "127.0.0.1", "--port", str(port)], cwd=out, env=env, log_file=superlink_log)
    try:
        wait_for_port("127.0.0.1", port, superlink, superlink_log)
        federation = (f"num-supernodes={len(sites)} client-resources-num-cpus={config.simulation.client_cpus} "
                      f"init-args-num-cpus={ray_cpus}")
        run_id = submit_run(work / "app", overrides, env=env, cwd=work, federation_config=federation)
        follow_log(run_id, env=env, cwd=work, log_file=logs / "flower.log", echo=echo, verbose=verbose)
        status, details = run_status(run_id, env=env, cwd=work)
    finally:
        stop_group(superlink)
        _kill_marked(marker)
        shutil.rmtree(work, ignore_errors=True)
    history_path = out / "history.json"
    history = json.loads(history_path.read_text(encoding="utf-8")) if history_path.is_file() else {}
    if status != "finished:completed" or history.get("status") != "completed":
        reason = history.get("error") or details or status
        raise RunFailedError(f"the federated run failed ({status}): {reason}\nFull log: {logs / 'flower.log'}")
    return history
