"""The fast path (``train.fast-path``, default true): value-equal, faster forms of the frozen base's
layers for training, switched on for a model by one call, ``enable``.

Each module holds one job and is tested against what it replaces (per model family in
``tests/unit/test_model_families.py``, the rest in ``tests/unit/test_fastpath.py``):

* ``lora.py``: peft's LoRA layer forward with less memory traffic; with A frozen (FFA-LoRA) the
  whole layer is one ``FrozenBaseLoRA`` (its per-example gradient for DP is computed by the rule
  ``fedllm.site.per_example`` installs on B).
* ``attention.py``: Llama's attention with the rotary embedding as one function; eager attention
  for short sequences on a CPU, query heads grouped per key/value head (``choose_attention``).
* ``norms.py``: Llama-style RMSNorm with a frozen weight as one function.
* ``head.py``: the output head and the next-token loss as one function (``head_nll``), in row
  chunks: the vocabulary-size logits are never stored.
* ``products.py``: the base's products in the layout this CPU's kernel runs fastest, timed once
  per shape at run time (``accumulate_product``; called only by ``FrozenBaseLoRA``).
* ``allocator.py``: glibc's allocator keeps freed memory for reuse (``keep_freed_memory``).

Who calls ``enable``, each only when ``train.fast-path`` is true: ``fedllm.model.lora.apply_lora``
(the layers), ``fedllm.site.runtime.SiteRuntime`` (the layers, and the attention kernel for the
site's device and sequence length), and ``fedllm.site.training``'s ``train_local`` and
``evaluate_loss`` (the layers, and the returned ``FastPath`` for the fused head and the
allocator). ``enable`` is idempotent. With the switch off nothing in this package runs: peft's own
LoRA layers, Opacus' ``GradSampleModule`` for per-example gradients, the loss from the full
logits, the model's own attention, glibc's default allocator.

Nothing here decides privacy: the per-example gradients go to Opacus' ``DPOptimizer``, which clips
and noises them (``fedllm.site.per_example``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedllm.fastpath import allocator, head
from fedllm.fastpath.attention import GROUPED_ATTENTION, choose_attention, use_lean_attention
from fedllm.fastpath.lora import use_lean_lora
from fedllm.fastpath.norms import use_lean_norms


@dataclass(frozen=True)
class FastPath:
    """The fast path as ``enable`` switched it on for one model: what the training loop uses of it
    beyond the model's own (now faster) layers."""

    attention: str | None  # the attention implementation chosen for training; None: not chosen by this call

    def keep_freed_memory(self) -> bool:
        """glibc's allocator keeps freed memory for reuse (``fedllm.fastpath.allocator``)."""
        return allocator.keep_freed_memory()

    def head_nll(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each row's next-token NLL through a frozen, bias-free head (``fedllm.fastpath.head``)."""
        return head.head_nll(hidden, weight, targets)


def enable(model: Any, *, device: str | None = None, max_length: int | None = None) -> FastPath:
    """Switch the fast path on for ``model`` (a peft model, or any transformers model): the lean
    LoRA forward on every peft LoRA ``Linear``, the lean RMSNorm and Llama attention forwards; with
    ``device`` and ``max_length`` (the longest training sequence) also the attention kernel for
    training there. Idempotent. Returns what the training loop uses."""
    use_lean_lora(model)
    use_lean_norms(model)
    use_lean_attention(model)
    attention = None
    if device is not None and max_length is not None:
        attention = choose_attention(model, device=device, max_length=max_length)
    return FastPath(attention=attention)


def is_enabled(model: Any) -> bool:
    """Whether ``enable`` changed anything on ``model``: a forward from this package on any of its
    modules, or an attention kernel chosen by ``choose_attention``."""
    for module in model.modules():
        function = getattr(module.__dict__.get("forward"), "__func__", None)
        if getattr(function, "__module__", "").startswith(__name__ + "."):
            return True
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return ("_fedllm_original_attention" in base.__dict__
            or getattr(getattr(base, "config", None), "_attn_implementation", None) == GROUPED_ATTENTION)
