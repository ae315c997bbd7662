"""Task metrics (``[evaluate]``): how well a model answers held-out records, beyond their loss.

* ``metrics.py``: one record's score from text, pure (no torch): SQuAD-normalized exact match
  (optionally against an answer set), ROUGE-L F1 (``rouge-score``), the correct-choice indicator.
* ``generation.py``: what the model says (batched greedy generation with a KV cache) and how likely
  it finds each option of an answer set (mean log-probability per token), on a transformers or peft
  model, with or without the fast path.
* ``task.py``: ``score_task``, the entry point: held-out examples and the ``[evaluate]`` settings in,
  one score in [0, 1] per record and metric out (``TaskScores``).

Nothing here releases anything: what leaves a site, and with how much noise, is the site's
``release-metrics`` setting (``fedllm.site.metric_release``).
"""
