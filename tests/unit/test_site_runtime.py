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
