"""``fedllm compare`` on the smoke scenario: every setting trained with real Flower simulations,
evaluated on the same held-out records, the files written, and the numbers consistent with each
run's own history (issue 15)."""

from __future__ import annotations

import json
import math

import pytest

from tests.integration.test_simulation import fedllm

pytestmark = pytest.mark.integration


def test_compare_runs_every_setting_on_the_same_held_out_records_and_resumes(tmp_path):
    out = tmp_path / "cmp"
    tasks = ("--set", "evaluate.metrics=exact-match,rouge-l", "--set", "evaluate.max-new-tokens=4")
    res = fedllm("compare", "smoke", "--rounds", "1", "--output", str(out), *tasks, timeout=1500)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (out / name).is_file()
    report = json.loads((out / "compare.json").read_text())
    assert report["settings"] == ["federated", "local", "pooled", "pooled-no-dp", "base"]
    rows = {(r["site"], r["setting"]): r for r in report["rows"]}
    sites = ["site-00", "site-01", "site-02"]
    assert set(rows) == {(s, setting) for s in sites for setting in report["settings"]}
    assert "| site-00 | federated |" in res.stdout and "Gain of federated over local" in res.stdout

    # each setting's numbers are its own run's: federated = the sites' own last evaluation (the smoke
    # sites release exact metrics), base = round 0 of the same run (B = 0), local = each site's own run
    fed = json.loads((out / "federated" / "seed-0" / "history.json").read_text())
    last, first = fed["rounds"][-1]["evaluate"]["sites"], fed["rounds"][0]["evaluate"]["sites"]
    for site in sites:
        assert rows[(site, "federated")]["eval-loss"] == pytest.approx(last[site]["eval-loss"], rel=1e-6)
        for metric in ("exact-match", "rouge-l"):  # the task metrics too, as the sites computed them
            assert rows[(site, "federated")][metric] == pytest.approx(last[site][metric], abs=1e-9)
            assert 0.0 <= rows[(site, "base")][metric] <= 1.0
        assert rows[(site, "base")]["eval-loss"] == pytest.approx(first[site]["eval-loss"], rel=1e-6)
        local = json.loads((out / "local" / "seed-0" / site / "history.json").read_text())
        alone = local["rounds"][-1]["evaluate"]["sites"]
        assert list(alone) == [site]  # trained alone
        assert rows[(site, "local")]["eval-loss"] == pytest.approx(alone[site]["eval-loss"], rel=1e-6)
        assert rows[(site, "pooled-no-dp")]["epsilon"] is None and rows[(site, "base")]["epsilon"] == 0
        assert 0 < rows[(site, "federated")]["epsilon"] <= 4.0 + 1e-6  # the scenario's target ε
        gain = next(g for g in report["gain-federated-over-local"] if g["site"] == site)
        assert gain["eval-loss"] == pytest.approx(rows[(site, "local")]["eval-loss"]
                                                  - rows[(site, "federated")]["eval-loss"])
    # pooled: one site with every site's training records, the same total steps, the held-out records untouched
    pooled = json.loads((out / "pooled" / "seed-0" / "history.json").read_text())
    assert list(pooled["rounds"][-1]["train"]["sites"]) == ["pooled"]
    assert pooled["rounds"][-1]["train"]["sites"]["pooled"]["local-steps"] == 3 * 3
    held_out = {s["site"]: s["held-out"] for s in report["sites"]}
    trained = sum(m["num-examples"] for m in fed["rounds"][-1]["train"]["sites"].values())
    assert pooled["rounds"][-1]["train"]["sites"]["pooled"]["num-examples"] == trained
    assert all(held_out[s] == last[s]["num-examples"] for s in sites)
    # the non-private ceiling trains on the same records without noise: it fits them better than DP
    assert all(math.isfinite(rows[(s, "pooled-no-dp")]["eval-loss"]) for s in sites)

    assert "| site | setting | eval-loss | perplexity | exact-match | rouge-l | ε |" in res.stdout
    again = fedllm("compare", "smoke", "--rounds", "1", "--output", str(out), *tasks, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("done already") == 1 + 3 + 2 and "training (" not in again.stdout
    assert json.loads((out / "compare.json").read_text())["rows"] == report["rows"]
    other = fedllm("compare", "smoke", "--rounds", "2", "--output", str(out), *tasks, timeout=600)
    assert other.returncode == 2 and "holds a fedllm compare with other settings (config differ)" in other.stderr
