"""The speed benchmark of record (issue 16): fedllm's DP-LoRA step on real site records against the
plain PEFT + Opacus recipe on the same sampled batches, side by side in one run (the machine is
shared and noisy: compare the ratios, not single timings).

Workloads (real records, as the shipped scenarios train on them):

* ``pubmedqa``: one site of the pubmedqa scenario (``../shared/data/pubmedqa``; skipped without it),
  its settings as shipped: 384 tokens, batch 8, ``train.physical-batch-size = 4``;
* ``demo``: one site of the demo scenario (shipped in the package), 160 tokens, batch 8.

For each, ``--steps`` Poisson batches (q = 8/n, a fixed seed) are drawn once from the site's training
records; every variant trains exactly those batches, in a fresh process of its own (as a site
process holds one model), the variants taking turns over ``--rounds`` rounds. tokens/s counts the
real (unpadded) tokens of the batches over the sum of the step times, after one untimed warm-up step.

* ``fedllm-dp`` / ``fedllm-no-dp``: ``fedllm.site.training.train_local`` as a site runs it, the
  scenario's settings, ``model.dtype = "auto"`` (what a user gets on this CPU);
* ``fedllm-dp-no-fast-path``: the same with ``train.fast-path = false`` (not run by default: ``--variants``);
* ``fedllm-dp-pass-N``: ``fedllm-dp`` with ``train.pass-tokens = N`` (not run by default: ``--variants``);
* ``plain-dp``: the plain recipe a user writes from the PEFT and Opacus docs: fp32,
  ``LoraConfig(r=8, target_modules="all-linear")``, ``PrivacyEngine.make_private`` (hooks), the
  loss from ``model(..., labels=labels).loss``, each batch whole, padded to its longest record.

Other parts:

* ``gemm``: the rate of one large GEMM (2048³) in fp32 and, where the CPU has native bf16, bf16;
  and the rate the base's products (``fedllm.fastpath.products.accumulate_product``, forward and
  backward) reach inside a real ``fedllm-dp`` step (flop counted from their shapes, timed around
  each call): the issue's target is >= 70% of the large GEMM's;
* ``profile``: where one real DP step's time goes (base products, per-example gradients, clipping
  and noise, attention, head and loss, optimizer, the rest), and the padding waste;
* ``memory``: peak RSS of a site process (VmHWM, model included) training the pubmedqa workload;
* ``simulate``: ``fedllm simulate demo`` for one round (tokens and train-seconds from its
  ``history.json``; all sites in parallel) beside one process using every core on the same sites'
  records.

It prints the CPU model and ISA (AVX2, AVX-512, AVX-512 BF16, AMX) first; a variant the CPU cannot
run natively (a bf16 base without native bf16) is not run.

    python bench/bench_real.py [--steps 3] [--rounds 1] [--threads 2] [--parts step,gemm,profile,memory,simulate] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PUBMEDQA = Path(os.environ.get("FEDLLM_PUBMEDQA_DIR", ROOT.parent / "shared" / "data" / "pubmedqa"))
WORKLOADS = {  # name: (site, max-length, batch size, physical batch size)
    "pubmedqa": ("geriatric", 384, 8, 4),
    "demo": ("northbridge-pediatrics", 160, 8, 0),
}
VARIANTS = ("fedllm-dp", "fedllm-no-dp", "plain-dp", "fedllm-dp-no-fast-path", "fedllm-dp-pass-N")
DEFAULT_VARIANTS = ("fedllm-dp", "fedllm-no-dp", "plain-dp")


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    isa = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 BF16"),
                                   ("amx_bf16", "AMX")) if flag in flags]
    limits = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
              if k in os.environ}  # the ISA held lower than the CPU's (an AVX2-only machine's kernels)
    return {"cpu": model, "isa": isa, "isa-limits": limits, "cores": os.cpu_count(), "torch": torch.__version__}


def _config(workload: str, *, fast_path: bool = True):
    from fedllm.config import RunConfig

    _, length, batch, physical = WORKLOADS[workload]
    return RunConfig.from_flat({"model.dtype": "auto", "data.max-length": length, "train.batch-size": batch,
                                "train.physical-batch-size": physical, "train.fast-path": fast_path})


def site_examples(workload: str, tokenizer) -> list:
    """The workload site's training records, tokenized as the site does (its held-out split removed)."""
    from fedllm.config import SiteConfig
    from fedllm.data.loading import load_records
    from fedllm.site.runtime import load_site_examples

    site = WORKLOADS[workload][0]
    with tempfile.TemporaryDirectory() as tmp:
        if workload == "pubmedqa":
            from fedllm.data.pubmedqa import pubmedqa_site_records

            path = Path(tmp) / f"{site}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in pubmedqa_site_records(PUBMEDQA)[site]))
        else:
            path = ROOT / "simulations" / "demo" / "data" / f"{site}.jsonl"
        records = load_records(path)
        train, _ = load_site_examples(_config(workload), SiteConfig(name=site, data_path=str(path), max_epsilon=10.0), tokenizer,
                                      records=records, split_key=bytes(32))  # a fixed key: the same split every run
    return train


def poisson_batches(n: int, batch: int, steps: int, seed: int = 0) -> list[list[int]]:
    """``steps`` non-empty Poisson batches at q = batch / n (an empty draw is drawn again: it times nothing)."""
    g = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    while len(out) < steps:
        drawn = torch.nonzero(torch.rand(n, generator=g) < batch / n).flatten().tolist()
        if drawn:
            out.append(drawn)
    return out


class PlainRecipe:
    """PEFT + Opacus as their docs show it: fp32, peft's default LoRA, Opacus hooks, HF's labels= loss."""

    def __init__(self, workload: str) -> None:
        from opacus import PrivacyEngine
        from peft import LoraConfig, get_peft_model
        from torch.utils.data import DataLoader, TensorDataset

        from fedllm.config import ModelConfig
        from fedllm.model.loading import load_model_and_tokenizer

        base, self.tokenizer = load_model_and_tokenizer(ModelConfig(dtype="float32"))
        self.model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
        optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-3)
        batch = WORKLOADS[workload][2]
        loader = DataLoader(TensorDataset(torch.zeros(batch, 1)), batch_size=batch)
        self.model, self.optimizer, _ = PrivacyEngine().make_private(
            module=self.model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
        self.model.train()
        self.dtype = "torch.float32"

    def step(self, examples: list) -> None:
        from fedllm.site.training import collate

        ids, mask, labels = collate(examples, self.tokenizer.pad_token_id)
        self.optimizer.zero_grad()
        self.model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        self.optimizer.step()


class Fedllm:
    """``train_local`` on exactly the given batch (q = 1 over it), as the site runs it."""

    def __init__(self, workload: str, *, dp: bool, fast_path: bool = True, pass_tokens: int = 0) -> None:
        from fedllm import fastpath
        from fedllm.model.loading import load_model_and_tokenizer
        from fedllm.model.lora import apply_lora

        self.config = _config(workload, fast_path=fast_path)
        base, self.tokenizer = load_model_and_tokenizer(self.config.model)
        for p in base.parameters():
            p.requires_grad_(False)
        self.model = apply_lora(base, self.config.lora, fast_path=fast_path)
        if fast_path:  # as SiteRuntime does
            fastpath.enable(self.model, device="cpu", max_length=self.config.data.max_length)
        self.dp, self.pass_tokens = dp, pass_tokens
        self.dtype = str(base.get_input_embeddings().weight.dtype)

    def step(self, examples: list) -> None:
        from fedllm.site.training import DPSettings, train_local

        train_local(self.model, examples, steps=1, batch_size=len(examples), learning_rate=1e-3,
                    pad_id=self.tokenizer.pad_token_id, dp=DPSettings(1.0, 1.0) if self.dp else None,
                    physical_batch_size=self.config.train.physical_batch_size, fast_path=self.config.train.fast_path,
                    pass_tokens=self.pass_tokens)


def build(variant: str, workload: str):
    if variant == "plain-dp":
        return PlainRecipe(workload)
    pass_tokens = int(variant.rsplit("-", 1)[1]) if variant.startswith("fedllm-dp-pass-") else 0
    return Fedllm(workload, dp="no-dp" not in variant, fast_path=not variant.endswith("no-fast-path"), pass_tokens=pass_tokens)


def _batches(workload: str, tokenizer, steps: int) -> list[list]:
    train = site_examples(workload, tokenizer)
    return [[train[i] for i in batch] for batch in poisson_batches(len(train), WORKLOADS[workload][2], steps + 1)]


def _time_one(variant: str, workload: str, steps: int) -> dict:
    """In this (fresh) process: the variant's time for each batch after one warm-up batch."""
    runner = build(variant, workload)
    batches = _batches(workload, runner.tokenizer, steps)
    runner.step(batches[0])
    times, tokens = [], []
    for batch in batches[1:]:
        start = time.perf_counter()
        runner.step(batch)
        times.append(time.perf_counter() - start)
        tokens.append(sum(len(e.input_ids) for e in batch))
    return {"step-s": times, "tokens": tokens, "dtype": runner.dtype}


def _subprocess(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{args}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_steps(workload: str, variants: tuple[str, ...], steps: int, rounds: int, threads: int) -> dict:
    """tokens/s of every variant on the same batches, each in fresh processes taking turns."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(rounds):
        for variant in variants[r % len(variants):] + variants[:r % len(variants)]:
            runs[variant].append(_subprocess("--time-one", variant, "--workload", workload, "--steps", str(steps),
                                             "--threads", str(threads)))
    out: dict = {}
    for v, rs in runs.items():
        per_round = [sum(r["tokens"]) / sum(r["step-s"]) for r in rs]
        out[v] = {"tokens-per-s": round(statistics.median(per_round), 1), "per-round": [round(x, 1) for x in per_round],
                  "step-s": round(statistics.median(s for r in rs for s in r["step-s"]), 2), "dtype": rs[0]["dtype"],
                  "tokens-per-step": round(statistics.mean(rs[0]["tokens"]))}
    tps = {v: out[v]["tokens-per-s"] for v in variants}
    ratios = {}
    for v in tps:  # every DP variant against the plain recipe, and fedllm-dp against the other DP variants
        if v.startswith("fedllm-dp") and "plain-dp" in tps:
            ratios[f"{v}-vs-plain-dp"] = round(tps[v] / tps["plain-dp"], 2)
        if v.startswith("fedllm-dp-") and "fedllm-dp" in tps:
            ratios[f"fedllm-dp-vs-{v[len('fedllm-dp-'):]}"] = round(tps["fedllm-dp"] / tps[v], 2)
    if "fedllm-no-dp" in tps and "fedllm-dp" in tps:
        ratios["dp-step-vs-no-dp-step-time"] = round(tps["fedllm-no-dp"] / tps["fedllm-dp"], 3)
    out["ratios"] = ratios
    return out


# ---- where the time goes ------------------------------------------------------------------------

class _Timers:
    """Seconds and flop of the functions wrapped by ``_instrument`` (their own calls only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.flop: dict[str, float] = {}

    def wrap(self, owner, name: str, label: str, flop=None):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = original(*args, **kwargs)
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
            if flop is not None:
                self.flop[label] = self.flop.get(label, 0.0) + flop(*args)
            return result

        setattr(owner, name, timed)
        return original


def _instrument(timers: _Timers) -> None:
    from fedllm.fastpath import head, products
    from fedllm.site import per_example, training

    timers.wrap(products, "accumulate_product", "base products", lambda out, a, b: 2.0 * a.shape[0] * a.shape[1] * b.shape[1])
    # FrozenBaseLoRA calls products.accumulate_product through the module, and per-example gradients start with
    # the module's fused_lora_b_grad_sample at each train_local: both see the wrapped functions
    timers.wrap(per_example, "fused_lora_b_grad_sample", "per-example gradients")
    timers.wrap(head.HeadCrossEntropy, "forward", "head and loss (forward)")
    timers.wrap(head.HeadCrossEntropy, "backward", "head and loss (backward)")
    timers.wrap(training, "collate", "collate")

    from opacus.optimizers import DPOptimizer

    timers.wrap(DPOptimizer, "clip_and_accumulate", "clipping")
    timers.wrap(DPOptimizer, "add_noise", "noise")
    timers.wrap(torch.optim.AdamW, "step", "optimizer (AdamW)")


def _profile_one(workload: str, steps: int) -> dict:
    """In this (fresh) process: one real DP step's time by part (after a warm-up step), with the
    attention's share from torch's profiler, and the padding of the batch."""
    timers = _Timers()
    runner = Fedllm(workload, dp=True)
    batches = _batches(workload, runner.tokenizer, steps)
    runner.step(batches[0])  # warm-up: kernels built, product ways timed
    _instrument(timers)
    from torch.profiler import ProfilerActivity, profile

    total = 0.0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[1:]:
            start = time.perf_counter()
            runner.step(batch)
            total += time.perf_counter() - start
    attention = sum(e.self_cpu_time_total for e in prof.key_averages()
                    if any(k in e.key.lower() for k in ("attention", "sdpa", "softmax", "baddbmm", "bmm"))) / 1e6
    # bmm/baddbmm include the per-example gradients' batched products: keep them out of the attention's share
    per_example_bmm = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == "aten::baddbmm") / 1e6
    parts = dict(timers.seconds)
    parts["attention (profiler: sdpa, softmax, bmm)"] = max(0.0, attention - per_example_bmm)
    real = sum(len(e.input_ids) for b in batches[1:] for e in b)
    from fedllm.site.training import plan_chunks

    physical = runner.config.train.physical_batch_size

    def padded_tokens(groups_of):  # the passes' padded tokens over the timed batches
        total = 0
        for b in batches[1:]:
            lengths = [len(e.input_ids) for e in b]
            total += sum(max(lengths[i] for i in g) * len(g) for g in groups_of(lengths))
        return total

    padded = padded_tokens(lambda lengths: plan_chunks(lengths, physical))
    size = physical or len(batches[0]) * 4  # in sampled order, at most physical records a pass (the reference path)
    in_order = padded_tokens(lambda lengths: [list(range(i, min(i + size, len(lengths))))
                                              for i in range(0, len(lengths), size)])
    counted = sum(parts.values())
    base_rate = timers.flop.get("base products", 0.0) / max(timers.seconds.get("base products", 1e-9), 1e-9)
    return {"step-s": total / (len(batches) - 1), "parts-s": {k: v / (len(batches) - 1) for k, v in parts.items()},
            "rest-s": max(0.0, total - counted) / (len(batches) - 1),
            "base-products-gflops": base_rate / 1e9, "real-tokens": real, "padded-tokens": padded,
            "padding-waste": (padded - real) / padded, "padding-waste-in-sampled-order": (in_order - real) / in_order, "dtype": runner.dtype}


def large_gemm_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def bench_gemm() -> dict:
    from fedllm.model.loading import native_bf16

    out = {"large-gemm-fp32-gflops": round(large_gemm_gflops(torch.float32), 1)}
    if native_bf16("cpu"):
        out["large-gemm-bf16-gflops"] = round(large_gemm_gflops(torch.bfloat16), 1)
    return out


# ---- memory and the simulation ------------------------------------------------------------------

def _peak_one(workload: str, steps: int) -> dict:
    """In this (fresh) process, as a site worker: the model loaded, ``steps`` DP steps; peak RSS."""
    from bench_speed import _status_mb  # the speed benchmark's reader of /proc/self/status

    runner = Fedllm(workload, dp=True)
    batches = _batches(workload, runner.tokenizer, steps)
    loaded = _status_mb("VmRSS")
    for batch in batches:
        runner.step(batch)
    return {"rss-after-load-mb": round(loaded), "peak-mb": round(_status_mb("VmHWM"))}


def bench_simulate(threads: int, extra: Sequence[str] = ()) -> dict:
    """``fedllm simulate demo`` for two rounds, the second timed (the sites in parallel, as the engine places them; the
    first loads the models) beside one
    process with every core training the same sites' records, the same steps and batch size."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "fedllm.cli.main", "simulate", "demo", "--rounds", "2",
                               "--output", str(Path(tmp) / "run"), *extra], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
        history = json.loads((Path(tmp) / "run" / "history.json").read_text())
        config = (Path(tmp) / "run" / "config.toml").read_text()
    train = [r for r in history["rounds"] if "train" in r][-1]  # the last round: the sites' models are loaded
    sites = train["train"]["sites"]
    tokens = sum(int(m["tokens"]) for m in sites.values())
    out: dict = {"wall-s": round(wall, 1), "round-train-seconds": round(train["train-seconds"], 1),
                 "sites": {name: {"tokens": m["tokens"], "train-seconds": round(m["train-seconds"], 1)}
                           for name, m in sites.items()},
                 "client-cpus": next((line.split("=")[1].strip() for line in config.splitlines()
                                      if line.startswith("client-cpus")), "?"),
                 # machine-wide: every site's tokens over the time the round's training took (sites in parallel)
                 "machine-wide-tokens-per-s": round(tokens / train["train-seconds"], 1),
                 "busiest-site-tokens-per-s": round(tokens / max(m["train-seconds"] for m in sites.values()), 1)}
    single = _subprocess("--single", "demo-all", "--threads", str(threads))
    out["one-process-all-cores-tokens-per-s"] = single["tokens-per-s"]
    out["simulation-vs-one-process"] = round(out["machine-wide-tokens-per-s"] / single["tokens-per-s"], 2)
    return out


def _single_all_demo_sites() -> dict:
    """One process, every core: each demo site's training records for the demo's steps and batch size."""
    from fedllm import fastpath
    from fedllm.config import RunConfig, SiteConfig
    from fedllm.config.run import load_run_overrides
    from fedllm.model.loading import load_model_and_tokenizer
    from fedllm.model.lora import apply_lora
    from fedllm.site.runtime import load_site_examples
    from fedllm.site.training import DPSettings, train_local

    config = RunConfig.from_flat(load_run_overrides(ROOT / "simulations" / "demo" / "run.toml"))
    base, tok = load_model_and_tokenizer(config.model)
    for p in base.parameters():
        p.requires_grad_(False)
    model = apply_lora(base, config.lora)
    fastpath.enable(model, device="cpu", max_length=config.data.max_length)
    tokens = seconds = 0.0
    for site in sorted((ROOT / "simulations" / "demo" / "data").glob("*.jsonl")):
        train, _ = load_site_examples(config, SiteConfig(name=site.stem, data_path=str(site), max_epsilon=10.0), tok, split_key=bytes(32))
        result = train_local(model, train, steps=config.train.local_steps, batch_size=config.train.batch_size,
                             learning_rate=1e-3, pad_id=tok.pad_token_id, dp=DPSettings(1.0, 1.0))
        tokens += result.tokens
        seconds += result.seconds
    return {"tokens-per-s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--parts", default="step,gemm,profile,memory,simulate")
    parser.add_argument("--workloads", default="pubmedqa,demo")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--time-one", help=argparse.SUPPRESS)
    parser.add_argument("--profile-one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peak-one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--workload", default="pubmedqa", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.time_one:
        print(json.dumps(_time_one(args.time_one, args.workload, args.steps)))
        return
    if args.profile_one:
        print(json.dumps(_profile_one(args.workload, args.steps)))
        return
    if args.peak_one:
        print(json.dumps(_peak_one(args.workload, args.steps)))
        return
    if args.single:
        print(json.dumps(_single_all_demo_sites()))
        return

    report: dict = {"machine": {**cpu_info(), "threads": args.threads}}
    print(json.dumps(report["machine"]), flush=True)
    parts = set(args.parts.split(","))
    workloads = [w for w in args.workloads.split(",") if w != "pubmedqa" or PUBMEDQA.is_dir()]
    if "pubmedqa" in args.workloads and "pubmedqa" not in workloads:
        print(f"pubmedqa: skipped ({PUBMEDQA} not found)", flush=True)
    variants = tuple(v for v in args.variants.split(",") if v)
    common = ("--threads", str(args.threads), "--steps", str(args.steps))
    for workload in workloads:
        site, length, batch, physical = WORKLOADS[workload]
        report[workload] = {"site": site, "max-length": length, "batch-size": batch, "physical-batch-size": physical}
        if "step" in parts:
            report[workload]["steps"] = bench_steps(workload, variants, args.steps, args.rounds, args.threads)
            print(workload, json.dumps(report[workload]["steps"]), flush=True)
        if "profile" in parts:
            report[workload]["profile"] = _subprocess("--profile-one", "--workload", workload, *common)
            print(workload, "profile", json.dumps(report[workload]["profile"]), flush=True)
        if "memory" in parts and workload == "pubmedqa":
            report[workload]["memory"] = _subprocess("--peak-one", "--workload", workload, *common)
            print(workload, "memory", json.dumps(report[workload]["memory"]), flush=True)
    if "gemm" in parts:
        report["gemm"] = bench_gemm()
        for workload in workloads:
            prof = report[workload].get("profile")
            if prof:
                large = report["gemm"].get("large-gemm-bf16-gflops" if "bfloat16" in prof["dtype"] else "large-gemm-fp32-gflops")
                report["gemm"][f"{workload}-base-products-vs-large-gemm"] = round(prof["base-products-gflops"] / large, 2)
        print("gemm", json.dumps(report["gemm"]), flush=True)
    if "simulate" in parts:
        report["simulate"] = bench_simulate(args.threads)
        print("simulate", json.dumps(report["simulate"]), flush=True)
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
