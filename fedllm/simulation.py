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
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from fedllm.config import RunConfig, SiteConfig, toml_value
from fedllm.errors import FedLLMError, RunFailedError
from fedllm.logs import strip_to_marker

log = logging.getLogger(__name__)

CONNECTION = "fedllm-sim"
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray binds 127.0.0.1 instead of the host's address
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FedLLMError(f"'{name}' not found; install fedllm's dependencies (pip install -e .)")
    return found


def write_app_folder(folder: Path, defaults: dict) -> None:
    """A minimal Flower app folder: components point at the installed fedllm package."""
    lines = [
        '[build-system]', 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', '',
        '[project]', 'name = "fedllm"', 'version = "0.1.0"', 'dependencies = []', '',
        '[tool.flwr.app]', 'publisher = "fedllm"', '',
        '[tool.flwr.app.components]', 'serverapp = "fedllm.server_app:app"', 'clientapp = "fedllm.client_app:app"', '',
        '[tool.flwr.app.config]',
        *[f'"{k}" = {toml_value(v)}' for k, v in defaults.items()],
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


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


def _stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait_for_port(port: int, proc: subprocess.Popen, log_file: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunFailedError(f"the Flower SuperLink exited at start (code {proc.returncode}); see {log_file}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RunFailedError(f"the Flower SuperLink did not open port {port} within {timeout:.0f}s; see {log_file}")


def run_simulation(
    config: RunConfig,
    sites: Sequence[SiteConfig],
    *,
    echo: Callable[[str], None] = print,
    verbose: bool = False,
) -> dict:
    """Run the federation; return the history dict. Raises ``RunFailedError`` if the run failed."""
    out = Path(config.output_dir)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sites_file = Path(config.simulation.sites_file)
    sites_file.write_text(json.dumps([s.to_dict() for s in sites], indent=2) + "\n", encoding="utf-8")
    work = Path(tempfile.mkdtemp(prefix="fedllm-sim-"))
    # Flower starts its helpers (flower-superexec, flwr-simulation) by name: put this
    # environment's scripts first on PATH, also when the virtualenv is not activated.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    marker = uuid.uuid4().hex  # inherited by every process the run starts, Ray's workers included
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(work / "flwr-home"), "PATH": path, RUN_MARKER: marker}
    port = free_port()
    (work / "flwr-home").mkdir()
    (work / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n',
        encoding="utf-8")
    write_app_folder(work / "app", RunConfig().to_flat())
    overrides = work / "run-config.toml"
    overrides.write_text("".join(f'"{k}" = {toml_value(v)}\n' for k, v in config.to_flat().items()), encoding="utf-8")
    superlink_log = logs / "superlink.log"
    with open(superlink_log, "w", encoding="utf-8") as sl_out:
        superlink = subprocess.Popen(
            [_tool("flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=out, env=env, stdout=sl_out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_port(port, superlink, superlink_log)
        federation = f"num-supernodes={len(sites)} client-resources-num-cpus={config.simulation.client_cpus}"
        submit = subprocess.run(
            [_tool("flwr"), "run", str(work / "app"), CONNECTION, "--run-config", str(overrides),
             "--federation-config", federation, "--format", "json"],
            cwd=work, env=env, capture_output=True, text=True, timeout=300)
        try:
            run_id = json.loads(submit.stdout)["run-id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise RunFailedError(f"flwr run could not submit the run:\n{submit.stdout}{submit.stderr}") from None
        if not run_id:
            raise RunFailedError(f"flwr run could not submit the run:\n{submit.stdout}")
        _follow_log(run_id, env, work, logs / "flower.log", echo, verbose)
        status, details = _run_status(run_id, env, work)
    finally:
        _stop_group(superlink)
        _kill_marked(marker)
        shutil.rmtree(work, ignore_errors=True)
    history_path = out / "history.json"
    history = json.loads(history_path.read_text(encoding="utf-8")) if history_path.is_file() else {}
    if status != "finished:completed" or history.get("status") != "completed":
        reason = history.get("error") or details or status
        raise RunFailedError(f"the federated run failed ({status}): {reason}\nFull log: {logs / 'flower.log'}")
    return history


def _follow_log(run_id: str, env: dict, cwd: Path, log_file: Path, echo: Callable[[str], None], verbose: bool) -> None:
    """Stream the run's log until it ends: everything to ``log_file``, progress to ``echo``."""
    with open(log_file, "w", encoding="utf-8") as sink:
        proc = subprocess.Popen([_tool("flwr"), "log", str(run_id), CONNECTION, "--stream"], cwd=cwd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                sink.write(line)
                sink.flush()
                message = strip_to_marker(line)
                if verbose:
                    echo(line.rstrip("\n"))
                elif message is not None:
                    echo(message)
                elif "ERROR" in line or "Exception" in line:
                    echo(line.rstrip("\n"))
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait()


def _run_status(run_id: str, env: dict, cwd: Path) -> tuple[str, str]:
    """(status, details) of a run as the SuperLink reports it, e.g. 'finished:failed'."""
    for _ in range(30):
        res = subprocess.run([_tool("flwr"), "list", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                             cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        try:
            run = json.loads(res.stdout)["runs"][0]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            time.sleep(1)
            continue
        if str(run.get("status", "")).startswith("finished"):
            return run["status"], str(run.get("status-details", ""))
        time.sleep(1)
    return "unknown", "the SuperLink did not report the run as finished"
