"""``fedllm compare``'s report from evaluated settings, without running anything (issue 15)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedllm.config import RunConfig, SiteConfig
from fedllm.errors import ConfigError
from fedllm.simulation.compare import ComparePlan, markdown, parse_settings, plot, summarise


def test_settings_are_a_checked_subset_in_a_fixed_order():
    assert parse_settings("local,federated") == ("federated", "local")
    with pytest.raises(ConfigError, match="choose from federated, local, pooled, pooled-no-dp, base"):
        parse_settings("federated,centralised")


def _plan(tmp_path: Path) -> ComparePlan:
    config = RunConfig.from_flat({"evaluate.metrics": "exact-match"})
    sites = tuple(SiteConfig(name=n, data_path="x", max_epsilon=8.0) for n in ("a", "b"))
    return ComparePlan(config=config, sites=sites, output=tmp_path, seeds=2)


def test_the_report_gives_means_spreads_and_the_gain_paired_by_seed(tmp_path):
    plan = _plan(tmp_path)

    def m(loss, em):
        return {"eval-loss": loss, "perplexity": 2.0 ** loss, "exact-match": em}

    results = {
        "federated": {0: {"a": m(2.0, 0.6), "b": m(2.2, 0.5)}, 1: {"a": m(2.2, 0.8), "b": m(2.4, 0.5)}},
        "local": {0: {"a": m(2.5, 0.4), "b": m(2.3, 0.5)}, 1: {"a": m(2.5, 0.4), "b": m(2.3, 0.6)}},
        "base": {0: {"a": m(3.0, 0.1), "b": m(3.0, 0.1)}},
    }
    trained = {"federated": {k: {"epsilon": {"a": 7.9, "b": 8.0}} for k in (0, 1)},
               "local": {k: {"epsilon": {"a": 7.5, "b": 7.6}} for k in (0, 1)}}
    plan = ComparePlan(config=plan.config, sites=plan.sites, output=tmp_path, seeds=2,
                       settings=("federated", "local", "base"))
    report = summarise(plan, trained, results)
    rows = {(r["site"], r["setting"]): r for r in report["rows"]}
    assert rows[("a", "federated")]["eval-loss"] == pytest.approx(2.1)
    assert rows[("a", "federated")]["eval-loss-spread"] == pytest.approx(0.1414, abs=1e-4)  # sample std of 2.0, 2.2
    assert rows[("a", "federated")]["epsilon"] == 8.0 - 0.1 and rows[("a", "base")]["epsilon"] == 0.0
    gain = {g["site"]: g for g in report["gain-federated-over-local"]}
    assert gain["a"]["eval-loss"] == pytest.approx(0.4)  # local - federated: (0.5 + 0.3) / 2
    assert gain["a"]["exact-match"] == pytest.approx(0.3)  # federated - local: (0.2 + 0.4) / 2
    assert gain["b"]["exact-match"] == pytest.approx(-0.05)  # federation can lose, and says so
    text = markdown(report)
    assert "| a | federated | 2.100 ± 0.141 |" in text and "| a | +0.400 ± 0.141 |" in text
    plot({**report, "sites": [{"site": "a"}, {"site": "b"}]}, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_comparison_must_be_the_same_plan_but_may_add_seeds(tmp_path):
    import dataclasses
    import json

    from fedllm.simulation.compare import _check_plan

    plan = _plan(tmp_path)
    _check_plan(plan)
    more = dataclasses.replace(plan, seeds=3)
    _check_plan(more)  # more seeds: the finished ones are kept, the new ones run
    assert json.loads((tmp_path / "compare-plan.json").read_text())["seeds"] == 3
    _check_plan(plan)  # fewer: a subset of what is there
    with pytest.raises(ConfigError, match=r"other settings \(config differ\).*more --seeds is fine"):
        _check_plan(dataclasses.replace(plan, config=plan.config.with_overrides({"num-server-rounds": 9})))
    with pytest.raises(ConfigError, match=r"\(settings differ\)"):
        _check_plan(dataclasses.replace(plan, settings=("federated", "local")))
