"""Foundation benchmark: ratios measured side by side in one run (the machine is shared and noisy).

On the default model (SmolLM2-135M-Instruct), LoRA r=8 on every attention and MLP linear layer,
batch 8 x 128 tokens:

(a) a DP step vs the same step without DP (fedllm's own loop; with FFA-LoRA, the default, and with
    A trained too), interleaved and compared by median;
(b) one federated round's wall time (Flower simulation engine, 1 site, measured by the server from
    sending the round to receiving the update) vs the same local steps in a plain loop, no Flower;
(c) bytes a site sends per round (the reply message as Flower serialises it) vs the raw adapter
    tensor bytes vs the full model's bytes.

    python bench/bench_foundation.py [--steps 6] [--round-steps 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedllm.config import RunConfig, SiteConfig  # noqa: E402
from fedllm.data.formatting import TokenizedExample  # noqa: E402
from fedllm.model.loading import load_model_and_tokenizer  # noqa: E402
from fedllm.model.lora import apply_lora, get_adapter_state  # noqa: E402
from fedllm.site.training import DPSettings, train_local  # noqa: E402

SEQ, BATCH = 128, 8


def _examples(tokenizer, n: int, seed: int = 0) -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(100, tokenizer.vocab_size - 1, (SEQ,), generator=g).tolist()
        labels = [-100] * (SEQ // 2) + ids[SEQ // 2:]  # loss on the second half, like a response
        out.append(TokenizedExample(tuple(ids), tuple(labels)))
    return out


def bench_dp_overhead(steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    results = {}
    for freeze_a in (True, False):
        config = RunConfig.from_flat({"lora.freeze-a": freeze_a})
        base, tok = load_model_and_tokenizer(config.model)
        for p in base.parameters():
            p.requires_grad_(False)
        model = apply_lora(base, config.lora)
        data = _examples(tok, BATCH)  # q = 1: every step is exactly 8 x 128 tokens
        times = {"dp": [], "no-dp": []}
        kw = dict(steps=1, batch_size=BATCH, learning_rate=1e-3, pad_id=tok.pad_token_id)
        train_local(model, data, dp=None, **kw)  # warm-up
        for _ in range(steps):
            for mode in ("no-dp", "dp"):
                start = time.perf_counter()
                train_local(model, data, dp=DPSettings(1.0, 1.0) if mode == "dp" else None, **kw)
                times[mode].append(time.perf_counter() - start)
        dp, plain = statistics.median(times["dp"]), statistics.median(times["no-dp"])
        results["ffa-lora" if freeze_a else "lora-a-and-b"] = {
            "dp-step-s": round(dp, 3), "no-dp-step-s": round(plain, 3), "ratio": round(dp / plain, 3),
            "trainable-params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        }
    return results


def bench_round_vs_plain_loop(round_steps: int, threads: int) -> dict:
    from fedllm.simulation.runner import run_simulation

    config = RunConfig.from_flat({})
    _, tok = load_model_and_tokenizer(config.model)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "site.jsonl"
        rows = []
        for ex in _examples(tok, BATCH):  # q = 1: every step trains on exactly the same 8 records
            half = len(ex.input_ids) // 2
            rows.append({"instruction": tok.decode(ex.input_ids[:half]), "output": tok.decode(ex.input_ids[half:])})
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = Path(tmp) / "run"
        run = RunConfig.from_flat({
            "num-server-rounds": 2, "output-dir": str(out), "simulation.sites-file": str(out / "sites.json"),
            "simulation.client-cpus": threads, "train.local-steps": round_steps, "train.batch-size": BATCH,
            "data.max-length": SEQ + 64, "strategy.fraction-evaluate": 0.0,
            "strategy.min-evaluate-sites": 0, "privacy.target-epsilon": 8.0,
        })
        bench_site = SiteConfig(name="bench", data_path=str(data), eval_fraction=0.0)  # no held-out split
        history = run_simulation(run, [bench_site], echo=lambda _: None)
        rounds = {r["round"]: r for r in history["rounds"] if r.get("train")}
        site = {k: rounds[k]["train"]["sites"]["bench"] for k in rounds}
        # the same steps in a plain loop: same data, same sampling rate, same σ, no Flower, model loaded
        torch.set_num_threads(threads)
        from fedllm.model.lora import shared_model
        from fedllm.site.runtime import load_site_examples

        model, tok2 = shared_model(run)
        train, _ = load_site_examples(run, bench_site, tok2, split_key=bytes(32))  # eval-fraction 0: key unused
        dp = DPSettings(site[1]["noise-multiplier"], 1.0)
        kw = dict(steps=round_steps, batch_size=BATCH, learning_rate=2e-3, pad_id=tok2.pad_token_id, dp=dp)
        train_local(model, train, **{**kw, "steps": 1})  # warm-up, as the site's first round had
        start = time.perf_counter()
        plain = train_local(model, train, **kw)
        plain_s = time.perf_counter() - start
        cold = _plain_loop_cold(run, data, round_steps, site[1]["noise-multiplier"], threads)
    out = {"plain-loop-s": round(plain_s, 2), "tokens-plain": plain.tokens, **cold}
    for k, name in ((1, "first"), (2, "warm")):
        out[f"{name}-round-wall-s"] = round(rounds[k]["train-seconds"], 2)
        out[f"{name}-round-site-train-s"] = round(site[k]["train-seconds"], 2)
        out[f"{name}-round-tokens"] = site[k]["tokens"]
        out[f"ratio-{name}-round-vs-plain"] = round(rounds[k]["train-seconds"] / plain_s, 3)
    out["ratio-first-round-vs-cold-plain"] = round(rounds[1]["train-seconds"] / cold["cold-plain-loop-s"], 3)
    out["note"] = ("q = 1: every step trains on the same 8 records in both; the first round includes the "
                   "worker's model load and tokenization, the warm round is a steady-state round")
    return out


def _plain_loop_cold(run: RunConfig, data: Path, steps: int, sigma: float, threads: int) -> dict:
    """The plain loop in a fresh process, timed from loading the model to the last step: what the
    site's first round pays for too (model load, tokenization, first-step kernel warm-up)."""
    import subprocess

    code = f"""
import json, sys, time, torch
sys.path.insert(0, {str(ROOT)!r})
from fedllm.config import RunConfig, SiteConfig
from fedllm.model.lora import shared_model
from fedllm.site.runtime import load_site_examples
from fedllm.site.training import DPSettings, train_local
torch.set_num_threads({threads})
run = RunConfig.from_flat(json.loads({json.dumps(json.dumps(run.to_flat()))}))
start = time.perf_counter()
model, tok = shared_model(run)
train, _ = load_site_examples(run, SiteConfig(name="bench", data_path={str(data)!r}, eval_fraction=0.0), tok,
                              split_key=bytes(32))
res = train_local(model, train, steps={steps}, batch_size={BATCH}, learning_rate=2e-3, pad_id=tok.pad_token_id,
                  dp=DPSettings({sigma!r}, 1.0))
print(json.dumps({{"cold-plain-loop-s": round(time.perf_counter() - start, 2), "cold-plain-tokens": res.tokens}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_bytes() -> dict:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fedllm import wire

    config = RunConfig.from_flat({})
    base, _ = load_model_and_tokenizer(config.model)
    full_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    model = apply_lora(base, config.lora)
    everything = get_adapter_state(model)
    # a trained update is dense: B is all zeros at initialisation, and Flower de-duplicates identical
    # chunks, so measure on random values of the right shapes
    g = torch.Generator().manual_seed(0)
    sent = {k: torch.randn(v.shape, generator=g) for k, v in get_adapter_state(model, trainable_only=True).items()}
    raw_all = sum(t.numel() * t.element_size() for t in everything.values())
    raw_sent = sum(t.numel() * t.element_size() for t in sent.values())
    metrics = {k: 1.0 for k in wire.TRAIN_METRIC_KEYS}
    reply = RecordDict({wire.ARRAYS: ArrayRecord(sent), wire.METRICS: MetricRecord(metrics),
                        wire.SITE: ConfigRecord({wire.SITE_NAME: "a-hospital-name"})})
    wire = sum(len(obj.deflate()) for obj in get_all_nested_objects(reply).values())
    return {"reply-bytes": wire, "raw-sent-tensor-bytes": raw_sent, "raw-full-adapter-bytes": raw_all,
            "full-model-bytes": full_bytes, "ratio-vs-raw-sent": round(wire / raw_sent, 4),
            "ratio-vs-full-adapter": round(wire / raw_all, 4), "ratio-vs-full-model": round(wire / full_bytes, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="interleaved steps per mode for (a)")
    parser.add_argument("--round-steps", type=int, default=8, help="local steps in the round of (b)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-round", action="store_true", help="skip (b), which starts Flower")
    parser.add_argument("--parts", default="abc", help="which of (a), (b), (c) to run, e.g. 'b'")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "setup": f"SmolLM2-135M-Instruct fp32, LoRA r=8 all-linear, batch {BATCH} x {SEQ} tokens, {args.threads} threads"}
    if "c" in args.parts:
        report["c-bytes"] = bench_bytes()
    if "a" in args.parts:
        report["a-dp-vs-no-dp"] = bench_dp_overhead(args.steps, args.threads)
    if "b" in args.parts and not args.skip_round:
        report["b-round-vs-plain-loop"] = bench_round_vs_plain_loop(args.round_steps, args.threads)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(report["setup"])
    for name, r in report.get("a-dp-vs-no-dp", {}).items():
        print(f"(a) {name:<13} DP step {r['dp-step-s']:.2f}s vs no-DP {r['no-dp-step-s']:.2f}s -> ratio {r['ratio']:.2f}"
              f"  ({r['trainable-params']:,} trainable params)")
    if "b-round-vs-plain-loop" in report:
        b = report["b-round-vs-plain-loop"]
        print(f"(b) first federated round {b['first-round-wall-s']:.1f}s vs plain loop in a fresh process "
              f"{b['cold-plain-loop-s']:.1f}s (model load, tokenization, 1st-step warm-up included in both) -> ratio "
              f"{b['ratio-first-round-vs-cold-plain']:.2f}")
        for name in ("first", "warm"):
            print(f"(b) {name} federated round {b[f'{name}-round-wall-s']:.1f}s vs plain loop {b['plain-loop-s']:.1f}s -> ratio "
                  f"{b[f'ratio-{name}-round-vs-plain']:.2f} (site's own training {b[f'{name}-round-site-train-s']:.1f}s; "
                  f"tokens {b[f'{name}-round-tokens']} vs {b['tokens-plain']})")
    c = report.get("c-bytes")
    if c:
        print(f"(c) reply {c['reply-bytes']:,} B vs raw sent tensors {c['raw-sent-tensor-bytes']:,} B -> {c['ratio-vs-raw-sent']:.3f}; "
              f"vs full adapter {c['raw-full-adapter-bytes']:,} B -> {c['ratio-vs-full-adapter']:.3f}; "
              f"vs full model {c['full-model-bytes']:,} B -> {c['ratio-vs-full-model']:.4f}")


if __name__ == "__main__":
    main()
