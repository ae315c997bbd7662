"""Scenario folders -> virtual sites: shipped scenarios materialise with real data files, partitions
lose and duplicate nothing, and a bad sites.toml is rejected with an error naming the file."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from fedllm.config import RunConfig
from fedllm.data.loading import load_records
from fedllm.errors import ConfigError, DataError
from fedllm.simulation.scenario import (
    SCENARIOS_DIR,
    find_scenario,
    load_scenario,
    materialise_sites,
)
from tests.helpers import PUBMEDQA_DIR, write_jsonl


def _key(record: dict) -> str:
    return json.dumps(record, sort_keys=True)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_demo_scenario_sites(tmp_path):
    scenario = load_scenario("demo")
    before = {p: p.read_bytes() for p in _files(scenario.folder)}
    sites = materialise_sites(scenario, tmp_path / "out")
    assert [s.name for s in sites] == ["st-ada-cardiology", "northbridge-pediatrics", "lakeside-oncology"]
    for site in sites:
        path = Path(site.data_path)
        assert path.is_absolute() and path.is_file(), site
        assert len(load_records(path)) >= 2
    assert {s.name: s.max_epsilon for s in sites} == {
        "st-ada-cardiology": 8.0, "northbridge-pediatrics": 8.0, "lakeside-oncology": 6.0}
    # every site states its own cap (required); the run's cap of 8 (run.toml) could only tighten them
    privacy = RunConfig.from_flat(scenario.run_overrides).privacy
    assert [s.effective_max_epsilon(privacy) for s in sites] == [8.0, 8.0, 6.0]
    assert {p: p.read_bytes() for p in _files(scenario.folder)} == before  # scenario folder untouched


def test_smoke_scenario_partitions_the_source_into_output(tmp_path):
    scenario = load_scenario("smoke")
    source = load_records(scenario.folder / scenario.sites_spec["partition"]["data"])
    sites = materialise_sites(scenario, tmp_path / "out")
    assert [s.name for s in sites] == ["site-00", "site-01", "site-02"]
    parts = []
    for site in sites:
        path = Path(site.data_path)
        assert path.parent == tmp_path / "out" / "data" and path.is_file()
        records = load_records(path)
        assert records, site.name
        parts.append(records)
    assert sum(map(len, parts)) == len(source)
    # together the sites hold exactly the source records: none lost, none duplicated
    assert Counter(_key(r) for p in parts for r in p) == Counter(_key(r) for r in source)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # iid: equal shares
    # reproducible: the same scenario writes the same files
    again = materialise_sites(scenario, tmp_path / "again")
    assert [Path(s.data_path).read_bytes() for s in again] == [Path(s.data_path).read_bytes() for s in sites]
    assert not list(tmp_path.rglob("*.tmp"))  # no half-written files left behind


def test_pubmedqa_scenario_writes_population_sites(tmp_path, monkeypatch):
    if not (PUBMEDQA_DIR / "ori_pqal.json").is_file():
        pytest.skip(f"shared PubMedQA copy not present at {PUBMEDQA_DIR}")
    monkeypatch.delenv("FEDLLM_PUBMEDQA_DIR", raising=False)  # use the path in sites.toml
    sites = materialise_sites(load_scenario("pubmedqa"), tmp_path)
    counts = {s.name: len(load_records(s.data_path)) for s in sites}
    assert counts == {"pediatric": 276, "geriatric": 335, "adult": 208, "other": 181}
    assert all(Path(s.data_path).parent == tmp_path / "data" for s in sites)


def test_pubmedqa_env_var_overrides_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLLM_PUBMEDQA_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(DataError, match="elsewhere"):
        materialise_sites(load_scenario("pubmedqa"), tmp_path / "out")


def test_find_scenario_by_name_and_by_path(tmp_path):
    assert find_scenario("demo") == SCENARIOS_DIR / "demo"
    assert find_scenario(str(SCENARIOS_DIR / "smoke")) == (SCENARIOS_DIR / "smoke").resolve()


def test_unknown_scenario_lists_the_available_ones():
    with pytest.raises(ConfigError) as exc:
        find_scenario("no-such-scenario")
    message = str(exc.value)
    assert "'no-such-scenario' not found" in message
    assert "demo, pubmedqa, smoke" in message


# --------------------------------------------------------------------------------- bad sites.toml


def _scenario(tmp_path: Path, sites_toml: str, *, run_toml: str | None = None) -> Path:
    folder = tmp_path / "scn"
    (folder / "data").mkdir(parents=True)
    rows = [{"instruction": f"Q{i}?", "output": f"A{i}.", "topic": "ab"[i % 2]} for i in range(12)]
    write_jsonl(folder / "data" / "a.jsonl", rows)
    with open(folder / "data" / "a.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["instruction", "output", "topic"])
        writer.writeheader()
        writer.writerows(rows)
    (folder / "sites.toml").write_text(sites_toml, encoding="utf-8")
    if run_toml is not None:
        (folder / "run.toml").write_text(run_toml, encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    "sites_toml, detail",
    [
        pytest.param('[[site]]\nsite-name = "a"\ndata-path = "data/a.jsonl"\nmax-epsilon = 8.0\n[[site]]\nsite-name = "a"\n'
                     'data-path = "data/a.jsonl"\nmax-epsilon = 8.0\n', "site names must be unique", id="duplicate-names"),
        pytest.param('[[site]]\nsite-name = "a"\ndata-path = "data/a.jsonl"\nmax-epsilon = 8.0\nmax-epsilom = 4.0\n',
                     "site 1 ('a'):\n  - max-epsilom: unknown key (did you mean 'max-epsilon'?)", id="unknown-key"),
        pytest.param('[[site]]\nsite-name = "a"\n', "site 1 ('a'):\n  - data-path: required", id="missing-data"),
        pytest.param('[[site]]\ndata-path = "data/a.jsonl"\nmax-epsilon = 8.0\n', "site 1:\n  - site-name: required", id="missing-name"),
        pytest.param('[[site]]\nname = "a"\ndata = "data/a.jsonl"\n',
                     "name: unknown key (did you mean 'site-name'?)", id="old-key-names"),
        pytest.param("# nothing here\n", "no sites", id="no-sites"),
        pytest.param('[partition]\nmax-epsilon = 8.0\ndata = "data/a.jsonl"\n', "[partition] needs 'num-sites'", id="partition-no-count"),
        pytest.param('[partition]\nmax-epsilon = 8.0\ndata = "data/a.jsonl"\nnum-sites = 2\nmethod = "kmeans"\n',
                     "method 'kmeans': use 'iid', 'dirichlet', 'natural-id', 'shard' or 'pathological'",
                     id="partition-bad-method"),
        pytest.param('[partition]\nmax-epsilon = 8.0\ndata = "data/a.jsonl"\nnum-sites = 2\nmethod = "dirichlet"\n',
                     "method 'dirichlet' needs 'partition-by' (a column of a.jsonl)", id="dirichlet-no-column"),
        pytest.param('[partition]\nmax-epsilon = 8.0\ndata = "data/a.jsonl"\nnum-sites = 2\nmethod = "dirichlet"\nlabel = "topic"\n',
                     "'label' is now 'partition-by'", id="label-renamed"),
        pytest.param('[partition]\nmax-epsilon = 8.0\ndata = "data/a.jsonl"\nnum-sites = 2\nnum-site = 2\n',
                     "unknown key 'num-site' (did you mean 'num-sites'?)", id="partition-unknown-key"),
        pytest.param('[partition]\nmax-epsilon = 8.0\ndata = "data/a.jsonl"\nnum-sites = 2\nalpha = 0.5\n',
                     "'alpha' applies to method 'dirichlet', not 'iid'", id="partition-key-of-another-method"),
        pytest.param('[partition]\nmax-epsilon = 8.0\ndata = "data/a.jsonl"\nnum-sites = 2\nmethod = "shard"\npartition-by = "topic"\n',
                     "method 'shard' needs 'num-shards-per-partition' or 'shard-size'", id="shard-no-size"),
        pytest.param('[partition]\nmax-epsilon = 8.0\ndata = "data/a.jsonl"\nnum-sites = 2\nmethod = "pathological"\n'
                     'partition-by = "topic"\n', "method 'pathological' needs 'num-classes-per-partition'",
                     id="pathological-no-count"),
        pytest.param('[partition]\nmax-epsilon = 8.0\ndata = "data/a.jsonl"\nnum-sites = 2\nmethod = "dirichlet"\n'
                     'partition-by = "topic"\nalpha = 0\n', "alpha = 0: must be a number > 0", id="dirichlet-bad-alpha"),
        pytest.param('[partition]\nmax-epsilon = 8.0\ndata = "data/a.jsonl"\nnum-sites = 2\nmethod = "dirichlet"\n'
                     'partition-by = "colour"\n', "partition-by = 'colour': ", id="partition-by-missing-column"),
    ],
)
def test_bad_sites_toml_names_the_file(tmp_path, sites_toml, detail):
    folder = _scenario(tmp_path, sites_toml)
    with pytest.raises(ConfigError) as exc:
        materialise_sites(load_scenario(str(folder)), tmp_path / "out")
    assert str(exc.value).startswith(f"{folder / 'sites.toml'}: ")
    assert detail in str(exc.value)


def test_invalid_sites_toml_and_run_toml_name_the_file(tmp_path):
    folder = _scenario(tmp_path, "[[site]\n")
    with pytest.raises(ConfigError, match="sites.toml: not valid TOML"):
        load_scenario(str(folder))
    folder = _scenario(tmp_path / "b", '[[site]]\nsite-name = "a"\ndata-path = "data/a.jsonl"\nmax-epsilon = 8.0\n',
                       run_toml="[privacy]\nmax-epsilom = 3.0\n")
    with pytest.raises(ConfigError) as exc:
        load_scenario(str(folder))
    assert str(folder / "run.toml") in str(exc.value)
    assert "did you mean 'privacy.max-epsilon'" in str(exc.value)


def test_folder_without_sites_toml_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="no sites.toml"):
        load_scenario(str(tmp_path))


def test_dirichlet_partition_of_a_jsonl_file(tmp_path):
    folder = _scenario(tmp_path, '[partition]\ndata = "data/a.jsonl"\nnum-sites = 3\nmethod = "dirichlet"\n'
                                 'partition-by = "topic"\nalpha = 0.3\nseed = 1\nmax-epsilon = 2.0\n')
    sites = materialise_sites(load_scenario(str(folder)), tmp_path / "out")
    assert len(sites) == 3 and all(s.max_epsilon == 2.0 for s in sites)
    assert sum(len(load_records(s.data_path)) for s in sites) == 12


def test_partition_with_more_sites_than_records_names_the_file(tmp_path):
    folder = _scenario(tmp_path, '[partition]\nmax-epsilon = 8.0\ndata = "data/a.jsonl"\nnum-sites = 20\n')
    with pytest.raises(ConfigError, match="sites.toml"):
        materialise_sites(load_scenario(str(folder)), tmp_path / "out")


def test_dirichlet_partition_of_a_csv_file(tmp_path):
    folder = _scenario(tmp_path, '[partition]\nmax-epsilon = 8.0\ndata = "data/a.csv"\nnum-sites = 2\nmethod = "dirichlet"\n'
                                 'partition-by = "topic"\n')
    sites = materialise_sites(load_scenario(str(folder)), tmp_path / "out")
    assert sum(len(load_records(s.data_path)) for s in sites) == 12


# ------------------------------------------------------------------- [partition] methods (flwr-datasets)


def _topics(sites) -> list[set[str]]:
    return [{r["messages"][0]["content"] for r in load_records(s.data_path)} for s in sites]


def _materialise(tmp_path: Path, sites_toml: str, out: str = "out"):
    """The sites of a fresh scenario folder under ``tmp_path/out``, written to ``tmp_path/out/run``."""
    return materialise_sites(load_scenario(str(_scenario(tmp_path / out, sites_toml))), tmp_path / out / "run")


@pytest.mark.parametrize(
    "table",
    [
        pytest.param('method = "iid"\nnum-sites = 3\n', id="iid"),
        pytest.param('method = "dirichlet"\nnum-sites = 2\npartition-by = "topic"\nalpha = 5.0\n', id="dirichlet"),
        pytest.param('method = "natural-id"\npartition-by = "topic"\n', id="natural-id"),
        pytest.param('method = "shard"\nnum-sites = 3\npartition-by = "topic"\nshard-size = 4\n', id="shard"),
        pytest.param('method = "pathological"\nnum-sites = 2\npartition-by = "topic"\n'
                     'num-classes-per-partition = 1\nclass-assignment-mode = "deterministic"\n', id="pathological"),
    ],
)
def test_every_partition_method_is_deterministic_and_gives_every_site_records(tmp_path, table):
    toml = f'[partition]\nmax-epsilon = 8.0\ndata = "data/a.jsonl"\nseed = 4\n{table}'
    sites = _materialise(tmp_path, toml, "a")
    again = _materialise(tmp_path, toml, "b")
    assert [s.name for s in sites] == [f"site-{i:02d}" for i in range(len(sites))] and len(sites) >= 2
    assert all(load_records(s.data_path) for s in sites)  # non-empty
    assert [Path(s.data_path).read_bytes() for s in again] == [Path(s.data_path).read_bytes() for s in sites]
    # disjoint: no source record is written to two sites (all 12 are distinct)
    assert sum(len(t) for t in _topics(sites)) == len(set().union(*_topics(sites)))


def test_natural_id_partition_gives_one_site_per_column_value(tmp_path):
    sites = _materialise(tmp_path, '[partition]\nmax-epsilon = 8.0\ndata = "data/a.csv"\nmethod = "natural-id"\npartition-by = "topic"\n')
    # _scenario's rows: topic "a" for even i, "b" for odd i; sites in sorted order of the values
    assert _topics(sites) == [{f"Q{i}?" for i in range(0, 12, 2)}, {f"Q{i}?" for i in range(1, 12, 2)}]
    with pytest.raises(ConfigError, match="num-sites = 3 but column 'topic' of .* has 2 distinct values"):
        _materialise(tmp_path, '[partition]\nmax-epsilon = 8.0\ndata = "data/a.csv"\nmethod = "natural-id"\npartition-by = "topic"\n'
                               'num-sites = 3\n', "b")


def test_partition_seed_changes_the_split(tmp_path):
    table = '[partition]\nmax-epsilon = 8.0\ndata = "data/a.jsonl"\nmethod = "dirichlet"\nnum-sites = 2\npartition-by = "topic"\n'
    assert _topics(_materialise(tmp_path, table + "seed = 1\n", "a")) != _topics(
        _materialise(tmp_path, table + "seed = 2\n", "b"))


@pytest.mark.parametrize(
    "table, keys",
    [
        pytest.param('method = "dirichlet"\nnum-sites = 10\npartition-by = "topic"\nalpha = 0.01\n',
                     "change alpha, min-partition-size or num-sites", id="dirichlet"),
        pytest.param('method = "shard"\nnum-sites = 3\npartition-by = "topic"\nshard-size = 5\n',
                     "change shard-size, num-shards-per-partition or num-sites", id="shard"),
    ],
)
def test_a_partition_that_leaves_a_site_empty_is_refused(tmp_path, table, keys):
    folder = _scenario(tmp_path, f'[partition]\nmax-epsilon = 8.0\ndata = "data/a.jsonl"\n{table}')
    with pytest.raises(ConfigError) as exc:
        materialise_sites(load_scenario(str(folder)), tmp_path / "out")
    message = str(exc.value)
    assert message.startswith(f"{folder / 'sites.toml'}: [partition] method ")
    assert "cannot split a.jsonl (12 records) into" in message and message.endswith(keys)
    assert not (tmp_path / "out" / "data").exists()  # nothing written


def test_shipped_scenarios_load():
    for name in ("demo", "pubmedqa", "bank", "smoke"):
        scenario = load_scenario(name)
        assert scenario.folder == SCENARIOS_DIR / name and scenario.run_overrides
    assert Path(__file__).resolve().parents[2] / "simulations" == SCENARIOS_DIR  # a checkout reads simulations/
