"""Finding 5 of issue 13 (exact metrics computed on private records left with every update), as a
coordinator would try it on a real ``SiteRuntime``: under the default ``release-metrics = "dp"``
no reply carries an exact data-dependent value, the held-out loss is noised and paid for in the
ledger, a second evaluation in the same round is not answered twice, and "none" releases nothing
optional."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedllm import wire
from fedllm.config import RunConfig, SiteConfig
from fedllm.errors import BudgetExceededError
from fedllm.model.lora import get_adapter_state
from fedllm.site import metric_release
from fedllm.site import runtime as site_runtime
from fedllm.site.runtime import SiteRuntime
from fedllm.site.training import evaluate_loss
from tests.helpers import write_jsonl

RECORDS = [{"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(40)]
CONFIG = {"model.name": "tiny-random-llama", "data.max-length": 48, "train.local-steps": 1, "train.batch-size": 4,
          "privacy.noise-multiplier": 1.0, "privacy.max-epsilon": 1000.0, "lora.r": 2, "lora.alpha": 4}
SPLIT = {"eval-fraction": 0.5, "max-eval-examples": 20}  # the site's own held-out split
DATA_DEPENDENT_TRAIN = (wire.TRAIN_LOSS, wire.EXAMPLES_SEEN, wire.TOKENS, wire.TRAIN_SECONDS)


def _runtime(tmp_path, accountant: str = "prv", **site_keys) -> SiteRuntime:
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    site = SiteConfig.from_dict({"site-name": "cardiology", "data-path": str(data), "max-epsilon": 1000.0, **SPLIT,
                                 **site_keys})
    config = RunConfig.from_flat({**CONFIG, "privacy.accountant": accountant})  # RDP: 40 small-σ releases, fast
    return SiteRuntime(config, site, ledger_path=tmp_path / "ledger" / "cardiology.json",
                       simulated=False)


def _ledger_entries(tmp_path) -> list[dict]:
    path = tmp_path / "ledger" / "cardiology.json"
    return json.loads(path.read_text())["entries"] if path.exists() else []


def _exact_loss(runtime: SiteRuntime, adapter) -> float:
    return evaluate_loss(runtime.model, runtime.eval_examples, batch_size=8, pad_id=runtime.tokenizer.pad_token_id,
                         fast_path=runtime.config.train.fast_path).loss


def test_by_default_a_train_reply_carries_no_exact_data_dependent_value(tmp_path):
    runtime = _runtime(tmp_path)  # release-metrics not written: "dp"
    assert runtime.site.release_metrics == "dp"
    outcome = runtime.train_round(run_id="r", server_round=1, adapter=get_adapter_state(runtime.model, trainable_only=True))
    m = outcome.metrics
    assert set(m) == set(wire.TRAIN_METRIC_KEYS)
    assert all(m[k] == -1 for k in DATA_DEPENDENT_TRAIN), m
    assert m[wire.NUM_EXAMPLES] == 1 != len(runtime.train_examples)  # a fixed FedAvg weight, not the count
    assert m[wire.METRICS_RELEASE] == wire.RELEASE_CODES["dp"]
    assert m[wire.EPSILON] == pytest.approx(_ledger_entries(tmp_path)[-1]["epsilon"])  # the guarantee is stated


def test_the_released_held_out_loss_is_noised_and_paid_for(tmp_path, monkeypatch):
    seeds = iter(range(1, 1000))
    monkeypatch.setattr(metric_release, "os_entropy_rng", lambda: np.random.default_rng(next(seeds)))
    sigma, bound = 0.5, 20.0  # small noise, so the statistics are sharp; bound above this model's losses
    runtime = _runtime(tmp_path, accountant="rdp", **{"metric-noise-multiplier": sigma, "metric-loss-bound": bound})
    adapter = get_adapter_state(runtime.model, trainable_only=True)
    full = list(runtime.eval_examples)
    model_losses = {}  # the adapter never changes here: run the model once per held-out set (CPU time)

    def once(model, examples, **kwargs):
        key = len(examples)
        if key not in model_losses:
            model_losses[key] = evaluate_loss(model, examples, **kwargs)
        return model_losses[key]

    monkeypatch.setattr(site_runtime, "evaluate_loss", once)
    assert len(full) >= 10
    rounds = 20
    sum_std, count_std = metric_release.noise_stds(noise_multiplier=sigma, loss_bound=bound)
    released: dict[str, np.ndarray] = {}
    exact: dict[str, float] = {}
    for name, examples, first in (("D", full, 0), ("D minus one held-out record", full[:-1], rounds)):
        runtime.eval_examples = examples
        exact[name] = _exact_loss(runtime, adapter)
        assert exact[name] < bound  # nothing clipped: the mean of clipped losses is the exact mean
        released[name] = np.array([runtime.evaluate(adapter, run_id="r", server_round=first + k)[wire.EVAL_LOSS]
                                   for k in range(rounds)])
        # the mean of per-record mean losses; the tiny model's records have equal token counts only roughly
        per_record = float(np.mean(model_losses[len(examples)].record_losses))
        predicted = math.hypot(sum_std, per_record * count_std) / len(examples)  # std of the noisy mean (delta method)
        values = released[name]
        assert not np.any(values == exact[name])  # never the exact value
        assert 0.5 * predicted < values.std() < 2 * predicted, (values.std(), predicted)
        assert abs(values.mean() - per_record) < 4 * predicted / math.sqrt(rounds)
    assert exact["D"] != exact["D minus one held-out record"]  # the exact losses tell the two datasets apart
    entries = [e for e in _ledger_entries(tmp_path) if e.get("release") == "metrics"]
    assert len(entries) == 2 * rounds and all(e["noise_multiplier"] == sigma and e["steps"] == 1 for e in entries)
    assert entries[-1]["epsilon"] > entries[0]["epsilon"] > 0  # composed into the site's ε


def test_a_second_evaluation_in_the_same_round_is_not_answered_twice(tmp_path):
    runtime = _runtime(tmp_path)
    adapter = get_adapter_state(runtime.model, trainable_only=True)
    first = runtime.evaluate(adapter, run_id="r", server_round=3)
    spent = _ledger_entries(tmp_path)
    assert len(spent) == 1 and spent[0]["release"] == "metrics"

    again = runtime.evaluate(adapter, run_id="r", server_round=3)  # a resumed coordinator: the same answer, free
    assert again == first and _ledger_entries(tmp_path) == spent

    other = {k: v + 0.5 for k, v in adapter.items()}  # another adapter in the same round: refused
    with pytest.raises(BudgetExceededError, match="already answered the evaluation of round 3 of run r"):
        runtime.evaluate(other, run_id="r", server_round=3)
    restarted = _runtime(tmp_path)  # a new process (a real site starts one per message): still refused
    with pytest.raises(BudgetExceededError, match="at most once per server round"):
        restarted.evaluate(other, run_id="r", server_round=3)
    assert _ledger_entries(tmp_path) == spent
    restarted.evaluate(other, run_id="r", server_round=4)  # the next round is answered
    assert len(_ledger_entries(tmp_path)) == 2


def test_none_releases_nothing_optional_and_never_evaluates(tmp_path, monkeypatch):
    runtime = _runtime(tmp_path, **{"release-metrics": "none"})
    adapter = get_adapter_state(runtime.model, trainable_only=True)
    outcome = runtime.train_round(run_id="r", server_round=1, adapter=adapter)
    assert {k: v for k, v in outcome.metrics.items() if v != -1} == {
        wire.NUM_EXAMPLES: 1, wire.METRICS_RELEASE: wire.RELEASE_CODES["none"]}

    def never(*args, **kwargs):
        raise AssertionError("the held-out records were evaluated under release-metrics = 'none'")

    monkeypatch.setattr(site_runtime, "evaluate_loss", never)
    metrics = runtime.evaluate(outcome.adapter, run_id="r", server_round=1)
    assert {k: v for k, v in metrics.items() if v != -1} == {
        wire.NUM_EXAMPLES: 0, wire.METRICS_RELEASE: wire.RELEASE_CODES["none"]}
    assert [e.get("release", "update") for e in _ledger_entries(tmp_path)] == ["update"]  # nothing else spent


def test_exact_must_be_written_out_and_then_sends_todays_exact_values(tmp_path):
    runtime = _runtime(tmp_path, **{"release-metrics": "exact"})
    adapter = get_adapter_state(runtime.model, trainable_only=True)
    outcome = runtime.train_round(run_id="r", server_round=1, adapter=adapter)
    assert outcome.metrics[wire.NUM_EXAMPLES] == len(runtime.train_examples)
    assert outcome.metrics[wire.TOKENS] > 0 and outcome.metrics[wire.TRAIN_SECONDS] > 0
    metrics = runtime.evaluate(outcome.adapter, run_id="r", server_round=1)
    assert metrics[wire.EVAL_LOSS] == pytest.approx(_exact_loss(runtime, outcome.adapter))
    assert metrics[wire.EVAL_TOKENS] > 0 and metrics[wire.METRICS_RELEASE] == wire.RELEASE_CODES["exact"]
