"""What a model says and how likely it finds given answers, for the task metrics.

* ``generate_texts``: greedy generation with transformers' ``generate`` (KV cache), prompts
  left-padded in batches of similar length; each sequence stops at its own end-of-sequence token.
  The batching does not change the answers: left padding is masked and the positions come from the
  attention mask (tested against one prompt at a time and against a greedy loop without a cache).
* ``option_log_likelihoods``: for every prompt, the mean log-probability per token of each option as
  its continuation (one forward pass per (prompt, option) pair, batched), no generation.

``model`` is a transformers causal LM or a peft model wrapping one, with or without the fast path
(``fedllm.fastpath``: its layers compute the same values, and its attention falls back to the
model's own when a cache is used). Both functions run in ``torch.no_grad`` with the model in eval
mode, and put it back in the mode it was in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch


@contextlib.contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """``model`` in eval mode without gradients for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size``, longest first: little padding."""
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size}; it must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id sequences to the longest: (input_ids, attention_mask)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt: generation needs at least one prompt token")
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, length - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token")
    return int(pad)


def generate_ids(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 batch_size: int, device: torch.device | str = "cpu") -> list[tuple[int, ...]]:
    """Greedy continuations of ``prompts`` (token ids), in their order: at most ``max_new_tokens`` new
    ids each, ending after the end-of-sequence token when one was generated (no padding)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens}; it must be at least 1")
    pad_id, eos_id = _pad_id(tokenizer), tokenizer.eos_token_id
    out: list[tuple[int, ...]] = [()] * len(prompts)
    with evaluating(model):
        for batch in _batches_by_length([len(p) for p in prompts], batch_size):
            ids, mask = left_pad([prompts[i] for i in batch], pad_id, device)
            generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                       max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=pad_id,
                                       eos_token_id=eos_id, num_beams=1, temperature=None, top_p=None, top_k=None)
            for row, index in enumerate(batch):
                new = generated[row, ids.size(1):].tolist()
                if eos_id is not None and eos_id in new:
                    new = new[:new.index(eos_id) + 1]  # after its end, generate pads the finished sequence
                out[index] = tuple(new)
    return out


def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   batch_size: int, device: torch.device | str = "cpu") -> list[str]:
    """Greedy continuations of ``prompts`` as text (special tokens skipped), in their order."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
    return [tokenizer.decode(list(new), skip_special_tokens=True) for new in ids]


def option_log_likelihoods(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], choices: Sequence[str],
                           batch_size: int, device: torch.device | str = "cpu") -> list[list[float]]:
    """``[prompt][option]``: the mean log-probability per token of each option's tokens (tokenized
    without special tokens, as a response is) as the continuation of the prompt. Mean, not sum, so that
    an option of more tokens is not penalized for its length.

    Each (prompt, option) pair is one sequence; a batch is left-padded (positions from the attention
    mask, as in generation) so that every option ends at the last position, and the output head runs
    on the last (longest option + 1) positions only: no vocabulary-size logits for the prompt."""
    options = [tuple(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices]
    empty = [c for c, ids in zip(choices, options) if not ids]
    if empty:
        raise ValueError(f"options with no tokens: {empty!r}")
    if all(len(o) == 1 for o in options):  # one token each (yes/no/maybe): one forward per prompt serves them all
        return _single_token_options(model, tokenizer, prompts, [o[0] for o in options], batch_size, device)
    pairs = [(tuple(p) + o, len(o)) for p in prompts for o in options]
    scores = [0.0] * len(pairs)
    with evaluating(model):
        for batch in _batches_by_length([len(pairs[i][0]) for i in range(len(pairs))], batch_size):
            for i in batch:
                if len(pairs[i][0]) == pairs[i][1]:
                    raise ValueError("an empty prompt: an option's first token needs a prompt token before it")
            ids, mask = left_pad([pairs[i][0] for i in batch], _pad_id(tokenizer), device)
            keep = max(pairs[i][1] for i in batch) + 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                           logits_to_keep=keep).logits[:, -keep:]
            log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            token_log_probs = log_probs.gather(-1, ids[:, -keep + 1:].unsqueeze(-1)).squeeze(-1)
            for row, index in enumerate(batch):
                scores[index] = float(token_log_probs[row, -pairs[index][1]:].mean())
    return [scores[i * len(options):(i + 1) * len(options)] for i in range(len(prompts))]


def _single_token_options(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], tokens: Sequence[int],
                          batch_size: int, device: torch.device | str) -> list[list[float]]:
    """``option_log_likelihoods`` when every option is one token: the log-probability of each option
    token after the prompt's last token, from one forward per prompt (the same values as one forward per
    (prompt, option) pair, whose last position's logits depend on the prompt only)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt: an option's first token needs a prompt token before it")
    scores: list[list[float]] = [[] for _ in prompts]
    index = torch.tensor(list(tokens), device=device)
    with evaluating(model):
        for batch in _batches_by_length([len(p) for p in prompts], batch_size):
            ids, mask = left_pad([tuple(prompts[i]) for i in batch], _pad_id(tokenizer), device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                           logits_to_keep=1).logits[:, -1]
            chosen = torch.log_softmax(logits.float(), dim=-1)[:, index]
            for row, i in enumerate(batch):
                scores[i] = [float(v) for v in chosen[row]]
    return scores
