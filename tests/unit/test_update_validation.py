"""Server-side screening of site replies: the update norm bound, the agreed metrics, the records a
reply may hold and the site's name, on real Flower messages (no processes) turned into the
coordinator's ``Reply`` objects as the Flower Grid adapter does (``fedllm.flower.grid``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedllm import wire
from fedllm.config import StrategyConfig
from fedllm.coordinator.screening import triage_replies, update_norm, validate_update
from fedllm.errors import InvalidUpdateError
from fedllm.flower.coordinator_strategy import FlowerStrategy
from fedllm.flower.grid import record_from_arrays, reply_from_message
from fedllm.flower.strategies import build_strategy
from tests.helpers import SMALL_ADAPTER, filled_adapter, reply_message

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


def _ar(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in values.items()}


def _train_metrics(**overrides) -> dict:
    """Exactly what ``SiteRuntime.train_round`` sends."""
    metrics = {wire.NUM_EXAMPLES: 10, wire.TRAIN_LOSS: 1.5, wire.LOCAL_STEPS: 4, wire.EXAMPLES_SEEN: 40,
               wire.TOKENS: 900, wire.TRAIN_SECONDS: 2.5, wire.EPSILON: 0.8, wire.DELTA: 1e-5, wire.EPSILON_CAP: 8.0,
               wire.NOISE_MULTIPLIER: 1.1, wire.SAMPLE_RATE: 0.1, wire.MAX_GRAD_NORM: 1.0,
               wire.METRICS_RELEASE: wire.RELEASE_CODES["exact"]}
    metrics.update(overrides)
    return {k: v for k, v in metrics.items() if v is not None}


def _eval_metrics(**overrides) -> dict:
    """Exactly what ``SiteRuntime.evaluate`` sends."""
    metrics = {wire.NUM_EXAMPLES: 8, wire.EVAL_LOSS: 2.0, wire.PERPLEXITY: math.exp(2.0), wire.EVAL_TOKENS: 300,
               wire.METRICS_RELEASE: wire.RELEASE_CODES["exact"]}
    metrics.update(overrides)
    return {k: v for k, v in metrics.items() if v is not None}


def _train(node: int, arrays: dict | None = None, *, metrics: dict | None = None, name: str | None = None,
           extra: dict | None = None):
    content = RecordDict({wire.METRICS: MetricRecord(_train_metrics() if metrics is None else metrics)})
    if arrays is not None:
        content[wire.ARRAYS] = record_from_arrays(arrays)
    if name != "":
        content[wire.SITE] = ConfigRecord({wire.SITE_NAME: name or f"site{node}"})
    for key, record in (extra or {}).items():
        content[key] = record
    return reply_message(node, content)


def _evaluate(node: int, *, metrics: dict | None = None, name: str | None = None, extra: dict | None = None):
    content = RecordDict({wire.METRICS: MetricRecord(_eval_metrics() if metrics is None else metrics),
                          wire.SITE: ConfigRecord({wire.SITE_NAME: name or f"site{node}"})})
    for key, record in (extra or {}).items():
        content[key] = record
    return reply_message(node, content, kind=MessageType.EVALUATE)


def _replies(messages) -> list:
    """Flower replies as the coordinator receives them (each charged to its source node)."""
    return [reply_from_message(m, kind=m.metadata.message_type, node_id=m.metadata.src_node_id) for m in messages]


def _triage_one(reply, **kwargs):
    return triage_replies(_replies([reply]), reference=filled_adapter(0.0), names={}, **kwargs)


def _aggregate(accepted) -> dict[str, np.ndarray]:
    return FlowerStrategy(build_strategy(StrategyConfig())).aggregate_train(1, accepted)


# ----------------------------------------------------------------------------- norm bound


def _norm_five() -> ArrayRecord:
    """An update of L2 norm exactly 5 relative to zeros (3 and 4 in two different tensors)."""
    a, b = np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32)
    a[0, 0], b[2, 1] = 3.0, 4.0
    return _ar({"layer.lora_A.weight": a, "layer.lora_B.weight": b})


def test_update_norm_is_the_l2_distance_from_the_global_adapter_over_all_tensors():
    assert update_norm(_norm_five(), filled_adapter(0.0)) == 5.0
    reference = filled_adapter(1.0)
    shifted = _ar({k: reference[k] + _norm_five()[k] for k in SMALL_ADAPTER})
    assert update_norm(shifted, reference) == pytest.approx(5.0, rel=1e-7)  # relative to the reference, not 0


def test_a_norm_exactly_at_the_bound_is_accepted_and_just_above_is_rejected():
    update, zeros = _norm_five(), filled_adapter(0.0)
    validate_update(update, zeros, max_update_norm=5.0)
    validate_update(update, zeros, max_update_norm=0.0)  # 0: no bound
    just_below = float(np.nextafter(5.0, 0.0))
    with pytest.raises(InvalidUpdateError) as exc:
        validate_update(update, zeros, max_update_norm=just_below)
    message = str(exc.value)
    assert "update norm 5.0" in message and repr(just_below) in message and "federation.max-update-norm" in message
    with pytest.raises(InvalidUpdateError, match=r"update norm 5 \(L2 .*\) exceeds the bound 4.9 set by "
                                                  r"federation.max-update-norm"):
        validate_update(update, zeros, max_update_norm=4.9)


def test_the_norm_is_computed_in_float64():
    # 400,000 entries of 1e-3 in float32: a float32 running sum would drift; float64 gives 0.632456
    big = {"x": (400, 1000)}
    update = _ar({k: np.full(s, 1e-3, np.float32) for k, s in big.items()})
    zeros = _ar({k: np.zeros(s, np.float32) for k, s in big.items()})
    expected = math.sqrt(400_000 * float(np.float32(1e-3)) ** 2)
    assert update_norm(update, zeros) == pytest.approx(expected, rel=1e-12)


def test_triage_rejects_an_update_above_the_bound_and_aggregates_the_others():
    small = filled_adapter(1.0)  # norm sqrt(12) = 3.46
    replies = [_train(1, small, name="near"), _train(2, filled_adapter(3.0), name="far"), _train(3, _norm_five(), name="edge")]
    triage = triage_replies(_replies(replies), reference=filled_adapter(0.0), names={}, max_update_norm=5.0)
    assert sorted(triage.metrics) == ["edge", "near"]
    assert list(triage.rejected) == ["far"]
    assert "update norm 10.3923" in triage.rejected["far"] and "federation.max-update-norm" in triage.rejected["far"]
    arrays = _aggregate(triage.accepted)
    expected_a = (np.full((2, 3), 1.0) + _norm_five()["layer.lora_A.weight"]) / 2
    np.testing.assert_allclose(arrays["layer.lora_A.weight"], expected_a, rtol=1e-6)


# ------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    "metrics, reason",
    [
        (_train_metrics(**{wire.EPSILON: None}), "metrics: missing 'epsilon'"),
        (_train_metrics(**{"user-text-length": 12}), "metrics: unexpected 'user-text-length'"),
        (_train_metrics(**{wire.TRAIN_LOSS: math.nan}), "metrics: 'train-loss' is nan, expected a finite number"),
        (_train_metrics(**{wire.EPSILON: math.inf}), "metrics: 'epsilon' is inf, expected a finite number"),
        (_train_metrics(**{wire.TOKENS: [1, 2, 3]}), "metrics: 'tokens' is list [1, 2, 3], expected one number"),
        (_train_metrics(**{wire.NUM_EXAMPLES: 0}), "metrics: 'num-examples' is 0, expected an int >= 1"),
        (_train_metrics(**{wire.NUM_EXAMPLES: 10.0}), "metrics: 'num-examples' is 10.0, expected an int >= 1"),
        (_eval_metrics(), "metrics: missing 'train-loss'"),
    ],
)
def test_train_replies_with_other_than_the_agreed_metrics_are_rejected_naming_the_key(metrics, reason):
    triage = _triage_one(_train(1, filled_adapter(1.0), metrics=metrics))
    assert not triage.accepted and not triage.metrics
    assert reason in triage.rejected["site1"]


def test_undefined_metrics_sent_as_minus_one_are_accepted():
    metrics = _train_metrics(**{wire.TRAIN_LOSS: -1.0, wire.EPSILON: -1.0})
    triage = _triage_one(_train(1, filled_adapter(1.0), metrics=metrics))
    assert triage.metrics["site1"] == metrics and not triage.rejected


@pytest.mark.parametrize(
    "metrics, reason",
    [
        (_eval_metrics(**{wire.PERPLEXITY: None}), "metrics: missing 'perplexity'"),
        (_eval_metrics(**{wire.TRAIN_LOSS: 1.0}), "metrics: unexpected 'train-loss'"),
        (_eval_metrics(**{wire.EVAL_LOSS: math.inf}), "metrics: 'eval-loss' is inf"),
        (_eval_metrics(**{wire.NUM_EXAMPLES: -1}), "metrics: 'num-examples' is -1, expected an int >= 0"),
        (_eval_metrics(**{wire.EXACT_MATCH: 1.5}), "metrics: 'exact-match' is 1.5, expected a score in [0, 1]"),
        (_eval_metrics(**{wire.ROUGE_L: math.nan}), "metrics: 'rouge-l' is nan"),
        (_eval_metrics(**{wire.TASK_EXAMPLES: 2.5}), "metrics: 'task-examples' is 2.5, expected an int >= 0"),
        (_eval_metrics(**{"accuracy": 0.5}), "metrics: unexpected 'accuracy'"),
    ],
)
def test_evaluate_replies_are_validated_and_rejected_ones_are_kept(metrics, reason):
    replies = [_evaluate(1, name="good"), _evaluate(2, metrics=metrics, name="bad")]
    triage = triage_replies(_replies(replies), reference=None, names={})  # kind inferred: evaluate
    assert list(triage.metrics) == ["good"] and [r.node_id for r in triage.accepted] == [1]
    assert reason in triage.rejected["bad"]
    explicit = triage_replies(_replies(replies), reference=None, names={}, kind="evaluate")
    assert explicit.rejected == triage.rejected


def test_task_metrics_are_optional_evaluate_keys_in_0_1_or_minus_one():
    metrics = _eval_metrics(**{wire.EXACT_MATCH: 0.75, wire.CHOICE: -1, wire.ROUGE_L: 0.0, wire.TASK_EXAMPLES: 8})
    triage = triage_replies(_replies([_evaluate(1, metrics=metrics)]), reference=None, names={})
    assert triage.metrics == {"site1": metrics} and not triage.rejected


def test_a_site_without_held_out_data_evaluates_zero_examples():
    metrics = _eval_metrics(**{wire.NUM_EXAMPLES: 0, wire.EVAL_LOSS: -1.0, wire.PERPLEXITY: -1.0, wire.EVAL_TOKENS: 0})
    triage = triage_replies(_replies([_evaluate(1, metrics=metrics)]), reference=None, names={})
    assert triage.metrics == {"site1": metrics}


def test_an_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError, match="kind must be one of train, evaluate"):
        triage_replies([], reference=None, names={}, kind="fit")


# ------------------------------------------------------------------------ records and name


@pytest.mark.parametrize(
    "extra, reason",
    [
        ({"notes": ConfigRecord({"text": "patient 12 ..."})}, "unexpected record 'notes' in the train reply"),
        ({"metrics2": MetricRecord({"x": 1.0})}, "2 MetricRecords in the train reply (metrics, metrics2), expected 1"),
        ({"arrays2": record_from_arrays(filled_adapter(1.0))}, "2 ArrayRecords in the train reply (arrays, arrays2), expected 1"),
        ({wire.METRICS: ConfigRecord(_train_metrics())}, "record 'metrics' is a ConfigRecord, expected a MetricRecord"),
    ],
)
def test_train_replies_with_records_a_site_does_not_send_are_rejected(extra, reason):
    triage = _triage_one(_train(1, filled_adapter(1.0), extra=extra))
    assert reason in triage.rejected["site1"] and not triage.accepted


def test_a_train_reply_without_arrays_or_metrics_is_rejected():
    triage = _triage_one(_train(1, None))
    assert "no 'arrays' record in the train reply" in triage.rejected["site1"]
    no_metrics = reply_message(2, RecordDict({wire.ARRAYS: record_from_arrays(filled_adapter(1.0))}))
    assert "no 'metrics' record in the train reply" in _triage_one(no_metrics).rejected["node-2"]


def test_an_evaluate_reply_carrying_tensors_is_rejected():
    triage = triage_replies(_replies([_evaluate(1, extra={wire.ARRAYS: record_from_arrays(filled_adapter(1.0))})]),
                            reference=None, names={})
    assert "1 ArrayRecords in the evaluate reply (arrays), expected none" in triage.rejected["site1"]


@pytest.mark.parametrize(
    "site_record, reason",
    [
        (ConfigRecord({wire.SITE_NAME: "../../etc/passwd"}), "site name '../../etc/passwd' is not 1-64 characters"),
        (ConfigRecord({wire.SITE_NAME: "x" * 65}), "is not 1-64 characters"),
        (ConfigRecord({wire.SITE_NAME: ""}), "site name '' is not 1-64 characters"),
        (ConfigRecord({wire.SITE_NAME: "site a"}), "site name 'site a' is not"),
        (ConfigRecord({wire.SITE_NAME: ".hidden"}), "site name '.hidden' is not 1-64 characters"),  # the site-file rule
        (ConfigRecord({wire.SITE_NAME: 7}), "site name is a int, expected a string"),
        (ConfigRecord({wire.SITE_NAME: "ok", "email": "a@b"}), "record 'site' has keys ['email', 'name']"),
        (MetricRecord({wire.SITE_NAME: 1.0}), "2 MetricRecords in the train reply (metrics, site), expected 1"),
    ],
)
def test_a_bad_site_record_is_rejected_under_the_node_id(site_record, reason):
    reply = _train(5, filled_adapter(1.0), name="", extra={wire.SITE: site_record})
    names = {5: "known-before"}
    triage = triage_replies(_replies([reply]), reference=filled_adapter(0.0), names=names)
    assert list(triage.rejected) == ["node-5"] and reason in triage.rejected["node-5"]
    assert names == {5: "known-before"}  # the bad name is not remembered


def test_safe_names_are_remembered_and_a_second_claim_of_a_name_is_rejected():
    names: dict[int, str] = {}
    replies = [_train(1, filled_adapter(1.0), name="cardio.v2_A-1"), _train(2, filled_adapter(2.0), name="cardio.v2_A-1"),
               _train(3, filled_adapter(2.0), name="x" * 64)]
    triage = triage_replies(_replies(replies), reference=filled_adapter(0.0), names=names)
    assert sorted(triage.metrics) == ["cardio.v2_A-1", "x" * 64]
    assert triage.rejected == {"node-2": "site name 'cardio.v2_A-1' was already used by another reply in this round"}
    assert names == {1: "cardio.v2_A-1", 3: "x" * 64}


def test_refusals_failures_and_every_rejection_are_sorted_and_the_rest_aggregated():
    names = {3: "capped"}
    replies = [
        _train(1, filled_adapter(1.0), name="good-a", metrics=_train_metrics(**{wire.NUM_EXAMPLES: 10})),
        _train(2, filled_adapter(4.0), name="good-b", metrics=_train_metrics(**{wire.NUM_EXAMPLES: 30})),
        reply_message(3, error=Error(code=wire.BUDGET_REFUSED, reason="Site 'capped' would exceed its privacy budget")),
        reply_message(4, error=Error(code=2, reason="boom")),
        _train(5, filled_adapter(100.0), name="huge"),
        _train(6, filled_adapter(1.0), name="chatty", metrics=_train_metrics(secret=1.0)),
        _train(7, filled_adapter(1.0), name="leaky", extra={"text": ConfigRecord({"t": "x"})}),
    ]
    triage = triage_replies(_replies(replies), reference=filled_adapter(0.0), names=names, max_update_norm=50.0)
    assert sorted(triage.metrics) == ["good-a", "good-b"]
    assert list(triage.refused) == ["capped"]
    assert triage.failed == [{"site": "node-4", "code": 2, "reason": "boom"}]
    assert sorted(triage.rejected) == ["chatty", "huge", "leaky"]
    arrays = _aggregate(triage.accepted)
    np.testing.assert_allclose(arrays["layer.lora_B.weight"], (1 * 10 + 4 * 30) / 40)


def test_train_replies_without_a_reference_are_not_validated():
    """Backward compatible: only the reference (the arrays sent) makes a train triage validate."""
    reply = _train(1, filled_adapter(1.0), metrics={wire.NUM_EXAMPLES: 3, wire.TRAIN_LOSS: 1.0})
    triage = triage_replies(_replies([reply]), reference=None, names={}, kind="train")
    assert list(triage.metrics) == ["site1"] and not triage.rejected
