"""Split one dataset into N simulated sites, reproducibly.

(A site's own train/held-out split is keyed by the site's secret: :mod:`fedllm.site.holdout`.)
The split into simulated sites uses Flower Datasets' partitioners (``flwr_datasets.partitioner``: IID, Dirichlet, natural id, shard,
pathological), imported when first needed; each is deterministic for a given seed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


# -------------------------------------------------------------------- one dataset -> simulated sites
# Flower Datasets' partitioners do the splitting. They work on a ``datasets.Dataset``; here that
# dataset is built in memory with two columns: each record's position (``index``) and the column
# the method splits by (``by``, as a string), so that records of any kind (chat, text, ...) never
# pass through Arrow and each site's records come back in their source order.

METHODS = ("iid", "dirichlet", "natural-id", "shard", "pathological")
INSTALL_HINT = "pip install flwr-datasets==0.6.1 (a dependency of fedllm: reinstall fedllm)"


class PartitionError(ValueError):
    """A partition that cannot be made as asked (e.g. a site would get no records)."""


def partition_iid(items: Sequence[T], *, num_sites: int, seed: int) -> list[list[T]]:
    """Shuffle (``Dataset.shuffle(seed)``) and deal ``items`` into ``num_sites`` contiguous parts
    of (almost) equal size (Flower's ``IidPartitioner``); each part keeps the source order."""
    _check_count(len(items), num_sites)
    parts = _partition([None] * len(items), _partitioners().IidPartitioner(num_partitions=num_sites), shuffle_seed=seed)
    return [[items[i] for i in part] for part in parts]


def partition_dirichlet(labels: Sequence[object], *, num_sites: int, alpha: float, seed: int,
                        min_partition_size: int = 1, self_balancing: bool = False) -> list[list[int]]:
    """Indices per site with each label's records spread by proportions drawn from
    Dirichlet(alpha) (Flower's ``DirichletPartitioner``; non-IID sites). The draw is repeated (up
    to 10 times) until every site has at least ``min_partition_size`` records."""
    _check_count(len(labels), num_sites)
    try:
        return _partition(labels, _partitioners().DirichletPartitioner(
            num_partitions=num_sites, partition_by="by", alpha=alpha, min_partition_size=min_partition_size,
            self_balancing=self_balancing, seed=seed))
    except PartitionError as exc:
        if "max number of attempts" not in str(exc):
            raise
        raise PartitionError(f"each of 11 draws from Dirichlet(alpha={alpha}) left a site with fewer than "
                             f"{min_partition_size} record(s)") from None


def partition_natural_id(ids: Sequence[object]) -> list[list[int]]:
    """Indices per distinct value of ``ids`` (Flower's ``NaturalIdPartitioner``): one site per
    value, sites in the values' sorted (string) order."""
    return _partition(ids, _partitioners().NaturalIdPartitioner(partition_by="by"))


def partition_shard(labels: Sequence[object], *, num_sites: int, seed: int, num_shards_per_partition: int | None = None,
                    shard_size: int | None = None, keep_incomplete_shard: bool = False) -> list[list[int]]:
    """Indices per site: records sorted by label, cut into shards of ``shard_size`` consecutive
    records, ``num_shards_per_partition`` random shards per site (Flower's ``ShardPartitioner``,
    the FedAvg paper's split). Records in unused or incomplete shards are left out."""
    _check_count(len(labels), num_sites)
    return _partition(labels, _partitioners().ShardPartitioner(
        num_partitions=num_sites, partition_by="by", num_shards_per_partition=num_shards_per_partition,
        shard_size=shard_size, keep_incomplete_shard=keep_incomplete_shard, seed=seed))


def partition_pathological(labels: Sequence[object], *, num_sites: int, seed: int, num_classes_per_partition: int,
                           class_assignment_mode: str = "random") -> list[list[int]]:
    """Indices per site: each site holds records of only ``num_classes_per_partition`` labels, a
    label's records shared evenly among the sites that hold it (Flower's
    ``PathologicalPartitioner``). With ``"random"`` assignment a label no site drew is left out."""
    _check_count(len(labels), num_sites)
    return _partition(labels, _partitioners().PathologicalPartitioner(
        num_partitions=num_sites, partition_by="by", num_classes_per_partition=num_classes_per_partition,
        class_assignment_mode=class_assignment_mode, seed=seed))


def _check_count(n: int, num_sites: int) -> None:
    if num_sites < 1 or num_sites > n:
        raise PartitionError(f"cannot split {n} records into {num_sites} sites")


def _partitioners():
    """``flwr_datasets.partitioner``, or an ImportError that says how to install it."""
    try:
        from flwr_datasets import partitioner
    except ImportError as exc:
        raise ImportError(f"splitting a dataset into simulated sites needs Flower Datasets ({exc.name} is "
                          f"missing): {INSTALL_HINT}") from None
    return partitioner


def _partition(values: Sequence[object], partitioner, *, shuffle_seed: int | None = None) -> list[list[int]]:
    """Run a Flower partitioner over ``values`` (one per record); the sorted record indices of
    every partition. Raises ``PartitionError`` when the partitioner refuses or a site is empty."""
    import datasets  # present: the partitioners' package imports it
    dataset = datasets.Dataset.from_dict({"index": list(range(len(values))), "by": [str(v) for v in values]})
    if shuffle_seed is not None:
        dataset = dataset.shuffle(seed=shuffle_seed)
    partitioner.dataset = dataset
    with warnings.catch_warnings():
        # a Dirichlet redraw (the final failure is raised) and a pyarrow deprecation inside Dataset.sort
        warnings.filterwarnings("ignore", message="The specified min_partition_size")
        warnings.filterwarnings("ignore", message="Specifying null_placement in SortOptions", category=FutureWarning)
        try:
            parts = [sorted(partitioner.load_partition(i)["index"]) for i in range(partitioner.num_partitions)]
        except ValueError as exc:
            raise PartitionError(str(exc)) from None
    empty = [i for i, part in enumerate(parts) if not part]
    if empty:
        raise PartitionError(f"{len(empty)} of {len(parts)} sites would get no records (site {empty[0]} first)")
    return parts
