"""Use a finished run: load its base model with its adapter, generate from it, export it.

A run folder (``RUN_DIR``, the ``output-dir`` of ``fedllm simulate`` or ``fedllm run``) says which
base model it trained on in ``config.toml`` (the fully resolved run configuration, written by the
coordinator at the start of the run). For a folder without one, the base is the adapter's own
``base_model_name_or_path`` (``adapter/adapter_config.json``), but only when that loads offline;
otherwise the error says to name it (``--model NAME``). ``model.name`` can always be overridden.

The adapter is ``RUN_DIR/adapter`` (the final global adapter) or any folder in PEFT format (a
``checkpoints/round-<k>`` of the run). It is loaded with peft's ``PeftModel.from_pretrained`` onto
the unquantized base in ``model.dtype``; with FFA-LoRA (``lora.freeze-a``) the frozen A factors are
saved in the adapter like B, so merging (``merge_and_unload``) needs nothing from fedllm.

Prompts are rendered exactly as training rendered them (``fedllm.data.formatting.render``: the
model's chat template, or the plain fallback), tokenized without special tokens, and decoded greedy
by default. The merged export is a plain Hugging Face model folder (``save_pretrained`` of the
model and the tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads without fedllm.
Exports are written to a temporary sibling folder and renamed: nothing is left half-written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.config import ModelConfig, RunConfig, flatten, read_toml, to_toml
from fedllm.errors import ConfigError, DataError, FedLLMError, ModelError

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "config.toml"  # the resolved run configuration, in every run folder
ADAPTER_DIR = "adapter"
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RunModel:
    """What a run folder says about its model: the base (``model``), the adapter folder, the run's
    full configuration when the folder has one, and where the base model setting came from."""

    run_dir: Path
    adapter_dir: Path
    model: ModelConfig
    config: RunConfig | None
    source: str


def resolve_run(run_dir: Path | str, *, model_name: str | None = None, adapter: Path | str | None = None) -> RunModel:
    """Check ``run_dir`` and find its base model and adapter. ``model_name`` overrides ``model.name``
    (the run's ``model.gguf-file`` then no longer applies); ``adapter`` replaces ``RUN_DIR/adapter``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} not found; give the output folder of a fedllm run "
                          f"(it holds {ADAPTER_DIR}/ and {RUN_CONFIG_FILE})")
    adapter_dir = Path(adapter) if adapter is not None else run_dir / ADAPTER_DIR
    _check_adapter(adapter_dir, run_dir, given=adapter is not None)
    config, source = _run_config(run_dir)
    if config is not None:
        model = config.model
    elif model_name is None:
        model, source = _model_from_adapter(adapter_dir, run_dir), f"{adapter_dir / 'adapter_config.json'}"
    else:
        model = ModelConfig()
    if model_name is not None:
        model = dataclasses.replace(model, name=model_name, gguf_file="")
        source = "--model"
        if config is not None:
            config = dataclasses.replace(config, model=model)
    return RunModel(run_dir=run_dir, adapter_dir=adapter_dir, model=model, config=config, source=source)


def _check_adapter(adapter_dir: Path, run_dir: Path, *, given: bool) -> None:
    if (adapter_dir / "adapter_config.json").is_file():
        return
    if given:
        raise ConfigError(f"--adapter {adapter_dir}: no adapter_config.json there; give a folder in PEFT format "
                          f"({run_dir}/{ADAPTER_DIR} or {run_dir}/checkpoints/round-<k>)")
    rounds = sorted((run_dir / "checkpoints").glob("round-*")) if (run_dir / "checkpoints").is_dir() else []
    hint = (f"; the run did not complete, but checkpoints exist: pass --adapter {rounds[-1]}" if rounds else
            "; give the output folder of a completed fedllm run")
    raise ConfigError(f"{run_dir}: no {ADAPTER_DIR}/adapter_config.json (no final adapter){hint}")


def _run_config(run_dir: Path) -> tuple[RunConfig | None, str]:
    """The run's configuration from ``config.toml``; (None, "") without one."""
    for name in (RUN_CONFIG_FILE,):
        path = run_dir / name
        if path.is_file():
            try:
                return RunConfig.from_flat(flatten(read_toml(path))), str(path)
            except ConfigError as exc:
                raise ConfigError(f"{path}: not a fedllm run configuration: {exc}. Pass --model NAME to name the "
                                  "base model instead") from None
    return None, ""


def _model_from_adapter(adapter_dir: Path, run_dir: Path) -> ModelConfig:
    """The base named in ``adapter_config.json``, if it loads offline (a model folder, or a Hugging
    Face id in the local cache)."""
    path = adapter_dir / "adapter_config.json"
    try:
        name = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); pass --model NAME") from None
    what = (f"{run_dir} has no {RUN_CONFIG_FILE} (a run folder from an older fedllm), so the base model is not "
            f"recorded")
    if not name:
        raise ConfigError(f"{what}, and {path} names no base model. Pass the run's model.name: --model NAME")
    if not _loadable_offline(name):
        raise ConfigError(f"{what}, and the base model in {path} ({name!r}) is not available offline. Pass the "
                          "run's model.name: --model NAME")
    log.info("%s has no %s: using the adapter's base model %s", run_dir, RUN_CONFIG_FILE, name)
    return ModelConfig(name=name)


def _loadable_offline(name: str) -> bool:
    if (Path(name).expanduser() / "config.json").is_file():
        return True
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an id huggingface_hub rejects is not in the cache
        return False


# ----------------------------------------------------------------------------------- loading


def load_run_model(run: RunModel, *, dtype: str | None = None) -> tuple[Any, Any]:
    """(PeftModel in eval mode, tokenizer): the run's base with its adapter. ``dtype``: the base's
    dtype instead of the run's ``model.dtype``."""
    from peft import PeftModel

    from fedllm.model.loading import load_model_and_tokenizer

    model_config = dataclasses.replace(run.model, dtype=dtype) if dtype else run.model
    try:
        base, tokenizer = load_model_and_tokenizer(model_config)
    except ModelError as exc:
        if run.source == "--model":
            raise
        raise ModelError(f"{exc} (base model from {run.source}; name another with --model NAME)") from None
    try:
        model = PeftModel.from_pretrained(base, str(run.adapter_dir))
    except Exception as exc:  # shapes or module names that do not fit this base
        raise ModelError(f"the adapter {run.adapter_dir} does not load onto base model {model_config.name!r}: "
                         f"{exc.__class__.__name__}: {_first_line(exc)}. Is it the run's base model? "
                         "(--model NAME)") from None
    return model.eval(), tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# -------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Prompt:
    """One prompt to answer: the text the model sees and, for a record that has one, the reference."""

    text: str
    reference: str | None = None


def chat_prompt(tokenizer: Any, message: str) -> Prompt:
    """A single user message, rendered as training rendered prompts."""
    from fedllm.data.formatting import render

    return Prompt(render(tokenizer, [{"role": "user", "content": message}], add_generation_prompt=True))


_PENDING = "\x00fedllm: the answer to generate\x00"  # stands in for a prompt-only record's missing answer


def record_prompts(tokenizer: Any, path: Path | str) -> list[Prompt]:
    """Each record of a data file (any of fedllm's formats, ``fedllm.data.loading``) as a prompt: a
    conversation up to its last assistant turn (that turn is the reference), rendered with the
    generation prompt; a conversation that ends with a user turn, whole (no reference); a plain-text
    record, as it is (the model continues it). Prompt-only records are accepted too: an instruction
    without ``output``, a conversation without an assistant turn. Every record is checked before
    any is answered (``DataError`` naming the file and record)."""
    from fedllm.data.formatting import render
    from fedllm.data.loading import normalise_record, read_raw

    path = Path(path)
    raw_records = read_raw(path)
    if not raw_records:
        raise DataError(f"{path}: no records; give a file with one prompt record per line")
    prompts = []
    for where, raw in raw_records:
        record = normalise_record(_with_pending_answer(raw), where=f"{path}: {where}")
        if "text" in record:
            prompts.append(Prompt(record["text"]))
            continue
        messages = record["messages"]
        if messages[-1]["role"] == "assistant":
            messages, reference = messages[:-1], messages[-1]["content"]
        else:
            reference = None
        if not messages:
            raise DataError(f"{path}: {where}: the conversation starts with its assistant turn: no prompt to answer")
        prompts.append(Prompt(render(tokenizer, messages, add_generation_prompt=True),
                              None if reference == _PENDING else reference))
    return prompts


def _with_pending_answer(raw: Any) -> Any:
    """A prompt-only record completed with a placeholder answer, so that it reads like a training record."""
    if not isinstance(raw, dict):
        return raw
    if "instruction" in raw and "output" not in raw and "messages" not in raw and "conversations" not in raw:
        return {**raw, "output": _PENDING}
    for key, role_key, roles, answer in (("messages", "role", ("assistant",), {"role": "assistant"}),
                                         ("conversations", "from", ("gpt", "assistant", "bot"), {"from": "gpt"})):
        turns = raw.get(key)
        if isinstance(turns, list) and turns and all(isinstance(t, dict) for t in turns) and not any(
                t.get(role_key) in roles for t in turns):
            content = "content" if key == "messages" else "value"
            return {**raw, key: [*turns, {**answer, content: _PENDING}]}
    return raw


def generate_text(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
                  streamer: Any = None) -> str:
    """The model's answer to ``prompt`` (rendered text), decoded without special tokens. Greedy at
    ``temperature`` 0, sampled otherwise; ``streamer`` (a transformers streamer) gets the tokens as
    they come."""
    import torch
    from transformers import GenerationConfig

    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    settings: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        settings |= {"temperature": temperature, "top_k": 0, "top_p": 1.0}
    generation = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **settings)
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=generation, streamer=streamer)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------------------------- exporting


def export_merged(run: RunModel, out: Path | str, *, dtype: str | None = None) -> Path:
    """Write the base with the adapter merged in as a Hugging Face model folder at ``out`` (model,
    tokenizer, and the run's model card as README.md). ``dtype``: the saved weights' dtype (default
    the run's ``model.dtype``; ``auto`` saves float32)."""
    out = check_export_folder(out)
    dtype = dtype or (run.model.dtype if run.model.dtype in EXPORT_DTYPES else "float32")
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: use one of {', '.join(EXPORT_DTYPES)}")
    model, tokenizer = load_run_model(run, dtype=dtype)
    merged = model.merge_and_unload()
    with _staging(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_merged_card(run), encoding="utf-8")
    return out


def export_adapter(run: RunModel, out: Path | str) -> Path:
    """Copy the adapter (PEFT format, its model card included) to ``out``, with the run's
    ``config.toml`` beside it when the run folder has a configuration."""
    out = check_export_folder(out)
    with _staging(out) as tmp:
        shutil.copytree(run.adapter_dir, tmp, dirs_exist_ok=True)
        if run.config is not None:
            header = f"fedllm run configuration of {run.run_dir.resolve().name} (adapter exported by fedllm export)"
            (tmp / RUN_CONFIG_FILE).write_text(to_toml(run.config, header=header), encoding="utf-8")
    return out


def check_export_folder(out: Path | str) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedLLMError(f"--out {out} already exists and is not empty; choose a new folder (fedllm export never "
                          "writes into an existing one)")
    return out


class _staging:
    """A temporary sibling of ``out`` that becomes ``out`` when the block succeeds and is removed
    when it fails."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                if self.out.is_dir():
                    self.out.rmdir()  # empty (checked before); a non-empty one makes rmdir fail, not vanish
                self.tmp.rename(self.out)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _merged_card(run: RunModel) -> str:
    """The run's model card (``README.md`` of the adapter) for the merged model: the library is
    transformers now, and a line says the adapter is merged and from which run."""
    card = run.adapter_dir / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else "# fedllm model\n"
    try:
        adapter = run.adapter_dir.resolve().relative_to(run.run_dir.resolve()).as_posix()
    except ValueError:
        adapter = run.adapter_dir.resolve().name
    note = (f"> **Merged model.** The LoRA adapter `{adapter}` of the fedllm run folder "
            f"`{run.run_dir.resolve().name}` is merged into the base model this card names "
            "(`fedllm export --merge`). Load it with `AutoModelForCausalLM.from_pretrained(this folder)`; "
            "no peft or fedllm is needed. The privacy statement below applies to the merged weights as it "
            "did to the adapter.\n")
    front, body = _split_front_matter(text)
    if front:
        front = front.replace("library_name: peft", "library_name: transformers")
    heading, sep, rest = body.partition("\n")
    if heading.startswith("# "):
        return f"{front}{heading}\n\n{note}{sep}{rest}"
    return f"{front}{note}\n{body}"


def _split_front_matter(text: str) -> tuple[str, str]:
    """(YAML front matter with its ``---`` lines and newline, the rest)."""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end != -1:
            return text[: end + 5], text[end + 5:]
    return "", text
