"""Per-example gradients for DP-SGD at a site, and the DP optimizer that clips and noises them.

The unit of privacy is one training example: every trained parameter ``p`` gets, after a backward
pass, ``p.grad_sample`` (batch first: one gradient per example of the physical batch), Opacus'
convention; Opacus' ``DPOptimizer`` (``dp_optimizer_class``) clips each example's gradient, over
all the trained parameters together, to ``max_grad_norm`` (C), sums them, adds Gaussian noise of
std ``noise_multiplier * C`` and divides by the expected batch size. The loss each backward pass
starts from must be a sum (or the mean) of per-example losses, each depending on its own example
only (``fedllm.site.training.sequence_losses``).

Two producers of ``grad_sample``, chosen per training call (``start_per_example_gradients``):

* **Opacus' ``GradSampleModule``** in hooks mode (docs/notes/dp-lora.md): every configuration, and
  the only one with ``train.fast-path = false``. The loss is the batch's mean (``loss_reduction =
  "mean"``); Opacus rescales to per-example gradients.
* **the fused FFA-LoRA layer of the fast path** (``fedllm.fastpath.lora.FrozenBaseLoRA``), when
  every trained parameter is the B factor of such a layer (A frozen, no dropout, a plain linear
  base): this module sets ``fused_lora_b_grad_sample`` as each B factor's ``per_example_rule``,
  which ``FrozenBaseLoRA``'s backward pass calls with its per-example inputs. The loss is the
  sum of the per-example losses (each example's gradient is taken as it is). Its values are those
  of ``GradSampleModule`` on peft's layers (tested per model family; exact in fp32).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from fedllm.fastpath.lora import fused_lora_factors, uses_lean_lora_forward


def fused_lora_b_grad_sample(b: torch.Tensor, u: torch.Tensor, g: torch.Tensor, scaling: float) -> None:
    """B's per-example gradient in a fused FFA-LoRA layer ``y = x Wᵀ + s·(x Aᵀ) Bᵀ``: for each
    example, ``s·Σ_t g_t ⊗ u_t`` over its tokens t, with ``u = x Aᵀ`` (examples, tokens, r) and ``g``
    the output's gradient (examples, tokens, out), both in the base's dtype. Added to
    ``b.grad_sample`` (examples, out, r) in B's dtype (fp32: clipped and noised there).

    On a bf16 base the product accumulates in fp32 inside the matrix kernel and is rounded to bf16
    once (its inputs are bf16 already), then cast to fp32."""
    rows = u.shape[0]
    # (uᵀ g)ᵀ: the same products as gᵀ u, in the faster operand order; s inside the product
    per_example = torch.baddbmm(u.new_empty(rows, u.shape[-1], g.shape[-1]), u.transpose(1, 2), g,
                                beta=0, alpha=scaling).to(b.dtype).transpose(1, 2)  # cast, then a view
    previous = getattr(b, "grad_sample", None)
    b.grad_sample = per_example if previous is None else previous + per_example  # type: ignore[attr-defined]  # Opacus'


def use_fused_per_example_gradients(model: torch.nn.Module, enabled: bool) -> bool:
    """Switch the fused layers' per-example gradients (``fused_lora_b_grad_sample`` on every B
    factor of a ``FrozenBaseLoRA`` layer) on or off. On only when every trained parameter is the
    weight of such a B factor (FFA-LoRA, the default, on the fast path); otherwise (A trained,
    dropout, a quantized base, other trainable modules, or no fast path) Opacus' hooks do it.
    Returns whether it is on."""
    layers: list[Any] = [m for m in model.modules() if uses_lean_lora_forward(m)]  # peft LoRA layers
    factors = [m.lora_B[name] for m in layers for name in m.lora_B]
    fused = {id(f) for m in layers for f in fused_lora_factors(m)}
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    covered = {id(f.weight) for f in factors if f.weight.requires_grad and id(f) in fused}
    usable = bool(trained) and trained == covered
    for factor in factors:
        factor.per_example_rule = fused_lora_b_grad_sample if enabled and usable else None
    return enabled and usable


@dataclass
class PerExampleGradients:
    """The per-example gradients of one training call. ``net``: what the forward pass calls (the
    model, or Opacus' ``GradSampleModule`` around it); ``fused``: the fused layers compute them
    (the loss to differentiate is the sum of the per-example losses; otherwise their mean)."""

    model: torch.nn.Module
    net: torch.nn.Module
    fused: bool

    def stop(self) -> None:
        """Remove what ``start_per_example_gradients`` installed; the model stays usable."""
        if self.fused:
            use_fused_per_example_gradients(self.model, False)
            for p in self.model.parameters():
                if p.requires_grad:
                    p.grad_sample = None  # type: ignore[attr-defined]  # Opacus' attribute
        else:
            # removes the hooks and per-example attributes
            self.net._close()  # type: ignore[operator]  # Opacus' GradSampleModule: untyped


def start_per_example_gradients(model: torch.nn.Module, *, fused: bool) -> PerExampleGradients:
    """Make backward passes through ``model`` leave each trained parameter's per-example gradients
    in ``grad_sample``: with ``fused`` (the fast path) from the fused layers where they cover every
    trained parameter, otherwise from Opacus' ``GradSampleModule`` (hooks mode)."""
    if fused and use_fused_per_example_gradients(model, True):
        return PerExampleGradients(model=model, net=model, fused=True)
    from opacus.grad_sample import GradSampleModule

    return PerExampleGradients(model=model, net=GradSampleModule(model, batch_first=True, loss_reduction="mean"),
                               fused=False)


@functools.cache
def dp_optimizer_class() -> type:
    """Opacus' ``DPOptimizer`` with one change, in ``scale_grad``: the number of accumulated
    backward passes, which Opacus recomputes for every parameter by looping over all of them
    (quadratic in the number of parameters: 44,100 checks a step for the default adapter's 210
    factors), is computed once per step. The division, the clipping and the noise are Opacus' own
    (the mechanism tests in ``tests/unit/test_train.py`` check the step against a hand computation)."""
    from opacus.optimizers import DPOptimizer

    class FedllmDPOptimizer(DPOptimizer):
        def scale_grad(self) -> None:
            if self.loss_reduction == "mean":
                divisor = self.expected_batch_size * self.accumulated_iterations
                for p in self.params:
                    p.grad /= divisor

    return FedllmDPOptimizer
