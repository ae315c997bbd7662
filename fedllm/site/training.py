"""Local training at one site: ``steps`` DP-SGD steps on the LoRA adapter, and held-out evaluation.

The loop is written out in plain PyTorch + Opacus so that its privacy can be reviewed here:

* **Poisson sampling**: every step includes each training record independently with probability
  ``q = batch_size / n``, which is what the accountant assumes. An empty batch still takes a
  noise-only step (skipping it would make the run depend on the data).
* **Per-example gradients** of the LoRA factors only (peft freezes the base), from
  ``fedllm.site.per_example``: with FFA-LoRA (A frozen, only B trained) on the fast path from the
  fused layers' backward pass; otherwise from Opacus in hooks mode. Either way Opacus'
  ``DPOptimizer`` clips and noises them.
* **The fast path** (``train.fast-path``, default true; ``fast_path`` here): ``fedllm.fastpath.enable``
  gives the model its faster layers (the same values), and the loss takes logits on response
  tokens only: the output head runs only where a label exists (``sequence_losses``), which is most
  of the saving in memory and time for long prompts; for a plain head the head and the loss are
  one function (``FastPath.head_nll``) that never stores the vocabulary-size logits. Off, the plain
  reference: the model as it is, the loss from its full logits, Opacus' hooks, glibc's default
  allocator.
* **Per-sequence loss**: each example's loss is the mean over its own response tokens, so its
  gradient depends on that example only (Hugging Face's ``labels=`` loss averages over the whole
  batch and couples examples).
* Each per-example gradient is clipped to ``max_grad_norm`` (C), the clipped sum gets Gaussian
  noise of std ``noise_multiplier * C`` and is divided by the expected batch size.
* The sampling and the noise draw on fresh OS entropy unless a test passes a generator: a seed
  known to the coordinator would let it recompute (and remove) the noise.

No Flower imports: the Flower ClientApp calls ``train_local`` and ``evaluate_loss``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedllm import fastpath
from fedllm.data.formatting import IGNORE_INDEX, TokenizedExample
from fedllm.fastpath import FastPath
from fedllm.model.lora import set_gradient_checkpointing
from fedllm.site.per_example import dp_optimizer_class, start_per_example_gradients


@dataclass(frozen=True)
class DPSettings:
    """The DP-SGD mechanism of one release (one round at one site)."""

    noise_multiplier: float
    max_grad_norm: float


@dataclass(frozen=True)
class StepInfo:
    """Progress of one local step, for the caller to show."""

    step: int
    steps: int
    batch_size: int
    loss: float


@dataclass(frozen=True)
class TrainResult:
    """What one local round produced. ``sample_rate``/``steps`` plus the DP settings are the DP
    event the site's ledger records before the adapter leaves."""

    train_loss: float
    steps: int
    sample_rate: float
    examples_seen: int
    tokens: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Held-out loss (mean NLL per response token) and perplexity; ``record_losses``: each
    record's own mean token loss (what :mod:`fedllm.site.metric_release` clips and noises)."""

    loss: float
    perplexity: float
    tokens: int
    num_examples: int
    record_losses: tuple[float, ...] = ()


def fresh_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from the OS entropy pool. The noise is drawn on the
    parameters' device (Opacus draws it there, and torch refuses a generator of another device);
    the Poisson sampling on the CPU."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))


def collate(examples: Sequence[TokenizedExample], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: (input_ids, attention_mask, labels)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL per position and the mask of positions that count: (B, T-1) each."""
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    return nll, (targets != IGNORE_INDEX).float()


def per_sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean loss over its own label tokens: shape (B,), no coupling."""
    nll, mask = token_losses(logits, labels)
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


def _as_is(logits: torch.Tensor, config: Any) -> torch.Tensor:
    return logits


# Output-head post-processing per model_type, applied to lm_head's output by the model's own
# forward; a model_type not listed here takes the full forward (tested per family against it).
_HEAD_POST: dict[str, Callable[[torch.Tensor, Any], torch.Tensor]] = {  # (logits, the model's config)
    **{t: _as_is for t in ("llama", "mistral", "mixtral", "qwen2", "phi3", "gemma", "gemma3_text", "falcon", "mpt")},
    "cohere": lambda logits, config: logits * config.logit_scale,
    "gemma2": lambda logits, config: (torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
                                      if config.final_logit_softcapping else logits),
}


def sequence_losses(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                    net: torch.nn.Module | None = None, *, fast: FastPath | None = None) -> torch.Tensor:
    """Each sequence's mean loss over its own label tokens, shape (B,).

    Without the fast path (``fast`` None): ``per_sequence_loss(net(...).logits, labels)``, from the
    full logits. With it, the vocabulary logits only where a label exists (the response tokens):
    the decoder runs on every token, the output head only on those, for a plain head through
    ``fast.head_nll``. Same values (tested per family); a model whose head this does not know takes
    the full path."""
    wrapped: Any = model  # a transformers model, maybe in peft's wrapper: their methods are not torch's
    base = wrapped.get_base_model() if hasattr(wrapped, "get_base_model") else wrapped
    post = _HEAD_POST.get(getattr(base.config, "model_type", "")) if fast is not None else None
    head = base.get_output_embeddings() if post is not None else None
    if fast is None or post is None or head is None or type(head) is not torch.nn.Linear:
        return per_sequence_loss((net or model)(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels)
    # no key/value cache (that is for generation); hooks fire: they are on the modules
    hidden = base.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)[0]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows_hidden = hidden[:, :-1][keep]
    if post is _as_is and head.bias is None and not head.weight.requires_grad:
        nll = fast.head_nll(rows_hidden, head.weight, targets[keep])  # the same values, no stored logits
    else:
        nll = F.cross_entropy(post(head(rows_hidden), base.config).float(), targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    total = torch.zeros(ids.size(0), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return total / keep.sum(1).clamp(min=1)


# length-bucketed chunks (fast path): a chunk of fewer padded tokens than this is not split off on its own
# (small products run below the kernel's rate), and each extra chunk costs about this many tokens of work
MIN_CHUNK_TOKENS = 512
CHUNK_COST_TOKENS = 32
# train.pass-tokens = 0 on a CPU: at most this many padded tokens a pass with a 16-bit base, and as many
# bytes' worth with a wider one (512 tokens with fp32). A pass's activations are what a site's memory holds.
# SmolLM2-135M, pubmedqa at 384 tokens, batch 8 (bench/bench_real.py, 2026-12-07): bf16 peaked at 2.14 GB
# with 4 x 384 tokens a pass and 1.66 GB with 2 x 384; fp32 (SDPA) at 2.35 GB with 2 x 384 and 1.71 GB with
# 1 x 384, for about 10% fewer tokens/s. The base's products run at about full rate from 768 rows in bf16.
CPU_PASS_TOKENS = 1024


def pass_token_limit(pass_tokens: int, device: torch.device | str, dtype: torch.dtype) -> int:
    """``train.pass-tokens`` for a base of ``dtype`` on ``device``: as set; 0 (automatic) is
    ``CPU_PASS_TOKENS`` on a CPU for a 16-bit base (fewer for a wider one: the same bytes of
    activations a pass) and no limit (0) elsewhere."""
    if pass_tokens:
        return pass_tokens
    if torch.device(device).type != "cpu":
        return 0
    return CPU_PASS_TOKENS * 2 // max(2, dtype.itemsize)


def plan_chunks(lengths: Sequence[int], max_rows: int = 0, max_tokens: int = 0) -> list[list[int]]:
    """The passes through the model for one sampled batch: positions into ``lengths`` (the sampled
    records' token counts), grouped so that records of similar length share a pass (each pass is
    right-padded to its longest record, so mixing lengths wastes the padding's compute).

    The records are ordered by length and cut into consecutive groups of at most ``max_rows``
    (0: no limit) and at most ``max_tokens`` padded tokens (0: no limit; a longer record runs
    alone) that minimise padded tokens + ``CHUNK_COST_TOKENS`` per group, each group holding at
    least ``MIN_CHUNK_TOKENS`` padded tokens unless it cannot take one more record (``max_rows``
    records, or ``max_tokens`` reached) or is the last (shortest) one. Every sampled record is in
    exactly one group: the step's sampled set, what DP sees, is unchanged; only the order of the
    sums inside the step differs."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    limit = max_rows if max_rows > 0 else n
    # best[i]: least cost of the first i records (longest first); cut[i]: where its last group starts
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(max(0, end - limit), end):
            padded = lengths[order[start]] * (end - start)  # the group's longest is its first
            if max_tokens and padded > max_tokens and end - start > 1:
                continue  # over the pass's token limit: records only alone
            full = (end - start >= limit or end == n  # at the row limit, or the last (shortest) group
                    or (max_tokens and padded + lengths[order[start]] > max_tokens))  # one more record: over the limit
            if padded < MIN_CHUNK_TOKENS and not full:
                continue  # too small to stand alone, and it could grow
            cost = best[start] + padded + CHUNK_COST_TOKENS
            if cost < best[end]:
                best[end], cut[end] = cost, start
    if best[n] == math.inf:  # the limits leave no grouping: each record alone
        return [[i] for i in order]
    groups: list[list[int]] = []
    end = n
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def _poisson_batch(n: int, sample_rate: float, generator: torch.Generator) -> list[int]:
    return torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten().tolist()


def train_local(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    pad_id: int,
    dp: DPSettings | None,
    weight_decay: float = 0.0,
    optimizer: str = "adamw",
    proximal_mu: float = 0.0,
    device: torch.device | str = "cpu",
    on_step: Callable[[StepInfo], None] | None = None,
    sampling_generator: torch.Generator | None = None,
    noise_generator: torch.Generator | None = None,
    physical_batch_size: int = 0,
    gradient_checkpointing: bool = False,
    fast_path: bool = True,
    planned_examples: int = 0,
    pass_tokens: int = 0,
) -> TrainResult:
    """Run ``steps`` local steps on ``model``'s trainable (adapter) parameters, in place.

    With ``dp`` set this is DP-SGD with Poisson sampling at ``q = batch_size / len(examples)``;
    without it, the same loop with plain gradients (no privacy guarantee). ``proximal_mu > 0``
    adds FedProx's proximal term after clipping and noise (it does not touch the data).

    ``physical_batch_size > 0`` runs each sampled (logical) batch through the model in chunks of at
    most that many records, to bound memory. Under DP every chunk's per-example gradients are
    clipped and added to the step's sum (Opacus' skip-step mechanism, as in its
    BatchMemoryManager) and the noise is added once per logical step, so the mechanism and the
    accounting are exactly those of the whole batch; without DP the chunks' gradients are
    accumulated into the batch mean.

    ``gradient_checkpointing`` recomputes each decoder layer's activations in the backward pass
    instead of storing them, for the duration of this call. It uses reentrant checkpointing with
    gradients on the input embeddings, the only mode in which Opacus' hooks see the recomputed
    activations (docs/notes/dp-lora.md P9): the per-example gradients are the same as without it (tested).

    ``fast_path`` (``train.fast-path``): ``fedllm.fastpath.enable`` on ``model`` and its fused
    head, fused per-example gradients and allocator setting; off, the plain reference (``model``
    must not have the fast path's layers). Both compute the same update (tested per family).

    ``pass_tokens`` (``train.pass-tokens``; fast path): at most that many padded tokens through the
    model at once (``pass_token_limit``: 0 is automatic). With the fast path each sampled batch runs
    in length-bucketed passes (``plan_chunks``), within ``physical_batch_size`` records and
    ``pass_tokens`` tokens a pass; under DP exactly as chunks above.

    ``planned_examples`` > 0 sets q = ``batch_size / planned_examples`` (and the expected batch)
    from a planned dataset size instead of ``len(examples)``, which it must not be below: the
    canary audit plans for every canary, so that q does not depend on which were included."""
    if not examples:
        raise ValueError("no training examples")
    if planned_examples and planned_examples < len(examples):
        raise ValueError(f"planned_examples = {planned_examples} is below the {len(examples)} examples given")
    fast = _fast_path(model, fast_path)
    if fast is not None:
        fast.keep_freed_memory()
    max_pass = pass_token_limit(pass_tokens, device, _base_dtype(model))
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    planned = planned_examples or len(examples)
    sample_rate = min(1.0, batch_size / planned)
    expected_batch = max(1, round(sample_rate * planned))
    sampler = sampling_generator or fresh_generator()
    optim: torch.optim.Optimizer
    if optimizer == "sgd":
        optim = torch.optim.SGD(params, lr=learning_rate, weight_decay=weight_decay, foreach=True)
    else:  # foreach: one call per operation over all the factors (a LoRA adapter has hundreds), not one per factor
        optim = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, foreach=True)
    per_example = start_per_example_gradients(model, fused=fast is not None) if dp is not None else None
    net: torch.nn.Module = model if per_example is None else per_example.net
    own = per_example is not None and per_example.fused
    if dp is not None:
        optim = dp_optimizer_class()(optim, noise_multiplier=dp.noise_multiplier,
                                          max_grad_norm=dp.max_grad_norm, expected_batch_size=expected_batch,
                                          loss_reduction="mean",
                                          generator=noise_generator or fresh_generator(params[0].device))
    if gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    model.train()
    losses, seen, tokens, start = [], 0, 0, time.perf_counter()
    try:
        for step in range(1, steps + 1):
            batch = _poisson_batch(len(examples), sample_rate, sampler)
            optim.zero_grad(set_to_none=True)
            if batch:
                if fast is not None:  # length-bucketed passes: less padding, the same sampled set
                    chunks = [[batch[i] for i in group] for group in
                              plan_chunks([len(examples[i].input_ids) for i in batch], physical_batch_size, max_pass)]
                else:
                    size = physical_batch_size if physical_batch_size > 0 else len(batch)
                    chunks = [batch[i:i + size] for i in range(0, len(batch), size)]
                total = 0.0
                for k, chunk in enumerate(chunks):
                    ids, mask, labels = collate([examples[i] for i in chunk], pad_id, device)
                    per_sequence = sequence_losses(model, ids, mask, labels, net, fast=fast)
                    # DP: the chunk's mean; Opacus rescales it to per-example gradients (loss_reduction
                    # "mean" over this backward's rows); fedllm's own capture takes each example's
                    # loss as it is (the sum). No DP: this chunk's share of the batch mean.
                    if dp is None:
                        loss = per_sequence.sum() / len(batch)
                    else:
                        loss = per_sequence.sum() if own else per_sequence.mean()
                    loss.backward()
                    total += float(per_sequence.detach().sum())
                    tokens += int(mask.sum())
                    if dp is not None and k < len(chunks) - 1:
                        optim.signal_skip_step(do_skip=True)  # type: ignore[attr-defined]  # Opacus: untyped
                        optim.step()  # clips this chunk's per-example gradients into the sum, no noise yet
                        optim.zero_grad(set_to_none=True)  # drops grad_sample, keeps the clipped sum
                losses.append(total / len(batch))
                seen += len(batch)
            elif dp is not None:  # noise-only step: zero-size per-example gradients
                for p in params:
                    empty = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    p.grad_sample = empty  # type: ignore[attr-defined]  # Opacus' attribute
            else:
                continue  # without DP an empty batch has nothing to learn from
            _step(optim, params, anchor, proximal_mu, dp is not None)
            if on_step:
                on_step(StepInfo(step, steps, len(batch), losses[-1] if batch else math.nan))
    finally:
        optim.zero_grad(set_to_none=True)
        if per_example is not None:
            per_example.stop()
        if gradient_checkpointing:
            set_gradient_checkpointing(model, False)
        model.eval()
    return TrainResult(
        train_loss=float(sum(losses) / len(losses)) if losses else math.nan,
        steps=steps,
        sample_rate=sample_rate,
        examples_seen=seen,
        tokens=tokens,
        seconds=time.perf_counter() - start,
    )


def _fast_path(model: torch.nn.Module, fast_path: bool) -> FastPath | None:
    """The fast path on ``model`` (``fedllm.fastpath.enable``) when ``fast_path``; otherwise None,
    and ``model`` must be the plain reference (a model with the fast path's layers is refused)."""
    if fast_path:
        return fastpath.enable(model)
    if fastpath.is_enabled(model):
        raise ValueError("train.fast-path = false, but this model runs the fast path's layers (fedllm.fastpath.enable "
                         "ran on it): build it with apply_lora(..., fast_path=False)")
    return None


def _base_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the base model computes in: its input embeddings' (fp32 without them)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    weight = getattr(get_embeddings() if callable(get_embeddings) else None, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32


def _step(optimizer, params, anchor, proximal_mu: float, private: bool) -> None:
    """One optimizer step; FedProx's proximal gradient is added after clipping and noise."""
    if private:
        if not optimizer.pre_step():
            return
        inner = optimizer.original_optimizer
    else:
        inner = optimizer
    if proximal_mu > 0:
        for p, p0 in zip(params, anchor):
            p.grad.add_(p.detach() - p0, alpha=proximal_mu)
    inner.step()


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    fast_path: bool = True,
) -> EvalResult:
    """Mean NLL per response token over ``examples`` and its perplexity (``fast_path`` as in
    ``train_local``)."""
    if not examples:
        return EvalResult(math.nan, math.nan, 0, 0)
    fast = _fast_path(model, fast_path)
    if fast is not None:
        fast.keep_freed_memory()
    model.eval()
    total, count = 0.0, 0
    per_record: list[float] = []
    for start in range(0, len(examples), batch_size):
        ids, mask, labels = collate(examples[start:start + batch_size], pad_id, device)
        counts = (labels[:, 1:] != IGNORE_INDEX).sum(1)
        losses = sequence_losses(model, ids, mask, labels, fast=fast)
        total += float((losses * counts).sum())
        count += int(counts.sum())
        per_record += [float(v) for v in losses.detach().float().cpu()]
    loss = total / max(count, 1)
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=count, num_examples=len(examples),
                      record_losses=tuple(per_record))
