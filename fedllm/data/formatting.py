"""Records -> prompt/response text (the model's chat template) -> tokens with response-only labels.

Chat records are rendered with the tokenizer's chat template when it has one, otherwise with a
plain "### User / ### Assistant" layout. Labels are -100 (ignored by the loss) everywhere except
the assistant turns, so a site trains only on responses; plain ``text`` records train on every
token. Sequences longer than ``max_length`` drop the start of the prompt first and keep as much
of the response as fits in half the window or more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedllm.data.loading import Record
from fedllm.errors import DataError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    """One training or held-out example: token ids and per-token labels (-100 = no loss)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _fallback_render(messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    parts = [f"### {m['role'].capitalize()}:\n{m['content']}\n\n" for m in messages]
    if add_generation_prompt:
        parts.append("### Assistant:\n")
    return "".join(parts)


def render(tokenizer: Any, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool) -> str:
    """Chat messages -> text, with the model's template or the plain fallback."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    return _fallback_render(messages, add_generation_prompt)


def _segments(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_response) pieces."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError(
                "the chat template does not render conversations incrementally; "
                "use instruction records or a model whose template does"
            )
        pieces.append((prompt[len(done):], False))
        response = full[len(prompt):]
        if not getattr(tokenizer, "chat_template", None) and tokenizer.eos_token:
            response = response.rstrip("\n") + tokenizer.eos_token
        pieces.append((response, True))
        done = full
    return pieces


def tokenize_record(record: Record, tokenizer: Any, *, max_length: int) -> TokenizedExample:
    """One normalised record -> a ``TokenizedExample`` of at most ``max_length`` tokens."""
    if "text" in record:
        ids: list[int] = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = [*ids, tokenizer.eos_token_id]
        ids = ids[:max_length]
        return TokenizedExample(tuple(ids), tuple(ids))
    ids = []
    labels: list[int] = []
    for text, is_response in _segments(tokenizer, record["messages"]):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if is_response else [IGNORE_INDEX] * len(piece)
    if len(ids) > max_length:
        ids, labels = _truncate(ids, labels, max_length)
    return TokenizedExample(tuple(ids), tuple(labels))


def _truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Keep the response: cut the start of the prompt first, then the end of the response."""
    first = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))
    prompt_keep = max(max_length - (len(ids) - first), min(first, max_length // 2))
    start = first - prompt_keep
    ids, labels = ids[start:], labels[start:]
    return ids[:max_length], labels[:max_length]


def tokenize_records(
    records: Sequence[Record], tokenizer: Any, *, max_length: int, source: str = "data"
) -> list[TokenizedExample]:
    """Tokenize every record; a record left with no response token is an error naming it."""
    out = []
    for number, record in enumerate(records, start=1):
        try:
            example = tokenize_record(record, tokenizer, max_length=max_length)
        except DataError as exc:
            raise DataError(f"{source}: record {number}: {exc}") from None
        if example.num_label_tokens == 0:
            raise DataError(
                f"{source}: record {number}: no response tokens left after formatting "
                f"(max length {max_length}); shorten the prompt or raise data.max-length"
            )
        out.append(example)
    return out
