"""Task metrics on one record: text (or option scores) in, a score in [0, 1] out. No torch.

* ``normalize_answer``: SQuAD's answer normalization (lower case, punctuation and the articles
  a/an/the removed, whitespace collapsed), so "The Yes." and "yes" compare equal.
* ``reference_text``: what of a record's response is the reference (``evaluate.reference``).
* ``exact_match``: normalized generation == normalized reference; with an answer set
  (``evaluate.choices``) the generation's answer is the first option it starts with, so a
  generation "Yes, because ..." is the answer "yes".
* ``rouge_l``: ROUGE-L F1 from Google's ``rouge-score`` (stemmed), the implementation papers
  report, rather than an LCS of our own.
* ``choice_correct``: whether the most likely option (``evaluate.choices``) is the reference.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Sequence
from typing import Any

REFERENCES = ("response", "first-word")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def reference_text(response: str, reference: str) -> str:
    """The reference answer in a record's ``response``: ``"response"``, all of it (stripped);
    ``"first-word"``, its first whitespace-separated word without surrounding punctuation
    (PubMedQA's "yes. <conclusion>" -> "yes"); "" for an empty response."""
    if reference == "response":
        return response.strip()
    if reference == "first-word":
        words = response.split()
        return words[0].strip(string.punctuation) if words else ""
    raise ValueError(f"evaluate.reference = {reference!r}; allowed: {', '.join(REFERENCES)}")


def answer_of(prediction: str, choices: Sequence[str] = ()) -> str:
    """The normalized answer in a generation: with ``choices``, the first option (normalized) that the
    normalized generation is or starts with as a whole word ("yes because ..." -> "yes", but
    "nonetheless" is not "no"); otherwise, or when none matches, the whole normalized generation."""
    text = normalize_answer(prediction)
    for option in choices:
        wanted = normalize_answer(option)
        if wanted and (text == wanted or text.startswith(wanted + " ")):
            return wanted
    return text


def exact_match(prediction: str, reference: str, choices: Sequence[str] = ()) -> float:
    """1.0 when the generation's answer (``answer_of``) equals the normalized reference, else 0.0."""
    return 1.0 if answer_of(prediction, choices) == normalize_answer(reference) else 0.0


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer  # the only use of rouge-score; its import loads nltk

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of stemmed, lower-cased word tokens) of ``prediction``
    against ``reference``, by ``rouge-score``; 0.0 when either has no word."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def choice_correct(option_scores: Sequence[float], choices: Sequence[str], reference: str) -> float:
    """1.0 when the highest-scoring option (the first on a tie) is the reference (both normalized)."""
    if len(option_scores) != len(choices) or not choices:
        raise ValueError(f"{len(option_scores)} option scores for {len(choices)} choices; need one per choice")
    best = max(range(len(choices)), key=lambda i: option_scores[i])
    return 1.0 if normalize_answer(choices[best]) == normalize_answer(reference) else 0.0
