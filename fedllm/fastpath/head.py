"""``head_nll``: the output head and the next-token loss on response tokens as one function, in row
chunks, its gradient computed in the forward pass: the vocabulary-size logits are never stored.

Part of the fast path (``fedllm.fastpath``): the training loop calls it through the ``FastPath``
that ``fedllm.fastpath.enable`` returns; with ``train.fast-path = false`` the loss is computed from
the model's full logits instead. Tested against the unfused computation (values and gradients).
"""

from __future__ import annotations

from typing import Any

import torch

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
