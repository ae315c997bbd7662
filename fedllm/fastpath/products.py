"""``accumulate_product``: ``out += a @ b`` for the frozen base's products, as one multiply, in row
chunks or in two column halves, whichever this CPU's kernel runs fastest for that shape (timed once
per shape, at run time).

Part of the fast path (``fedllm.fastpath``): only ``FrozenBaseLoRA`` (``fedllm.fastpath.lora``),
which ``fedllm.fastpath.enable`` installs, calls it; with ``train.fast-path = false`` no product is
timed. The values are the same every way, up to the order of the sums inside the kernel.
"""

from __future__ import annotations

import math
import time

import torch

ROW_CHUNK = 512
TRIALS = 3
_product_way: dict[tuple, str] = {}


def accumulate_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out += a @ b`` in place (``out`` contiguous, rows of ``a`` = rows of ``out``).

    On a CPU, oneDNN's matrix multiply runs some shapes no faster on two threads than on one: on
    this project's 2-core machine, bf16 (rows 640-1280) x 1536 -> 576, SmolLM2's MLP down
    projection, runs at about 1.1 TFLOP/s whole and 1.7-2.0 in row chunks of 512, 1024 x 576 -> 576
    at 1.24 in two halves of the output's columns against 0.98 whole and 1.09 in row chunks, while
    other shapes are fastest whole
    (``python bench/bench_speed.py --parts gemm``). The first products of each shape (rows in
    buckets of 128, inner and outer size, dtype, layout of ``b``) are computed all three ways
    (``PRODUCT_WAYS``), ``TRIALS`` times each in turn, after one untimed run each (a new shape's
    first product includes building its kernel); the way with the shortest time is kept for that
    shape (the shortest of several, as a single timing on a shared machine can be off by 10-20%).
    The values are the same every way, up to the order of the sums inside the kernel (tested)."""
    rows = out.shape[0]
    if out.device.type != "cpu" or rows <= ROW_CHUNK:
        return out.addmm_(a, b)
    key = (rows // 128, a.shape[1], out.shape[1], a.dtype, b.stride())
    way = _product_way.get(key)
    if way is None:
        trial = torch.empty_like(out)
        best: dict[str, float] = {}
        for product in PRODUCT_WAYS.values():
            product(trial.copy_(out), a, b)  # untimed: builds each way's kernels
        for _ in range(TRIALS):
            for name, product in PRODUCT_WAYS.items():
                trial.copy_(out)
                start = time.perf_counter()
                product(trial, a, b)
                best[name] = min(best.get(name, math.inf), time.perf_counter() - start)
        way = _product_way[key] = min(best, key=best.__getitem__)
    return PRODUCT_WAYS[way](out, a, b)


def _addmm_in_row_chunks(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    for start in range(0, out.shape[0], ROW_CHUNK):
        out[start:start + ROW_CHUNK].addmm_(a[start:start + ROW_CHUNK], b)
    return out


def _addmm_in_column_halves(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    half = (out.shape[1] + 1) // 2
    out[:, :half].addmm_(a, b[:, :half])
    out[:, half:].addmm_(a, b[:, half:])
    return out


PRODUCT_WAYS = {"whole": lambda out, a, b: out.addmm_(a, b), "rows": _addmm_in_row_chunks,
                "columns": _addmm_in_column_halves}
