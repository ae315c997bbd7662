"""Attention for training, with the values of the model's own.

* ``lean_llama_attention_forward``: Llama's attention forward with the rotary embedding as one
  ``Rotary`` function (written-out backward pass).
* ``choose_attention`` / ``grouped_eager_attention``: on a CPU, eager attention (query heads
  grouped per key/value head) where it is faster than SDPA on this machine, timed once per shape.

Part of the fast path (``fedllm.fastpath``): ``fedllm.fastpath.enable`` installs the lean forward
and chooses the attention kernel; with ``train.fast-path = false`` the model keeps its own
attention forward and implementation. Both tested per model family; this module reaches into
transformers' attention interface (``ALL_ATTENTION_FUNCTIONS``, ``set_attn_implementation``) and
Llama's module code (transformers 5).
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch


def lean_llama_attention_forward(self: Any, hidden_states: torch.Tensor,
                                 position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                                 attention_mask: torch.Tensor | None = None, cache: Any = None,
                                 **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """``LlamaAttention.forward`` (transformers 5) without a cache, the rotary embedding applied by
    ``Rotary``; with a cache (generation) or anything unexpected, the original forward."""
    if cache is not None or position_embeddings is None or kwargs.get("past_key_values") is not None:
        return type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, cache=cache, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = Rotary.apply(query, cos, sin), Rotary.apply(key, cos, sin)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    output, weights = attention(self, query, key, value, attention_mask,
                                dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                                **kwargs)
    return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


class Rotary(torch.autograd.Function):
    """``x·cos + rotate_half(x)·sin`` for x of shape (batch, heads, tokens, head dim) and cos, sin
    of shape (batch, tokens, head dim), as Llama applies its rotary embedding, in two passes over
    the halves: ``[x₁c₁ - x₂s₁, x₂c₂ + x₁s₂]``; backward ``[g₁c₁ + g₂s₂, g₂c₂ - g₁s₁]``. The
    result is contiguous (batch, heads, tokens, head dim), which attention reshapes for free."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """``[x₁c₁ - sign·x₂s₁, x₂c₂ + sign·x₁s₂]`` (sign -1: the transpose, for the backward pass)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    first, second = out[..., :half], out[..., half:]
    if sign > 0:
        torch.mul(x1, cos[..., :half], out=first).addcmul_(x2, sin[..., :half], value=-1.0)
        torch.mul(x2, cos[..., half:], out=second).addcmul_(x1, sin[..., half:])
    else:  # the transpose: ∂x₁ = g₁c₁ + g₂s₂, ∂x₂ = g₂c₂ - g₁s₁
        torch.mul(x1, cos[..., :half], out=first).addcmul_(x2, sin[..., half:])
        torch.mul(x2, cos[..., half:], out=second).addcmul_(x1, sin[..., :half], value=-1.0)
    return out


def use_lean_attention(model: Any) -> int:
    """Give every ``LlamaAttention`` of ``model`` the lean forward; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == "LlamaAttention" and type(module).__module__.endswith("modeling_llama"):
            module.forward = types.MethodType(lean_llama_attention_forward, module)
            count += 1
    return count


# eager attention keeps each layer's attention weights (rows x heads x length² values) for the backward
# pass; beyond this length they would dominate a site's memory, and SDPA is chosen without timing
EAGER_ATTENTION_MAX_LENGTH = 1024
TIMING_ROWS = 4  # sequences in the timed pass (the ratio of the two kernels hardly depends on it)
# eager attention is chosen only when it takes at most this share of SDPA's time: it costs memory (the
# attention weights), and on a shared machine single timings are off by 10-20%, so a near tie (fp32 at
# 384 tokens: 35 ms against 38) would flip from run to run; the SmolLM2 pubmedqa site worker with an
# fp32 base peaked at 3.1-3.2 GB with eager attention and 2.3 GB with SDPA, 2 x 384 tokens a pass
EAGER_TIME_SHARE = 0.85
GROUPED_ATTENTION = "fedllm_grouped_eager"
# model types whose attention modules call transformers' generic eager attention (the same function,
# copied per model) through the attention interface; others keep "eager" (tested per family)
_GROUPED_ATTENTION_TYPES = {"llama", "mistral", "mixtral", "qwen2", "phi3", "cohere", "gemma"}
_eager_faster: dict[tuple, bool] = {}


def choose_attention(model: Any, *, device: str, max_length: int) -> str:
    """The attention kernel for training on ``device`` with sequences of at most ``max_length``.

    On a CPU, which is faster depends on the CPU, the dtype and the length: measured on 2 threads,
    fwd + bwd of one layer (4 sequences, 9 heads, 3 key/value heads, head dim 64), AMD EPYC with
    AVX-512 BF16 and no AMX: at 384 tokens bf16 grouped eager 17 ms against SDPA's 39 ms, fp32 35
    against 38; at 768 tokens bf16 128 against SDPA's 113; fp32 at 256 tokens 18 against 16. So
    for sequences up to ``EAGER_ATTENTION_MAX_LENGTH`` both are timed once per shape and dtype on
    this machine (``eager_attention_is_faster``), and eager is kept only when clearly faster (at
    most ``EAGER_TIME_SHARE`` of SDPA's time; otherwise SDPA, the model's own
    choice, which some models make eager for their values); longer sequences and GPUs keep the
    model's own. Eager attention keeps the attention weights for the backward pass (batch x
    heads x length² values a layer), hence the length limit. Models whose eager attention is
    transformers' generic one get ``grouped_eager_attention``, the same function with fewer
    passes over memory. Both give the model's values (tested per family)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = getattr(base.config, "_attn_implementation", None)
    original = base.__dict__.setdefault("_fedllm_original_attention", current)
    wanted = original
    if (device == "cpu" and max_length <= EAGER_ATTENTION_MAX_LENGTH and original in ("eager", "sdpa")
            and eager_attention_is_faster(base, max_length, grouped=_grouped(base))):
        wanted = "eager"
        if _grouped(base):
            _register_grouped_attention()
            wanted = GROUPED_ATTENTION
    if current != wanted and original in ("eager", "sdpa") and base._can_set_attn_implementation():
        base.set_attn_implementation(wanted)
    return base.config._attn_implementation


def _grouped(base: Any) -> bool:
    return getattr(base.config, "model_type", None) in _GROUPED_ATTENTION_TYPES


def eager_attention_is_faster(base: Any, length: int, *, grouped: bool) -> bool:
    """Whether (grouped) eager attention's forward and backward pass takes at most
    ``EAGER_TIME_SHARE`` of SDPA's time on this machine for ``base``'s attention shape at ``length``
    tokens in its dtype: each timed on random inputs with a causal mask, once untimed, then the
    shorter of two runs; cached per shape."""
    config = base.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = next(base.parameters()).dtype
    key = (heads, kv_heads, head_dim, length, dtype, grouped, torch.get_num_threads())
    if key not in _eager_faster:
        eager, sdpa = _time_attention(heads, kv_heads, head_dim, length, dtype, grouped)
        _eager_faster[key] = eager <= EAGER_TIME_SHARE * sdpa
    return _eager_faster[key]


def _time_attention(heads: int, kv_heads: int, head_dim: int, length: int, dtype: torch.dtype,
                    grouped: bool) -> tuple[float, float]:
    """Seconds of (grouped) eager attention's and of SDPA's forward and backward pass (eager's
    infinite where the heads do not group)."""
    import time

    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    if heads % kv_heads:
        return math.inf, 0.0
    module = torch.nn.Module()  # what the two functions read of an attention module
    for name, value in (("num_key_value_groups", heads // kv_heads), ("is_causal", True)):
        setattr(module, name, value)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    bool_mask = causal.expand(TIMING_ROWS, 1, length, length)
    additive = torch.zeros(TIMING_ROWS, 1, length, length, dtype=dtype).masked_fill(~bool_mask, torch.finfo(dtype).min)
    eager = grouped_eager_attention if grouped else eager_attention_forward
    g = torch.Generator().manual_seed(0)
    shapes = ((TIMING_ROWS, heads, length, head_dim), (TIMING_ROWS, kv_heads, length, head_dim))
    q, k, v = (torch.randn(shapes[min(i, 1)], generator=g).to(dtype).requires_grad_() for i in range(3))
    grad = torch.randn(shapes[0], generator=g).to(dtype)
    scaling = head_dim ** -0.5

    def seconds(run) -> float:
        best = float("inf")
        for attempt in range(3):
            start = time.perf_counter()
            out = run()[0]
            out.transpose(1, 2).backward(grad)
            if attempt:  # the first builds kernels: untimed
                best = min(best, time.perf_counter() - start)
        return best

    sdpa = seconds(lambda: sdpa_attention_forward(module, q, k, v, bool_mask, scaling=scaling))
    return seconds(lambda: eager(module, q, k, v, additive, scaling=scaling)), sdpa


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
