"""Speed benchmark (issue 6): fedllm's DP-LoRA step against the plain Opacus + PEFT recipe, side by
side in one run (the machine is shared and noisy: compare the ratios, not single timings).

Setup as in the issue: SmolLM2-135M-Instruct, LoRA r=8 on every linear layer, batch 8 x 128 tokens
(loss on the second half of each sequence, like a response), 2 threads.

* **plain recipe** (the baseline, written as a user would write it from the PEFT and Opacus docs):
  fp32 model, ``get_peft_model(LoraConfig(r=8, target_modules="all-linear"))``, Opacus
  ``PrivacyEngine.make_private`` (hooks mode), the loss from ``model(..., labels=labels).loss``;
  with and without DP.
* **fedllm**: ``fedllm.site.training.train_local`` as the sites run it: FFA-LoRA (A frozen, B trained),
  vocabulary logits on response tokens only, the lean LoRA forward, and the base in
  ``model.dtype`` (bf16 and fp32 both measured); with and without DP. Every step trains exactly the
  same 8 x 128 tokens (the site holds 8 records and the batch size is 8, so q = 1).
* **fedllm, fast path off** (``fedllm-bf16-dp-no-fast-path``): the same ``train_local`` DP step with
  ``train.fast-path = false``: peft's LoRA layers, Opacus' ``GradSampleModule`` (hooks mode), the
  loss from the full logits, the model's own attention, glibc's default allocator; it computes
  the same update as the fast path (tests/unit/test_model_families.py).

Step times: each variant runs in a fresh process of its own (one model, as a site process), the
variants taking turns over ``--rounds`` rounds; the median over all its ``--steps`` x rounds steps.
The plain recipe runs with glibc's default allocator (what its user gets) and once more with
fedllm's allocator setting (``plain-dp-tuned-allocator``). Peak memory is measured in
a fresh process per variant: the peak RSS (``VmHWM``, reset after loading) during ``--steps``
steps, above the RSS after loading (so it counts what training adds, not the model itself).
``startup``: the default model's load time in a fresh process once it is converted. ``quality``
(needs ``../shared/data/pubmedqa``): held-out loss after DP training on one PubMedQA site with the
base in fp32 and in bf16, same seeds.

    python bench/bench_speed.py [--steps 5] [--rounds 2] [--threads 2] [--parts speed,memory,startup,quality,gemm] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedllm import fastpath  # noqa: E402
from fedllm.config import RunConfig  # noqa: E402
from fedllm.data.formatting import TokenizedExample  # noqa: E402
from fedllm.fastpath.allocator import keep_freed_memory  # noqa: E402
from fedllm.model.loading import load_model_and_tokenizer  # noqa: E402
from fedllm.model.lora import apply_lora  # noqa: E402
from fedllm.site.training import DPSettings, train_local  # noqa: E402

SEQ, BATCH = 128, 8
TOKENS_PER_STEP = SEQ * BATCH
VARIANTS = ("plain-dp", "plain-no-dp", "fedllm-bf16-dp", "fedllm-bf16-no-dp", "fedllm-fp32-dp", "fedllm-fp32-no-dp",
            "fedllm-bf16-dp-no-fast-path")
TIMED = (*VARIANTS, "plain-dp-tuned-allocator")


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab - 1, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, : SEQ // 2] = -100
    return ids, labels


class PlainRecipe:
    """PEFT + Opacus as their docs show it (fp32, peft's default LoRA, HF's labels= loss)."""

    def __init__(self, dp: bool) -> None:
        from opacus import PrivacyEngine
        from peft import LoraConfig, get_peft_model
        from torch.utils.data import DataLoader, TensorDataset

        base, tok = load_model_and_tokenizer(RunConfig().model)
        self.model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
        self.ids, self.labels = _batch(tok.vocab_size)
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-3)
        if dp:
            loader = DataLoader(TensorDataset(self.ids, self.labels), batch_size=BATCH)
            self.model, self.optimizer, _ = PrivacyEngine().make_private(
                module=self.model, optimizer=self.optimizer, data_loader=loader, noise_multiplier=1.0,
                max_grad_norm=1.0)
        self.model.train()

    def step(self) -> None:
        self.optimizer.zero_grad()
        loss = self.model(input_ids=self.ids, attention_mask=torch.ones_like(self.ids), labels=self.labels).loss
        loss.backward()
        self.optimizer.step()


class Fedllm:
    """``train_local`` on 8 records with batch size 8: one step = the same 8 x 128 tokens;
    ``fast_path``: ``train.fast-path``."""

    def __init__(self, dtype: str, dp: bool, fast_path: bool = True) -> None:
        config = RunConfig.from_flat({"model.dtype": dtype, "train.fast-path": fast_path})
        base, tok = load_model_and_tokenizer(config.model)
        for p in base.parameters():
            p.requires_grad_(False)
        self.model = apply_lora(base, config.lora, fast_path=fast_path)
        if fast_path:  # as SiteRuntime does
            fastpath.enable(self.model, device="cpu", max_length=SEQ)
        self.fast_path = fast_path
        ids, labels = _batch(tok.vocab_size)
        self.examples = [TokenizedExample(tuple(i.tolist()), tuple(lab.tolist())) for i, lab in zip(ids, labels)]
        self.dp = DPSettings(1.0, 1.0) if dp else None
        self.pad = tok.pad_token_id

    def step(self) -> None:
        train_local(self.model, self.examples, steps=1, batch_size=BATCH, learning_rate=1e-3, pad_id=self.pad, dp=self.dp,
                    fast_path=self.fast_path)


def build(variant: str):
    if variant == "plain-dp-tuned-allocator":
        keep_freed_memory()
        return PlainRecipe(True)
    dp = "-dp" in variant and not variant.endswith("no-dp")
    if variant.startswith("plain"):
        return PlainRecipe(dp)
    return Fedllm("bfloat16" if "bf16" in variant else "float32", dp, fast_path=not variant.endswith("-no-fast-path"))


def bench_steps(steps: int, threads: int, rounds: int) -> dict:
    """Step times of every variant, each in a fresh process of its own (as a site process runs
    one model), the variants taking turns over ``rounds`` rounds in rotating order, so that the
    machine's drifts spread over all of them; the median over all their steps. fedllm's variants
    set fedllm's allocator (``fedllm.fastpath.allocator.keep_freed_memory``, done by ``train_local`` on the
    fast path; not by ``fedllm-bf16-dp-no-fast-path``); the plain
    recipe runs as a user runs it, with glibc's default allocator, and once more with fedllm's
    setting (``plain-dp-tuned-allocator``), for the conservative ratio."""
    times: dict[str, list[float]] = {v: [] for v in TIMED}
    for r in range(rounds):
        order = TIMED[r % len(TIMED):] + TIMED[:r % len(TIMED)]
        for variant in order:
            proc = subprocess.run([sys.executable, __file__, "--time-one", variant, "--steps", str(steps),
                                   "--threads", str(threads)], capture_output=True, text=True, check=True)
            times[variant] += json.loads(proc.stdout.strip().splitlines()[-1])["step-s"]
    med = {v: statistics.median(t) for v, t in times.items()}
    out: dict = {v: {"step-s": round(med[v], 3), "tokens-per-s": round(TOKENS_PER_STEP / med[v], 1),
                     "per-round-s": [round(statistics.median(times[v][i:i + steps]), 3) for i in range(0, len(times[v]), steps)]}
                 for v in TIMED}
    out["ratios"] = {
        "throughput-fedllm-bf16-dp-vs-plain-dp": round(med["plain-dp"] / med["fedllm-bf16-dp"], 2),
        "throughput-fedllm-bf16-dp-vs-plain-dp-tuned-allocator": round(med["plain-dp-tuned-allocator"] / med["fedllm-bf16-dp"], 2),
        "throughput-fedllm-fp32-dp-vs-plain-dp": round(med["plain-dp"] / med["fedllm-fp32-dp"], 2),
        "throughput-fedllm-bf16-dp-vs-no-fast-path": round(med["fedllm-bf16-dp-no-fast-path"] / med["fedllm-bf16-dp"], 2),
        "throughput-fedllm-bf16-dp-no-fast-path-vs-plain-dp": round(med["plain-dp"] / med["fedllm-bf16-dp-no-fast-path"], 2),
        "dp-overhead-fedllm-bf16": round(med["fedllm-bf16-dp"] / med["fedllm-bf16-no-dp"], 3),
        "dp-overhead-fedllm-fp32": round(med["fedllm-fp32-dp"] / med["fedllm-fp32-no-dp"], 3),
        "dp-overhead-plain": round(med["plain-dp"] / med["plain-no-dp"], 3),
    }
    return out


def _time_one(variant: str, steps: int) -> dict:
    """In this (fresh) process: the variant's step times after one warm-up step."""
    runner = build(variant)
    runner.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.step()
        times.append(time.perf_counter() - start)
    return {"step-s": times}


def _peak_one(variant: str, steps: int, threads: int) -> dict:
    """In this (fresh) process: RSS after building the variant, and the peak during its steps."""
    torch.set_num_threads(threads)
    runner = build(variant)
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM, the peak RSS, to the current RSS
        fh.write("5")
    for _ in range(steps):
        runner.step()
    peak = _status_mb("VmHWM")
    return {"rss-after-load-mb": round(before), "peak-mb": round(peak), "training-adds-mb": round(peak - before)}


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_memory(steps: int, threads: int) -> dict:
    out = {}
    for variant in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--one", variant, "--steps", str(steps), "--threads", str(threads)],
                              capture_output=True, text=True, check=True)
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    add = {v: out[v]["training-adds-mb"] for v in VARIANTS}
    out["ratios"] = {
        "dp-memory-overhead-fedllm-bf16": round(add["fedllm-bf16-dp"] / add["fedllm-bf16-no-dp"], 3),
        "dp-memory-overhead-fedllm-fp32": round(add["fedllm-fp32-dp"] / add["fedllm-fp32-no-dp"], 3),
        "dp-memory-overhead-plain": round(add["plain-dp"] / add["plain-no-dp"], 3),
        "peak-fedllm-bf16-dp-vs-plain-dp": round(out["fedllm-bf16-dp"]["peak-mb"] / out["plain-dp"]["peak-mb"], 3),
        "peak-fedllm-bf16-dp-vs-no-fast-path": round(out["fedllm-bf16-dp"]["peak-mb"]
                                                     / out["fedllm-bf16-dp-no-fast-path"]["peak-mb"], 3),
    }
    return out


def bench_gemm() -> dict:
    """TFLOP/s of the default model's base products (bf16, ``out += a @ b`` as ``FrozenBaseLoRA``
    runs them: ``x Wᵀ`` forward, ``g W`` backward) every way ``fedllm.fastpath.products.accumulate_product``
    chooses between (whole, in row chunks of ``ROW_CHUNK``, in two column halves), for several row
    counts (batch x tokens), each weight cold (one of 40 distinct copies, as 30 layers are)."""
    from fedllm.fastpath.products import PRODUCT_WAYS

    def best(fn, weights, repeats=3):
        for w in weights[:4]:
            fn(w)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for w in weights:
                fn(w)
            times.append((time.perf_counter() - start) / len(weights))
        return min(times)

    out = {}
    for inner, outer in ((576, 576), (576, 192), (576, 1536), (1536, 576)):
        weights = [torch.randn(outer, inner, dtype=torch.bfloat16) for _ in range(40)]
        for rows in (640, 1024, 1536):
            x = torch.randn(rows, inner, dtype=torch.bfloat16)
            g = torch.randn(rows, outer, dtype=torch.bfloat16)
            acc_out = torch.zeros(rows, outer, dtype=torch.bfloat16)
            acc_in = torch.zeros(rows, inner, dtype=torch.bfloat16)
            flop = 2 * rows * inner * outer
            for direction, (acc, a, layout) in {"forward": (acc_out, x, lambda w: w.t()),
                                                "backward": (acc_in, g, lambda w: w)}.items():
                out[f"{rows}x{inner}->{outer} {direction}"] = {
                    f"{way}-tflops": round(flop / best(lambda w, product=product, acc=acc, a=a, layout=layout:
                                                       product(acc, a, layout(w)), weights) / 1e12, 2)
                    for way, product in PRODUCT_WAYS.items()}
    return out


def bench_startup() -> dict:
    """The default model's load time in a fresh process, after its first conversion (cached)."""
    root = str(ROOT)
    code = (f"import time, sys; sys.path.insert(0, {root!r}); t0 = time.perf_counter()\n"
            "from fedllm.config import ModelConfig\nfrom fedllm.model.loading import load_model_and_tokenizer\n"
            "t1 = time.perf_counter(); load_model_and_tokenizer(ModelConfig()); t2 = time.perf_counter()\n"
            "print(round(t1 - t0, 2), round(t2 - t1, 2))")
    load_model_and_tokenizer(RunConfig().model)  # converts once if needed
    runs = []
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        runs.append([float(x) for x in proc.stdout.strip().splitlines()[-1].split()])
    return {"import-s": statistics.median(r[0] for r in runs), "load-s": statistics.median(r[1] for r in runs),
            "runs": runs}


def bench_quality(steps: int, site: str, seeds: list[int]) -> dict:
    """Held-out loss after ``steps`` DP steps on one PubMedQA site (../shared/data/pubmedqa), with the
    base in fp32 and in bf16, the same sampling and noise seeds for both: does bf16 change what is
    learned beyond run-to-run noise (the spread over seeds)?"""
    from fedllm.config import SiteConfig
    from fedllm.data.pubmedqa import pubmedqa_site_records
    from fedllm.model.lora import get_adapter_state, set_adapter_state
    from fedllm.privacy.accounting import noise_multiplier_for
    from fedllm.site.runtime import load_site_examples
    from fedllm.site.training import evaluate_loss

    folder = ROOT.parent / "shared" / "data" / "pubmedqa"
    records = pubmedqa_site_records(folder)[site]
    out: dict = {"site": site, "records": len(records), "steps": steps, "seeds": seeds}
    for dtype in ("float32", "bfloat16"):
        config = RunConfig.from_flat({"model.dtype": dtype, "data.max-length": 256, "train.learning-rate": 0.015})
        base, tok = load_model_and_tokenizer(config.model)
        for p in base.parameters():
            p.requires_grad_(False)
        model = apply_lora(base, config.lora)
        fastpath.enable(model, device="cpu", max_length=config.data.max_length)
        start = get_adapter_state(model)
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "site.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in records))
            train, held = load_site_examples(config, SiteConfig(name=site, data_path=str(data), eval_fraction=0.1,
                                                                max_eval_examples=64), tok,
                                             split_key=bytes(32))  # a fixed key: the same split on every run
        q = config.train.batch_size / len(train)
        sigma = noise_multiplier_for(target_epsilon=6.0, target_delta=1e-5, sample_rate=q, steps=steps, accountant="prv")
        losses = []
        for seed in seeds:
            set_adapter_state(model, start)
            train_local(model, train, steps=steps, batch_size=config.train.batch_size, learning_rate=0.015,
                        pad_id=tok.pad_token_id, dp=DPSettings(sigma, 1.0),
                        sampling_generator=torch.Generator().manual_seed(seed),
                        noise_generator=torch.Generator().manual_seed(1000 + seed))
            losses.append(round(evaluate_loss(model, held, batch_size=8, pad_id=tok.pad_token_id).loss, 4))
        set_adapter_state(model, start)
        before = evaluate_loss(model, held, batch_size=8, pad_id=tok.pad_token_id).loss
        out[dtype] = {"held-out-before": round(before, 4), "held-out-after": losses,
                      "mean": round(statistics.mean(losses), 4), "sd": round(statistics.stdev(losses), 4) if len(losses) > 1 else None}
        out["noise-multiplier"] = round(sigma, 3)
    out["difference-of-means"] = round(out["bfloat16"]["mean"] - out["float32"]["mean"], 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--parts", default="speed,memory,startup",
                        help="comma-separated: speed, memory, startup, quality, gemm")
    parser.add_argument("--quality-steps", type=int, default=30)
    parser.add_argument("--quality-site", default="geriatric")
    parser.add_argument("--quality-seeds", default="1,2,3")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--time-one", choices=TIMED, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2, help="speed: rounds of one fresh process per variant")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.time_one:
        print(json.dumps(_time_one(args.time_one, args.steps)))
        return
    if args.one:
        print(json.dumps(_peak_one(args.one, args.steps, args.threads)))
        return
    report = {"machine": f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}",
              "setup": f"SmolLM2-135M-Instruct, LoRA r=8 all-linear, batch {BATCH} x {SEQ} tokens, loss on the second half"}
    parts = set(args.parts.split(","))
    if "speed" in parts:
        report["steps"] = bench_steps(args.steps, args.threads, args.rounds)
    if "memory" in parts and not args.no_memory:
        report["memory"] = bench_memory(args.steps, args.threads)
    if "startup" in parts:
        report["startup"] = bench_startup()
    if "gemm" in parts:
        report["gemm"] = bench_gemm()
    if "quality" in parts:
        report["quality"] = bench_quality(args.quality_steps, args.quality_site,
                                          [int(s) for s in args.quality_seeds.split(",")])
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(report["setup"], "|", report["machine"])
    for variant in TIMED if "steps" in report else ():
        r = report["steps"][variant]
        mem = report.get("memory", {}).get(variant)
        extra = f"  peak {mem['peak-mb']} MB (training adds {mem['training-adds-mb']} MB)" if mem else ""
        print(f"{variant:<26} {r['step-s']:6.3f} s/step  {r['tokens-per-s']:8.1f} tokens/s  rounds {r['per-round-s']}{extra}")
    for section in ("steps", "memory"):
        for name, value in report.get(section, {}).get("ratios", {}).items():
            print(f"{name:<45} {value}")
    for section in ("startup", "quality", "gemm"):
        if section in report:
            print(section, json.dumps(report[section]))


if __name__ == "__main__":
    main()
