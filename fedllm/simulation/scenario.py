"""Scenario folders (``simulations/<name>/``) -> the virtual sites of a simulated federation.

A scenario folder holds:

* ``run.toml``: run-config overrides (only keys of ``[tool.flwr.app.config]``);
* ``sites.toml``: the virtual sites, in one of three forms:
  - ``[[site]]`` tables with the keys of a site file (the site schema, :mod:`fedllm.config.site`):
    ``site-name``, ``data-path`` (a file or saved dataset folder, relative to the scenario folder),
    ``max-epsilon`` (required: the site's own cap, which the run's can only tighten), and optionally
    ``max-delta`` (the site's δ; default automatic),
    ``eval-fraction`` / ``max-eval-examples`` (the site's own held-out split),
    ``device``, ``data-columns`` (its column mapping, ``"FIELD=COLUMN, ..."``), ``require-dp``
    (default true: set false for a no-DP baseline), ``ledger-path``, ``signing-key``; checked by
    the schema's one validator, every problem of every entry reported at once;
  - ``[partition]`` with ``data``, ``num-sites``, ``method`` ("iid", "dirichlet", "natural-id",
    "shard" or "pathological", Flower Datasets' partitioners), ``partition-by`` (a column),
    ``seed`` and the method's own keys: one dataset split into simulated sites (the keys are in
    ``fedllm.simulation.partition_table``);
  - ``[pubmedqa]`` with ``path`` (the shared PubMedQA folder, relative to the scenario folder;
    ``$FEDLLM_PUBMEDQA_DIR`` overrides it) plus ``[[site]]`` tables whose ``site-name`` names a
    population site (their data-path is the file written for them);
* ``README.md``: the command, the expected runtime and the expected final ε.

Sites built from a partition or from PubMedQA are written as JSONL files into the run's output
folder (``data/<site>.jsonl``) before the run starts; the scenario folder is never modified.

Named scenarios are the folders of the repository's ``simulations/``. A wheel ships them as the
data package ``fedllm.scenarios`` (pyproject.toml), found with ``importlib.resources``; in a
source checkout or an editable install they are read from ``simulations/`` itself.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.config import SITE_PATH_KEYS, SiteConfig, load_run_overrides, read_toml, site_problems
from fedllm.data.loading import columns_problem
from fedllm.errors import ConfigError


def scenarios_dir() -> Path:
    """Where named scenarios live: ``fedllm/scenarios`` in an installed wheel, else the
    repository's ``simulations/`` (source checkout, editable install)."""
    shipped = Path(str(importlib.resources.files("fedllm") / "scenarios"))
    return shipped if shipped.is_dir() else Path(__file__).resolve().parents[2] / "simulations"


SCENARIOS_DIR = scenarios_dir()


@dataclass(frozen=True)
class Scenario:
    """A scenario folder, read but not yet materialised."""

    name: str
    folder: Path
    run_overrides: dict[str, Any]
    sites_spec: dict[str, Any]


def find_scenario(name_or_path: str) -> Path:
    """A path to a scenario folder, or a name under ``simulations/``."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    candidate = SCENARIOS_DIR / name_or_path
    if candidate.is_dir():
        return candidate
    available = sorted(p.name for p in SCENARIOS_DIR.iterdir() if (p / "sites.toml").is_file()) if SCENARIOS_DIR.is_dir() else []
    raise ConfigError(f"scenario {name_or_path!r} not found; give a folder or one of: {', '.join(available) or '(none)'}")


def load_scenario(name_or_path: str) -> Scenario:
    folder = find_scenario(name_or_path)
    sites_file = folder / "sites.toml"
    if not sites_file.is_file():
        raise ConfigError(f"{folder}: no sites.toml; a scenario folder needs run.toml and sites.toml")
    run_file = folder / "run.toml"
    overrides = load_run_overrides(run_file) if run_file.is_file() else {}
    return Scenario(name=folder.name, folder=folder, run_overrides=overrides, sites_spec=read_toml(sites_file))


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    os.replace(tmp, path)


def _check_columns(table: dict[str, Any], where: str) -> str:
    columns = table.get("data-columns", "")
    if why := columns_problem(columns):
        raise ConfigError(f"{where}: data-columns = {columns!r}: {why}")
    return columns


def _site_entries(spec: dict[str, Any], where: Path,
                  resolve: Callable[[dict[str, Any]], dict[str, Any]]) -> list[SiteConfig]:
    """The ``[[site]]`` tables as sites, checked by the site schema's one validator: every problem
    of every entry in one ``ConfigError`` naming the file. ``resolve(entry)``: the entry with its
    paths as the simulation uses them (absolute)."""
    entries = spec.get("site", [])
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ConfigError(f"{where}: 'site' must be an array of tables ([[site]])")
    sites, invalid = [], []
    for i, entry in enumerate(entries, start=1):
        resolved = resolve(entry)
        problems = site_problems(resolved)
        if problems:
            name = entry.get("site-name")
            label = f"site {i} ({name!r})" if isinstance(name, str) and name else f"site {i}"
            invalid.append(f"  {label}:\n  - " + "\n  - ".join(problems))
        else:
            sites.append(SiteConfig.from_dict(resolved))
    if invalid:
        raise ConfigError(f"{where}: invalid [[site]] entries (site keys as in a site file):\n" + "\n".join(invalid))
    names = [site.name for site in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: site names must be unique, found {names}")
    return sites


def _in_folder(entry: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``entry`` with its relative paths (data-path, ledger-path, signing-key) resolved from ``folder``."""
    return {key: str((folder / Path(value).expanduser()).resolve())
            if key in SITE_PATH_KEYS and isinstance(value, str) and value else value
            for key, value in entry.items()}


def materialise_sites(scenario: Scenario, output: Path) -> list[SiteConfig]:
    """The scenario's virtual sites, in partition-id order, with absolute data paths."""
    spec, where = scenario.sites_spec, scenario.folder / "sites.toml"
    if "partition" in spec:
        from fedllm.simulation.partition_table import partition_sites

        return partition_sites(spec["partition"], scenario.folder, output, where)
    if "pubmedqa" in spec:  # population sites: data-path is the file written below
        sites = _site_entries(spec, where, lambda entry: {
            **_in_folder(entry, scenario.folder), "data-path": str(output / "data" / f"{entry.get('site-name')}.jsonl")})
    else:
        sites = _site_entries(spec, where, lambda entry: _in_folder(entry, scenario.folder))
    if not sites:
        raise ConfigError(f"{where}: no sites; add [[site]] tables or a [partition] table")
    if "pubmedqa" in spec:
        from fedllm.data.pubmedqa import pubmedqa_site_records

        folder = Path(os.environ.get("FEDLLM_PUBMEDQA_DIR") or (scenario.folder / spec["pubmedqa"].get("path", "")).resolve())
        records = pubmedqa_site_records(folder)
        for site in sites:
            if site.name not in records:
                raise ConfigError(f"{where}: PubMedQA has no site {site.name!r}; use {', '.join(records)}")
        for site in sites:
            _write_jsonl(Path(site.data_path), records[site.name])
    return sites
