"""The one site schema: a site file, a SuperNode's node config, a scenario's ``[[site]]`` table and
the simulation's ``sites.json`` are read by the same validator under the same keys, so the same bad
entry gets the same problem lines everywhere, one name rule (1-64 characters) holds everywhere, and
``require-dp`` has one default. Plus: every TOML file fedllm writes parses back to what was written."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from fedllm.config import SITE_DEFAULTS, SITE_KEYS, SITE_NAME_RE, RunConfig, SiteConfig, toml_value
from fedllm.deploy.certs import create_dev_pki
from fedllm.deploy.site_file import load_site_file, node_config_value
from fedllm.errors import ConfigError
from fedllm.simulation.scenario import load_scenario, materialise_sites
from tests.helpers import problem_lines

NAME_64 = "n" * 64
NAME_65 = "n" * 65


def _toml(entry: dict) -> str:
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in entry.items())


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "hello"}\n' * 4, encoding="utf-8")
    (tmp_path / "run.toml").write_text("", encoding="utf-8")
    return tmp_path


def _from_every_reader(folder: Path, entry: dict) -> dict[str, list[str] | SiteConfig]:
    """``entry`` (site keys, data-path relative to ``folder``) read as a site file, a node config
    (data-path absolute), a scenario [[site]] table and a sites.json entry: the problem lines of
    each reader's ConfigError, or the SiteConfig it built."""
    absolute = {**entry, "data-path": str(folder / entry["data-path"])} if "data-path" in entry else entry
    (folder / "site.toml").write_text(_toml(entry), encoding="utf-8")
    (folder / "sites.toml").write_text("[[site]]\n" + _toml(entry), encoding="utf-8")
    readers = {
        "site file": lambda: load_site_file(folder / "site.toml").site,
        "node config": lambda: SiteConfig.from_node_config(absolute),
        "scenario": lambda: materialise_sites(load_scenario(str(folder)), folder / "out")[0],
        "sites.json": lambda: SiteConfig.from_dict(json.loads(json.dumps(absolute))),
    }
    out: dict[str, list[str] | SiteConfig] = {}
    for name, read in readers.items():
        try:
            out[name] = read()
        except ConfigError as exc:
            out[name] = [line.strip()[2:] for line in str(exc).splitlines() if line.strip().startswith("- ")]
    return out


def test_the_same_bad_entry_gets_the_same_problem_lines_from_every_reader(folder: Path) -> None:
    bad = {"site-name": ".hidden", "data-path": "data/a.jsonl", "max-epsilom": 4.0, "max-epsilon": -1,
           "device": "gpu"}
    results = _from_every_reader(folder, bad)
    expected = [
        "max-epsilom: unknown key (did you mean 'max-epsilon'?); site keys: " + ", ".join(SITE_KEYS),
        "site-name = '.hidden': must be 1 to 64 letters, digits, '.', '_' and '-', not starting with '.' (it names "
        "the site's ledger and state files), e.g. \"cardiology\"",
        "max-epsilon = -1: must be a finite number > 0: the site's own cap on its cumulative ε, at its own δ "
        "(max-delta); e.g. max-epsilon = 8.0",
        'device = \'gpu\': must be "cpu", "cuda", "cuda:N" or "mps"',
    ]
    assert results == {reader: expected for reader in results}


def test_the_same_good_entry_gives_the_same_site_from_every_reader(folder: Path) -> None:
    good = {"site-name": "x.y-z_1", "data-path": "data/a.jsonl", "max-epsilon": 3, "device": "cuda:1",
            "data-columns": "text=text", "require-dp": False}
    results = _from_every_reader(folder, good)
    expected = SiteConfig(name="x.y-z_1", data_path=str(folder / "data" / "a.jsonl"), max_epsilon=3.0,
                          device="cuda:1", data_columns="text=text", require_dp=False)
    assert results["site file"].ledger_path == str(folder / "ledgers" / "x.y-z_1.json")  # the file's own default
    results["site file"] = SiteConfig.from_dict({**results["site file"].to_dict(), "ledger-path": ""})
    assert results == {reader: expected for reader in results}


def test_require_dp_defaults_to_true_for_every_reader(folder: Path) -> None:
    results = _from_every_reader(folder, {"site-name": "a", "data-path": "data/a.jsonl", "max-epsilon": 8.0})
    assert {reader: site.require_dp for reader, site in results.items()} == {reader: True for reader in results}
    assert SiteConfig(name="a", data_path="/d", max_epsilon=8.0).require_dp is True and SITE_DEFAULTS["require-dp"] is True


def test_a_65_character_name_is_refused_everywhere_and_64_is_accepted(folder: Path, tmp_path: Path) -> None:
    for reader, result in _from_every_reader(folder, {"site-name": NAME_65, "data-path": "data/a.jsonl", "max-epsilon": 8.0}).items():
        assert isinstance(result, list) and len(result) == 1, reader
        assert result[0].startswith(f"site-name = '{NAME_65}': must be 1 to 64 letters"), reader
    with pytest.raises(ConfigError, match=f"--sites: '{NAME_65}' is not a site name"):
        create_dev_pki(tmp_path / "pki", server_names=[], sites=[NAME_65])
    for reader, result in _from_every_reader(folder, {"site-name": NAME_64, "data-path": "data/a.jsonl", "max-epsilon": 8.0}).items():
        assert isinstance(result, SiteConfig) and result.name == NAME_64, reader
    create_dev_pki(tmp_path / "pki", server_names=[], sites=[NAME_64])
    assert (tmp_path / "pki" / "sites" / NAME_64).is_file()


def test_the_resend_store_uses_the_same_name_rule(tmp_path: Path) -> None:
    from fedllm.site.resend_store import ReleaseCache

    assert ReleaseCache(tmp_path, site=NAME_64).path.name == f"{NAME_64}.release.safetensors"
    for odd in (NAME_65, ".hidden", ".."):  # not site names: never a file name of their own
        assert ReleaseCache(tmp_path, site=odd).path.name.startswith("site-")


@pytest.mark.parametrize("name, ok", [("a", True), ("A-b_c.9", True), ("-x", True), ("_", True), (".x", False),
                                      ("", False), ("a/b", False), ("a b", False), ("ü", False), ("..", False)])
def test_site_name_rule(name: str, ok: bool) -> None:
    assert bool(SITE_NAME_RE.fullmatch(name)) is ok


def test_every_problem_of_every_scenario_entry_is_reported_at_once(folder: Path) -> None:
    (folder / "sites.toml").write_text('[[site]]\nsite-name = "a"\ndata-path = "data/a.jsonl"\nmax-epsilon = "4"\n'
                                       '[[site]]\nsite-name = "b"\ndata-path = "data/a.jsonl"\nmax-epsilon = 8.0\n'
                                       '[[site]]\nsite-name = "c/d"\nrequire-dp = "no"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        materialise_sites(load_scenario(str(folder)), folder / "out")
    text = str(exc.value)
    assert text.startswith(f"{folder / 'sites.toml'}: invalid [[site]] entries")
    assert "site 1 ('a'):" in text and "site 3 ('c/d'):" in text and "site 2" not in text
    assert [line.split(":")[0].split(" = ")[0] for line in problem_lines(exc)] == [
        "max-epsilon", "site-name", "data-path", "max-epsilon", "require-dp"]  # site 3 lacks the required cap


def test_scenario_paths_are_relative_to_the_scenario_folder(folder: Path) -> None:
    (folder / "sites.toml").write_text('[[site]]\nsite-name = "a"\ndata-path = "data/a.jsonl"\nmax-epsilon = 8.0\n'
                                       'ledger-path = "ledgers/a.json"\n', encoding="utf-8")
    [site] = materialise_sites(load_scenario(str(folder)), folder / "out")
    assert (site.data_path, site.ledger_path) == (str(folder / "data" / "a.jsonl"), str(folder / "ledgers" / "a.json"))


def test_to_dict_writes_every_key_and_reads_back() -> None:
    site = SiteConfig(name="a", data_path="/d", ledger_path="/l", max_epsilon=2.5, device="mps",
                      signing_key="/k", require_dp=False, data_columns="text=body")
    assert tuple(site.to_dict()) == SITE_KEYS
    assert SiteConfig.from_dict(site.to_dict()) == site


# ------------------------------------------------------------------------ TOML written with tomli_w

ODD = 'C:\\dir\\"quoted" \\" ü\ttab\nnewline \x7f \'single\''


def test_node_config_values_with_backslashes_and_quotes_survive_flowers_parser() -> None:
    from flwr.common.config import parse_config_args

    values = {"a": ODD, "b": '\\"', "c": '\\\\"\\', "d": 3.0, "e": False, "f": 7}
    text = " ".join(f"{key}={node_config_value(value)}" for key, value in values.items())
    assert parse_config_args([text]) == values


def test_flower_files_parse_back_to_what_was_written(tmp_path: Path) -> None:
    from fedllm.flower.processes import Connection, write_app_folder, write_run_overrides

    cert = tmp_path / ODD.replace("\n", "").replace("\x7f", "").replace("\\", "").replace("/", "")
    Connection("127.0.0.1:9092", root_certificates=str(cert)).write(tmp_path / "home")
    config = tomllib.loads((tmp_path / "home" / "config.toml").read_text(encoding="utf-8"))
    assert config == {"superlink": {"default": "fedllm", "fedllm": {"address": "127.0.0.1:9092",
                                                                    "root-certificates": str(cert.resolve())}}}
    Connection("127.0.0.1:9092", insecure=True).write(tmp_path / "home")
    config = tomllib.loads((tmp_path / "home" / "config.toml").read_text(encoding="utf-8"))
    assert config["superlink"]["fedllm"] == {"address": "127.0.0.1:9092", "insecure": True}

    flat = RunConfig.from_flat({"output-dir": ODD, "federation.round-timeout": float("inf")}).to_flat()
    write_app_folder(tmp_path / "app", flat)
    app = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text(encoding="utf-8"))
    assert app["tool"]["flwr"]["app"]["config"] == flat
    assert app["tool"]["flwr"]["app"]["components"] == {"serverapp": "fedllm.flower.server_app:app",
                                                        "clientapp": "fedllm.flower.client_app:app"}
    write_run_overrides(tmp_path / "run.toml", flat)
    assert tomllib.loads((tmp_path / "run.toml").read_text(encoding="utf-8")) == flat
