"""LoRA on a loaded base model: which modules get adapters, ``apply_lora``, gradient checkpointing,
the adapter's state (get, set, save in PEFT format), and the process's resident peft model.

An adapter is peft's ``LoraConfig`` from ``fedllm.config.LoraConfig``; with ``lora.freeze-a``
(FFA-LoRA, the default) A is drawn once from ``lora.seed`` and never trained, so only B moves and
only B is exchanged. With ``train.fast-path`` on, ``apply_lora`` switches on the fast path's layers
(``fedllm.fastpath.enable``), which compute the same values. Only adapter tensors ever leave this
module's callers.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedllm import fastpath
from fedllm.config import LoraConfig
from fedllm.errors import ModelError
from fedllm.model.loading import load_model_and_tokenizer


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


def apply_lora(model: Any, lora: LoraConfig, *, fast_path: bool = True) -> Any:
    """Wrap ``model`` with a LoRA adapter; everything but the adapter is frozen. A is initialised
    from ``lora.seed`` and, with ``lora.freeze-a``, never trained (FFA-LoRA). ``fast_path``
    (``train.fast-path``): the fast path's layers (``fedllm.fastpath.enable``); off, peft's own."""
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
    if fast_path:
        fastpath.enable(peft_model)
    return peft_model


def set_gradient_checkpointing(model: Any, enabled: bool) -> None:
    """Switch gradient checkpointing of a (peft-wrapped) transformers model on or off.

    On: reentrant checkpointing (``use_reentrant=True``) plus ``enable_input_require_grads``. With
    the non-reentrant default, Opacus' forward hooks never see the recomputed activations and the
    per-example gradients are missing (docs/notes/dp-lora.md P9); without input gradients, reentrant
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


_RESIDENT: dict[tuple, tuple[Any, Any]] = {}


def shared_model(config: Any, *, device: str | None = None) -> tuple[Any, Any]:
    """(peft model, tokenizer) for a ``RunConfig``, loaded once per process and per model + LoRA
    configuration (and ``train.fast-path``): virtual sites and rounds served by the same process
    reuse it and only swap adapter tensors. ``device`` as in ``load_model_and_tokenizer`` (it matters only for a
    quantized base and for ``model.dtype = "auto"``)."""
    key = (config.model, config.lora, config.train.fast_path,
           device if config.model.quantization != "none" or config.model.dtype == "auto" else None)
    if key not in _RESIDENT:
        _RESIDENT.clear()  # one resident base model per process
        model, tokenizer = load_model_and_tokenizer(config.model, device=device)
        for p in model.parameters():
            p.requires_grad_(False)
        _RESIDENT[key] = (apply_lora(model, config.lora, fast_path=config.train.fast_path), tokenizer)
    return _RESIDENT[key]
