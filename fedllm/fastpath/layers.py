"""Faster forms of the frozen base's building blocks for training, with the same values.

Each piece computes what transformers or peft compute, with fewer passes over memory (on a CPU
most of a LoRA step's time outside the matrix multiplies is spent streaming activations); each
is tested against the original (per model family in ``tests/unit/test_model_families.py``, the
rest in ``tests/unit/test_speed.py``):

* ``lean_lora_forward``: peft's LoRA layer forward; with A frozen (FFA-LoRA) the whole layer is
  one ``FrozenBaseLoRA``, which also gives B's per-example gradients for DP.
* ``choose_attention`` / ``grouped_eager_attention``: eager attention for short sequences on a
  CPU, query heads grouped per key/value head.
* ``lean_rms_norm_forward``: the RMSNorm of Llama-style models (weight frozen) as one
  ``FrozenRMSNorm`` with a written-out backward pass.
* ``accumulate_product``: ``out += a @ b`` for the base's products, as one multiply, in row
  chunks or in two column halves, whichever this CPU's kernel runs fastest for that shape (timed
  once per shape).
* ``lean_llama_attention_forward``: Llama's attention forward with the rotary embedding as one
  ``Rotary`` function (written-out backward pass).
* ``head_nll``: the output head and the next-token loss on response tokens as one function, in
  row chunks, its gradient computed in the forward pass: the full logits are never stored.
* ``keep_freed_memory``: the C allocator keeps freed activation memory for reuse instead of
  handing it back to the system and faulting it in again on the next allocation.

Nothing here decides privacy: the per-example gradients go to Opacus' ``DPOptimizer`` as before.
"""

from __future__ import annotations

import ctypes
import math
import platform
import time
from typing import Any

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_allocator_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process for reuse (once per process; returns
    whether it is in effect).

    By default glibc serves blocks above a threshold (128 KiB, raised dynamically to at most
    32 MiB) with fresh ``mmap`` pages and returns them on ``free``; a training step allocates and
    frees hundreds of activation tensors of 1-12 MB, and every new one page-faults its memory in
    again (zero-filled by the kernel). With both thresholds raised, freed blocks are reused:
    SmolLM2-135M, bf16, 8 x 128 tokens, 2 threads: a DP step about 10% faster, peak RSS unchanged
    (``bench/bench_speed.py``). The process keeps its peak memory until it exits, which is what a
    site process does anyway. No effect, and ``False``, off glibc."""
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
                _allocator_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(
                    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31))
            except (OSError, AttributeError):
                pass
    return _allocator_tuned


def uses_lean_lora_forward(module: Any) -> bool:
    """True for a peft LoRA layer that ``apply_lora`` gave fedllm's lean forward."""
    return getattr(module.forward, "__func__", None) is lean_lora_forward


def fused_lora_factors(module: Any) -> list[Any]:
    """The B factors of a LoRA layer that runs as ``FrozenBaseLoRA`` (empty otherwise)."""
    if not uses_lean_lora_forward(module):
        return []
    return [module.lora_B[name] for name in module.lora_B
            if name in module.lora_A and _fusable(module, module.lora_A[name], module.lora_B[name], module.lora_dropout[name])]


def lean_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
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

    Forward: the rank-r ``u = x Aᵀ`` and ``s·u Bᵀ (+ bias)`` are small; the base's product is
    added to them inside the matrix multiply (``addmm``), so the layer's output is written once.
    Backward: ``∂x = g W + s·(g B) A`` likewise in one ``addmm``; B's gradient is
    ``s·Σ_t g_t ⊗ u_t``, per example (``per_example``, for DP: stored batch first in
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
        u = torch.mm(x2, a.to(dtype).t())  # x Aᵀ; the scaling s is applied inside the products below
        b_low = b.to(dtype)
        out = x.new_empty(*x.shape[:-1], weight.shape[0])  # returned whole: autograd forbids returning a view
        out2 = out.view(-1, weight.shape[0])
        # s·u Bᵀ (+ bias); beta = 0 ignores out2's uninitialised values
        torch.addmm(out2 if bias is None else bias.to(dtype), u, b_low.t(), beta=0 if bias is None else 1,
                    alpha=scaling, out=out2)
        accumulate_product(out2, x2, weight.to(dtype).t())  # in place: addmm would first copy the LoRA term
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
            gu = torch.mm(g2, b.to(dtype)).mul_(ctx.scaling)  # rank r: a small tensor
            grad_x = accumulate_product(torch.mm(gu, a.to(dtype)), g2, weight.to(dtype)).view(*ctx.batch_shape, -1)
        if ctx.per_example:
            rows = ctx.batch_shape[0]  # batch first; a 2-d input has one example per row
            g3, u3 = g2.view(rows, -1, g2.shape[-1]), u.view(rows, -1, u.shape[-1])
            # (uᵀ g)ᵀ: the same products as gᵀ u, in the faster operand order; s inside the product
            per_example = torch.baddbmm(u3.new_empty(rows, u3.shape[-1], g3.shape[-1]), u3.transpose(1, 2), g3,
                                        beta=0, alpha=ctx.scaling).to(b.dtype).transpose(1, 2)  # cast, then a view
            previous = getattr(b, "grad_sample", None)
            b.grad_sample = per_example if previous is None else previous + per_example
        elif ctx.needs_input_grad[4]:
            grad_b = torch.addmm(g2.new_empty(g2.shape[-1], u.shape[-1]), g2.t(), u, beta=0,
                                 alpha=ctx.scaling).to(b.dtype)
        return grad_x, None, None, None, grad_b, None, None


ROW_CHUNK = 512
TRIALS = 3
_product_way: dict[tuple, str] = {}


def accumulate_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out += a @ b`` in place (``out`` contiguous, rows of ``a`` = rows of ``out``).

    On a CPU, oneDNN's matrix multiply runs some shapes no faster on two threads than on one: on
    this project's 2-core machine, bf16 (rows 640-1280) x 1536 -> 576, SmolLM2's MLP down
    projection, runs at about 1.1 TFLOP/s whole and 1.7-2.0 in row chunks of 512, 1024 x 576 -> 576
    at 1.24 in two halves of the output's columns against 0.98 whole and 1.09 in row chunks, while
    other shapes are fastest whole
    (``python bench/bench_speed.py --parts gemm``). The first products of each shape (rows in
    buckets of 128, inner and outer size, dtype, layout of ``b``) are computed all three ways
    (``PRODUCT_WAYS``), ``TRIALS`` times each in turn, after one untimed run each (a new shape's
    first product includes building its kernel); the way with the shortest time is kept for that
    shape (the shortest of several, as a single timing on a shared machine can be off by 10-20%).
    The values are the same every way, up to the order of the sums inside the kernel (tested)."""
    rows = out.shape[0]
    if out.device.type != "cpu" or rows <= ROW_CHUNK:
        return out.addmm_(a, b)
    key = (rows // 128, a.shape[1], out.shape[1], a.dtype, b.stride())
    way = _product_way.get(key)
    if way is None:
        trial, best = torch.empty_like(out), {}
        for product in PRODUCT_WAYS.values():
            product(trial.copy_(out), a, b)  # untimed: builds each way's kernels
        for _ in range(TRIALS):
            for name, product in PRODUCT_WAYS.items():
                trial.copy_(out)
                start = time.perf_counter()
                product(trial, a, b)
                best[name] = min(best.get(name, math.inf), time.perf_counter() - start)
        way = _product_way[key] = min(best, key=best.get)
    return PRODUCT_WAYS[way](out, a, b)


def _addmm_in_row_chunks(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    for start in range(0, out.shape[0], ROW_CHUNK):
        out[start:start + ROW_CHUNK].addmm_(a[start:start + ROW_CHUNK], b)
    return out


def _addmm_in_column_halves(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    half = (out.shape[1] + 1) // 2
    out[:, :half].addmm_(a, b[:, :half])
    out[:, half:].addmm_(a, b[:, half:])
    return out


PRODUCT_WAYS = {"whole": lambda out, a, b: out.addmm_(a, b), "rows": _addmm_in_row_chunks,
                "columns": _addmm_in_column_halves}


HEAD_CHUNK_ELEMENTS = 1 << 24  # logits per chunk of rows in head_nll (64 MB in fp32)


def head_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``cross_entropy(linear(hidden, weight).float(), targets, reduction="none")`` for the rows
    of ``hidden`` (tokens, width) with a frozen, bias-free output head ``weight`` (vocabulary,
    width): the same values, through ``HeadCrossEntropy``."""
    rows = max(8, min(256, HEAD_CHUNK_ELEMENTS // weight.shape[0]))
    return HeadCrossEntropy.apply(hidden, weight, targets, rows)


class HeadCrossEntropy(torch.autograd.Function):
    """Each token's NLL ``lse(z) - z[target]`` of its logits ``z = h Wᵀ``, in chunks of rows.

    The logits of a chunk are computed in the head's dtype (as the model's ``lm_head`` does) and
    their log-softmax in fp32 (as the loss on ``logits.float()`` does). The loss is the graph's end
    but for a per-token weight: ``∂nll/∂h = (softmax(z) - onehot(target)) W``, computed in the
    forward pass while the chunk's logits are at hand (rounded to the head's dtype before the
    product, as autograd rounds the logits' gradient), and only these (tokens x width) values are
    kept; the backward pass scales each row by its incoming gradient. Nothing of vocabulary size
    outlives its chunk: for 8 x 64 response tokens of a 49,152-word vocabulary the 50 MB of bf16
    logits, their 100 MB fp32 copy, the 100 MB fp32 log-probabilities kept for the backward pass
    and the logits' gradients are never materialised whole (tested against the unfused
    computation, values and gradients)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                rows: int) -> torch.Tensor:
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        head = weight.to(hidden.dtype)
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            log_probs = torch.log_softmax(torch.mm(hidden[chunk], head.t()), -1, dtype=torch.float32)
            target = targets[chunk].unsqueeze(1)
            nll[chunk] = log_probs.gather(1, target).squeeze(1).neg_()
            if grad is not None:
                probs = log_probs.exp_()
                probs.scatter_add_(1, target, probs.new_full(target.shape, -1.0))  # softmax - onehot
                torch.mm(probs.to(hidden.dtype), head, out=grad[chunk])
        ctx.save_for_backward(grad)
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_nll: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad.float() * grad_nll.unsqueeze(1)).to(grad.dtype), None, None, None


# RMSNorm classes whose forward is Llama's, the same code copied per model (tested per family)
_LLAMA_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Phi3RMSNorm"}


def use_lean_norms(model: Any) -> int:
    """Give every Llama-style RMSNorm of ``model`` the lean forward; returns how many."""
    import types

    count = 0
    for module in model.modules():
        if type(module).__name__ in _LLAMA_RMS_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(lean_rms_norm_forward, module)
            count += 1
    return count


def lean_rms_norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """Llama's ``RMSNorm.forward``: ``weight · (x / rms(x))`` computed in fp32 and rounded to the
    input's dtype before the weight, as there; a trained weight takes the original forward."""
    if self.weight.requires_grad:
        return type(self).forward(self, hidden_states)
    return FrozenRMSNorm.apply(hidden_states, self.weight, float(self.variance_epsilon))


class FrozenRMSNorm(torch.autograd.Function):
    """``w · (x·r)`` with ``r = 1/√(mean(x²) + ε)`` and a frozen weight ``w``: the values of
    Llama's RMSNorm with about half the passes over the activations. Only ``x`` and the per-row
    ``r`` are kept for the backward pass, ``∂x = r·gy - r³·mean(gy·x)·x`` with ``gy = g·w``
    (Llama's ``r·(gy - x̂·mean(gy·x̂))``, ``x̂ = x·r``, multiplied out), in fp32; the forward
    scales an fp32 copy of x in place and multiplies by w in place on the rounded result."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()  # x itself when x is fp32: never written below
        r = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
        ctx.save_for_backward(x, r, weight)
        xhat = (xf * r if xf is x else xf.mul_(r)).to(x.dtype)  # computed in fp32, rounded once
        # Llama: weight * x̂ in their promoted dtype; xhat is a new tensor here, so it may be written
        return xhat.mul_(weight) if weight.dtype == xhat.dtype else weight * xhat

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, r, weight = ctx.saved_tensors
        gy = (grad * weight).float()  # a new tensor (the product), written below
        xf = x.float()  # only read
        c = torch.linalg.vecdot(gy, xf).unsqueeze(-1).mul_(r.pow(3)).div_(-x.shape[-1])  # -r³·mean(gy·x)
        return gy.mul_(r).addcmul_(xf, c).to(x.dtype), None, None


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
    import types

    count = 0
    for module in model.modules():
        if type(module).__name__ == "LlamaAttention" and type(module).__module__.endswith("modeling_llama"):
            module.forward = types.MethodType(lean_llama_attention_forward, module)
            count += 1
    return count


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
