"""Ways to run a LoRA layer's products, timed side by side (issue 16's notes on the rank-8 products).

One decoder layer of SmolLM2-135M (hidden 576, k/v 192, MLP 1536; LoRA r = 8 on all seven
linear layers), forward and input gradient, at ``--rows`` rows (688: the demo's DP step, one pass):

* ``current``: what ``fedllm.fastpath.lora.FrozenBaseLoRA`` does: ``u = x Aᵀ``, ``s·u Bᵀ`` and the
  base's product added to it; backward ``gu = s·g B``, ``gu A`` and the base's ``g W`` added to it;
* ``appended``: the rank-8 term appended to the base's product, one product each way:
  ``[x | s·u] [W | B]ᵀ`` and ``[g | s·g B] [W; A]``.

Each way's time is the best of 3 rounds of 10 calls, both ways taking turns; the ratio is
``appended / current`` (below 1: appended is faster). The values agree up to the dtype's rounding
(printed). Synthetic tensors: this times products only, not a training step (``bench_real.py`` is the
benchmark of record).

    python bench/bench_lora_products.py [--dtype bf16|fp32] [--rows 688] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real import cpu_info

RANK, SCALING = 8, 2.0
SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # (in, out)


def current(x, w, a, b, g):
    u = torch.mm(x, a.t())
    out = x.new_empty(x.shape[0], w.shape[0])
    torch.addmm(out, u, b.t(), beta=0, alpha=SCALING, out=out)
    out.addmm_(x, w.t())
    gu = torch.mm(g, b).mul_(SCALING)
    grad_x = torch.mm(gu, a).addmm_(g, w)
    return out, grad_x


def appended(x, w, a, b, g, w_b, w_a):
    k, n = x.shape[1], w.shape[0]
    u = torch.mm(x, a.t())
    xa = x.new_empty(x.shape[0], k + RANK)
    xa[:, :k] = x
    torch.mul(u, SCALING, out=xa[:, k:])
    out = torch.mm(xa, w_b.t())
    ga = g.new_empty(g.shape[0], n + RANK)
    ga[:, :n] = g
    torch.mm(g, b, out=ga[:, n:])
    ga[:, n:].mul_(SCALING)
    return out, torch.mm(ga, w_a)


def best_time(fn, *operands, calls: int = 10) -> float:
    fn(*operands)
    start = time.perf_counter()
    for _ in range(calls):
        fn(*operands)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32")
    parser.add_argument("--rows", type=int, default=688)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    print(json.dumps(cpu_info()))
    gen = torch.Generator().manual_seed(0)
    total = {"current": 0.0, "appended": 0.0}
    for k, n in SHAPES:
        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(dtype)
        x, g = rand(args.rows, k), rand(args.rows, n)
        w, a, b = rand(n, k, scale=k ** -0.5), rand(RANK, k, scale=k ** -0.5), rand(n, RANK, scale=0.1)
        w_b, w_a = torch.cat([w, b], 1), torch.cat([w, a], 0)
        diff = max((p.float() - q.float()).abs().max().item()
                   for p, q in zip(current(x, w, a, b, g), appended(x, w, a, b, g, w_b, w_a), strict=True))
        best = {"current": float("inf"), "appended": float("inf")}
        for _ in range(3):
            best["current"] = min(best["current"], best_time(current, x, w, a, b, g))
            best["appended"] = min(best["appended"], best_time(appended, x, w, a, b, g, w_b, w_a))
        for way in total:
            total[way] += best[way]
        print(f"{k:5d} -> {n:5d}: current {best['current'] * 1e3:.2f} ms, appended {best['appended'] * 1e3:.2f} ms, "
              f"ratio {best['appended'] / best['current']:.3f}, max difference {diff:.1e}")
    print(f"{args.dtype}, {args.rows} rows, one layer: current {total['current'] * 1e3:.1f} ms, "
          f"appended {total['appended'] * 1e3:.1f} ms, ratio {total['appended'] / total['current']:.3f}")


if __name__ == "__main__":
    main()
