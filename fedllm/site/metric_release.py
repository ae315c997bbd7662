"""Which numbers computed on a site's records leave the site, and how: the site's ``release-metrics``.

Besides its adapter update (DP-SGD, :mod:`fedllm.site.training`), a site answers each round with
metrics (``fedllm.wire.TRAIN_METRIC_KEYS`` / ``EVALUATE_METRIC_KEYS``). The site file decides
which of them carry a value computed on its records (``release-metrics``, default ``"dp"``); a
metric that is not released is sent as ``NOT_RELEASED`` (-1, "not defined" on the wire), and
``wire.METRICS_RELEASE`` tells the coordinator which setting the site applied.

``"exact"``: every metric as computed (fedllm's behaviour before this setting existed). Nothing
in them is protected: train loss, examples seen, tokens, seconds, the held-out loss, perplexity,
token and record counts are exact functions of the site's records. A site must write it out; the
audit report and the model card name the sites that did.

``"dp"`` (default):

* **Held-out loss: the Gaussian mechanism.** Each held-out record's own mean token loss ℓ_i is
  clipped to [0, B] (``metric-loss-bound``, default 10 nats; a non-finite loss counts as B). The
  site releases the pair (S̃, ñ) = (Σ clip(ℓ_i) + N(0, (σ·√2·B)²), n + N(0, (σ·√2)²)).
  *Neighbouring relation*: add/remove one held-out record, which moves (S/B, n) by (ℓ_i/B, 1), of
  L2 norm at most √2. With noise of standard deviation σ·√2 on both coordinates of (S/B, n) this
  is the Gaussian mechanism with noise multiplier σ (``metric-noise-multiplier``, default 20):
  exactly one DP-SGD step with sample rate q = 1 and clipping norm √2, so its privacy loss is
  that of ``DPEvent(σ, 1, 1)`` and it composes with the site's training releases in the same
  accountant. *Unit of privacy*: one held-out record, which is also one of the site's records:
  the release is recorded in the site's ledger (``release = "metrics"``, σ, q = 1, 1 step,
  C = B) *before* the answer leaves, composed into the site's cumulative ε and counted against
  its cap; a release that would cross the cap is refused. Measured with the PRV accountant at
  δ = 1e-5 (``tests/unit/test_metric_release.py``): σ = 20 costs ε ≈ 0.17 for one release on its
  own; eleven releases added to a training history at ε ≈ 4.50 bring it to ≈ 4.55 (σ = 10:
  0.35 alone, ≈ 4.71 composed). What leaves: eval-loss = the noisy mean S̃ / max(ñ, 1), clipped
  to [0, B] (post-processing, free); perplexity = exp(eval-loss) (post-processing); num-examples
  = round(max(ñ, 0)) (post-processing of the released noisy count); eval-tokens = -1 (not
  released). The released loss is the mean over records of each record's mean token loss, not
  the token-weighted mean an exact evaluation reports. With the defaults the noise on the mean
  is about 283 / n nats (n held-out records): a coarse signal, that is the price of the
  guarantee.
* **Task metrics** (the run's ``[evaluate] metrics``: exact-match, choice, rouge-l; each record's
  score is in [0, 1]): released in the same Gaussian mechanism, as more coordinates of one vector.
  With k task metrics the site releases (S/B, n, M_1, …, M_k), M_j the sum of metric j over the
  scored records (the first ``evaluate.max-examples`` held-out records). Adding or removing one
  held-out record moves S/B and n by at most 1 each, and each M_j by at most 1 (the record's own
  score, or the score of the record it pushes out of the first ``max-examples``), so the L2
  sensitivity is √(2+k); every coordinate gets noise of standard deviation σ·√(2+k) (B·σ·√(2+k)
  on the loss sum). That is the Gaussian mechanism with noise multiplier σ, the same ledger event
  (σ, q = 1, 1 step) as the loss alone: task metrics cost no extra ε, they make every released
  number noisier by √((2+k)/2). What leaves: each metric's noisy sum divided by the scored
  count estimated from the released ñ (min(max(ñ, 1), max-examples)), clipped to [0, 1], and
  ``task-examples`` = that estimate, rounded. With σ = 20 and one metric the noise on an accuracy
  over n scored records is about 35 / n: meaningful only for a site with thousands of held-out
  records. Under "exact" the means are sent as computed; under "none" they are -1 and nothing is
  scored.
* **Train metrics.** Released as they are: ``local-steps``, ``max-grad-norm`` (the run's
  settings, no record information) and ``delta`` (the site's policy). Released as the site's DP
  guarantee: ``epsilon``, ``noise-multiplier``, ``sample-rate``. They carry no record's content,
  but they are functions of the number n of training records (q = batch-size / n; a calibrated
  σ and the ε follow from q), so a coordinator can infer n from them; fedllm's accounting, like
  Opacus's, treats q, and so n, as a public parameter of the mechanism. A site whose record count
  is itself sensitive uses ``"none"``. Not released (-1): ``train-loss``, ``examples-seen``,
  ``tokens``, ``train-seconds`` (exact functions of the records that the DP-SGD mechanism does
  not cover). ``num-examples`` is sent as 1: FedAvg then weights every site equally (as central
  DP already does, ``fedllm.flower.strategies``); a noisy count would cost ε every round for a
  weight nobody needs exactly.

``"none"``: nothing beyond what aggregation needs: train ``num-examples`` = 1, every other train
and evaluate metric -1 (evaluate ``num-examples`` = 0), and the held-out data is not evaluated.

**Evaluation is answered at most once per server round of a run** (:class:`EvaluationLog`, a
file beside the site's ledger, under every setting): asked again for the same run and round with
the same global adapter (a coordinator that resumed), the site sends the answer it already
released, which costs nothing; asked with another adapter, it refuses. Without that, any number
of noisy answers about adapters of the coordinator's choosing could be averaged.

Limits: the noise comes from numpy's PCG64 seeded from the OS entropy pool (not a
cryptographically secure generator; floating-point sampling is not hardened against the attacks
of Mironov 2012). Numbers in, numbers out, except :class:`EvaluationLog` and :func:`record_metric_release`,
which write the site's own files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedllm import wire
from fedllm.errors import BudgetExceededError, LedgerError
from fedllm.files import write_text_atomic
from fedllm.privacy.accounting import DPEvent, epsilon_for
from fedllm.privacy.ledger import PrivacyLedger
from fedllm.privacy.ledger_chain import LedgerEntry

NOT_RELEASED = -1
SENSITIVITY = math.sqrt(2.0)  # L2 norm of the change of (S/B, n) when one held-out record is added or removed

# train metrics under "dp": released as they are (policy / run settings, no record information)
POLICY_TRAIN_KEYS = (wire.LOCAL_STEPS, wire.MAX_GRAD_NORM, wire.DELTA, wire.EPSILON_CAP)
# train metrics under "dp": the DP guarantee itself (functions of the training-set size n)
GUARANTEE_TRAIN_KEYS = (wire.EPSILON, wire.NOISE_MULTIPLIER, wire.SAMPLE_RATE)
# exact functions of the site's records that no mechanism covers: never released under "dp"
DATA_TRAIN_KEYS = (wire.TRAIN_LOSS, wire.EXAMPLES_SEEN, wire.TOKENS, wire.TRAIN_SECONDS)
EXACT_EVALUATE_KEYS = (wire.EVAL_LOSS, wire.PERPLEXITY, wire.EVAL_TOKENS, wire.NUM_EXAMPLES)


def os_entropy_rng() -> np.random.Generator:
    """A numpy generator seeded from the OS entropy pool (tests replace it with a seeded one)."""
    return np.random.default_rng(np.frombuffer(os.urandom(32), dtype=np.uint32))


def clip_losses(losses: Sequence[float], *, loss_bound: float) -> np.ndarray:
    """Each record's loss clipped to [0, ``loss_bound``]; a non-finite loss counts as the bound."""
    values = np.asarray(list(losses), dtype=np.float64)
    values = np.where(np.isfinite(values), values, loss_bound)
    return np.clip(values, 0.0, loss_bound)


def sensitivity(num_task_metrics: int = 0) -> float:
    """L2 sensitivity of (S/B, n, M_1, …, M_k) to adding or removing one held-out record: √(2 + k)."""
    return math.sqrt(2.0 + num_task_metrics)


def noise_stds(*, noise_multiplier: float, loss_bound: float, num_task_metrics: int = 0) -> tuple[float, float]:
    """Standard deviations of the noise on (the clipped loss sum, the record count): σ·√(2+k)·B and
    σ·√(2+k); each task-metric sum M_j gets σ·√(2+k), the count's."""
    scale = noise_multiplier * sensitivity(num_task_metrics)
    return scale * loss_bound, scale


def metric_event(noise_multiplier: float) -> DPEvent:
    """The privacy loss of one held-out release: the Gaussian mechanism, as one step at q = 1."""
    return DPEvent(noise_multiplier, 1.0, 1)


def metric_release_epsilon(*, noise_multiplier: float, target_delta: float, accountant: str = "prv") -> float:
    """ε of one held-out release on its own at ``target_delta``."""
    return epsilon_for([metric_event(noise_multiplier)], target_delta=target_delta, accountant=accountant)


@dataclass(frozen=True)
class HeldOutRelease:
    """One noisy held-out release: the noisy sum and count, and what is derived from them."""

    noisy_sum: float
    noisy_count: float
    loss: float  # the noisy mean, clipped to [0, B]
    perplexity: float
    num_examples: int  # round(max(noisy count, 0))
    noise_multiplier: float
    loss_bound: float
    task: dict[str, float] = field(default_factory=dict)  # task metric -> noisy mean in [0, 1]
    task_examples: int = 0  # the scored records, estimated from the noisy count and max_scored


def release_held_out_loss(losses: Sequence[float], *, noise_multiplier: float, loss_bound: float,
                          rng: np.random.Generator, task_scores: Mapping[str, Sequence[float]] | None = None,
                          max_scored: int = 0) -> HeldOutRelease:
    """The Gaussian mechanism on (Σ clipped loss, count, Σ task score per task metric) (see the
    module docstring). ``task_scores``: per task metric, one score in [0, 1] per scored record (the
    first ``max_scored`` held-out records, 0: all); each sum moves by at most 1 when a held-out record
    is added or removed (the record itself, or the one it pushes out of the first ``max_scored``),
    so with k task metrics the vector has L2 sensitivity √(2+k) and every coordinate gets noise
    σ·√(2+k) (times B for the loss sum): still one Gaussian mechanism with noise multiplier σ, the
    same ledger event as the loss alone, at the price of more noise on each number."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}")
    if not (math.isfinite(loss_bound) and loss_bound > 0):
        raise ValueError(f"loss_bound must be a finite number > 0, got {loss_bound!r}")
    task_scores = dict(task_scores or {})
    clipped = clip_losses(losses, loss_bound=loss_bound)
    sum_std, count_std = noise_stds(noise_multiplier=noise_multiplier, loss_bound=loss_bound,
                                    num_task_metrics=len(task_scores))
    noisy_sum = float(clipped.sum() + rng.normal(0.0, sum_std))
    noisy_count = float(len(clipped) + rng.normal(0.0, count_std))
    loss = min(max(noisy_sum / max(noisy_count, 1.0), 0.0), loss_bound)
    scored = max(noisy_count, 1.0) if max_scored <= 0 else min(max(noisy_count, 1.0), float(max_scored))
    task = {}
    for name, scores in task_scores.items():
        values = np.clip(np.nan_to_num(np.asarray(list(scores), dtype=np.float64), nan=0.0), 0.0, 1.0)
        task[name] = min(max(float(values.sum() + rng.normal(0.0, count_std)) / scored, 0.0), 1.0)
    return HeldOutRelease(noisy_sum=noisy_sum, noisy_count=noisy_count, loss=loss, perplexity=math.exp(loss),
                          num_examples=max(0, round(noisy_count)), noise_multiplier=noise_multiplier,
                          loss_bound=loss_bound, task=task, task_examples=round(scored) if task else 0)


# --------------------------------------------------------------------------------------------
# the metric dicts a site sends


def train_metrics(mode: str, exact: Mapping[str, float | int]) -> dict[str, float | int]:
    """The train metrics that leave under ``mode``, from the exact ones (every train key but
    ``wire.METRICS_RELEASE``)."""
    code = {wire.METRICS_RELEASE: wire.RELEASE_CODES[_checked(mode)]}
    if mode == "exact":
        return {**dict(exact), **code}
    out: dict[str, float | int] = {key: NOT_RELEASED for key in wire.TRAIN_METRIC_KEYS}
    out[wire.NUM_EXAMPLES] = 1  # equal FedAvg weights; screening needs an int >= 1
    if mode == "dp":
        out.update({key: exact[key] for key in (*POLICY_TRAIN_KEYS, *GUARANTEE_TRAIN_KEYS)})
    return {**out, **code}


def exact_evaluate_metrics(*, num_examples: int, loss: float, perplexity: float, tokens: int,
                           task: Mapping[str, float] | None = None, task_examples: int = 0) -> dict[str, float | int]:
    """Under "exact": the evaluation as computed (-1 for a non-finite value), with the task metrics'
    means (``task``: metric -> mean score) and how many records they scored."""
    out: dict[str, float | int] = {
        wire.NUM_EXAMPLES: num_examples, wire.EVAL_LOSS: _finite(loss), wire.PERPLEXITY: _finite(perplexity),
        wire.EVAL_TOKENS: tokens, wire.METRICS_RELEASE: wire.RELEASE_CODES["exact"]}
    return {**out, **_task_part(task, task_examples)}


def dp_evaluate_metrics(release: HeldOutRelease) -> dict[str, float | int]:
    """Under "dp": the noisy mean loss, its perplexity, the rounded noisy count and the noisy task
    metrics; no token count."""
    out: dict[str, float | int] = {
        wire.NUM_EXAMPLES: release.num_examples, wire.EVAL_LOSS: release.loss, wire.PERPLEXITY: release.perplexity,
        wire.EVAL_TOKENS: NOT_RELEASED, wire.METRICS_RELEASE: wire.RELEASE_CODES["dp"]}
    return {**out, **_task_part(release.task, release.task_examples)}


def no_evaluate_metrics(task_metrics: Sequence[str] = ()) -> dict[str, float | int]:
    """Under "none": nothing (num-examples 0: the screening's "evaluated nothing"); the run's task
    metrics, when it asks for some, as -1."""
    out: dict[str, float | int] = {
        wire.NUM_EXAMPLES: 0, wire.EVAL_LOSS: NOT_RELEASED, wire.PERPLEXITY: NOT_RELEASED,
        wire.EVAL_TOKENS: NOT_RELEASED, wire.METRICS_RELEASE: wire.RELEASE_CODES["none"]}
    if task_metrics:
        out.update({name: NOT_RELEASED for name in task_metrics})
        out[wire.TASK_EXAMPLES] = NOT_RELEASED
    return out


def _task_part(task: Mapping[str, float] | None, task_examples: int) -> dict[str, float | int]:
    if not task:
        return {}
    return {**{name: _finite(value) for name, value in task.items()}, wire.TASK_EXAMPLES: int(task_examples)}


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else float(NOT_RELEASED)


def _checked(mode: str) -> str:
    if mode not in wire.RELEASE_CODES:
        raise ValueError(f"release-metrics must be one of {', '.join(wire.RELEASE_CODES)}, not {mode!r}")
    return mode


# --------------------------------------------------------------------------------------------
# the ledger


def check_metric_release(ledger: PrivacyLedger, *, run_id: str, server_round: int, noise_multiplier: float,
                         target_delta: float, max_epsilon: float, accountant: str = "prv") -> float:
    """The site's cumulative ε after one more held-out release; ``BudgetExceededError`` when that
    would cross ``max_epsilon`` (<= 0 or ∞: no cap)."""
    event = metric_event(noise_multiplier)
    after = ledger.epsilon_after(noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate,
                                 steps=event.steps, target_delta=target_delta, accountant=accountant)
    if 0 < max_epsilon < math.inf and after > max_epsilon:
        spent = ledger.epsilon(target_delta=target_delta, accountant=accountant)
        raise BudgetExceededError(
            f"Site '{ledger.site}' refuses to release its held-out metrics for round {server_round} of run {run_id}: "
            f"its cumulative ε would go from {spent:.3f} to {after:.3f}, over its cap {max_epsilon:g} "
            f"(δ={target_delta:g}, {accountant}; metric-noise-multiplier = {noise_multiplier:g}). Set "
            "release-metrics = \"none\" in the site file, raise metric-noise-multiplier, or stop evaluating.")
    return after


def record_metric_release(ledger: PrivacyLedger, *, run_id: str, server_round: int, noise_multiplier: float,
                          loss_bound: float, num_examples: int, target_delta: float, max_epsilon: float,
                          accountant: str = "prv", site_max_epsilon: float | None = None) -> LedgerEntry:
    """Record one held-out release in the site's ledger (``release = "metrics"``: σ, q = 1, 1 step,
    C = ``loss_bound``, the held-out record count), or raise ``BudgetExceededError`` with nothing
    recorded when it would cross ``max_epsilon`` (:func:`check_metric_release`). ``target_delta`` is
    the site's own δ, recorded as its δ policy with ``site_max_epsilon`` (its own cap), as for an update."""
    check_metric_release(ledger, run_id=run_id, server_round=server_round, noise_multiplier=noise_multiplier,
                         target_delta=target_delta, max_epsilon=max_epsilon, accountant=accountant)
    event = metric_event(noise_multiplier)
    return ledger.record(run_id=run_id, server_round=server_round, steps=event.steps,
                         sample_rate=event.sample_rate, noise_multiplier=noise_multiplier, max_grad_norm=loss_bound,
                         target_delta=target_delta, num_examples=num_examples, accountant=accountant,
                         release="metrics", site_max_delta=target_delta, site_max_epsilon=site_max_epsilon)


def metric_release_recorded(ledger: PrivacyLedger, *, run_id: str, server_round: int) -> bool:
    """Whether the ledger holds a held-out release for this run and round."""
    return any(e.release == "metrics" and e.run_id == run_id and e.server_round == server_round
               for e in ledger.entries)


# --------------------------------------------------------------------------------------------
# at most one evaluation per server round


@dataclass(frozen=True)
class Answered:
    """An evaluation already answered: for which global adapter, and what was sent."""

    input_digest: str
    metrics: dict[str, float | int]


class EvaluationLog:
    """The evaluations a site answered, per (run, server round): ``FOLDER/<site>.evaluations.jsonl``
    beside its ledger, one JSON object a line, rewritten atomically. It holds only what was
    already sent (and the digest of the adapter it was about), so it is no more sensitive than
    the replies themselves."""

    def __init__(self, folder: Path, *, site: str) -> None:
        self.path = Path(folder) / f"{site}.evaluations.jsonl"

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            lines = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, ValueError) as exc:
            raise LedgerError(
                f"{self.path} (the evaluations this site answered) cannot be read ({exc}); the site cannot tell "
                "which rounds it already answered, so it refuses to evaluate. Restore the file from a backup.") from exc
        return lines

    def lookup(self, *, run_id: str, server_round: int) -> Answered | None:
        for item in self._read():
            if item.get("run-id") == run_id and item.get("server-round") == server_round:
                return Answered(input_digest=str(item["input-digest"]), metrics=dict(item["metrics"]))
        return None

    def store(self, *, run_id: str, server_round: int, input_digest: str, metrics: Mapping[str, float | int]) -> None:
        items = [*self._read(), {"run-id": run_id, "server-round": server_round, "input-digest": input_digest,
                                 "metrics": dict(metrics)}]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, "".join(json.dumps(item, sort_keys=True, allow_nan=False) + "\n" for item in items))


def refuse_second_evaluation(site: str, *, run_id: str, server_round: int) -> BudgetExceededError:
    """The refusal of a second evaluation, with another global adapter, in a round already answered."""
    return BudgetExceededError(
        f"Site '{site}' already answered the evaluation of round {server_round} of run {run_id} for another global "
        "adapter: a site evaluates at most once per server round (each answer is computed on its held-out records). "
        "Refusing; the coordinator evaluates the next round's adapter instead.")
