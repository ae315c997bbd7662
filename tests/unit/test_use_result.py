"""Using a finished run (``fedllm generate``, ``fedllm export``) on a run folder built by hand the way
the coordinator writes one: ``adapter/`` saved by ``save_adapter`` from a random FFA-LoRA (B ≠ 0, A
frozen from ``lora.seed``), its model card, and ``config.toml`` naming the tiny random Llama."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fedllm.cli.main import main
from fedllm.config import LoraConfig, ModelConfig, RunConfig, to_toml
from fedllm.data.formatting import render
from fedllm.model.loading import load_model_and_tokenizer
from fedllm.model.lora import get_adapter_state, save_adapter
from tests.helpers import with_random_lora, write_jsonl

MODEL = "tiny-random-llama"
CARD = "---\nbase_model: none\nlibrary_name: peft\n---\n# fedllm adapter\n\nTrained with DP. ε = 1.23 at δ = 1e-5.\n"
IDS = torch.tensor([[5, 70, 101, 33, 200, 12, 9, 150]])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("use") / "run"
    model, _ = load_model_and_tokenizer(ModelConfig(name=MODEL))
    peft_model = with_random_lora(model, LoraConfig())  # freeze-a (FFA-LoRA): A from lora.seed, B random
    save_adapter(peft_model, get_adapter_state(peft_model), run / "adapter")
    (run / "adapter" / "README.md").write_text(CARD, encoding="utf-8")
    (run / "config.toml").write_text(to_toml(RunConfig.from_flat({"model.name": MODEL})), encoding="utf-8")
    return run


def _adapted(adapter):
    from peft import PeftModel

    base, tokenizer = load_model_and_tokenizer(ModelConfig(name=MODEL))
    return PeftModel.from_pretrained(base, str(adapter)).eval(), tokenizer


def _greedy(model, tokenizer, text, n):
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _leftovers(folder):
    """Temporary siblings an export may have left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_merged_export_loads_without_fedllm_and_gives_the_adapted_logits(run_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--merge", "--out", str(out)]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # transformers only: no peft, no fedllm
    adapted, tokenizer = _adapted(run_dir / "adapter")
    base, _ = load_model_and_tokenizer(ModelConfig(name=MODEL))
    with torch.no_grad():
        got, want, plain = (m(IDS).logits for m in (merged, adapted, base.eval()))
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter changed the model: the check can fail
    assert AutoTokenizer.from_pretrained(out)("fever?")["input_ids"] == tokenizer("fever?")["input_ids"]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "ε = 1.23 at δ = 1e-5" in card and "Merged model" in card and "`run`" in card
    assert "library_name: transformers" in card and "library_name: peft" not in card
    assert _leftovers(tmp_path) == []


def test_export_refuses_a_non_empty_out_and_leaves_nothing_when_it_fails(run_dir, tmp_path, capsys, monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["export", str(run_dir), "--merge", "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert f"--out {taken} already exists and is not empty" in err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    from fedllm.model import export

    def broken(run):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "_merged_card", broken)  # fails after the model was written to the temp folder
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="disk full"):
        main(["export", str(run_dir), "--merge", "--out", str(out)])
    assert not out.exists() and _leftovers(tmp_path) == []


def test_export_without_merge_copies_the_adapter_and_the_run_config(run_dir, tmp_path):
    out = tmp_path / "adapter-copy"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "config.toml"} <= {
        p.name for p in out.iterdir()}
    assert "tiny-random-llama" in (out / "config.toml").read_text(encoding="utf-8")
    copied, _ = _adapted(out)
    original, _ = _adapted(run_dir / "adapter")
    with torch.no_grad():
        assert torch.equal(copied(IDS).logits, original(IDS).logits)


def test_generate_streams_the_greedy_answer_to_the_rendered_prompt(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "What counts as a fever?", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    model, tokenizer = _adapted(run_dir / "adapter")
    prompt = render(tokenizer, [{"role": "user", "content": "What counts as a fever?"}], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")  # the chat template training used
    expected = _greedy(model, tokenizer, prompt, 12)
    assert expected and printed == expected + "\n"


def test_generate_from_a_file_writes_one_json_line_per_record(run_dir, tmp_path, capsys):
    records = [{"instruction": "Define fever.", "output": "A raised temperature."},
               {"instruction": "Summarise", "input": "The patient is well.", "output": "Well."},
               {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye?"}]},
               {"instruction": "Only a question, no answer"},  # prompt-only records
               {"conversations": [{"from": "human", "value": "And no answer here"}]},
               {"text": "Plain text is continued:"}]
    data = write_jsonl(tmp_path / "prompts.jsonl", records)
    out = tmp_path / "generations.jsonl"
    assert main(["generate", str(run_dir), "--file", str(data), "--max-new-tokens", "6", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["record"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r.get("reference") for r in rows] == ["A raised temperature.", "Well.", None, None, None, None]
    assert all(isinstance(r["generation"], str) for r in rows)
    model, tokenizer = _adapted(run_dir / "adapter")
    first = render(tokenizer, [{"role": "user", "content": "Define fever."}], add_generation_prompt=True)
    assert rows[0]["prompt"] == first and rows[0]["generation"] == _greedy(model, tokenizer, first, 6)
    assert rows[2]["prompt"].endswith("Bye?<|im_end|>\n<|im_start|>assistant\n")
    assert rows[3]["prompt"] == render(tokenizer, [{"role": "user", "content": "Only a question, no answer"}],
                                       add_generation_prompt=True)
    assert rows[4]["prompt"].endswith("And no answer here<|im_end|>\n<|im_start|>assistant\n")
    assert rows[5]["prompt"] == "Plain text is continued:"
    # without --out: the same lines on stdout
    assert main(["generate", str(run_dir), "--file", str(data), "--max-new-tokens", "6"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows


def test_a_bad_run_folder_is_a_clear_error(run_dir, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["generate", str(missing), "--prompt", "hi"]) == 2
    assert f"run folder {missing} not found" in capsys.readouterr().err

    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir / "adapter", unfinished / "checkpoints" / "round-2")
    assert main(["export", str(unfinished), "--merge", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no adapter/adapter_config.json" in err and f"--adapter {unfinished / 'checkpoints' / 'round-2'}" in err
    assert not (tmp_path / "x").exists()
    # the checkpoint, named with --adapter (no config.toml there: --model names the base)
    assert main(["generate", str(unfinished), "--adapter", str(unfinished / "checkpoints" / "round-2"),
                 "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert "--model NAME" in capsys.readouterr().err
    assert main(["generate", str(unfinished), "--adapter", str(unfinished / "checkpoints" / "round-2"),
                 "--model", MODEL, "--prompt", "hi", "--max-new-tokens", "2"]) == 0

    with pytest.raises(SystemExit) as exc:  # exactly one of --prompt and --file
        main(["generate", str(run_dir)])
    assert exc.value.code == 2


def test_a_malformed_prompt_record_names_the_file_and_record(run_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "fine"}, {"question": "what?"}])
    out = tmp_path / "generations.jsonl"
    assert main(["generate", str(run_dir), "--file", str(data), "--max-new-tokens", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{data}: record 2" in err and "unrecognised record" in err and "[record 1]" not in err
    assert not out.exists()


def test_an_old_run_folder_uses_the_adapters_base_only_when_it_loads_offline(run_dir, tmp_path):
    from fedllm.errors import ConfigError
    from fedllm.model.export import resolve_run
    from tests.helpers import edit_json, save_random_llama

    old = tmp_path / "old-run"
    shutil.copytree(run_dir / "adapter", old / "adapter")  # no config.toml
    base = save_random_llama(tmp_path / "base", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
    edit_json(old / "adapter" / "adapter_config.json", lambda c: c.update(base_model_name_or_path=str(base)))
    assert resolve_run(old).model.name == str(base)
    edit_json(old / "adapter" / "adapter_config.json", lambda c: c.update(base_model_name_or_path="org/not-cached"))
    with pytest.raises(ConfigError, match="not available offline. Pass the run's model.name: --model NAME"):
        resolve_run(old)
    assert resolve_run(old, model_name=MODEL).model.name == MODEL
