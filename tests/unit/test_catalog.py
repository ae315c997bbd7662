"""``fedllm models``: parameter counts computed from the published shapes match the published
sizes; the memory estimate behaves (precision, checkpointing, batch); every family names a tiny
test model that exists."""

from __future__ import annotations

import json

import pytest

from fedllm.cli.main import main
from fedllm.model.catalog import FAMILIES, estimate_memory
from fedllm.model.loading import TINY_CONFIGS

PUBLISHED = {  # billions of parameters, from the model cards
    ("Llama 3.1", "8B"): 8.03, ("Llama 3.1", "70B"): 70.6, ("Llama 3.1", "405B"): 405.9,
    ("Mistral / OpenChat", "7B"): 7.25, ("Mixtral", "8x7B"): 46.7, ("Mixtral", "8x22B"): 141.0,
    ("Phi-3", "mini 3.8B"): 3.82, ("Phi-3", "medium 14B"): 14.0, ("Command R+", "R+ 104B"): 104.0,
    ("Gemma", "Gemma 7B"): 8.54, ("Gemma", "Gemma 2 9B"): 9.24, ("Gemma", "Gemma 2 27B"): 27.2,
    ("Yi", "6B"): 6.06, ("Yi", "34B"): 34.4, ("Qwen2.5", "7B"): 7.62, ("Qwen2.5", "72B"): 72.7,
    ("SmolLM2", "135M"): 0.135, ("SmolLM2", "1.7B"): 1.71, ("MPT", "7B"): 6.7, ("MPT", "30B"): 30.0,
    ("Falcon", "40B"): 41.8, ("Falcon", "180B"): 180.0,
}


@pytest.mark.parametrize("family,size", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_sizes(family, size):
    shape = next(s for f in FAMILIES if f.name == family for s in f.sizes if s.name == size)
    assert shape.parameters() / 1e9 == pytest.approx(PUBLISHED[(family, size)], rel=0.03)


def test_every_family_has_a_tested_tiny_model():
    assert {f.tiny for f in FAMILIES} <= set(TINY_CONFIGS)


def test_the_memory_estimate_moves_the_right_way():
    shape = next(s for f in FAMILIES if f.name == "Llama 3.1" for s in f.sizes if s.name == "8B")
    kw = dict(rank=8, seq_len=512, physical_batch=8)
    fp32, bf16, q4 = (estimate_memory(shape, precision=p, **kw) for p in ("fp32", "bf16", "4bit"))
    assert fp32.base_gb == pytest.approx(8.03 * 4, rel=0.01) and bf16.base_gb == pytest.approx(8.03 * 2, rel=0.01)
    assert q4.base_gb < bf16.base_gb / 3
    ckpt = estimate_memory(shape, precision="bf16", checkpointing=True, **kw)
    assert ckpt.activations_gb < bf16.activations_gb / 5 and ckpt.base_gb == bf16.base_gb
    small = estimate_memory(shape, precision="bf16", rank=8, seq_len=512, physical_batch=1)
    assert small.per_example_grads_gb == pytest.approx(bf16.per_example_grads_gb / 8)
    assert small.total_gb < bf16.total_gb


def test_cli_prints_the_table_and_json(capsys):
    assert main(["models", "--precision", "bf16", "--seq-len", "256"]) == 0
    out = capsys.readouterr().out
    for fam in FAMILIES:
        assert fam.name in out
    assert "Apache-2.0" in out and "CC-BY-NC-4.0" in out and "q,k,v,o_proj only" in out
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == sum(len(f.sizes) for f in FAMILIES) and all(r["memory-gb"] > 0 for r in rows)
    assert main(["models", "--rank", "0"]) == 2
