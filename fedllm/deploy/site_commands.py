"""``fedllm site start sites/x.toml --server HOST:PORT``: run one institution's site.

Starts a Flower SuperNode next to the site's data. It connects *out* to the coordinator's
SuperLink (TLS with the coordinator's CA certificate, SuperNode authentication with the site's
key) and runs the fedllm ClientApp *installed at the site* for every message: the SuperNode runs
with ``--isolation process`` and the site's own runner (:mod:`fedllm.flower.site_runner`, started
here from this install) takes its tasks, refusing any run whose app bundle (FAB) is not fedllm's
own at the site's pinned version (:mod:`fedllm.flower.fab_check`) before any of the bundle is
unpacked or imported; the coordinator's code never runs at the site. The site's node config (name, data path,
ledger path, privacy cap, device, signing key) comes from the site file and never leaves the
machine, except the site's name. Before connecting it checks, without training or sending
anything, that the data loads and that the ledger verifies against it.

The command stays in the foreground, shows the site's progress (fedllm's own lines) and stops the
SuperNode and everything it started on Ctrl-C or SIGTERM. It exits non-zero when the SuperNode
stops by itself, e.g. when the coordinator refuses the site's key. A SuperNode retries a lost
connection without limit, so a site outlives a coordinator restart and rejoins on its own.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedllm.errors import ConfigError, FedLLMError, RunFailedError
from fedllm.flower.fab_check import installed_version
from fedllm.flower.processes import flower_env, free_port, stop_group, tool
from fedllm.logs import strip_to_marker


def _echo(text: str) -> None:
    print(text, flush=True)


def _preflight(site_file) -> None:
    """The data loads and the ledger (if any) verifies against it: fail here, not mid-round. The
    ledger is bound to the site's training subset (its own held-out split, with the split key beside
    the ledger), as the site computes it before it trains (``fedllm.site.runtime``)."""
    from fedllm.data.loading import load_records
    from fedllm.privacy.ledger import verify_ledger
    from fedllm.privacy.signing import load_private_key
    from fedllm.site.holdout import site_split_key
    from fedllm.site.runtime import training_fingerprint

    site = site_file.site
    records = load_records(site.data_path, columns=site.data_columns)
    _echo(f"site {site.name}: {len(records)} records in {site.data_path} (they stay on this machine)")
    ledger = Path(site.ledger_path)
    if ledger.is_file():  # the same checks the site makes before it trains: this data, and its own key if it signs
        public_key = load_private_key(site.signing_key).public_key() if site.signing_key else None
        fingerprint = training_fingerprint(site, records, site_split_key(ledger, site.name))
        result = verify_ledger(ledger, public_key=public_key, dataset_fingerprint=fingerprint)
        if not result.ok:
            raise FedLLMError(f"site {site.name}: privacy ledger {ledger} does not verify: "
                              f"{'; '.join(result.problems[:3])}; run fedllm ledger verify {ledger}")
        eps = "inf" if result.final_epsilon == float("inf") else f"{result.final_epsilon:.2f}"
        _echo(f"site {site.name}: ledger {ledger}: {result.entries} releases, ε spent {eps}")
    else:
        _echo(f"site {site.name}: new ledger will be written to {ledger}")


def supernode_command(site_file, *, server: str, insecure: bool, root_certificates: str, port: int) -> list[str]:
    conn = site_file.connection
    cmd = [tool("flower-supernode"), "--superlink", server, "--node-config", site_file.node_config(),
           "--host", "127.0.0.1", "--port", str(port), "--isolation", "process"]  # the site's runner takes its tasks
    if insecure:
        cmd.append("--insecure")
    else:
        ca = root_certificates or conn.root_certificates
        if not ca:
            raise ConfigError(f"{site_file.path}: no CA certificate for TLS: set [connection] root-certificates "
                              "(the coordinator's ca.crt), pass --root-certificates PEM, or --insecure for a "
                              "local trial without TLS")
        if not Path(ca).is_file():
            raise ConfigError(f"{ca}: CA certificate not found")
        cmd += ["--root-certificates", str(Path(ca).resolve())]
    if conn.auth_key:
        cmd += ["--auth-supernode-private-key", conn.auth_key]
    return cmd


def runner_command(port: int, *, version: str) -> list[str]:
    """The site's own ClientApp runner (this install's Python and fedllm), serving the SuperNode's
    Runtime API on 127.0.0.1:``port``; it exits when this process does."""
    return [sys.executable, "-m", "fedllm.flower.site_runner", "serve", "--runtime-api-address", f"127.0.0.1:{port}",
            "--fedllm-version", version, "--parent-pid", str(os.getpid())]


def cmd_site_start(args: argparse.Namespace) -> int:
    from fedllm.deploy.site_file import load_site_file

    site_file = load_site_file(Path(args.file))
    server = args.server or site_file.connection.server
    if not server:
        raise ConfigError(f"{site_file.path}: no coordinator address: pass --server HOST:PORT or set "
                          "[connection] server")
    pinned = site_file.connection.fedllm_version or installed_version()
    if pinned != installed_version():
        raise ConfigError(f"{site_file.path}: [connection] fedllm-version = {pinned!r}, but the fedllm installed here is "
                          f"{installed_version()!r}: the site runs only its installed fedllm, so install fedllm "
                          f"{pinned} or set fedllm-version = {installed_version()!r} (or remove the key)")
    _preflight(site_file)
    port = site_file.connection.runtime_port or free_port()
    cmd = supernode_command(site_file, server=server, insecure=args.insecure,
                            root_certificates=args.root_certificates or "", port=port)
    state = Path(site_file.connection.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    log_file = state / "supernode.log"
    name = site_file.site.name
    _echo(f"site {name}: connecting to {server} ({'INSECURE' if args.insecure else 'TLS'}"
          f"{', authenticated with ' + Path(site_file.connection.auth_key).name if site_file.connection.auth_key else ''}"
          f"); runs only its installed fedllm {pinned}; log {log_file}; Ctrl-C stops the site")
    state_flags = {"refused": False}
    lock = threading.Lock()
    with open(log_file, "a", encoding="utf-8") as sink:

        def pump(proc: subprocess.Popen) -> None:  # helpers keep a pipe open after exit: read in a thread
            assert proc.stdout is not None
            for line in proc.stdout:
                with lock:
                    sink.write(line)
                    sink.flush()
                state_flags["refused"] = state_flags["refused"] or "Failed to activate SuperNode" in line
                message = strip_to_marker(line)
                if args.verbose:
                    _echo(line.rstrip("\n"))
                elif message is not None:
                    _echo(message)
                elif "ERROR" in line or "Traceback" in line:
                    _echo(line.rstrip("\n"))

        env = flower_env(state / "flwr-home")
        procs = [subprocess.Popen(cmd, cwd=state, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace", start_new_session=True)]
        proc, stopped = procs[0], None
        readers = [threading.Thread(target=pump, args=(proc,), daemon=True)]
        try:
            procs.append(subprocess.Popen(
                runner_command(port, version=pinned), cwd=state, env=env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True))
            readers.append(threading.Thread(target=pump, args=(procs[1],), daemon=True))
            for reader in readers:
                reader.start()
            while (stopped := next((p for p in procs if p.poll() is not None), None)) is None:
                time.sleep(0.5)
            for reader in readers:
                reader.join(timeout=2)
        except KeyboardInterrupt:
            _echo(f"site {name}: stopping")
            return 0
        finally:
            for started in procs:
                stop_group(started)
    if stopped is not proc and not state_flags["refused"]:
        raise RunFailedError(f"site {name}: the site's ClientApp runner stopped (exit code {procs[1].returncode}); "
                             f"see {log_file}")
    refused = state_flags["refused"]
    if refused:
        key = site_file.connection.auth_key
        raise RunFailedError(
            f"site {name}: the coordinator refused this site: its key is not registered there"
            + (f" (send {key}.pub to the coordinator, who starts the server with --site-keys holding it)" if key else
               " (set [connection] auth-key to the site's private key and register its .pub at the coordinator)"))
    raise RunFailedError(f"site {name}: the SuperNode stopped (exit code {proc.returncode}); see {log_file}")


def add_site_start_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="the site file (sites/<name>.toml)")
    parser.add_argument("--server", help="the coordinator's HOST:PORT (default: [connection] server in the file)")
    parser.add_argument("--root-certificates", metavar="PEM", help="CA certificate of the coordinator "
                                                                   "(default: [connection] root-certificates)")
    parser.add_argument("--insecure", action="store_true", help="connect without TLS (local trials only)")
    parser.add_argument("--verbose", action="store_true", help="show the SuperNode's full log")
