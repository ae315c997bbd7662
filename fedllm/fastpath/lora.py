"""peft's LoRA layer forward with less memory traffic, and ``FrozenBaseLoRA``: a whole FFA-LoRA layer
(frozen base, frozen A, B trained) as one autograd function.

Part of the fast path (``fedllm.fastpath``): ``use_lean_lora`` is called by
``fedllm.fastpath.enable`` only; with ``train.fast-path = false`` every LoRA layer runs peft's own
forward. This module reaches into peft's ``lora.Linear`` internals (``active_adapters``,
``lora_A``/``lora_B``/``lora_dropout``/``scaling``/``lora_variant``, ``base_layer``) and into
``nn.Module``'s hook dictionaries.

Per-example gradients for DP: ``FrozenBaseLoRA`` does not compute them itself. When the DP code
(``fedllm.site.per_example``) sets a rule on a B factor (``lora_B[name].per_example_rule``), B's
backward pass hands that rule its per-example inputs (the rank-r ``u = x Aᵀ``, the output
gradient, the scaling) instead of computing B's summed gradient; the rule computes and stores the
per-example gradients where Opacus' ``DPOptimizer`` reads them.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from fedllm.fastpath import products


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
        rule = getattr(lora_b, "per_example_rule", None) if torch.is_grad_enabled() else None
        base = self.base_layer
        return FrozenBaseLoRA.apply(x, base.weight, base.bias, lora_a.weight, lora_b.weight,
                                    float(self.scaling[name]), rule)
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
    ``s·Σ_t g_t ⊗ u_t``, per example (for DP: ``per_example_rule(b, u, g, s)`` is called with u
    and g batch first, and nothing is put in ``B.grad``; the rule is
    ``fedllm.site.per_example.fused_lora_b_grad_sample``) or summed (no rule: returned as
    ``B.grad``). Only u is kept for the backward pass.

    The products run in the base's dtype; on a bf16 base the per-example product accumulates in
    fp32 inside the matrix kernel, is rounded to bf16 once (its inputs, the output gradient and
    u, are bf16 already) and is held, clipped and noised in fp32. The values are those of peft's
    forward and of Opacus' GradSampleModule (tested per family; exact in fp32)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float, per_example_rule: Any) -> torch.Tensor:
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        a_low = frozen_in(a, dtype)
        u = torch.mm(x2, a_low.t())  # x Aᵀ; the scaling s is applied inside the products below
        b_low = b.to(dtype)  # B in the base's dtype once a call: the backward pass reuses it
        out = x.new_empty(*x.shape[:-1], weight.shape[0])  # returned whole: autograd forbids returning a view
        out2 = out.view(-1, weight.shape[0])
        # s·u Bᵀ (+ bias); beta = 0 ignores out2's uninitialised values
        torch.addmm(out2 if bias is None else bias.to(dtype), u, b_low.t(), beta=0 if bias is None else 1,
                    alpha=scaling, out=out2)
        products.accumulate_product(out2, x2, weight.to(dtype).t())  # in place: addmm would first copy the LoRA term
        ctx.save_for_backward(u, weight, a_low, b_low, b)
        ctx.scaling, ctx.per_example_rule, ctx.batch_shape = scaling, per_example_rule, x.shape[:-1]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, weight, a_low, b_low, b = ctx.saved_tensors
        dtype = u.dtype
        g2 = grad.reshape(-1, grad.shape[-1]).to(dtype)
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            gu = torch.mm(g2, b_low).mul_(ctx.scaling)  # rank r: a small tensor
            grad_x = products.accumulate_product(torch.mm(gu, a_low), g2, weight.to(dtype)).view(*ctx.batch_shape, -1)
        if ctx.per_example_rule is not None:
            rows = ctx.batch_shape[0]  # batch first; a 2-d input has one example per row
            ctx.per_example_rule(b, u.view(rows, -1, u.shape[-1]), g2.view(rows, -1, g2.shape[-1]), ctx.scaling)
        elif ctx.needs_input_grad[4]:
            grad_b = torch.addmm(g2.new_empty(g2.shape[-1], u.shape[-1]), g2.t(), u, beta=0,
                                 alpha=ctx.scaling).to(b.dtype)
        return grad_x, None, None, None, grad_b, None, None


def frozen_in(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A frozen factor in ``dtype``, cast once and kept on the factor until its values change (its
    version counter moves: an adapter loaded into it) rather than cast in every call."""
    if a.dtype == dtype:
        return a
    cached = getattr(a, "_fedllm_cast", None)
    if cached is None or cached[0] != (dtype, a._version, a.data_ptr()):
        cached = ((dtype, a._version, a.data_ptr()), a.detach().to(dtype))
        a._fedllm_cast = cached  # type: ignore[attr-defined]  # a tensor attribute, dropped with the factor
    return cached[1]


def use_lean_lora(model: Any) -> int:
    """Give every peft LoRA ``Linear`` of ``model`` the lean forward; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == "Linear" and type(module).__module__ == "peft.tuners.lora.layer":
            module.forward = types.MethodType(lean_lora_forward, module)
            count += 1
    return count
