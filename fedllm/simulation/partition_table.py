"""A scenario's ``[partition]`` table: one dataset split into simulated sites.

Keys (kebab-case twins of Flower Datasets' partitioner arguments, documented in
docs/configuration.md#scenario-partition):

* every method: ``data`` (a file or saved dataset folder, relative to the scenario folder),
  ``num-sites``, ``method``, ``seed`` (default 0), ``data-columns``, ``max-epsilon`` (required:
  the same cap for every site), ``max-delta`` (default 0: each site's automatic δ),
  ``release-metrics`` (the same setting for every site; default "dp"), ``eval-fraction`` and
  ``max-eval-examples`` (every site's held-out policy, as in a site file);
* ``dirichlet``: ``partition-by`` (a column of the data), ``alpha`` (default 0.5),
  ``min-partition-size`` (default 1), ``self-balancing`` (default false);
* ``natural-id``: ``partition-by``, the column whose values name the sites' true owners; one site
  per value, in sorted order; ``num-sites`` is optional and, if given, must equal the count;
* ``shard``: ``partition-by``, ``num-shards-per-partition`` and/or ``shard-size``,
  ``keep-incomplete-shard`` (default false);
* ``pathological``: ``partition-by``, ``num-classes-per-partition`` (required),
  ``class-assignment-mode`` ("random", "deterministic" or "first-deterministic"; default random).

``partition-by`` names a column of the source data as stored (before ``data-columns`` renames
anything). Sites are named ``site-00``, ``site-01``, ... (``site-000`` from 100 sites on); each
site's records are written, normalised, to ``OUTPUT/data/<site>.jsonl``. The same table and
seed always give the same files; a split that would leave a site empty is a ``ConfigError``.
"""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Any

from fedllm.config import SiteConfig, site_problems
from fedllm.data.loading import columns_problem
from fedllm.errors import ConfigError
from fedllm.files import write_text_atomic

logger = logging.getLogger(__name__)

COMMON_KEYS = ("data", "num-sites", "method", "seed", "data-columns", "max-epsilon", "max-delta", "release-metrics",
               "eval-fraction", "max-eval-examples")
_SITE_POLICY_KEYS = ("max-epsilon", "max-delta", "release-metrics", "eval-fraction", "max-eval-examples")
METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "iid": (),
    "dirichlet": ("partition-by", "alpha", "min-partition-size", "self-balancing"),
    "natural-id": ("partition-by",),
    "shard": ("partition-by", "num-shards-per-partition", "shard-size", "keep-incomplete-shard"),
    "pathological": ("partition-by", "num-classes-per-partition", "class-assignment-mode"),
}
# the keys to change when a method cannot make the split, for the error message
REMEDY = {
    "iid": "num-sites",
    "dirichlet": "alpha, min-partition-size or num-sites",
    "natural-id": "partition-by",
    "shard": "shard-size, num-shards-per-partition or num-sites",
    "pathological": "num-classes-per-partition, class-assignment-mode or num-sites",
}
ASSIGNMENT_MODES = ("random", "deterministic", "first-deterministic")


def partition_sites(table: Any, folder: Path, output: Path, where: Path) -> list[SiteConfig]:
    """The simulated sites of a ``[partition]`` table, their data written under ``output/data``.
    ``where`` (the scenario's sites.toml) starts every error message."""
    from fedllm.data import partition
    from fedllm.data.loading import load_records, read_raw

    at = f"{where}: [partition]"
    if not isinstance(table, dict):
        raise ConfigError(f"{at} must be a table")
    method = table.get("method", "iid")
    if method not in METHOD_KEYS:
        raise ConfigError(f"{at} method {method!r}: use {_or(METHOD_KEYS)}")
    _check_keys(table, method, at)
    _policy_problem({k: table[k] for k in _SITE_POLICY_KEYS if k in table}, at)  # before reading data
    for key in ("data",) if method == "natural-id" else ("data", "num-sites"):
        if key not in table:
            raise ConfigError(f"{at} needs '{key}'")
    num_sites = _int(table, "num-sites", at, default=None, least=1)
    seed = _int(table, "seed", at, default=0, least=None)
    columns = table.get("data-columns", "")
    if why := columns_problem(columns):
        raise ConfigError(f"{at}: data-columns = {columns!r}: {why}")
    source = (folder / table["data"]).resolve()
    records = load_records(source, columns=columns)
    if num_sites is not None and num_sites > len(records):
        raise ConfigError(f"{at} num-sites = {num_sites} but {source} has only {len(records)} "
                          "records; every site needs at least one")
    values: list[Any] = []
    if method != "iid":
        if not isinstance(table.get("partition-by"), str) or not table["partition-by"]:
            raise ConfigError(f"{at} method {method!r} needs 'partition-by' (a column of {source.name})")
        values = _column(read_raw(source), table["partition-by"], source, at)
    try:
        if method == "iid":
            parts = partition.partition_iid(list(range(len(records))), num_sites=num_sites, seed=seed)
        elif method == "dirichlet":
            alpha = table.get("alpha", 0.5)
            if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
                raise ConfigError(f"{at} alpha = {alpha!r}: must be a number > 0")
            parts = partition.partition_dirichlet(
                values, num_sites=num_sites, alpha=float(alpha), seed=seed,
                min_partition_size=_int(table, "min-partition-size", at, default=1, least=1),
                self_balancing=_bool(table, "self-balancing", at))
        elif method == "natural-id":
            parts = partition.partition_natural_id(values)
            if num_sites is not None and num_sites != len(parts):
                raise ConfigError(f"{at} num-sites = {num_sites} but column {table['partition-by']!r} of {source} "
                                  f"has {len(parts)} distinct values (one site each); drop num-sites or set it to "
                                  f"{len(parts)}")
        elif method == "shard":
            per_site = _int(table, "num-shards-per-partition", at, default=None, least=1)
            size = _int(table, "shard-size", at, default=None, least=1)
            if per_site is None and size is None:
                raise ConfigError(f"{at} method 'shard' needs 'num-shards-per-partition' or 'shard-size' (or both)")
            parts = partition.partition_shard(values, num_sites=num_sites, seed=seed, num_shards_per_partition=per_site,
                                              shard_size=size,
                                              keep_incomplete_shard=_bool(table, "keep-incomplete-shard", at))
        else:
            if "num-classes-per-partition" not in table:
                raise ConfigError(f"{at} method 'pathological' needs 'num-classes-per-partition'")
            mode = table.get("class-assignment-mode", "random")
            if mode not in ASSIGNMENT_MODES:
                raise ConfigError(f"{at} class-assignment-mode = {mode!r}: use {_or(ASSIGNMENT_MODES)}")
            parts = partition.partition_pathological(
                values, num_sites=num_sites, seed=seed, class_assignment_mode=mode,
                num_classes_per_partition=_int(table, "num-classes-per-partition", at, default=1, least=1))
    except partition.PartitionError as exc:
        raise ConfigError(f"{at} method {method!r} cannot split {source.name} ({len(records)} records) into "
                          f"{num_sites or 'its'} sites: {exc}; change {REMEDY[method]}") from None
    return _write_sites(parts, records, output, policy={k: table[k] for k in _SITE_POLICY_KEYS if k in table},
                        at=at,
                        names=sorted({str(v) for v in values}) if method == "natural-id" else None)


def _write_sites(parts: list[list[int]], records: list[dict], output: Path, *, policy: dict[str, Any], at: str,
                 names: list[str] | None) -> list[SiteConfig]:
    _policy_problem(policy, at)
    sites = []
    for i, indices in enumerate(parts):
        name = f"site-{i:03d}" if len(parts) > 99 else f"site-{i:02d}"
        data = output / "data" / f"{name}.jsonl"
        write_text_atomic(data, "".join(json.dumps(records[j], ensure_ascii=False) + "\n" for j in indices))
        if names is not None:
            logger.info("%s holds the %d records with %r", name, len(indices), names[i])
        try:
            sites.append(SiteConfig.from_dict({"site-name": name, "data-path": str(data), **policy}))
        except ConfigError as exc:
            raise ConfigError(f"{at}: {exc}") from None
    return sites


def _policy_problem(policy: dict[str, Any], at: str) -> None:
    """ConfigError unless the table's site policy (``max-epsilon`` required, ``max-delta``) is valid."""
    if "max-epsilon" not in policy:
        raise ConfigError(f"{at} max-epsilon: required; add max-epsilon = 8.0 (the cap on each simulated site's "
                          "cumulative ε) to the [partition] table")
    problems = list(site_problems({"site-name": "site-00", "data-path": "-", **policy}))
    if problems:
        raise ConfigError(f"{at} " + "; ".join(problems))


def _check_keys(table: dict[str, Any], method: str, at: str) -> None:
    allowed = COMMON_KEYS + METHOD_KEYS[method]
    for key in table:
        if key in allowed:
            continue
        if key == "label":
            raise ConfigError(f"{at} 'label' is now 'partition-by' (Flower Datasets' name); rename it")
        other = [m for m, keys in METHOD_KEYS.items() if key in keys]
        if other:
            raise ConfigError(f"{at} '{key}' applies to method {_or(other)}, not {method!r}")
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{at} unknown key '{key}'{hint}; allowed with method {method!r}: {', '.join(allowed)}")


def _column(raw_records: list[tuple[str, Any]], column: str, source: Path, at: str) -> list[Any]:
    """Every record's value in ``column``; a record without one is an error."""
    values = []
    for where, raw in raw_records:
        value = raw.get(column) if isinstance(raw, dict) else None
        if value is None:
            have = ", ".join(sorted(raw)) if isinstance(raw, dict) else "none"
            raise ConfigError(f"{at} partition-by = {column!r}: {source}: {where} has no value in column "
                              f"{column!r}; its columns: {have}")
        values.append(value)
    return values


def _int(table: dict[str, Any], key: str, at: str, *, default: int | None, least: int | None) -> Any:
    value = table.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
        raise ConfigError(f"{at} {key} = {value!r}: must be an integer" + (f" >= {least}" if least is not None else ""))
    return value


def _bool(table: dict[str, Any], key: str, at: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{at} {key} = {value!r}: must be true or false")
    return value


def _or(options) -> str:
    quoted = [f"'{o}'" for o in options]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
