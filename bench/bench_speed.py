"""Speed benchmark (issue 6): fedllm's DP-LoRA step against the plain Opacus + PEFT recipe, side by
side in one run (the machine is shared and noisy: compare the ratios, not single timings).

Setup as in the issue: SmolLM2-135M-Instruct, LoRA r=8 on every linear layer, batch 8 x 128 tokens
(loss on the second half of each sequence, like a response), 2 threads.

* **plain recipe** (the baseline, written as a user would write it from the PEFT and Opacus docs):
  fp32 model, ``get_peft_model(LoraConfig(r=8, target_modules="all-linear"))``, Opacus
  ``PrivacyEngine.make_private`` (hooks mode), the loss from ``model(..., labels=labels).loss``;
  with and without DP.
* **fedllm**: ``fedllm.train.train_local`` as the sites run it: FFA-LoRA (A frozen, B trained),
  vocabulary logits on response tokens only, the lean LoRA forward, and the base in
  ``model.dtype`` (bf16 and fp32 both measured); with and without DP. Every step trains exactly the
  same 8 x 128 tokens (the site holds 8 records and the batch size is 8, so q = 1).

Step times are medians over ``--steps`` interleaved steps per variant. Peak memory is measured in
a fresh process per variant: the peak RSS (``VmHWM``, reset after loading) during ``--steps``
steps, above the RSS after loading (so it counts what training adds, not the model itself).
``startup``: the default model's load time in a fresh process once it is converted. ``quality``
(needs ``../shared/data/pubmedqa``): held-out loss after DP training on one PubMedQA site with the
base in fp32 and in bf16, same seeds.

    python bench/bench_speed.py [--steps 5] [--threads 2] [--parts speed,memory,startup,quality] [--json]
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

from fedllm.config import RunConfig  # noqa: E402
from fedllm.data.formatting import TokenizedExample  # noqa: E402
from fedllm.model import apply_lora, load_model_and_tokenizer  # noqa: E402
from fedllm.speed import choose_attention, keep_freed_memory  # noqa: E402
from fedllm.train import DPSettings, train_local  # noqa: E402

SEQ, BATCH = 128, 8
TOKENS_PER_STEP = SEQ * BATCH
VARIANTS = ("plain-dp", "plain-no-dp", "fedllm-bf16-dp", "fedllm-bf16-no-dp", "fedllm-fp32-dp", "fedllm-fp32-no-dp")


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
    """``train_local`` on 8 records with batch size 8: one step = the same 8 x 128 tokens."""

    def __init__(self, dtype: str, dp: bool) -> None:
        config = RunConfig.from_flat({"model.dtype": dtype})
        base, tok = load_model_and_tokenizer(config.model)
        for p in base.parameters():
            p.requires_grad_(False)
        self.model = apply_lora(base, config.lora)
        choose_attention(self.model, device="cpu", max_length=SEQ)  # as SiteRuntime does
        ids, labels = _batch(tok.vocab_size)
        self.examples = [TokenizedExample(tuple(i.tolist()), tuple(lab.tolist())) for i, lab in zip(ids, labels)]
        self.dp = DPSettings(1.0, 1.0) if dp else None
        self.pad = tok.pad_token_id

    def step(self) -> None:
        train_local(self.model, self.examples, steps=1, batch_size=BATCH, learning_rate=1e-3, pad_id=self.pad, dp=self.dp)


def build(variant: str):
    dp = variant.endswith("-dp") and not variant.endswith("no-dp")
    if variant.startswith("plain"):
        return PlainRecipe(dp)
    return Fedllm("bfloat16" if "bf16" in variant else "float32", dp)


def bench_steps(steps: int, threads: int) -> dict:
    """Median step time of every variant, interleaved in this process. fedllm's allocator setting
    (``fedllm.speed.keep_freed_memory``, process-wide) is made first, so the plain recipe runs with
    it too: the ratios are conservative. The plain DP recipe with glibc's default allocator, what
    a user gets, is timed in a fresh process afterwards (``plain-dp-default-allocator``)."""
    keep_freed_memory()
    runners = {v: build(v) for v in VARIANTS}
    for runner in runners.values():
        runner.step()  # warm-up
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(steps):
        for variant, runner in runners.items():
            start = time.perf_counter()
            runner.step()
            times[variant].append(time.perf_counter() - start)
    out = {v: {"step-s": round(statistics.median(t), 3), "tokens-per-s": round(TOKENS_PER_STEP / statistics.median(t), 1)}
           for v, t in times.items()}
    med = {v: statistics.median(t) for v, t in times.items()}
    del runners
    proc = subprocess.run([sys.executable, __file__, "--time-one", "plain-dp", "--steps", str(steps), "--threads", str(threads)],
                          capture_output=True, text=True, check=True)
    default = json.loads(proc.stdout.strip().splitlines()[-1])["step-s"]
    out["plain-dp-default-allocator"] = {"step-s": round(default, 3), "tokens-per-s": round(TOKENS_PER_STEP / default, 1)}
    out["ratios"] = {
        "throughput-fedllm-bf16-dp-vs-plain-dp": round(med["plain-dp"] / med["fedllm-bf16-dp"], 2),
        "throughput-fedllm-fp32-dp-vs-plain-dp": round(med["plain-dp"] / med["fedllm-fp32-dp"], 2),
        "throughput-fedllm-bf16-dp-vs-plain-dp-default-allocator": round(default / med["fedllm-bf16-dp"], 2),
        "dp-overhead-fedllm-bf16": round(med["fedllm-bf16-dp"] / med["fedllm-bf16-no-dp"], 3),
        "dp-overhead-fedllm-fp32": round(med["fedllm-fp32-dp"] / med["fedllm-fp32-no-dp"], 3),
        "dp-overhead-plain": round(med["plain-dp"] / med["plain-no-dp"], 3),
    }
    return out


def _time_one(variant: str, steps: int) -> dict:
    """In this (fresh) process, with glibc's default allocator: the variant's median step time."""
    runner = build(variant)
    runner.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.step()
        times.append(time.perf_counter() - start)
    return {"step-s": statistics.median(times)}


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
    }
    return out


def bench_startup() -> dict:
    """The default model's load time in a fresh process, after its first conversion (cached)."""
    code = ("import time, sys; sys.path.insert(0, %r); t0 = time.perf_counter()\n"
            "from fedllm.config import ModelConfig\nfrom fedllm.model import load_model_and_tokenizer\n"
            "t1 = time.perf_counter(); load_model_and_tokenizer(ModelConfig()); t2 = time.perf_counter()\n"
            "print(round(t1 - t0, 2), round(t2 - t1, 2))" % str(ROOT))
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
    from fedllm.model import get_adapter_state, set_adapter_state
    from fedllm.privacy.accounting import noise_multiplier_for
    from fedllm.site import load_site_examples
    from fedllm.train import evaluate_loss

    folder = ROOT.parent / "shared" / "data" / "pubmedqa"
    records = pubmedqa_site_records(folder)[site]
    out: dict = {"site": site, "records": len(records), "steps": steps, "seeds": seeds}
    for dtype in ("float32", "bfloat16"):
        config = RunConfig.from_flat({"model.dtype": dtype, "data.max-length": 256, "train.learning-rate": 0.015})
        base, tok = load_model_and_tokenizer(config.model)
        for p in base.parameters():
            p.requires_grad_(False)
        model = apply_lora(base, config.lora)
        choose_attention(model, device="cpu", max_length=config.data.max_length)
        start = get_adapter_state(model)
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "site.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in records))
            train, held = load_site_examples(config, SiteConfig(name=site, data_path=str(data)), tok)
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
    parser.add_argument("--parts", default="speed,memory,startup", help="comma-separated: speed, memory, startup, quality")
    parser.add_argument("--quality-steps", type=int, default=30)
    parser.add_argument("--quality-site", default="geriatric")
    parser.add_argument("--quality-seeds", default="1,2,3")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--time-one", choices=VARIANTS, help=argparse.SUPPRESS)
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
        report["steps"] = bench_steps(args.steps, args.threads)
    if "memory" in parts and not args.no_memory:
        report["memory"] = bench_memory(args.steps, args.threads)
    if "startup" in parts:
        report["startup"] = bench_startup()
    if "quality" in parts:
        report["quality"] = bench_quality(args.quality_steps, args.quality_site,
                                          [int(s) for s in args.quality_seeds.split(",")])
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(report["setup"], "|", report["machine"])
    for variant in (*VARIANTS, "plain-dp-default-allocator") if "steps" in report else ():
        r = report["steps"][variant]
        mem = report.get("memory", {}).get(variant)
        extra = f"  peak {mem['peak-mb']} MB (training adds {mem['training-adds-mb']} MB)" if mem else ""
        print(f"{variant:<20} {r['step-s']:6.3f} s/step  {r['tokens-per-s']:8.1f} tokens/s{extra}")
    for section in ("steps", "memory"):
        for name, value in report.get(section, {}).get("ratios", {}).items():
            print(f"{name:<45} {value}")
    for section in ("startup", "quality"):
        if section in report:
            print(section, json.dumps(report[section]))


if __name__ == "__main__":
    main()
