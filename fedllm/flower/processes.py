"""Flower's command-line tools and processes, driven from Python: the one place that starts
``flower-superlink``/``flower-supernode``, talks to a SuperLink with ``flwr``, and cleans up.

Used by the simulation (``fedllm simulate``) and by deployment (``fedllm server start``,
``fedllm site start``, ``fedllm run``). Flower 1.42 facts it relies on (docs/notes/flower-1.42.md):

* one HTTP(S) port serves the Fleet, Control and Runtime APIs;
* ``flwr`` reads its connections from ``$FLWR_HOME/config.toml``, so every command here runs with a
  private ``FLWR_HOME`` holding exactly one connection (``CONNECTION``);
* ``flwr run`` returns 0 even when the run fails: the final status comes from ``flwr list``;
* telemetry, the update check and per-run dependency installation are switched off (``FLOWER_ENV``).

Processes are started in their own session (process group) and stopped as a group.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedllm.config import toml_text
from fedllm.errors import FedLLMError, RunFailedError
from fedllm.logs import strip_to_marker

log = logging.getLogger(__name__)

CONNECTION = "fedllm"
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


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (Linux: ip_local_port_range)."""
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2])
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default; macOS uses 49152-65535, also above this
    return low, high


def free_port() -> int:
    """A port on 127.0.0.1 that is free now and outside the ephemeral range.

    A port the kernel picks (bind to 0) comes from the range it also gives to outgoing connections:
    between picking it and the SuperLink or SuperNode binding it, any connection this machine opens
    (gRPC, a site's SuperNode) may take it, and the process then fails with "address already in
    use" (seen in CI). Ports below the ephemeral range are only ever taken by listeners."""
    low, _ = _ephemeral_range()
    candidates = list(range(10000, low)) if low > 11000 else []
    random.SystemRandom().shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # no free port below the range: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tool(name: str) -> str:
    """The path of one of Flower's commands, from this Python environment first."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FedLLMError(f"'{name}' not found; install fedllm's dependencies (pip install -e .)")
    return found


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """The environment for Flower's processes: this environment's scripts first on PATH (Flower
    starts its helpers by name), a private FLWR_HOME, and telemetry and downloads off."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home), "PATH": path, **extra}


@dataclass(frozen=True)
class Connection:
    """How ``flwr`` reaches a SuperLink: ``address`` HOST:PORT, TLS with ``root_certificates``
    (a CA certificate, PEM) unless ``insecure``."""

    address: str
    root_certificates: str = ""
    insecure: bool = False

    def write(self, flwr_home: Path) -> None:
        flwr_home.mkdir(parents=True, exist_ok=True)
        connection: dict[str, str | bool] = {"address": self.address}
        if self.insecure:
            connection["insecure"] = True
        elif self.root_certificates:
            connection["root-certificates"] = str(Path(self.root_certificates).resolve())
        text = toml_text({"superlink": {"default": CONNECTION, CONNECTION: connection}})
        (flwr_home / "config.toml").write_text(text, encoding="utf-8")


def write_app_folder(folder: Path, defaults: dict) -> None:
    """A minimal Flower app folder: components point at the installed fedllm package, so the app
    bundle (FAB) carries no code, only this pyproject.toml. Its version is the installed fedllm's:
    a site accepts only this shape, at the fedllm version it runs (:mod:`fedllm.flower.fab_check`)."""
    from fedllm.flower import fab_check

    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": fab_check.APP_NAME, "version": fab_check.installed_version(), "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": fab_check.PUBLISHER,
            "components": {"serverapp": fab_check.SERVERAPP, "clientapp": fab_check.CLIENTAPP},
            "config": dict(defaults),  # flat dotted keys, written quoted: "privacy.max-epsilon" = 10.0
        }}},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(toml_text(pyproject), encoding="utf-8")


def write_run_overrides(path: Path, flat: dict) -> None:
    """Flat run-config keys as the TOML file ``flwr run --run-config`` reads (quoted dotted keys)."""
    path.write_text(toml_text(flat), encoding="utf-8")


def start_process(cmd: list[str], *, cwd: Path, env: dict, log_file: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own session, stdout and stderr to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", encoding="utf-8") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for_port(host: str, port: int, proc: subprocess.Popen, log_file: Path, *, what: str = "the Flower SuperLink",
                  timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    probe = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunFailedError(f"{what} exited at start (code {proc.returncode}); see {log_file}")
        with socket.socket() as sock:
            if sock.connect_ex((probe, port)) == 0:
                return
        time.sleep(0.3)
    raise RunFailedError(f"{what} did not open port {port} within {timeout:.0f}s; see {log_file}")


def flwr_json(args: list[str], *, env: dict, cwd: Path, timeout: float = 120.0) -> dict:
    """Run ``flwr ARGS --format json``; the parsed JSON (``{"success": false, ...}`` on failure)."""
    res = subprocess.run([tool("flwr"), *args, "--format", "json"], check=False, cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError:
        return {"success": False, "error-message": (res.stdout + res.stderr).strip()}


def submit_run(app: Path, overrides: Path, *, env: dict, cwd: Path, federation_config: str = "") -> str:
    """Submit the app; the run id. Raises ``RunFailedError`` when the SuperLink does not accept it."""
    args = ["run", str(app), CONNECTION, "--run-config", str(overrides)]
    if federation_config:
        args += ["--federation-config", federation_config]
    reply = flwr_json(args, env=env, cwd=cwd, timeout=300)
    run_id = reply.get("run-id")
    if not reply.get("success", True) or not run_id:
        raise RunFailedError(f"flwr run could not submit the run: {reply.get('error-message') or reply}")
    return str(run_id)


def follow_log(run_id: str, *, env: dict, cwd: Path, log_file: Path, echo: Callable[[str], None], verbose: bool) -> None:
    """Stream the run's log until it ends: everything to ``log_file``, fedllm's progress to ``echo``."""
    with open(log_file, "a", encoding="utf-8") as sink:
        proc = subprocess.Popen([tool("flwr"), "log", str(run_id), CONNECTION, "--stream"], cwd=cwd, env=env,
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


def run_status(run_id: str, *, env: dict, cwd: Path, attempts: int = 30) -> tuple[str, str]:
    """(status, details) of a run as the SuperLink reports it, e.g. 'finished:failed'."""
    for _ in range(attempts):
        reply = flwr_json(["list", CONNECTION, "--run-id", str(run_id)], env=env, cwd=cwd)
        try:
            run = reply["runs"][0]
        except (KeyError, IndexError, TypeError):
            time.sleep(1)
            continue
        if str(run.get("status", "")).startswith("finished"):
            return run["status"], str(run.get("status-details", ""))
        time.sleep(1)
    return "unknown", "the SuperLink did not report the run as finished"


def stop_run(run_id: str, *, env: dict, cwd: Path) -> None:
    """Ask the SuperLink to stop a run (best effort)."""
    with contextlib.suppress(Exception):
        subprocess.run([tool("flwr"), "stop", str(run_id), CONNECTION], check=False, cwd=cwd, env=env, capture_output=True,
                       timeout=60)
