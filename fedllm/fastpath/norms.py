"""The RMSNorm of Llama-style models (weight frozen) as one ``FrozenRMSNorm`` with a written-out
backward pass: the same values with about half the passes over the activations.

Part of the fast path (``fedllm.fastpath``): ``use_lean_norms`` is called by
``fedllm.fastpath.enable`` only. Tested per model family against the model's own norm.
"""

from __future__ import annotations

import types
from typing import Any

import torch

# RMSNorm classes whose forward is Llama's, the same code copied per model (tested per family)
_LLAMA_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Phi3RMSNorm"}


def use_lean_norms(model: Any) -> int:
    """Give every Llama-style RMSNorm of ``model`` the lean forward; returns how many."""
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
