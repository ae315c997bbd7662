"""``fedllm compare``: is joining worth it? One scenario trained four ways, evaluated on the same records.

On the same sites, the same held-out records (every setting uses each site's one split key), the
same local steps and the same per-site target ε, compare runs:

* ``federated``: the scenario as it is (one simulated federation);
* ``local``: each site alone (one simulated federation of one site per site);
* ``pooled``: every site's training records at one site, DP at the same target ε, the same total
  steps (``train.local-steps`` × number of sites per round): the centralized reference;
* ``pooled-no-dp``: the same without DP (the ceiling);
* ``base``: the base model untouched (no run).

Every setting's final adapter is then evaluated here, in one process with one model load, on
each site's held-out records (``local``: each site's own adapter on its own records): held-out
loss, perplexity and the run's task metrics (``[evaluate]``), exactly, because the operator of a
simulation holds all the data. ``federated`` and ``local`` numbers equal what the sites reported
in their runs' ``history.json`` under ``release-metrics = "exact"`` (tested).

``--seeds K`` repeats every trained setting K times (``lora.seed`` = seed, seed+1, …; DP noise
is fresh OS entropy in every run), and the report gives mean and spread (sample standard
deviation) over the seeds, and the gain of federated over local per site, paired by seed.

Resumable: every run writes to ``OUTPUT/<setting>/seed-<k>[/<site>]``; a run whose
``history.json`` says completed (and its evaluation, ``eval.json``) is kept when the command is
run again with the same ``--output``; an unfinished one is removed and run again (each run has its
own ledgers, so nothing is double-counted). A resumed comparison must be the same plan
(``compare-plan.json``); more ``--seeds`` is the same plan, so seeds can be added later. The runs themselves go one after the other: the
simulation engine already runs a federation's sites in parallel, over ``simulation.client-cpus``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm import wire
from fedllm.config import RunConfig, SiteConfig
from fedllm.errors import ConfigError, FedLLMError
from fedllm.files import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

SETTINGS = ("federated", "local", "pooled", "pooled-no-dp", "base")
TRAINED = ("federated", "local", "pooled", "pooled-no-dp")
POOLED_SITE = "pooled"


@dataclass(frozen=True)
class ComparePlan:
    """What ``fedllm compare`` runs: the resolved run config, the sites, seeds and settings."""

    config: RunConfig
    sites: tuple[SiteConfig, ...]
    output: Path
    seeds: int = 1
    settings: tuple[str, ...] = SETTINGS


def parse_settings(text: str) -> tuple[str, ...]:
    """``--settings federated,local``: a subset of ``SETTINGS``, in their order; ``federated`` and
    ``local`` are needed for the gain."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        raise ConfigError(f"--settings {text!r}: choose from {', '.join(SETTINGS)}")
    return tuple(s for s in SETTINGS if s in names)


# --------------------------------------------------------------------------------------------
# the runs


def _split_keys(plan: ComparePlan) -> Path:
    """One split key per site, shared by every setting: the same held-out records everywhere."""
    from fedllm.site.holdout import load_or_create_split_key

    folder = plan.output / "split-keys"
    for site in plan.sites:
        load_or_create_split_key(folder / f"{site.name}.split-key")
    return folder


def _with_ledgers(sites: Sequence[SiteConfig], run_dir: Path, keys: Path) -> list[SiteConfig]:
    """The sites with their ledgers in ``run_dir/ledgers`` and their shared split keys beside them."""
    import dataclasses

    ledgers = run_dir / "ledgers"
    ledgers.mkdir(parents=True, exist_ok=True)
    out = []
    for site in sites:
        key = keys / f"{site.name}.split-key"
        if key.exists():
            shutil.copy2(key, ledgers / key.name)
        out.append(dataclasses.replace(site, ledger_path=str(ledgers / f"{site.name}.json")))
    return out


def _completed(run_dir: Path) -> bool:
    path = run_dir / "history.json"
    if not path.is_file() or not (run_dir / "adapter").is_dir():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("status") == "completed"
    except (OSError, ValueError):
        return False


def _run(config: RunConfig, sites: Sequence[SiteConfig], run_dir: Path, keys: Path, *, label: str,
         echo: Callable[[str], None]) -> dict[str, Any]:
    """One simulated federation into ``run_dir`` (kept when already completed); its history."""
    from fedllm.simulation.runner import run_simulation

    if _completed(run_dir):
        echo(f"  {label}: done already ({run_dir}), kept")
        return json.loads((run_dir / "history.json").read_text(encoding="utf-8"))
    if run_dir.exists():  # an interrupted run: its own ledgers only, so start it again from scratch
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    sites = _with_ledgers(sites, run_dir, keys)
    config = config.with_overrides({
        "output-dir": str(run_dir), "simulation.sites-file": str(run_dir / "sites.json"),
        "strategy.min-available-sites": len(sites), "strategy.min-train-sites": min(config.strategy.min_train_sites,
                                                                                       len(sites)),
        "strategy.min-evaluate-sites": min(config.strategy.min_evaluate_sites, len(sites)),
        "privacy.ledger-dir": str(run_dir / "ledgers")})
    start = time.perf_counter()
    echo(f"  {label}: training ({len(sites)} site{'s' if len(sites) > 1 else ''}, {config.num_server_rounds} rounds "
         f"x {config.train.local_steps} steps) -> {run_dir}")
    history = run_simulation(config, sites, echo=lambda line: None)
    echo(f"  {label}: finished in {time.perf_counter() - start:.0f}s")
    return history


def _pooled_site(plan: ComparePlan, keys: Path, *, dp: bool) -> SiteConfig:
    """One site holding every site's training records (each site's own split): no held-out records."""
    from fedllm.data.loading import load_records
    from fedllm.site.holdout import read_split_key, split_records

    path = plan.output / "pooled-data.jsonl"
    if not path.exists():
        records: list[dict[str, Any]] = []
        for site in plan.sites:
            site_records = load_records(site.data_path, format=plan.config.data.format, columns=site.data_columns)
            split = split_records(site_records, key=read_split_key(keys / f"{site.name}.split-key"),
                                  eval_fraction=site.eval_fraction, max_eval=site.max_eval_examples)
            records += [dict(site_records[i]) for i in split.train]
        write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return SiteConfig.from_dict({
        "site-name": POOLED_SITE, "data-path": str(path), "eval-fraction": 0.0, "release-metrics": "exact",
        "max-epsilon": min(s.max_epsilon for s in plan.sites), "require-dp": dp})


def run_settings(plan: ComparePlan, keys: Path, *,
                 echo: Callable[[str], None] = print) -> dict[str, dict[int, dict[str, Any]]]:
    """Train every trained setting for every seed (or keep what a previous call finished), each site
    with its split key from ``keys``; returns setting -> seed -> {"runs": {name: run folder},
    "epsilon": {site: ε}}."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    base_seed = plan.config.lora.seed
    for k in range(plan.seeds):
        seeded = plan.config.with_overrides({"lora.seed": base_seed + k})
        label = f"seed {k + 1}/{plan.seeds}"
        for setting in (s for s in TRAINED if s in plan.settings):
            folder = plan.output / setting / f"seed-{k}"
            if setting == "federated":
                run = {"federated": folder}
                hist = {"federated": _run(seeded, plan.sites, folder, keys,
                                          label=f"federated, {label}", echo=echo)}
            elif setting == "local":
                run, hist = {}, {}
                for site in plan.sites:
                    run[site.name] = folder / site.name
                    hist[site.name] = _run(seeded, [site], folder / site.name, keys,
                                           label=f"local {site.name}, {label}", echo=echo)
            else:
                dp = setting == "pooled"
                pooled = seeded.with_overrides({
                    "train.local-steps": seeded.train.local_steps * len(plan.sites), "data.format": "auto",
                    "privacy.enabled": dp})
                site = _pooled_site(plan, keys, dp=dp)
                run = {POOLED_SITE: folder}
                hist = {POOLED_SITE: _run(pooled, [site], folder, keys,
                                          label=f"{setting}, {label}", echo=echo)}
            out.setdefault(setting, {})[k] = {"runs": {n: str(p) for n, p in run.items()},
                                              "epsilon": _epsilons(hist, dp=setting != "pooled-no-dp")}
    return out


def _epsilons(histories: dict[str, dict[str, Any]], *, dp: bool) -> dict[str, float | None]:
    """Each site's cumulative ε after its last training round in these runs (None without DP)."""
    eps: dict[str, float | None] = {}
    for history in histories.values():
        for r in history.get("rounds", []):
            for name, m in r.get("train", {}).get("sites", {}).items():
                value = m.get(wire.EPSILON, -1)
                eps[name] = value if dp and value is not None and value >= 0 else None
    return eps


# --------------------------------------------------------------------------------------------
# evaluation, in this process


class Evaluator:
    """The base model with a LoRA adapter, loaded once, and every site's held-out examples."""

    def __init__(self, plan: ComparePlan, keys: Path) -> None:
        from fedllm import fastpath
        from fedllm.model.lora import get_adapter_state, shared_model
        from fedllm.site.holdout import read_split_key
        from fedllm.site.runtime import load_site_examples

        self.config = plan.config
        self.model, self.tokenizer = shared_model(plan.config)
        if plan.config.train.fast_path:
            fastpath.enable(self.model, device="cpu", max_length=plan.config.data.max_length)
        self.initial = get_adapter_state(self.model)  # B = 0: the base model's outputs
        self.held_out = {}
        for site in plan.sites:
            _, held = load_site_examples(plan.config, site, self.tokenizer,
                                         split_key=read_split_key(keys / f"{site.name}.split-key"))
            self.held_out[site.name] = held

    def load(self, adapter_dir: Path | None) -> None:
        """Put the adapter saved in ``adapter_dir`` (PEFT format) into the model; None: the base."""
        from fedllm.model.lora import set_adapter_state

        if adapter_dir is None:
            set_adapter_state(self.model, self.initial)
            return
        from safetensors.torch import load_file

        set_adapter_state(self.model, load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))

    def evaluate(self, site: str) -> dict[str, float]:
        """Held-out loss, perplexity and the task metrics of the loaded adapter on ``site``'s records."""
        from fedllm.site.training import evaluate_loss

        examples = self.held_out[site]
        res = evaluate_loss(self.model, examples, batch_size=self.config.train.eval_batch_size,
                            pad_id=self.tokenizer.pad_token_id, fast_path=self.config.train.fast_path)
        out = {wire.EVAL_LOSS: res.loss, wire.PERPLEXITY: res.perplexity, wire.NUM_EXAMPLES: res.num_examples}
        if self.config.evaluate.metric_names and examples:
            from fedllm.evaluation.task import score_task

            scores = score_task(self.model, self.tokenizer, examples, self.config.evaluate)
            out.update(scores.means())
            out[wire.TASK_EXAMPLES] = scores.num_scored
        return out


def evaluate_settings(plan: ComparePlan, trained: dict[str, dict[int, dict[str, Any]]], evaluator: Evaluator, *,
                      echo: Callable[[str], None] = print) -> dict[str, dict[int, dict[str, dict[str, float]]]]:
    """setting -> seed -> site -> metrics; each evaluation is kept in ``OUTPUT/<setting>/seed-<k>/eval.json``."""
    echo("  evaluating every setting on each site's held-out records ...")
    results: dict[str, dict[int, dict[str, dict[str, float]]]] = {}
    names = [s.name for s in plan.sites]
    for setting in plan.settings:
        for k in range(plan.seeds if setting != "base" else 1):
            cache = plan.output / setting / f"seed-{k}" / "eval.json"
            if cache.is_file():
                results.setdefault(setting, {})[k] = json.loads(cache.read_text(encoding="utf-8"))
                continue
            per_site: dict[str, dict[str, float]] = {}
            if setting == "local":
                for name in names:
                    evaluator.load(Path(trained[setting][k]["runs"][name]) / "adapter")
                    per_site[name] = evaluator.evaluate(name)
            else:
                run = None if setting == "base" else Path(next(iter(trained[setting][k]["runs"].values())))
                evaluator.load(None if run is None else run / "adapter")
                for name in names:
                    per_site[name] = evaluator.evaluate(name)
            write_json_atomic(cache, per_site)
            results.setdefault(setting, {})[k] = per_site
    return results


# --------------------------------------------------------------------------------------------
# the report


def _spread(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(plan: ComparePlan, trained: dict[str, dict[int, dict[str, Any]]],
              results: dict[str, dict[int, dict[str, dict[str, float]]]],
              held_out: dict[str, int] | None = None) -> dict[str, Any]:
    """``compare.json``: per site and setting, mean and spread over seeds of every metric, ε, and
    the gain of federated over local (paired by seed)."""
    metrics = [wire.EVAL_LOSS, wire.PERPLEXITY, *plan.config.evaluate.metric_names]
    rows = []
    for site in plan.sites:
        for setting in plan.settings:
            per_seed = results.get(setting, {})
            row: dict[str, Any] = {"site": site.name, "setting": setting, "seeds": len(per_seed)}
            for metric in metrics:
                mean, std = _spread([per_seed[k][site.name].get(metric, math.nan) for k in per_seed])
                row[metric] = mean
                row[f"{metric}-spread"] = std
            if setting == "base":
                row["epsilon"] = 0.0
            elif setting in trained:
                source = site.name if setting in ("federated", "local") else POOLED_SITE
                eps = [trained[setting][k]["epsilon"].get(source) for k in trained[setting]]
                row["epsilon"] = None if any(e is None for e in eps) else max(eps)
            rows.append(row)
    gains = []
    if "federated" in results and "local" in results:
        for site in plan.sites:
            gain: dict[str, Any] = {"site": site.name}
            seeds = sorted(set(results["federated"]) & set(results["local"]))
            for metric in metrics:
                lower_is_better = metric in (wire.EVAL_LOSS, wire.PERPLEXITY)
                diffs = [(results["local"][k][site.name][metric] - results["federated"][k][site.name][metric])
                         * (1 if lower_is_better else -1) for k in seeds
                         if metric in results["local"][k][site.name] and metric in results["federated"][k][site.name]]
                gain[metric], gain[f"{metric}-spread"] = _spread(diffs)
            gains.append(gain)
    c = plan.config
    return {
        "scenario-output": str(plan.output), "seeds": plan.seeds, "settings": list(plan.settings),
        "rounds": c.num_server_rounds, "local-steps": c.train.local_steps, "batch-size": c.train.batch_size,
        "target-epsilon": c.privacy.target_epsilon if c.privacy.enabled else None, "model": c.model.name,
        "task-metrics": list(c.evaluate.metric_names), "metrics": metrics,
        "sites": [{"site": s.name, "held-out": (held_out or {}).get(s.name)} for s in plan.sites],
        "rows": rows, "gain-federated-over-local": gains,
    }


def _fmt(value: Any, spread: Any = None, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    text = format(value, spec)
    if spread is not None and isinstance(spread, float) and math.isfinite(spread) and spread > 0:
        text += f" ± {format(spread, spec.lstrip('+'))}"
    return text


def markdown(report: dict[str, Any]) -> str:
    """``compare.md``: one row per site and setting, then the gain of federated over local."""
    metrics = report["metrics"]
    lines = [f"# fedllm compare: {report['model']}, {report['rounds']} rounds x {report['local-steps']} local steps, "
             f"target ε {_fmt(report['target-epsilon'], spec='g')}, {report['seeds']} seed(s)", "",
             "Mean ± sample standard deviation over seeds (DP noise and the adapter's seed vary). Every setting is "
             "evaluated on each site's own held-out records. Loss and perplexity: lower is better; task metrics: "
             "higher is better.", "",
             "| site | setting | " + " | ".join(metrics) + " | ε |",
             "|---|---|" + "---|" * len(metrics) + "---|"]
    for row in report["rows"]:
        eps = "no DP" if row["setting"] == "pooled-no-dp" else _fmt(row.get("epsilon"), spec=".2f")
        cells = [_fmt(row[m], row.get(f"{m}-spread"), ".2f" if m == wire.PERPLEXITY else ".3f") for m in metrics]
        lines.append(f"| {row['site']} | {row['setting']} | " + " | ".join(cells) + f" | {eps} |")
    if report["gain-federated-over-local"]:
        lines += ["", "## Gain of federated over local, per site", "",
                  "Positive: federation did better (loss and perplexity: local − federated; task metrics: "
                  "federated − local), paired by seed.", "",
                  "| site | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for gain in report["gain-federated-over-local"]:
            lines.append(f"| {gain['site']} | " + " | ".join(
                _fmt(gain[m], gain.get(f"{m}-spread"), "+.3f") for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """``compare.png``: per site, the settings side by side (held-out loss; each task metric below)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = [wire.EVAL_LOSS, *report["task-metrics"]]
    sites = [s["site"] for s in report["sites"]]
    settings = report["settings"]
    fig = Figure(figsize=(max(6.0, 1.6 * len(sites) + 2), 3.2 * len(metrics)))
    FigureCanvasAgg(fig)
    width = 0.8 / len(settings)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(len(metrics), 1, i + 1)
        shown = [r[metric] for r in report["rows"] if isinstance(r.get(metric), float) and math.isfinite(r[metric])]
        if metric == wire.EVAL_LOSS and shown:  # losses differ in the decimals: zoom in on them
            pad = max(0.5 * (max(shown) - min(shown)), 0.02)
            ax.set_ylim(max(0.0, min(shown) - pad), max(shown) + pad)
        elif shown:
            ax.set_ylim(0.0, 1.0)
        for j, setting in enumerate(settings):
            rows = {r["site"]: r for r in report["rows"] if r["setting"] == setting}
            values = [rows[s][metric] if s in rows else math.nan for s in sites]
            errors = [rows[s].get(f"{metric}-spread", 0.0) if s in rows else 0.0 for s in sites]
            ax.bar([x + (j - (len(settings) - 1) / 2) * width for x in range(len(sites))], values, width,
                   yerr=[e if math.isfinite(e) else 0.0 for e in errors], label=setting, capsize=2)
        ax.set_xticks(range(len(sites)), sites)
        ax.set_ylabel(metric + (" (lower is better)" if metric == wire.EVAL_LOSS else " (higher is better)"))
        if i == 0:
            ax.legend(fontsize=8, ncols=len(settings))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(path)


def _check_plan(plan: ComparePlan) -> None:
    """Resume only the same comparison: ``OUTPUT/compare-plan.json`` holds the run config, sites and
    settings; another plan in the same folder is refused. More ``--seeds`` than before is the same
    plan: the finished seeds are kept and the new ones run (seed k's runs do not depend on K)."""
    wanted = json.loads(json.dumps({"config": plan.config.to_flat(), "sites": [s.to_dict() for s in plan.sites],
                                    "settings": list(plan.settings)}))
    path = plan.output / "compare-plan.json"
    found = None
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found = {}
        same = isinstance(found, dict) and all(found.get(k) == v for k, v in wanted.items())
        if not same:
            changed = sorted(k for k in wanted if not isinstance(found, dict) or found.get(k) != wanted[k])
            raise ConfigError(f"{plan.output} holds a fedllm compare with other settings ({', '.join(changed)} "
                              "differ): resume it with the same arguments (more --seeds is fine), or choose another "
                              "--output")
    seeds = max(plan.seeds, int(found.get("seeds", 0)) if isinstance(found, dict) else 0)
    write_json_atomic(path, {**wanted, "seeds": seeds})


def run_compare(plan: ComparePlan, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, evaluate, write ``compare.json``, ``compare.md`` and ``compare.png``; the report."""
    if not plan.sites:
        raise FedLLMError("the scenario has no sites")
    _check_plan(plan)
    # the model and every site's held-out records first: bad data or a bad model fails before any run
    keys = _split_keys(plan)
    evaluator = Evaluator(plan, keys)
    echo("  held-out records per site: " + ", ".join(f"{n} {len(e)}" for n, e in evaluator.held_out.items()))
    trained = run_settings(plan, keys, echo=echo)
    results = evaluate_settings(plan, trained, evaluator, echo=echo)
    report = summarise(plan, trained, results, {name: len(e) for name, e in evaluator.held_out.items()})
    write_json_atomic(plan.output / "compare.json", report)
    write_text_atomic(plan.output / "compare.md", markdown(report))
    plot(report, plan.output / "compare.png")
    return report
