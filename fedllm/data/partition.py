"""Split data reproducibly: a site's train/held-out split, and one dataset into N simulated sites."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def stable_seed(*parts: object) -> int:
    """A 32-bit seed from any values, stable across processes (unlike ``hash``)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def split_holdout(items: Sequence[T], *, eval_fraction: float, seed: int, max_eval: int = 0) -> tuple[list[T], list[T]]:
    """(train, held-out). At least one record is held out when ``eval_fraction > 0`` and at least
    one stays for training; ``max_eval > 0`` caps the held-out count."""
    n = len(items)
    order = np.random.default_rng(seed).permutation(n)
    n_eval = 0
    if eval_fraction > 0 and n >= 2:
        n_eval = min(max(1, math.floor(n * eval_fraction)), n - 1)
        if max_eval > 0:
            n_eval = min(n_eval, max_eval)
    held = sorted(order[:n_eval].tolist())
    train = sorted(order[n_eval:].tolist())
    return [items[i] for i in train], [items[i] for i in held]


def partition_iid(items: Sequence[T], *, num_sites: int, seed: int) -> list[list[T]]:
    """Shuffle and deal ``items`` into ``num_sites`` parts of (almost) equal size."""
    if num_sites < 1 or num_sites > len(items):
        raise ValueError(f"cannot split {len(items)} records into {num_sites} sites")
    order = np.random.default_rng(seed).permutation(len(items))
    return [[items[i] for i in sorted(part.tolist())] for part in np.array_split(order, num_sites)]


def partition_dirichlet(labels: Sequence[object], *, num_sites: int, alpha: float, seed: int) -> list[list[int]]:
    """Indices per site with label proportions drawn from Dirichlet(alpha) (non-IID sites);
    every site gets at least one index."""
    if num_sites < 1 or num_sites > len(labels):
        raise ValueError(f"cannot split {len(labels)} records into {num_sites} sites")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_sites)]
    for label in sorted(set(map(str, labels))):
        idx = [i for i, lab in enumerate(labels) if str(lab) == label]
        rng.shuffle(idx)
        cuts = (np.cumsum(rng.dirichlet([alpha] * num_sites)) * len(idx)).astype(int)[:-1]
        for site, chunk in enumerate(np.split(np.array(idx, dtype=int), cuts)):
            parts[site].extend(chunk.tolist())
    for site in range(num_sites):  # donate from the largest site to any empty one
        if not parts[site]:
            donor = max(range(num_sites), key=lambda s: len(parts[s]))
            parts[site].append(parts[donor].pop())
    return [sorted(p) for p in parts]
