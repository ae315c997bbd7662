"""What a model says about canaries: where a canary's secret code sits in its tokens, the
log-likelihood of every possible code (for exposure), and per-record response log-likelihoods
under the trained adapter and under the base model (for the one-run test and the MIA).

Reads the model, never trains it. A canary here is anything with ``code`` (a string of digits)
and ``record(code)`` (the chat record with that code in its response), see
:class:`fedllm.audit.canaries.Canary`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedllm.errors import FedLLMError

DIGITS = 10


@dataclass(frozen=True)
class SecretSpan:
    """Token ids of a canary up to its code, the token id of each digit 0-9, and the code length."""

    prefix_ids: tuple[int, ...]
    digit_ids: tuple[int, ...]
    code_length: int


def locate_secret(canary: Any, tokenizer: Any, *, max_length: int) -> SecretSpan:
    """Where the code sits in the tokenized canary (as :func:`fedllm.data.formatting.tokenize_record`
    builds it for training). Needs every digit to be one token whatever its neighbours (true for
    SmolLM2, Llama and the byte tokenizer) and the code inside the trained response."""
    from fedllm.data.formatting import IGNORE_INDEX, tokenize_record

    length = len(canary.code)

    def tok(code: str):
        return tokenize_record(canary.record(code), tokenizer, max_length=max_length)

    needed = len(tokenize_record(canary.record(), tokenizer, max_length=1 << 30).input_ids)
    uniform = [tok(str(d) * length).input_ids for d in range(DIGITS)]
    own = tok(canary.code)
    problem = "codes of the same length tokenize to different lengths"
    if needed > max_length:
        problem = f"the canary needs {needed} tokens, more than data.max-length"
    elif len({len(ids) for ids in uniform} | {len(own.input_ids)}) == 1:
        diff = [i for i in range(len(own.input_ids)) if len({ids[i] for ids in uniform}) > 1]
        start = diff[0] if diff else -1
        digit_ids = tuple(ids[start] for ids in uniform)
        if diff != list(range(start, start + length)):
            problem = "the code's digits are not separate tokens"
        elif any(len(set(ids[start:start + length])) != 1 for ids in uniform) or len(set(digit_ids)) != DIGITS:
            problem = "a digit's token depends on its neighbours"
        elif tuple(own.input_ids[start:start + length]) != tuple(digit_ids[int(c)] for c in canary.code):
            problem = "the canary's own code tokenizes differently"
        elif any(own.labels[i] == IGNORE_INDEX for i in range(start, start + length)):
            problem = "the code is not in the trained response"
        else:
            return SecretSpan(tuple(own.input_ids[:start]), digit_ids, length)
    raise FedLLMError(f"canary audit: {problem} with this model's tokenizer (canary {canary.record()!r}, "
                      f"data.max-length {max_length}). The exposure audit needs a tokenizer that encodes "
                      "each digit as one token (SmolLM2, Llama and the byte tokenizer do) and a "
                      "data.max-length that fits the canary (about 100 tokens); raise data.max-length.")


def _trie(codes: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    """The inner nodes of the trie of ``codes`` (every proper, non-empty prefix), shortest first,
    and each node's index."""
    nodes = sorted({code[:i] for code in codes for i in range(1, len(code))}, key=lambda n: (len(n), n))
    return nodes, {node: i for i, node in enumerate(nodes)}


def all_codes(length: int) -> list[str]:
    """Every code of ``length`` digits, in numeric order (index = the code as an integer)."""
    return [f"{i:0{length}d}" for i in range(DIGITS**length)]


def code_log_likelihoods(model: Any, span: SecretSpan, codes: Sequence[str], *, device: Any = "cpu") -> np.ndarray:
    """log p(code | prefix) for each of ``codes`` (all of the same length), in one forward pass.

    Tree attention: the input is the prefix followed by one token per inner node of the codes'
    trie (for all 10^4 four-digit codes: 10 + 100 + 1,000 tokens). A 4-D attention mask lets each
    node see the prefix, its ancestors and itself, and its position id is its depth after the
    prefix, so its logits are exactly p(next digit | prefix, the digits on its path). That is
    1,110 tokens per canary instead of 10^4 sequences. :func:`check_enumeration` compares the
    result with a plain forward pass, which the audit does on every run."""
    import torch

    nodes, index = _trie(codes)
    prefix, total = len(span.prefix_ids), len(span.prefix_ids) + len(nodes)
    allowed = torch.zeros((total, total), dtype=torch.bool)
    allowed[:prefix, :prefix] = torch.ones((prefix, prefix), dtype=torch.bool).tril()
    allowed[prefix:, :prefix] = True
    rows, cols = [], []
    for i, node in enumerate(nodes):  # a node sees itself and every shorter prefix of itself
        for j in range(1, len(node) + 1):
            rows.append(prefix + i)
            cols.append(prefix + index[node[:j]])
    allowed[rows, cols] = True
    dtype = next(model.parameters()).dtype
    mask = torch.zeros((total, total), dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    ids = torch.tensor([*span.prefix_ids, *(span.digit_ids[int(node[-1])] for node in nodes)], device=device)
    positions = torch.tensor([*range(prefix), *(prefix - 1 + len(node) for node in nodes)], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids[None], attention_mask=mask[None, None].to(device), position_ids=positions[None],
                       use_cache=False, logits_to_keep=len(nodes) + 1).logits[0]
        digits = torch.log_softmax(logits.float(), -1)[:, list(span.digit_ids)].cpu().numpy()
    # row 0: the next digit after the prefix; row 1 + index[node]: the next digit after that node
    rows_of = np.array([[0, *(1 + index[code[:i]] for i in range(1, len(code)))] for code in codes])
    symbols = np.array([[int(c) for c in code] for code in codes])
    return digits[rows_of, symbols].sum(axis=1)


def direct_code_log_likelihood(model: Any, span: SecretSpan, code: str, *, device: Any = "cpu") -> float:
    """log p(code | prefix) from one plain forward pass over prefix + code."""
    import torch

    ids = torch.tensor([[*span.prefix_ids, *(span.digit_ids[int(c)] for c in code)]], device=device)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    start = len(span.prefix_ids)
    return float(sum(logp[start - 1 + i, ids[0, start + i]] for i in range(len(code))))


def check_enumeration(model: Any, span: SecretSpan, code: str, score: float, *, device: Any = "cpu") -> None:
    """Raise if tree attention disagrees with a plain forward pass (a model that ignores custom
    4-D masks or position ids would give wrong exposures silently)."""
    direct = direct_code_log_likelihood(model, span, code, device=device)
    if not abs(direct - score) <= 1e-3 * max(1.0, abs(direct)):
        raise FedLLMError(f"canary audit: enumerating codes with tree attention gives log p = {score:.4f} "
                          f"but a plain forward pass gives {direct:.4f}; this model does not honour custom 4-D "
                          "attention masks, so its exposures cannot be computed. Use a Llama-style model.")


def response_log_likelihoods(model: Any, examples: Sequence[Any], *, batch_size: int, pad_id: int,
                             device: Any = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Per example: the summed log-likelihood of its response (label) tokens, and their number."""
    import torch

    from fedllm.site.training import collate, token_losses

    sums, counts = np.zeros(len(examples)), np.zeros(len(examples))
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask, labels = collate([examples[i] for i in rows], pad_id, device)
            nll, label_mask = token_losses(model(input_ids=ids, attention_mask=mask).logits, labels)
            sums[rows] = (-(nll * label_mask).sum(1)).cpu().numpy()
            counts[rows] = label_mask.sum(1).cpu().numpy()
    return sums, counts


def base_and_trained(model: Any, score: Callable[[], Any]) -> tuple[Any, Any]:
    """``score()`` under the base model (the peft adapter disabled) and under the trained adapter."""
    with model.disable_adapter():
        base = score()
    return base, score()
