"""Task metrics of a model on held-out examples (``[evaluate]``): the entry point for a site's
evaluation and ``fedllm compare``.

``score_task`` takes the first ``evaluate.max-examples`` held-out examples that have a prompt
(``task_items``: the tokens before the first response token; plain ``text`` records have none and
are skipped), and scores each with every metric in ``evaluate.metrics``: ``exact-match`` and
``rouge-l`` from one greedy generation pass (``fedllm.evaluation.generation``), ``choice`` from the
options' likelihoods. Each score is in [0, 1], one per record, so that a site can bound each
record's contribution when it releases the mean with noise.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedllm.config.run import EvaluateConfig, evaluate_problems
from fedllm.data.formatting import IGNORE_INDEX, TokenizedExample
from fedllm.errors import ConfigError
from fedllm.evaluation.generation import generate_texts, option_log_likelihoods
from fedllm.evaluation.metrics import choice_correct, exact_match, reference_text, rouge_l

GENERATED = ("exact-match", "rouge-l")  # the metrics that read a generation


@dataclass(frozen=True)
class TaskScores:
    """Scores of one evaluation: ``per_record[metric]`` holds one score in [0, 1] per scored record
    (the same records, in the same order, for every metric)."""

    per_record: dict[str, list[float]]
    num_scored: int
    seconds: float

    def means(self) -> dict[str, float]:
        """Each metric's mean over the scored records; {} when nothing was scored."""
        if not self.num_scored:
            return {}
        return {name: sum(scores) / len(scores) for name, scores in self.per_record.items()}


def task_items(examples: Sequence[TokenizedExample], tokenizer: Any) -> list[tuple[tuple[int, ...], str]]:
    """``(prompt ids, response text)`` per example that has a prompt: the ids before its first label
    token, and its label tokens decoded without special tokens. Examples labelled from their first
    token (plain ``text`` records) have no prompt and are skipped."""
    items = []
    for example in examples:
        first = next((i for i, t in enumerate(example.labels) if t != IGNORE_INDEX), len(example.labels))
        if first == 0 or first == len(example.labels):
            continue
        response = [t for t in example.labels if t != IGNORE_INDEX]
        items.append((example.input_ids[:first], tokenizer.decode(response, skip_special_tokens=True)))
    return items


def check_settings(settings: EvaluateConfig) -> None:
    """What ``score_task`` needs of ``[evaluate]``, checked by the config's own validator (a settings
    object built in code skips the parse); raises ``ConfigError``."""
    problems = evaluate_problems({"evaluate.metrics": settings.metrics, "evaluate.choices": settings.choices})
    if problems:
        raise ConfigError("Invalid [evaluate] settings:\n  - " + "\n  - ".join(problems))


def score_task(model: Any, tokenizer: Any, examples: Sequence[TokenizedExample], settings: EvaluateConfig, *,
               device: str = "cpu") -> TaskScores:
    """Every metric in ``settings.metric_names`` on the first ``settings.max_examples`` items of
    ``examples`` (0: all). No metrics asked: nothing is computed (empty ``per_record``)."""
    start = time.perf_counter()
    check_settings(settings)
    names = settings.metric_names
    if not names:
        return TaskScores(per_record={}, num_scored=0, seconds=0.0)
    items = task_items(examples, tokenizer)
    if settings.max_examples:
        items = items[:settings.max_examples]
    prompts = [prompt for prompt, _ in items]
    references = [reference_text(response, settings.reference) for _, response in items]
    choices = settings.choice_list
    per_record: dict[str, list[float]] = {}
    if any(m in GENERATED for m in names):
        texts = generate_texts(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                               batch_size=settings.batch_size, device=device)
        if "exact-match" in names:
            per_record["exact-match"] = [exact_match(t, r, choices) for t, r in zip(texts, references)]
        if "rouge-l" in names:
            per_record["rouge-l"] = [rouge_l(t, r) for t, r in zip(texts, references)]
    if "choice" in names:
        scores = option_log_likelihoods(model, tokenizer, prompts, choices, settings.batch_size, device)
        per_record["choice"] = [choice_correct(s, choices, r) for s, r in zip(scores, references)]
    ordered = {m: per_record[m] for m in names}  # the order the run config lists them in
    return TaskScores(per_record=ordered, num_scored=len(items), seconds=time.perf_counter() - start)
