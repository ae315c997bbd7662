"""Run and site configuration: defaults match pyproject, shipped scenarios validate, errors name the
key (with did-you-mean), every problem is reported at once, and configs round-trip losslessly."""

from __future__ import annotations

import math
import re
import tomllib

import pytest

from fedllm.config import (
    PrivacyConfig,
    RunConfig,
    SiteConfig,
    defaults_flat,
    flatten,
    load_run_overrides,
    parse_set_option,
    to_toml,
)
from fedllm.errors import ConfigError
from fedllm.simulation.scenario import load_scenario
from tests.helpers import REPO, problem_lines

RUN_TOMLS = sorted((REPO / "simulations").glob("*/run.toml"))
SITES_TOMLS = sorted((REPO / "simulations").glob("*/sites.toml"))


def _typed(flat: dict) -> dict:
    return {key: (type(value), value) for key, value in flat.items()}


# ------------------------------------------------------------------------------------ defaults


def test_dataclass_defaults_equal_pyproject_app_config():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    shipped = flatten(pyproject["tool"]["flwr"]["app"]["config"])
    defaults = defaults_flat()
    assert sorted(shipped) == sorted(defaults), (
        f"only in pyproject: {sorted(set(shipped) - set(defaults))}; "
        f"only in the dataclasses: {sorted(set(defaults) - set(shipped))}"
    )
    # same values AND same types (1 vs 1.0 matters: Flower passes pyproject's type through)
    assert _typed(shipped) == _typed(defaults)
    # and the shipped defaults are themselves valid
    assert RunConfig.from_flat(shipped) == RunConfig()


@pytest.mark.parametrize("path", RUN_TOMLS, ids=[p.parent.name for p in RUN_TOMLS])
def test_shipped_run_toml_validates_and_applies(path):
    overrides = load_run_overrides(path)
    assert overrides, f"{path} overrides nothing"
    applied = RunConfig.from_flat(overrides).to_flat()
    for key, value in overrides.items():
        assert applied[key] == value, key


def test_every_scenario_has_a_run_toml():
    assert {p.parent.name for p in RUN_TOMLS} == {p.parent.name for p in SITES_TOMLS}
    assert {"demo", "smoke", "pubmedqa"} <= {p.parent.name for p in SITES_TOMLS}


@pytest.mark.parametrize("path", SITES_TOMLS, ids=[p.parent.name for p in SITES_TOMLS])
def test_shipped_sites_toml_parses(path):
    scenario = load_scenario(str(path.parent))
    assert scenario.name == path.parent.name
    assert scenario.folder == path.parent.resolve()
    assert "site" in scenario.sites_spec or "partition" in scenario.sites_spec
    assert scenario.run_overrides == load_run_overrides(path.parent / "run.toml")


# ---------------------------------------------------------------------------------- validation


def test_typo_gets_did_you_mean():
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flat({"privacy.max-epsilom": 4.0})
    (line,) = problem_lines(exc)
    assert line.startswith("privacy.max-epsilom")
    assert "did you mean 'privacy.max-epsilon'" in line


def test_unrelated_unknown_key_has_no_misleading_suggestion():
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flat({"zzzz": 1})
    (line,) = problem_lines(exc)
    assert line.startswith("zzzz: unknown key")
    assert "did you mean" not in line


@pytest.mark.parametrize(
    "key, value, expected",
    [
        pytest.param("train.batch-size", "8", "expected int", id="str-for-int"),
        pytest.param("train.batch-size", 8.5, "expected int", id="fraction-for-int"),
        pytest.param("num-server-rounds", True, "expected int", id="bool-for-int"),
        pytest.param("privacy.enabled", 1, "expected bool", id="int-for-bool"),
        pytest.param("privacy.max-epsilon", "8", "expected float", id="str-for-float"),
        pytest.param("model.name", 3, "expected str", id="int-for-str"),
        pytest.param("lora.dropout", 1.5, "must be >= 0 and <= 0.99", id="above-range"),
        pytest.param("num-server-rounds", 0, "must be >= 1", id="below-range"),
        pytest.param("train.learning-rate", 0.0, "must be > 0", id="exclusive-bound"),
        pytest.param("privacy.max-grad-norm", math.nan, "must be > 0", id="nan"),
        pytest.param("strategy.name", "fedavgg", "must be one of fedavg, fedprox, fedadam (did you mean 'fedavg'?)",
                     id="bad-choice"),
        pytest.param("model.dtype", "fp16", "must be one of float32, bfloat16, float16", id="bad-dtype"),
    ],
)
def test_bad_value_is_one_line_naming_key(key, value, expected):
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flat({key: value})
    (line,) = problem_lines(exc)  # exactly one problem: a bad type is not also reported as a bad range
    assert line.startswith(f"{key} = {value!r}")
    assert expected in line


def test_all_problems_reported_together():
    bad = {
        "privacy.max-epsilom": 4.0,
        "train.batch-size": "8",
        "lora.dropout": 1.5,
        "strategy.name": "fedavgg",
        "data.format": "xml",
    }
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flat(bad)
    lines = problem_lines(exc)
    assert len(lines) == len(bad)
    for key in bad:
        assert sum(line.startswith(key) for line in lines) == 1, key


def test_target_epsilon_above_cap_is_rejected_only_when_calibrating():
    with pytest.raises(ConfigError, match=r"privacy\.target-epsilon = 12 is above privacy\.max-epsilon = 10"):
        RunConfig.from_flat({"privacy.target-epsilon": 12.0, "privacy.max-epsilon": 10.0})
    # with a fixed noise multiplier the target is not used, so it is not an error
    cfg = RunConfig.from_flat({"privacy.target-epsilon": 12.0, "privacy.noise-multiplier": 1.0})
    assert cfg.privacy.noise_multiplier == 1.0


def test_lenient_but_exact_coercions():
    cfg = RunConfig.from_flat({"privacy.max-epsilon": 4, "train.batch-size": 16.0, "privacy.enabled": "False"})
    assert cfg.privacy.max_epsilon == 4.0 and isinstance(cfg.privacy.max_epsilon, float)
    assert cfg.train.batch_size == 16 and isinstance(cfg.train.batch_size, int)
    assert cfg.privacy.enabled is False


def test_load_run_overrides_error_names_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[privacy]\nmax-epsilom = 4.0\n", encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_run_overrides(path)
    assert str(path) in str(exc.value)
    assert "did you mean 'privacy.max-epsilon'" in str(exc.value)


def test_invalid_toml_and_missing_file_name_the_file(tmp_path):
    broken = tmp_path / "run.toml"
    broken.write_text("[privacy\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{broken}: not valid TOML")):
        load_run_overrides(broken)
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: file not found")):
        load_run_overrides(missing)


# ---------------------------------------------------------------------------------- round trip

NON_DEFAULT = {
    "num-server-rounds": 7,
    "output-dir": 'C:\\runs\\"quoted"\nnext ü',  # backslash, quotes, newline, non-ASCII
    "model.name": "tiny-random-llama",
    "lora.r": 4,
    "lora.dropout": 0.05,
    "lora.freeze-a": False,
    "data.format": "chat",
    "train.learning-rate": 1e-4,
    "privacy.target-delta": 1e-7,
    "privacy.max-epsilon": 3.5,
    "privacy.target-epsilon": 3.0,
    "strategy.name": "fedprox",
    "federation.round-timeout": math.inf,
}


@pytest.mark.parametrize("overrides", [{}, NON_DEFAULT], ids=["defaults", "non-default"])
def test_flat_round_trip(overrides):
    cfg = RunConfig.from_flat(overrides)
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    for key, value in overrides.items():
        assert cfg.to_flat()[key] == value, key


@pytest.mark.parametrize("overrides", [{}, NON_DEFAULT], ids=["defaults", "non-default"])
def test_to_toml_parses_back_to_same_flat_dict(overrides):
    cfg = RunConfig.from_flat(overrides)
    text = to_toml(cfg, header="resolved configuration\nsecond line")
    assert text.startswith("# resolved configuration\n# second line\n")
    parsed = flatten(tomllib.loads(text))
    assert _typed(parsed) == _typed(cfg.to_flat())
    assert RunConfig.from_flat(parsed) == cfg


def test_with_overrides_validates_and_keeps_the_rest():
    base = RunConfig.from_flat({"lora.r": 4})
    changed = base.with_overrides({"privacy.max-epsilon": 9.0})
    assert changed.privacy.max_epsilon == 9.0 and changed.lora.r == 4
    assert base.privacy.max_epsilon == 10.0  # the original is untouched
    with pytest.raises(ConfigError, match="did you mean 'lora.r'"):
        base.with_overrides({"lora.rr": 2})


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("privacy.max-epsilon=4", "privacy.max-epsilon", 4),
        ("train.learning-rate=1e-3", "train.learning-rate", 0.001),
        ("lora.dropout = 0.05", "lora.dropout", 0.05),
        ("privacy.enabled=false", "privacy.enabled", False),
        ("lora.freeze-a=true", "lora.freeze-a", True),
        ('model.name="tiny random"', "model.name", "tiny random"),
        ("model.name='literal'", "model.name", "literal"),
        ("model.name=tiny-random-llama", "model.name", "tiny-random-llama"),
        ("output-dir=/tmp/run=1", "output-dir", "/tmp/run=1"),  # split on the first '='
        ("output-dir=", "output-dir", ""),
    ],
)
def test_parse_set_option(text, key, value):
    got_key, got_value = parse_set_option(text)
    assert got_key == key
    assert got_value == value and type(got_value) is type(value)


def test_parse_set_option_values_feed_the_config():
    overrides = dict(parse_set_option(t) for t in ("privacy.max-epsilon=4", "privacy.target-epsilon=3",
                                                     "data.max-length=64", "lora.freeze-a=false"))
    cfg = RunConfig.from_flat(overrides)
    assert (cfg.privacy.max_epsilon, cfg.privacy.target_epsilon) == (4.0, 3.0)
    assert (cfg.data.max_length, cfg.lora.freeze_a) == (64, False)


def test_parse_set_option_rejects_text_without_equals():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_set_option("privacy.max-epsilon")


# ---------------------------------------------------------------------------------- site config


def test_site_from_node_config():
    site = SiteConfig.from_node_config(
        {"site-name": "cardiology", "data-path": "/data/c.jsonl", "max-epsilon": 4, "ledger-path": "/l.json"}
    )
    assert site == SiteConfig(name="cardiology", data_path="/data/c.jsonl", ledger_path="/l.json", max_epsilon=4.0)
    assert SiteConfig.from_dict(site.to_dict()) == site


@pytest.mark.parametrize(
    "node, missing",
    [
        ({"data-path": "/d.jsonl", "max-epsilon": 8.0}, ["site-name"]),
        ({"site-name": "a", "max-epsilon": 8.0}, ["data-path"]),
        ({"site-name": "", "data-path": "/d.jsonl", "max-epsilon": 8.0}, ["site-name"]),
        ({"site-name": "a", "data-path": "/d.jsonl"}, ["max-epsilon"]),  # no fallback to the run's cap
        ({}, ["site-name", "data-path", "max-epsilon"]),
    ],
)
def test_site_from_node_config_requires_name_and_data(node, missing):
    with pytest.raises(ConfigError) as exc:
        SiteConfig.from_node_config(node)
    lines = problem_lines(exc)
    assert [line.split(":")[0] for line in lines] == missing


@pytest.mark.parametrize("cap", [-1.0, "4", True, 0.0, float("inf")])
def test_site_cap_must_be_a_non_negative_number(cap):
    with pytest.raises(ConfigError, match=re.escape(f"max-epsilon = {cap!r}")):
        SiteConfig.from_node_config({"site-name": "a", "data-path": "/d.jsonl", "max-epsilon": cap})


@pytest.mark.parametrize("site_cap, expected", [(4.0, 4.0), (20.0, 10.0), (10.0, 10.0)])
def test_effective_max_epsilon_only_tightens(site_cap, expected):
    site = SiteConfig(name="a", data_path="/d.jsonl", max_epsilon=site_cap)
    assert site.effective_max_epsilon(PrivacyConfig(max_epsilon=10.0)) == expected


def test_the_evaluate_section_takes_lists_or_comma_separated_strings(tmp_path):
    from fedllm.config.run import load_run_overrides

    run = tmp_path / "run.toml"
    run.write_text('[evaluate]\nmetrics = ["exact-match", "choice"]\nchoices = ["yes", "no", "maybe"]\n'
                   'reference = "first-word"\n')
    flat = load_run_overrides(run)
    assert flat["evaluate.metrics"] == "exact-match,choice"  # Flower's config carries no lists
    config = RunConfig.from_flat(flat)
    assert config.evaluate.metric_names == ("exact-match", "choice")
    assert config.evaluate.choice_list == ("yes", "no", "maybe")
    assert config.evaluate.reference == "first-word"
    assert RunConfig().evaluate.metric_names == ()


@pytest.mark.parametrize("section, expected", [
    ('metrics = ["exact-macth"]', "'exact-macth' is not a task metric (did you mean 'exact-match'?)"),
    ('metrics = ["choice"]', "'choice' but evaluate.choices lists fewer than 2 options"),
    ('metrics = ["rouge-l", "rouge-l"]', "a metric is listed twice"),
    ('choices = ["yes", "Yes"]', "an option is listed twice"),
    ('reference = "first"', "evaluate.reference = 'first': must be one of response, first-word"),
    ('metrics = [1, 2]', "evaluate.metrics = [1, 2]: expected a list of strings"),
    ('max-new-tokens = 0', "evaluate.max-new-tokens = 0: must be >= 1"),
])
def test_a_bad_evaluate_section_names_the_file_key_and_fix(tmp_path, section, expected):
    from fedllm.config.run import load_run_overrides

    run = tmp_path / "run.toml"
    run.write_text(f"[evaluate]\n{section}\n")
    with pytest.raises(ConfigError) as err:
        load_run_overrides(run)
    assert str(run) in str(err.value) and expected in str(err.value)


def test_automatic_client_cpus_share_the_cores_among_the_sites_of_a_round():
    from fedllm.simulation.runner import client_cpus_for

    auto = RunConfig.from_flat({})
    assert auto.simulation.client_cpus == 0
    assert client_cpus_for(auto, 3, cores=2) == 1  # more sites than cores: one thread each
    assert client_cpus_for(auto, 1, cores=2) == 2  # a lone site uses every core
    assert client_cpus_for(auto, 4, cores=16) == 4
    sampled = RunConfig.from_flat({"strategy.fraction-train": 0.1, "strategy.min-train-sites": 2})
    assert client_cpus_for(sampled, 100, cores=16) == 1  # 10 sites a round
    assert client_cpus_for(sampled, 10, cores=16) == 8  # 2 sites a round (min-train-sites)
    assert client_cpus_for(RunConfig.from_flat({"simulation.client-cpus": 3}), 1, cores=2) == 3  # as set


def test_automatic_simulation_runs_a_round_s_sites_at_once_rather_than_leave_a_core_idle():
    from fedllm.simulation.runner import simulation_cpus

    auto = RunConfig.from_flat({})
    assert simulation_cpus(auto, 3, cores=2) == 3  # 3 sites on 2 cores: all at once, not 2 + 1
    assert simulation_cpus(auto, 4, cores=2) == 2  # two even waves
    assert simulation_cpus(auto, 5, cores=2) == 2  # more than twice the cores: waves
    assert simulation_cpus(auto, 1, cores=2) == 2
    assert simulation_cpus(RunConfig.from_flat({"simulation.client-cpus": 1}), 3, cores=2) == 2  # as set: cores
