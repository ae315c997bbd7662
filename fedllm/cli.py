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
from fedllm.errors import ConfigError, FedLLMError, RunFailedError


def _echo(text: str) -> None:
    print(text, flush=True)


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedllm.config import RunConfig, parse_set_option
    from fedllm.scenario import load_scenario, materialise_sites

    scenario = load_scenario(args.scenario)
    overrides = dict(scenario.run_overrides)
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    for item in args.set or []:
        key, value = parse_set_option(item)
        overrides[key] = value
    config = RunConfig.from_flat(overrides)  # validate before anything is written
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
    from fedllm.report import summary_text
    from fedllm.simulation import run_simulation

    start = time.perf_counter()
    history = run_simulation(config, sites, echo=_echo, verbose=args.verbose)
    _echo(f"\nFinished in {time.perf_counter() - start:.0f}s.\n")
    _echo(summary_text(history, output_dir=output, privacy_enabled=config.privacy.enabled,
                       max_epsilon=config.privacy.max_epsilon))
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
    return config.with_overrides({
        "output-dir": str(output),
        "simulation.sites-file": str(output / "sites.json"),
        "strategy.min-available-sites": min(wanted, len(sites)),
    })


def _check_sites(config, sites) -> None:
    """Load the model once (converting it on first use) and every site's data before any
    process starts: bad data fails here with file, record and field."""
    from transformers.utils import logging as hf_logging

    from fedllm.model import load_model_and_tokenizer
    from fedllm.site import load_site_examples

    hf_logging.disable_progress_bar()

    _echo(f"Checking the model ({config.model.name}) and {len(sites)} sites' data ...")
    _, tokenizer = load_model_and_tokenizer(config.model)
    for site in sites:
        train, held = load_site_examples(config, site, tokenizer)
        if len(train) < 1:
            raise FedLLMError(f"site {site.name}: no training records left after the held-out split ({site.data_path})")
        _echo(f"  {site.name}: {len(train)} train / {len(held)} held-out examples")


def cmd_budget(args: argparse.Namespace) -> int:
    from fedllm.privacy.accounting import epsilon_for, noise_multiplier_for, DPEvent

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
    ledger = PrivacyLedger.open(path, site=str(site))
    for line in ledger.summary_lines():
        _echo(line)
    return 0


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

    led = sub.add_parser("ledger", help="inspect a site's privacy ledger")
    led_sub = led.add_subparsers(dest="ledger_command", required=True)
    show = led_sub.add_parser("show", help="print a ledger and its cumulative ε")
    show.add_argument("file")
    show.set_defaults(func=cmd_ledger_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
