"""The coordinator's commands: ``fedllm server start`` (a Flower SuperLink with TLS and SuperNode
authentication) and ``fedllm run`` (submit the fedllm app to it, follow the run, exit non-zero
when it fails, resume a run whose coordinator died).

Deployment is Flower's own engine: the SuperLink listens on one port (Fleet, Control and Runtime
APIs over HTTPS); each site runs a SuperNode (``fedllm site start``) that connects *out* to it.
The ServerApp (``fedllm.flower.server_app``) runs under the SuperLink, on the coordinator's machine, so
``fedllm run`` runs there too: the run's outputs (adapter, history, checkpoints, resume state) are
written to a local folder, exactly as ``fedllm simulate`` writes them.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from fedllm.config import (
    RunConfig,
    flatten,
    load_run_overrides,
    parse_set_option,
    read_toml,
)
from fedllm.errors import ConfigError, FedLLMError, RunFailedError
from fedllm.flower.processes import (
    CONNECTION,
    Connection,
    flower_env,
    flwr_json,
    follow_log,
    run_status,
    start_process,
    stop_group,
    stop_run,
    submit_run,
    tool,
    wait_for_port,
    write_app_folder,
    write_run_overrides,
)

DEFAULT_PORT = 9092


def _echo(text: str) -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------------------------
# fedllm server start


def _tls_files(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) from --certs DIR or the explicit flags."""
    certs = Path(args.certs)
    files = (Path(args.ssl_ca_certfile or certs / "ca.crt"), Path(args.ssl_certfile or certs / "server.pem"),
             Path(args.ssl_keyfile or certs / "server.key"))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(
            f"TLS files not found: {', '.join(missing)}. Create a development CA with `fedllm certs --out {certs}` "
            "(or pass your institution's files with --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile); for a local "
            "trial without encryption, pass --insecure")
    return tuple(f.resolve() for f in files)  # type: ignore[return-value]


def _local_address(server_cert: Path | None, port: int) -> str:
    """How this machine reaches its own SuperLink with a hostname the certificate is valid for."""
    if server_cert is None:
        return f"127.0.0.1:{port}"
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(server_cert.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return f"localhost:{port}"
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    dns = san.get_values_for_type(x509.DNSName)
    if "127.0.0.1" in ips:
        return f"127.0.0.1:{port}"
    if "localhost" in dns:
        return f"localhost:{port}"
    return f"{(dns or ips or ['localhost'])[0]}:{port}"


def register_site_keys(keys: list[Path], *, env: dict, cwd: Path, echo: Callable[[str], None]) -> list[str]:
    """Register SuperNode public keys with the SuperLink (``flwr supernode register``); a key
    already registered is fine. Returns the names registered now or before."""
    names = []
    for key in keys:
        reply = flwr_json(["supernode", "register", str(key), CONNECTION, "--name", key.stem], env=env, cwd=cwd)
        message = str(reply.get("error-message", ""))
        if reply.get("success"):
            echo(f"  registered site key {key.name} (node {reply.get('node-id')})")
        elif "already in use" in message:
            echo(f"  site key {key.name} was already registered")
        else:
            detail = " ".join(line.strip(" │╭╮╰╯─") for line in message.splitlines() if line.strip(" │╭╮╰╯─"))
            raise RunFailedError(f"could not register site key {key}: {detail or reply}")
        names.append(key.stem)
    return names


def cmd_server_start(args: argparse.Namespace) -> int:
    """Start the coordinator's SuperLink in the foreground; Ctrl-C (or SIGTERM) stops it."""
    state = Path(args.state).resolve()
    keys = sorted(p.resolve() for p in Path(args.site_keys).glob("*.pub")) if args.site_keys else []
    if args.site_keys and not keys:
        raise ConfigError(f"--site-keys {args.site_keys}: no *.pub files there (site public keys from fedllm certs)")
    if args.insecure and keys:
        raise ConfigError("--insecure with --site-keys: Flower's SuperNode authentication needs TLS. Drop --site-keys "
                          "for an open local trial, or drop --insecure (fedllm certs makes a development CA)")
    tls = None if args.insecure else _tls_files(args)
    state.mkdir(parents=True, exist_ok=True)
    auth = not args.insecure  # Flower 1.42 allows SuperNode authentication only over TLS
    cmd = [tool("flower-superlink"), "--disable-runtime-dependency-installation", "--host", args.host,
           "--port", str(args.port), "--database", str(state / "state.db")]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(tls[0]), "--ssl-certfile", str(tls[1]), "--ssl-keyfile", str(tls[2])]
    if auth:
        cmd.append("--enable-supernode-auth")
    env = flower_env(state / "flwr-home")
    log_file = state / "superlink.log"
    local = _local_address(tls[1] if tls else None, args.port)
    cli_home = state / "cli-home"
    Connection(local, root_certificates=str(tls[0]) if tls else "", insecure=tls is None).write(cli_home)
    cli_env = flower_env(cli_home)
    proc = start_process(cmd, cwd=state, env=env, log_file=log_file)
    try:
        wait_for_port(args.host, args.port, proc, log_file)
        registered = register_site_keys(keys, env=cli_env, cwd=state, echo=_echo) if keys else []
        mode = "TLS" if tls else "INSECURE (no TLS: local trials only)"
        _echo(f"fedllm coordinator listening on {args.host}:{args.port} ({mode}; "
              + (f"SuperNode authentication on, {len(registered)} site keys given: {', '.join(registered)}"
                 if auth and registered else
                 "SuperNode authentication on: only registered site keys can join" if auth else
                 "WARNING: no SuperNode authentication, any site can join") + ")")
        _echo(f"state and log: {state}   (Ctrl-C stops the coordinator)")
        _echo(f"submit a run from this machine: fedllm run --server {local}"
              + (" --insecure" if tls is None else f" --root-certificates {tls[0]}"))
        with open(log_file, encoding="utf-8", errors="replace") as follow:
            follow.seek(0, 2)
            while proc.poll() is None:
                line = follow.readline()
                if not line:
                    time.sleep(0.5)
                elif args.verbose or "ERROR" in line:
                    _echo(line.rstrip("\n"))
        raise RunFailedError(f"the SuperLink stopped (exit code {proc.returncode}); see {log_file}")
    except KeyboardInterrupt:
        _echo("stopping the coordinator")
        return 0
    finally:
        stop_group(proc)


# --------------------------------------------------------------------------------------------
# fedllm run


def _connection(args: argparse.Namespace) -> Connection:
    if args.insecure:
        return Connection(args.server, insecure=True)
    ca = Path(args.root_certificates or Path(args.certs) / "ca.crt")
    if not ca.is_file():
        raise ConfigError(f"{ca}: the CA certificate that signed the coordinator's TLS certificate was not found; "
                          "pass --root-certificates PEM (or --certs DIR holding ca.crt), or --insecure for a local "
                          "trial without TLS")
    return Connection(args.server, root_certificates=str(ca.resolve()))


def _tls_flag(args: argparse.Namespace) -> str:
    if args.insecure:
        return "--insecure "
    return f"--root-certificates {args.root_certificates} " if args.root_certificates else f"--certs {args.certs} "


def _registered_sites(env: dict, cwd: Path) -> int | None:
    """How many SuperNodes are registered (None when the SuperLink does not say)."""
    reply = flwr_json(["supernode", "ls", CONNECTION], env=env, cwd=cwd)
    if not reply.get("success"):
        message = str(reply.get("error-message", reply))
        if "connect" in message.lower() or "unavailable" in message.lower() or "ssl" in message.lower():
            raise RunFailedError(f"cannot reach the coordinator: {message.splitlines()[-1] if message else message}")
        return None
    nodes = [n for n in reply.get("nodes", []) if n.get("status") in ("registered", "online", "offline")]
    return len(nodes) or None


def _run_overrides(args: argparse.Namespace) -> tuple[dict, Path]:
    """The run's flat overrides and output folder, for a new run or ``--resume RUN_DIR``."""
    sets = dict(parse_set_option(item) for item in args.set or [])
    if args.resume:
        run_dir = Path(args.resume).resolve()
        if not (run_dir / "config.toml").is_file():
            raise ConfigError(f"--resume {run_dir}: no config.toml there; give the output folder of a fedllm run")
        history_file = run_dir / "history.json"
        history = json.loads(history_file.read_text(encoding="utf-8")) if history_file.is_file() else {}
        overrides = flatten(read_toml(run_dir / "config.toml"))
        overrides.update(sets)
        if args.rounds is not None:
            overrides["num-server-rounds"] = args.rounds
        done = max((r["round"] for r in history.get("rounds", []) if "evaluate" in r), default=0)
        if history.get("status") == "completed" and int(overrides["num-server-rounds"]) <= done:
            raise ConfigError(f"--resume {run_dir}: the run already completed all {done} rounds; "
                              "give --rounds N (more than that) to continue training")
        overrides.update({"federation.resume": True, "output-dir": str(run_dir)})
        if not overrides.get("federation.run-id"):
            overrides["federation.run-id"] = str(history.get("run-id", ""))
        return overrides, run_dir
    overrides = load_run_overrides(Path(args.config)) if args.config else {}
    overrides.update(sets)
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    output = Path(args.output or Path("runs") / f"run-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if output.exists() and any(output.iterdir()):
        raise FedLLMError(f"output folder {output} is not empty; choose another --output, or continue a run "
                          f"with --resume {output}")
    overrides.setdefault("federation.tolerated-failures", -1)  # deployment: a lost site does not end the run
    overrides.setdefault("federation.run-id", f"{output.name}-{uuid.uuid4().hex[:8]}")
    overrides.update({"output-dir": str(output), "federation.resume": False})
    return overrides, output


def cmd_run(args: argparse.Namespace) -> int:
    """Submit the fedllm app to a coordinator's SuperLink, follow it, and report."""
    from fedllm.reports.summary import summary_text

    overrides, output = _run_overrides(args)
    connection = _connection(args)
    work = Path(tempfile.mkdtemp(prefix="fedllm-run-"))
    try:
        connection.write(work / "flwr-home")
        env = flower_env(work / "flwr-home")
        if "strategy.min-available-sites" not in overrides:
            registered = _registered_sites(env, work)
            if registered:
                overrides["strategy.min-available-sites"] = registered
            else:
                _echo("note: the coordinator lists no registered sites (no SuperNode authentication?): the run "
                      "starts as soon as one site is connected; set --set strategy.min-available-sites=N to wait "
                      "for N sites")
        config = RunConfig.from_flat(overrides)  # validate before anything is submitted
        created = not output.exists()
        output.mkdir(parents=True, exist_ok=True)
        write_app_folder(work / "app", RunConfig().to_flat())
        write_run_overrides(work / "run-config.toml", config.to_flat())
        verb = "resuming" if config.federation.resume else "starting"
        _echo(f"fedllm run: {verb} {config.federation.run_id} on {connection.address} "
              f"({'INSECURE' if connection.insecure else 'TLS'}): {config.num_server_rounds} rounds, waiting for "
              f"{config.strategy.min_available_sites} sites, model {config.model.name}, "
              f"DP {'on' if config.privacy.enabled else 'OFF'} -> {output}")
        logs = output / "logs"
        logs.mkdir(exist_ok=True)
        try:
            run_id = submit_run(work / "app", work / "run-config.toml", env=env, cwd=work)
        except RunFailedError:
            if created:
                shutil.rmtree(output, ignore_errors=True)
            raise
        start = time.perf_counter()
        try:
            follow_log(run_id, env=env, cwd=work, log_file=logs / "flower.log", echo=_echo, verbose=args.verbose)
            status, details = run_status(run_id, env=env, cwd=work)
        except KeyboardInterrupt:
            _echo(f"interrupted: stopping run {run_id}; continue it later with: fedllm run --server {args.server} "
                  f"{_tls_flag(args)}--resume {output}")
            stop_run(run_id, env=env, cwd=work)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    history_path = output / "history.json"
    history = json.loads(history_path.read_text(encoding="utf-8")) if history_path.is_file() else {}
    if status != "finished:completed" or history.get("status") != "completed":
        reason = history.get("error") or details or status
        raise RunFailedError(f"the federated run failed ({status}): {reason}\nFull log: {logs / 'flower.log'}\n"
                             f"Continue from the last completed round with: fedllm run --server {args.server} "
                             f"{_tls_flag(args)}--resume {output}")
    _echo(f"\nFinished in {time.perf_counter() - start:.0f}s.\n")
    _echo(summary_text(history, output_dir=output, privacy_enabled=config.privacy.enabled,
                       max_epsilon=config.privacy.max_epsilon, deployment=True))
    return 0


def _valid_address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT, e.g. coordinator.example.org:{DEFAULT_PORT}")
    if host.startswith("[") and host.endswith("]"):
        ipaddress.ip_address(host[1:-1])
    return text


def add_server_start_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="interface to listen on (default 0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--certs", default="certs", help="folder with ca.crt, server.pem, server.key "
                                                         "(from fedllm certs; default certs)")
    parser.add_argument("--ssl-certfile", help="the server's TLS certificate (PEM), instead of --certs")
    parser.add_argument("--ssl-keyfile", help="the server's TLS private key (PEM), instead of --certs")
    parser.add_argument("--ssl-ca-certfile", help="the CA certificate (PEM) that signed it, instead of --certs")
    parser.add_argument("--site-keys", metavar="DIR", help="register every site public key DIR/*.pub "
                                                           "(only registered sites can join)")
    parser.add_argument("--state", default="fedllm-server", help="the coordinator's state folder (database of "
                                                                 "registered sites and runs, log; default fedllm-server)")
    parser.add_argument("--insecure", action="store_true", help="no TLS and no SuperNode authentication (Flower "
                                                                "needs TLS for it): local trials only")
    parser.add_argument("--verbose", action="store_true", help="show the SuperLink's log")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", required=True, type=_valid_address, help="the coordinator's HOST:PORT")
    parser.add_argument("--config", metavar="RUN_TOML", help="run configuration file (keys as in a scenario's "
                                                             "run.toml; see docs/configuration.md)")
    parser.add_argument("--rounds", type=int, help="number of server rounds (num-server-rounds)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run-config key (repeatable)")
    parser.add_argument("--output", help="output folder on this machine (default runs/run-<time>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last completed round")
    parser.add_argument("--root-certificates", metavar="PEM", help="CA certificate that signed the coordinator's "
                                                                   "TLS certificate (default CERTS/ca.crt)")
    parser.add_argument("--certs", default="certs", help="folder holding ca.crt (default certs)")
    parser.add_argument("--insecure", action="store_true", help="connect without TLS (local trials only)")
    parser.add_argument("--verbose", action="store_true", help="show Flower's full log")

