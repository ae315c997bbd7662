"""Real federations on Flower's simulation engine (SuperLink + Ray), driven through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

pytestmark = pytest.mark.integration


def _processes_with(marker: str) -> list[str]:
    """Processes whose environment carries ``marker`` (inherited by everything a run starts)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()[:120]!r}")
        except OSError:
            continue
    return found


def fedllm(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``fedllm ARGS`` in a subprocess; asserts that it left no process behind."""
    marker = f"FEDLLM_TEST_RUN={uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FEDLLM_TEST_RUN": marker.split("=", 1)[1]}
    res = subprocess.run([sys.executable, "-m", "fedllm.cli.main", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=timeout, env=env)
    leftover = _processes_with(marker)
    assert not leftover, f"processes left behind: {leftover}"
    return res


def simulate(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return fedllm("simulate", *args, timeout=timeout)


def _ledger(path: Path) -> list[dict]:
    return json.loads(path.read_text())["entries"]


def test_smoke_federation_produces_a_loadable_adapter_history_and_ledgers(tmp_path):
    out = tmp_path / "run"
    res = simulate("smoke", "--output", str(out), "--rounds", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[round 2/2]" in res.stdout and "step 3/3" in res.stdout  # progress was shown

    # history: round 0 (before) + every round, every site
    history = json.loads((out / "history.json").read_text())
    assert history["status"] == "completed"
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2]
    sites = sorted(json.loads((out / "sites.json").read_text()), key=lambda s: s["site-name"])
    names = [s["site-name"] for s in sites]
    assert len(names) == 3
    for r in history["rounds"]:
        assert sorted(r["evaluate"]["sites"]) == names
        if r["round"] > 0:
            assert sorted(r["train"]["sites"]) == names
            for m in r["train"]["sites"].values():
                assert m["local-steps"] == 3 and m["tokens"] >= 0 and m["train-seconds"] > 0
            assert r["evaluate"]["aggregate"]["perplexity"] > 1

    # ledgers: ε strictly increases, stays under the cap, equals what the site reported
    config = tomllib.loads((out / "config.toml").read_text())
    cap = config["privacy"]["max-epsilon"]
    for name in names:
        entries = _ledger(out / "ledgers" / f"{name}.json")
        eps = [e["epsilon"] for e in entries]
        assert [e["server_round"] for e in entries] == [1, 2]
        assert eps[0] < eps[1] <= cap
        assert history["rounds"][2]["train"]["sites"][name]["epsilon"] == pytest.approx(eps[1])

    # adapter: PEFT format, loads onto the base model, and differs from the initial adapter
    from peft import PeftModel

    from fedllm.config import RunConfig
    from fedllm.model.loading import build_tiny_model
    from fedllm.model.lora import apply_lora, get_adapter_state

    run_cfg = RunConfig.from_flat({"model.name": "tiny-random-llama", "lora.r": 4, "lora.alpha": 8})
    initial = get_adapter_state(apply_lora(build_tiny_model("llama"), run_cfg.lora))
    loaded = PeftModel.from_pretrained(build_tiny_model("llama"), out / "adapter")
    final = get_adapter_state(loaded)
    assert set(final) == set(initial)
    assert any(not torch.equal(final[k], initial[k]) for k in initial if "lora_B" in k)
    for k in initial:
        if "lora_A" in k:  # FFA-LoRA: A is shared and frozen
            assert torch.equal(final[k], initial[k])
    for k in (1, 2):
        assert (out / "checkpoints" / f"round-{k}" / "adapter_model.safetensors").is_file()


def _smoke_split_keys(folder: Path, train: range) -> None:
    """Write each smoke site's split key into ``folder`` (its ledger folder), chosen so that the
    site trains on a number of records in ``train``: the keyed split is random per key, and this
    test's ε arithmetic needs q in a known range."""
    from fedllm.data.loading import load_records
    from fedllm.simulation.scenario import load_scenario, materialise_sites
    from fedllm.site.holdout import split_key_path, split_records

    folder.mkdir(parents=True, exist_ok=True)
    for site in materialise_sites(load_scenario("smoke"), folder.parent / "probe"):
        records = load_records(site.data_path)
        key = next(k for k in (bytes([i]) * 32 for i in range(256)) if len(split_records(
            records, key=k, eval_fraction=site.eval_fraction, max_eval=site.max_eval_examples).train) in train)
        split_key_path(folder / f"{site.name}.json", site.name).write_text(key.hex() + "\n")


def test_sites_refuse_rounds_past_their_cap_and_the_run_records_it(tmp_path):
    out, ledgers = tmp_path / "run", tmp_path / "ledgers"
    # σ fixed at 0.8, q = 4/n with 22 <= n <= 26 training records, 3 steps a round: round 1 costs
    # ε≈4.26-4.68 (under the cap of 5), round 2 would bring it to ≈5.22-5.82, so every site refuses round 2
    _smoke_split_keys(ledgers, range(22, 27))
    res = simulate("smoke", "--output", str(out), "--rounds", "3", "--set", "privacy.noise-multiplier=0.8",
                   "--set", "privacy.max-epsilon=5.0", "--set", "privacy.target-epsilon=3.0",
                   "--set", f"privacy.ledger-dir={ledgers}")
    assert res.returncode == 0, res.stdout + res.stderr
    history = json.loads((out / "history.json").read_text())
    assert history["status"] == "completed"
    assert "stopped-early" in history
    second = history["rounds"][2]["train"]
    assert second["sites"] == {} and len(second["refused"]) == 3
    assert all("would exceed its privacy budget" in reason for reason in second["refused"].values())
    assert len(list(ledgers.glob("*.json"))) == 3
    for ledger in ledgers.glob("*.json"):
        entries = _ledger(ledger)
        assert len(entries) == 1 and entries[0]["epsilon"] <= 5.0  # the refused round spent nothing


def test_a_run_that_every_site_refused_exits_non_zero_with_the_sites_reasons(tmp_path):
    """Issue 13, finding 8: DP off against require-dp (the default) used to end 'completed', exit 0."""
    out = tmp_path / "run"
    res = simulate("smoke", "--output", str(out), "--rounds", "2", "--set", "privacy.enabled=false")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "no site trained" in res.stderr and "privacy.enabled = false" in res.stderr
    history = json.loads((out / "history.json").read_text())
    assert history["status"] == "failed" and "refuses this run" in history["error"]
    assert not any((out / "ledgers").glob("*.json"))  # nothing trained, nothing recorded


def test_a_failing_site_fails_the_run_with_a_non_zero_exit(tmp_path):
    ledgers = tmp_path / "ledgers"
    ledgers.mkdir()
    (ledgers / "site-01.json").write_text('{"format": "fedllm-privacy-ledger", "version": 1, "site": "site-01", "entr')
    out = tmp_path / "run"
    res = simulate("smoke", "--output", str(out), "--rounds", "1", "--set", f"privacy.ledger-dir={ledgers}")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "site-01" in res.stderr and "failed" in res.stderr
    history = json.loads((out / "history.json").read_text())
    assert history["status"] == "failed"


def test_bad_configuration_fails_before_anything_starts(tmp_path):
    out = tmp_path / "run"
    res = simulate("smoke", "--output", str(out), "--set", "privacy.max-epsilom=4")
    assert res.returncode == 2
    assert "did you mean 'privacy.max-epsilon'" in res.stderr
    assert not out.exists()


def test_central_dp_records_the_site_level_guarantee_every_round(tmp_path):
    out = tmp_path / "run"
    res = simulate("smoke", "--output", str(out), "--rounds", "2", "--set", "central-dp.enabled=true",
                   "--set", "central-dp.clipping=adaptive", "--set", "central-dp.noise-multiplier=0.7",
                   "--set", "central-dp.clipping-norm=0.1")
    assert res.returncode == 0, res.stdout + res.stderr
    # 3 sites, 2 rounds at z = 0.7: planned site-level ε ≈ 10.1 > 10, so the run warns at start
    assert "site-level ε would be 10.1 after 2 rounds with 3 sites at noise 0.7: too large" in res.stdout
    assert "site-level ε 6.6" in res.stdout and "site-level ε 10.1" in res.stdout  # progress lines
    history = json.loads((out / "history.json").read_text())
    block = history["central-dp"]
    ledger_path = out / "ledgers" / "_coordinator.json"
    assert {k: block[k] for k in block if k not in ("epsilon", "cumulative-epsilon")} == {
        "enabled": True, "clipping": "adaptive", "noise-multiplier": 0.7, "clipping-norm": 0.1,
        "sites-per-round": 3, "total-sites": 3, "rounds": 2, "sampling": "all", "delta": 1e-05, "accountant": "prv",
        "ledger": str(ledger_path), "ledger-releases": 2}
    # a fresh coordinator ledger: this run's releases are all it holds, so both totals agree
    assert block["cumulative-epsilon"] == pytest.approx(block["epsilon"])
    assert len(json.loads(ledger_path.read_text())["entries"]) == 2
    from fedllm.privacy.site_level import site_level_epsilon
    per_round = [r["central-dp"] for r in history["rounds"] if r["round"] > 0]
    assert [r["sites"] for r in per_round] == [3, 3]
    assert per_round[0]["clipping-norm"] == 0.1 and per_round[1]["clipping-norm"] != 0.1  # adapted
    eps = [r["epsilon"] for r in per_round]
    assert eps == [pytest.approx(site_level_epsilon(noise_multiplier=0.7, sites_per_round=3, total_sites=3, rounds=t,
                                                    target_delta=1e-5, sampling="all")) for t in (1, 2)]
    assert eps[0] < eps[1] == block["epsilon"]
    # the record-level guarantee is still there, side by side
    assert all(m["epsilon"] > 0 for m in history["rounds"][2]["train"]["sites"].values())
