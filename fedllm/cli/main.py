"""The ``fedllm`` command. Parses arguments, dispatches, imports heavy modules inside each command
so ``fedllm --help`` stays fast. Library code logs; this module prints. Exit codes: 0 success,
1 a failed run, 2 bad input (configuration, data, budget), 130 interrupted."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from fedllm import __version__
from fedllm.cli.use_commands import add_use_commands
from fedllm.errors import ConfigError, FedLLMError, RunFailedError


def _echo(text: str) -> None:
    print(text, flush=True)


def _scenario_config(args: argparse.Namespace):
    """(scenario, flat overrides, validated RunConfig) from SCENARIO, --rounds and --set, before
    anything is written."""
    from fedllm.config import RunConfig, parse_set_option
    from fedllm.simulation.scenario import load_scenario

    scenario = load_scenario(args.scenario)
    overrides = dict(scenario.run_overrides)
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    for item in args.set or []:
        key, value = parse_set_option(item)
        overrides[key] = value
    return scenario, overrides, RunConfig.from_flat(overrides)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedllm.simulation.scenario import materialise_sites

    scenario, overrides, config = _scenario_config(args)
    output = Path(args.output or Path("runs") / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if output.exists() and any(output.iterdir()):
        raise FedLLMError(f"output folder {output} is not empty; choose another --output (site ledgers can be kept "
                          "across runs with --set privacy.ledger-dir=DIR)")
    created = not output.exists()
    try:
        sites = materialise_sites(scenario, output)
        config = _finalise_config(config, overrides, output, sites)
        _check_sites(config, sites)
    except BaseException:
        if created:  # nothing half-written: remove what this command created before the run
            shutil.rmtree(output, ignore_errors=True)
        raise
    _echo(f"fedllm simulate {scenario.name}: {len(sites)} sites, {config.num_server_rounds} rounds, "
          f"model {config.model.name}, DP {'on' if config.privacy.enabled else 'OFF'} -> {output}")
    from fedllm.reports.summary import summary_text
    from fedllm.simulation.runner import run_simulation

    start = time.perf_counter()
    history = run_simulation(config, sites, echo=_echo, verbose=args.verbose)
    _echo(f"\nFinished in {time.perf_counter() - start:.0f}s.\n")
    _echo(summary_text(history, output_dir=output, privacy_enabled=config.privacy.enabled,
                       max_epsilon=config.privacy.max_epsilon,
                       ledger_dir=Path(config.privacy.ledger_dir) if config.privacy.ledger_dir else None))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from fedllm.simulation.compare import SETTINGS, ComparePlan, parse_settings, run_compare
    from fedllm.simulation.scenario import materialise_sites

    scenario, _, config = _scenario_config(args)
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: give 1 or more")
    settings = parse_settings(args.settings) if args.settings else SETTINGS
    output = Path(args.output or Path("runs") / f"compare-{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    resuming = (output / "sites").is_dir()
    if output.exists() and any(output.iterdir()) and not resuming:
        raise FedLLMError(f"output folder {output} is not empty and holds no fedllm compare; choose another --output")
    created = not output.exists()
    try:
        sites = materialise_sites(scenario, output / "sites")
    except BaseException:
        if created:
            shutil.rmtree(output, ignore_errors=True)
        raise
    _echo(f"fedllm compare {scenario.name}: {len(sites)} sites, {config.num_server_rounds} rounds, "
          f"settings {', '.join(settings)}, {args.seeds} seed(s), model {config.model.name} -> {output}"
          + (" (resuming: finished runs are kept)" if resuming else ""))
    start = time.perf_counter()
    from fedllm.simulation.compare import markdown

    report = run_compare(ComparePlan(config=config, sites=tuple(sites), output=output, seeds=args.seeds,
                                     settings=settings), echo=_echo)
    _echo(f"\nFinished in {time.perf_counter() - start:.0f}s.\n")
    _echo(markdown(report))
    _echo(f"Report: {output / 'compare.md'}, {output / 'compare.json'}, {output / 'compare.png'}")
    return 0


def _finalise_config(config, overrides: dict, output: Path, sites: list):
    """Add what only the simulate command knows: output paths and the number of sites (all
    virtual sites are online from the start, so the strategy waits for every one of them)."""
    wanted = int(overrides.get("strategy.min-available-sites", len(sites)))
    for key, value in (("strategy.min-train-sites", config.strategy.min_train_sites),
                       ("strategy.min-evaluate-sites", config.strategy.min_evaluate_sites)):
        if value > len(sites):
            raise ConfigError(f"{key} = {value} but the scenario has only {len(sites)} sites; the run would "
                              "wait forever for the missing ones")
    # site-side folders given relative to where the user runs the command, not to the output folder
    folders = {key: str(Path(value).expanduser().resolve()) for key, value in
               (("privacy.ledger-dir", config.privacy.ledger_dir),
                ("privacy.signing-key-dir", config.privacy.signing_key_dir)) if value}
    return config.with_overrides({
        **folders,
        "output-dir": str(output),
        "simulation.sites-file": str(output / "sites.json"),
        "strategy.min-available-sites": min(wanted, len(sites)),
    })


def _check_sites(config, sites) -> None:
    """Load the model once (converting it on first use) and every site's data before any
    process starts: bad data fails here with file, record and field."""
    from transformers.utils import logging as hf_logging

    from fedllm.model.loading import load_model_and_tokenizer
    from fedllm.site.runtime import load_site_examples

    hf_logging.disable_progress_bar()

    _echo(f"Checking the model ({config.model.name}) and {len(sites)} sites' data ...")
    _, tokenizer = load_model_and_tokenizer(config.model)
    from fedllm.site.holdout import site_split_key

    ledger_dir = Path(config.privacy.ledger_dir or Path(config.output_dir) / "ledgers")  # as the ClientApp's
    for site in sites:
        ledger = Path(site.ledger_path) if site.ledger_path else ledger_dir / f"{site.name}.json"
        train, held = load_site_examples(config, site, tokenizer, split_key=site_split_key(ledger, site.name))
        if len(train) < 1:
            raise FedLLMError(f"site {site.name}: no training records left after the held-out split ({site.data_path})")
        _echo(f"  {site.name}: {len(train)} train / {len(held)} held-out examples")


def cmd_budget(args: argparse.Namespace) -> int:
    from fedllm.privacy.accounting import DPEvent, epsilon_for, noise_multiplier_for

    if args.steps is None:
        if args.rounds is None or args.local_steps is None:
            raise FedLLMError("give --steps, or --rounds and --local-steps")
        args.steps = args.rounds * args.local_steps
    q = min(1.0, args.batch_size / args.dataset_size)
    common = f"dataset {args.dataset_size}, batch {args.batch_size} (q={q:.4g}), {args.steps} steps, δ={args.delta:g}, {args.accountant}"
    if args.noise_multiplier is not None:
        eps = epsilon_for([DPEvent(args.noise_multiplier, q, args.steps)], target_delta=args.delta, accountant=args.accountant)
        result = {"noise-multiplier": args.noise_multiplier, "epsilon": eps}
        text = f"noise multiplier σ={args.noise_multiplier:g} -> ε = {eps:.3f}   ({common})"
    elif args.epsilon is not None:
        sigma = noise_multiplier_for(target_epsilon=args.epsilon, target_delta=args.delta, sample_rate=q,
                                     steps=args.steps, accountant=args.accountant)
        eps = epsilon_for([DPEvent(sigma, q, args.steps)], target_delta=args.delta, accountant=args.accountant)
        result = {"noise-multiplier": sigma, "epsilon": eps}
        text = f"target ε={args.epsilon:g} -> noise multiplier σ = {sigma:.4f} (gives ε = {eps:.3f})   ({common})"
    else:
        raise FedLLMError("give --epsilon (to get a noise multiplier) or --noise-multiplier (to get ε)")
    result.update({"target-delta": args.delta, "sample-rate": q, "steps": args.steps, "accountant": args.accountant})
    _echo(json.dumps(result) if args.json else text)
    return 0


def cmd_ledger_show(args: argparse.Namespace) -> int:
    from fedllm.privacy.ledger import PrivacyLedger

    path = Path(args.file)
    if not path.is_file():
        raise FedLLMError(f"{path}: no such ledger file")
    site = json.loads(path.read_text(encoding="utf-8")).get("site", "") if path.stat().st_size else ""
    ledger = PrivacyLedger.open(path, site=str(site), kind=None)  # a site's or the coordinator's central-DP ledger
    for line in ledger.summary_lines():
        _echo(line)
    return 0


def _training_fingerprint(args: argparse.Namespace, path: Path) -> str:
    """The fingerprint ``ledger verify --data`` checks: the training subset the site's split (the
    policy the ledger records, and the split key: ``--split-key`` or beside the ledger) leaves."""
    from fedllm.data.fingerprint import dataset_fingerprint
    from fedllm.data.loading import load_records
    from fedllm.site.holdout import read_split_key, split_key_id, split_key_path, split_records

    records = load_records(args.data, format=args.data_format, columns=args.data_columns)
    header = json.loads(path.read_text(encoding="utf-8"))
    policy = header.get("held-out-split") if isinstance(header, dict) else None
    if not isinstance(policy, dict):  # an older ledger: bound to the whole data file
        return dataset_fingerprint(records)
    key = read_split_key(args.split_key or split_key_path(path, str(header.get("site", ""))))
    if split_key_id(key) != policy.get("split-key-id"):
        raise FedLLMError(f"the split key {args.split_key or split_key_path(path, str(header.get('site', '')))} has "
                          f"id {split_key_id(key)}, but the ledger was written under the split key "
                          f"{policy.get('split-key-id')}: give the site's split key with --split-key")
    split = split_records(records, key=key, eval_fraction=float(policy["eval-fraction"]),
                          max_eval=int(policy["max-eval-examples"]))
    return dataset_fingerprint([records[i] for i in split.train])


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    """``fedllm ledger verify FILE``: exit 0 if everything checks, 1 on any problem, 2 on unreadable input."""
    from fedllm.privacy.ledger import verify_ledger

    path = Path(args.file)
    if not path.is_file():
        raise FedLLMError(f"{path}: no such ledger file")
    data_fingerprint = None
    if args.data:
        data_fingerprint = _training_fingerprint(args, path)
    result = verify_ledger(path, public_key=args.public_key, dataset_fingerprint=data_fingerprint,
                           max_delta=args.max_delta, max_epsilon=args.max_epsilon)
    if args.json:
        _echo(json.dumps(result.to_dict()))
        return 0 if result.ok else 1
    if result.kind == "central-dp":
        _echo(f"Central-DP ledger {path}: coordinator '{result.site}' (site-level releases), {result.entries} entries, "
              f"version {result.version}")
    else:
        _echo(f"Privacy ledger {path}: site '{result.site}', {result.entries} entries, version {result.version}")
    _echo(f"dataset: {result.dataset_fingerprint or '(none: not bound to a dataset)'}"
          + (f" (checked against {args.data})" if args.data else ""))
    if not result.signed:
        _echo("unsigned: the hash chain stops accidental or naive edits only (anyone can recompute it)")
    elif result.signature_checked:
        _echo(f"signed by {result.key_id}; signatures checked against the given public key {args.public_key}")
    else:
        _echo(f"signed by {result.key_id}; signatures checked only against the key in the file itself: "
              "give --public-key SITE.pub to check that it is the site's key")
    if result.entries:
        eps = "inf (no DP guarantee)" if result.final_epsilon == float("inf") else f"{result.final_epsilon:.2f}"
        if result.site_delta is not None:
            cap = "" if result.site_max_epsilon is None else f", cap {result.site_max_epsilon:g}"
            _echo(f"cumulative ε = {eps} at the site's own δ={result.site_delta:g} ({result.accountant}{cap}), "
                  "recomputed from the recorded parameters")
        else:
            _echo(f"cumulative ε = {eps} (δ={result.target_delta:g}, {result.accountant}), recomputed entry by entry "
                  "from the recorded parameters; the ledger records no site δ policy: give --max-delta SITE_DELTA "
                  "to check it at the site's own δ")
    for note in result.notes:
        _echo(f"note: {note}")
    if result.ok:
        _echo("OK: hash chain intact, dataset fingerprint consistent, every ε recomputes")
        return 0
    where = (f"first bad entry: {result.first_bad_entry} (entries are numbered from 1)"
             if result.first_bad_entry is not None else "the ledger header")
    _echo(f"FAILED: {where}; {len(result.problems)} problem{'s' if len(result.problems) != 1 else ''}:")
    for problem in result.problems:
        _echo(f"  - {problem}")
    return 1


def cmd_ledger_keygen(args: argparse.Namespace) -> int:
    """``fedllm ledger keygen --out DIR --site NAME``: a site's Ed25519 key pair for signing its ledger."""
    from fedllm.privacy.signing import generate_signing_key, key_id, load_public_key

    private, public = generate_signing_key(args.out, site=args.site)
    private, public = private.resolve(), public.resolve()
    _echo(f"Signing key of site '{args.site}' ({key_id(load_public_key(public))}):")
    _echo(f"  private key: {private}  (permissions 600; it stays at the site, never send it)")
    _echo(f"  public key:  {public}  (give it to the coordinator: fedllm ledger verify LEDGER --public-key "
          f"{public.name})")
    _echo(f"Use it: node config signing-key=\"{private}\"; in a simulation, "
          f"--set privacy.signing-key-dir={private.parent}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``fedllm models``: supported families, published facts and a DP-LoRA memory estimate."""
    from fedllm.model.catalog import check_inputs, table_json, table_lines

    try:
        check_inputs(rank=args.rank, seq_len=args.seq_len, physical_batch=args.batch)
    except ValueError as exc:
        raise FedLLMError(str(exc)) from None
    common = dict(rank=args.rank, seq_len=args.seq_len, physical_batch=args.batch, precision=args.precision,
                  checkpointing=args.checkpointing)
    if args.json:
        _echo(json.dumps(table_json(**common), indent=2))
        return 0
    for line in table_lines(**common, family=args.family):
        _echo(line)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """``fedllm audit RUN_DIR`` (privacy report) or ``fedllm audit --canaries N`` (empirical audit)."""
    if args.canaries is not None:
        from fedllm.audit.canaries import main as canary_main

        return canary_main(args)
    if not args.run_dir:
        raise FedLLMError("give a run folder (fedllm audit RUN_DIR), or --canaries N for an empirical audit")
    from fedllm.reports.privacy_report import main as report_main

    return report_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedllm", description="Federated DP-LoRA fine-tuning of open LLMs on Flower.")
    parser.add_argument("--version", action="version", version=f"fedllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a scenario folder on Flower's simulation engine")
    sim.add_argument("scenario", help="a folder, or a name under simulations/ (demo, pubmedqa, smoke)")
    sim.add_argument("--rounds", type=int, help="number of server rounds (num-server-rounds)")
    sim.add_argument("--output", help="output folder (default runs/<scenario>-<time>)")
    sim.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run-config key (repeatable)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's full log")
    sim.set_defaults(func=cmd_simulate)

    cmp_ = sub.add_parser("compare", help="is joining worth it? a scenario federated, each site alone, pooled "
                                          "(DP and not) and the base model, on the same held-out records")
    cmp_.add_argument("scenario", help="a scenario name (simulations/) or folder")
    cmp_.add_argument("--rounds", type=int, help="override num-server-rounds")
    cmp_.add_argument("--output", help="output folder (default runs/compare-<scenario>-<time>); run again with the "
                                       "same folder to resume")
    cmp_.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run-config key (repeatable)")
    cmp_.add_argument("--seeds", type=int, default=1, help="repeat every trained setting K times; the report gives "
                                                           "the spread (default 1)")
    cmp_.add_argument("--settings", help="a subset of federated,local,pooled,pooled-no-dp,base (default: all)")
    cmp_.set_defaults(func=cmd_compare)

    bud = sub.add_parser("budget", help="plan DP: target ε -> noise multiplier, or noise multiplier -> ε")
    goal = bud.add_mutually_exclusive_group(required=True)
    goal.add_argument("--epsilon", type=float, help="target ε: compute the noise multiplier")
    goal.add_argument("--noise-multiplier", type=float, help="noise multiplier σ: compute ε")
    bud.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5; choose δ << 1/dataset size)")
    bud.add_argument("--dataset-size", type=int, required=True, help="training records at the site")
    bud.add_argument("--batch-size", type=int, required=True, help="expected batch size (q = batch / dataset)")
    bud.add_argument("--steps", type=int, help="total local DP-SGD steps over the whole run")
    bud.add_argument("--rounds", type=int, help="rounds (with --local-steps, instead of --steps)")
    bud.add_argument("--local-steps", type=int, help="local steps per round")
    bud.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    bud.add_argument("--json", action="store_true", help="print JSON")
    bud.set_defaults(func=cmd_budget)

    led = sub.add_parser("ledger", help="inspect, verify or sign a site's privacy ledger")
    led_sub = led.add_subparsers(dest="ledger_command", required=True)
    show = led_sub.add_parser("show", help="print a ledger and its cumulative ε")
    show.add_argument("file")
    show.set_defaults(func=cmd_ledger_show)
    ver = led_sub.add_parser("verify", help="check a ledger: hash chain, dataset binding, signatures, every ε "
                                            "(exit 0 intact, 1 a problem, 2 unreadable input)")
    ver.add_argument("file")
    ver.add_argument("--public-key", metavar="PEM", help="the site's Ed25519 public key (its .pub file): the "
                                                         "signatures must be by this key")
    ver.add_argument("--data", metavar="PATH",
                     help="the site's data (file or saved dataset folder): the ledger must be bound "
                          "to exactly this data's training subset (the site's held-out split, see --split-key)")
    ver.add_argument("--data-format", default="auto", choices=("auto", "instruction", "chat", "sharegpt", "text"),
                     help="with --data: how to read the records (the run's data.format; default auto)")
    ver.add_argument("--data-columns", default="", metavar="FIELD=COLUMN,...",
                     help="with --data: the column mapping the site reads its data with (its data-columns)")
    ver.add_argument("--max-delta", type=float, default=None, metavar="DELTA",
                     help="the site's δ (its max-delta): entries recorded at a larger δ are problems and the "
                          "cumulative ε is computed at it (default: the site policy recorded in the ledger)")
    ver.add_argument("--max-epsilon", type=float, default=None, metavar="EPS",
                     help="the site's cap (its max-epsilon): a cumulative ε above it at the site's δ is a problem "
                          "(default: the site policy recorded in the ledger)")
    ver.add_argument("--split-key", metavar="FILE",
                     help="with --data: the site's split key (default: SITE.split-key beside the ledger); the "
                          "ledger is bound to the training subset the site's held-out split leaves")
    ver.add_argument("--json", action="store_true", help="print the result as JSON")
    ver.set_defaults(func=cmd_ledger_verify)
    keygen = led_sub.add_parser("keygen", help="create a site's Ed25519 key pair for signing its ledger")
    keygen.add_argument("--out", required=True, metavar="DIR", help="folder for SITE.key (private) and SITE.pub")
    keygen.add_argument("--site", required=True, metavar="NAME", help="the site's name (site-name)")
    keygen.set_defaults(func=cmd_ledger_keygen)

    aud = sub.add_parser("audit", help="privacy report of a run (ε per site under three accountants), "
                                       "or an empirical canary audit (--canaries)")
    aud.add_argument("run_dir", nargs="?", help="a run folder written by fedllm simulate / fedllm run")
    aud.add_argument("--output", help="where to write the report (default RUN_DIR/audit, or runs/audit-<time> with --canaries)")
    aud.add_argument("--public-key", action="append", metavar="SITE=PEM",
                     help="a site's Ed25519 public key to check its ledger signature against (repeatable)")
    aud.add_argument("--json", action="store_true", help="also print the report's JSON on stdout")
    aud.add_argument("--canaries", type=int, metavar="N",
                     help="empirical audit: train with N one-run canaries inserted and measure what leaks")
    aud.add_argument("--scenario", default="demo", help="with --canaries: the scenario whose first site's data and "
                                                         "settings are used (default demo)")
    aud.add_argument("--site", help="with --canaries: which site of the scenario (default the first)")
    aud.add_argument("--set", action="append", metavar="KEY=VALUE", help="with --canaries: override a run-config key")
    aud.add_argument("--no-noise", action="store_true",
                     help="with --canaries: train with clipping but no noise (a deliberately broken mechanism, "
                          "to show the audit catches it)")
    aud.add_argument("--guesses", type=int, help="with --canaries: guesses k of the one-run audit, fixed before "
                                                  "scores are seen (default: chosen from N up front)")
    aud.set_defaults(func=cmd_audit)
    models = sub.add_parser("models", help="supported model families: sizes, licenses, context, LoRA targets, "
                                           "and a DP-LoRA memory estimate")
    models.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    models.add_argument("--seq-len", type=int, default=512, help="tokens per example (default 512)")
    models.add_argument("--batch", type=int, default=8, help="physical batch: examples per forward/backward (default 8)")
    models.add_argument("--precision", choices=("fp32", "bf16", "4bit"), default="bf16",
                        help="base weights (default bf16)")
    models.add_argument("--checkpointing", action="store_true", help="with gradient checkpointing")
    models.add_argument("--family", help="only this family (e.g. mixtral, 'Llama 3.1')")
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(func=cmd_models)
    _add_deployment_commands(sub)
    add_use_commands(sub)
    return parser


def _add_deployment_commands(sub) -> None:
    """``fedllm certs``, ``fedllm server start``, ``fedllm site check|start``, ``fedllm run``
    (docs/deployment.md). These modules import nothing heavy at module level."""
    from fedllm.deploy.certs import add_certs_arguments, cmd_certs
    from fedllm.deploy.server_commands import (
        add_run_arguments,
        add_server_start_arguments,
        cmd_run,
        cmd_server_start,
    )
    from fedllm.deploy.site_check import add_site_check_arguments, cmd_site_check
    from fedllm.deploy.site_commands import add_site_start_arguments, cmd_site_start

    certs = sub.add_parser("certs", help="create a development CA, the coordinator's TLS certificate and site "
                                         "key pairs (trials; institutions use their own PKI)")
    add_certs_arguments(certs)
    certs.set_defaults(func=cmd_certs)

    server = sub.add_parser("server", help="the coordinator: start the federation server")
    server_sub = server.add_subparsers(dest="server_command", required=True)
    start = server_sub.add_parser("start", help="start the coordinator's Flower SuperLink (TLS and SuperNode "
                                                "authentication by default)")
    add_server_start_arguments(start)
    start.set_defaults(func=cmd_server_start)

    site = sub.add_parser("site", help="a site (institution): check its file and data, or start it")
    site_sub = site.add_subparsers(dest="site_command", required=True)
    check = site_sub.add_parser("check", help="validate a site file and its data without training or sending "
                                              "anything")
    add_site_check_arguments(check)
    check.set_defaults(func=cmd_site_check)
    site_start = site_sub.add_parser("start", help="start this site: connect to the coordinator and train when "
                                                   "asked")
    add_site_start_arguments(site_start)
    site_start.set_defaults(func=cmd_site_start)

    run = sub.add_parser("run", help="submit a federated run to a coordinator, follow it, write its outputs "
                                     "(exit 1 when it fails); --resume continues a run")
    add_run_arguments(run)
    run.set_defaults(func=cmd_run)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, a scheduler) cleans up like Ctrl-C: stop what the run started


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background by a shell
            signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return args.func(args)
    except RunFailedError as exc:
        print(f"fedllm: error: {exc}", file=sys.stderr)
        return 1
    except FedLLMError as exc:
        print(f"fedllm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
