"""A site's own protections in a deployment: it refuses runs without DP unless its file allows
them, and a round asked again after a coordinator crash re-sends the released update without a
second ledger entry."""

from __future__ import annotations

import json

import pytest
import torch

from fedllm.config import RunConfig, SiteConfig
from fedllm.errors import BudgetExceededError
from fedllm.model.lora import get_adapter_state
from fedllm.site.runtime import SiteRuntime
from tests.helpers import write_jsonl

RECORDS = [{"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(12)]
CONFIG = {"model.name": "tiny-random-llama", "data.max-length": 48, "train.local-steps": 2, "train.batch-size": 2,
          "privacy.noise-multiplier": 1.0, "lora.r": 2, "lora.alpha": 4}


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", RECORDS)


def _runtime(tmp_path, data_file, **overrides) -> SiteRuntime:
    config = RunConfig.from_flat({**CONFIG, **overrides})
    site = SiteConfig(name="cardiology", data_path=str(data_file), max_epsilon=8.0)  # deployment default: require_dp = True
    return SiteRuntime(config, site, ledger_path=tmp_path / "ledger" / "cardiology.json", simulated=False)


def test_a_site_refuses_a_run_without_dp_unless_its_file_allows_it(tmp_path, data_file):
    runtime = _runtime(tmp_path, data_file, **{"privacy.enabled": False})
    adapter = get_adapter_state(runtime.model, trainable_only=True)
    with pytest.raises(BudgetExceededError, match="requires differential privacy"):
        runtime.train_round(run_id="r", server_round=1, adapter=adapter)
    assert not (tmp_path / "ledger" / "cardiology.json").exists()  # nothing trained, nothing spent

    allowed = SiteConfig(name="cardiology", data_path=str(data_file), max_epsilon=8.0, require_dp=False)
    runtime = SiteRuntime(runtime.config, allowed, ledger_path=tmp_path / "ledger2.json", simulated=False)
    outcome = runtime.train_round(run_id="r", server_round=1, adapter=adapter)
    assert outcome.metrics["noise-multiplier"] == 0.0
    assert SiteConfig.from_dict({"site-name": "s", "data-path": "x", "max-epsilon": 8.0}).require_dp is True  # one default, every reader


def test_a_round_asked_again_resends_the_same_update_without_a_second_spend(tmp_path, data_file):
    runtime = _runtime(tmp_path, data_file)
    adapter = get_adapter_state(runtime.model, trainable_only=True)
    first = runtime.train_round(run_id="run-1", server_round=1, adapter=adapter)
    ledger = json.loads((tmp_path / "ledger" / "cardiology.json").read_text())
    assert len(ledger["entries"]) == 1

    again = runtime.train_round(run_id="run-1", server_round=1, adapter=adapter)  # coordinator resumed
    assert json.loads((tmp_path / "ledger" / "cardiology.json").read_text()) == ledger  # no new entry
    assert again.metrics == first.metrics
    assert all(torch.equal(again.adapter[k], first.adapter[k]) for k in first.adapter)

    changed = {k: v + 0.01 for k, v in adapter.items()}  # another global adapter: a new release, paid for
    runtime.train_round(run_id="run-1", server_round=1, adapter=changed)
    assert len(json.loads((tmp_path / "ledger" / "cardiology.json").read_text())["entries"]) == 2


TASKS = {"evaluate.metrics": "exact-match,choice,rouge-l", "evaluate.choices": "it,no",
         "evaluate.reference": "first-word", "evaluate.max-new-tokens": 3}


def _site(data_file, release: str) -> SiteConfig:
    return SiteConfig(name="cardiology", data_path=str(data_file), max_epsilon=8.0, release_metrics=release,
                      eval_fraction=0.5, max_eval_examples=6)


def test_the_runs_task_metrics_leave_a_site_as_its_release_metrics_allows(tmp_path, data_file):
    from fedllm.evaluation.task import score_task
    from fedllm.site import metric_release

    config = RunConfig.from_flat({**CONFIG, **TASKS})
    exact = SiteRuntime(config, _site(data_file, "exact"), ledger_path=tmp_path / "exact" / "c.json", simulated=False)
    adapter = get_adapter_state(exact.model, trainable_only=True)
    sent = exact.evaluate(adapter, run_id="r", server_round=0)
    scores = score_task(exact.model, exact.tokenizer, exact.eval_examples, config.evaluate)
    assert sent["task-examples"] == scores.num_scored == len(exact.eval_examples) > 0
    for name, mean in scores.means().items():
        assert sent[name] == pytest.approx(mean) and 0.0 <= mean <= 1.0
    assert set(scores.means()) == {"exact-match", "choice", "rouge-l"}
    assert not (tmp_path / "exact" / "c.json").exists() or not json.loads(
        (tmp_path / "exact" / "c.json").read_text())["entries"]  # exact: nothing recorded

    dp = SiteRuntime(config, _site(data_file, "dp"), ledger_path=tmp_path / "dp" / "c.json", simulated=False)
    noisy = dp.evaluate(adapter, run_id="r", server_round=0)
    entries = json.loads((tmp_path / "dp" / "c.json").read_text())["entries"]
    assert [e["release"] for e in entries] == ["metrics"]  # one Gaussian release for the loss and the task metrics
    assert all(0.0 <= noisy[n] <= 1.0 for n in ("exact-match", "choice", "rouge-l"))
    assert noisy["metrics-release"] == metric_release.wire.RELEASE_CODES["dp"]

    none = SiteRuntime(config, _site(data_file, "none"), ledger_path=tmp_path / "none" / "c.json", simulated=False)
    nothing = none.evaluate(adapter, run_id="r", server_round=0)
    assert nothing["exact-match"] == nothing["choice"] == nothing["rouge-l"] == nothing["task-examples"] == -1
