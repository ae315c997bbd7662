"""fedllm.fastpath's pieces that are not per-family forms of a model's modules (those are tested in
test_model_families.py): the base's product in row chunks, the fused output head and loss, the
allocator setting, the rotary function and Llama's lean attention; and the switch itself
(``train.fast-path``): off, none of the fast path runs."""

from __future__ import annotations

import platform

import pytest
import torch

from fedllm.fastpath import allocator, attention, head, products
from tests.helpers import write_jsonl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("way", ["whole", "rows", "columns"])
def test_accumulate_product_adds_the_same_product_every_way(monkeypatch, dtype, way):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1100, 48, generator=g).to(dtype)
    w = torch.randn(41, 48, generator=g).to(dtype)  # an odd width: column halves of 21 and 20
    start = torch.randn(1100, 41, generator=g).to(dtype)
    expected = start.clone().addmm_(a, w.t())
    monkeypatch.setattr(products, "_product_way", {})
    first = products.accumulate_product(start.clone(), a, w.t())  # times every way, then computes once
    assert len(products._product_way) == 1 and next(iter(products._product_way.values())) in products.PRODUCT_WAYS
    key = next(iter(products._product_way))
    products._product_way[key] = way
    again = products.accumulate_product(start.clone(), a, w.t())
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(first, expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(again, expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(products.PRODUCT_WAYS[way](start.clone(), a, w.t()), expected, rtol=tolerance,
                               atol=tolerance)


def test_small_products_are_one_multiply(monkeypatch):
    monkeypatch.setattr(products, "_product_way", {})
    out = products.accumulate_product(torch.zeros(products.ROW_CHUNK, 3), torch.ones(products.ROW_CHUNK, 2), torch.ones(2, 3))
    assert products._product_way == {} and bool((out == 2).all())


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fused_head_loss_gives_the_unfused_values_and_gradients_in_every_chunk(monkeypatch, dtype, tolerance):
    """head_nll equals cross_entropy on the head's logits in fp32 (values and the gradient of a
    weighted sum of the losses, as the per-sequence loss weights them), over several chunks of
    rows and a partial last one; under ``no_grad`` the same values."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(21, 16, generator=g).to(dtype)
    weight = (torch.randn(50, 16, generator=g) / 4).to(dtype)
    targets = torch.randint(0, 50, (21,), generator=g)
    weights = torch.rand(21, generator=g) + 0.5
    monkeypatch.setattr(head, "HEAD_CHUNK_ELEMENTS", 8 * 50)  # chunks of 8 rows: 8, 8, 5
    fused_h = hidden.clone().requires_grad_(True)
    fused = head.head_nll(fused_h, weight, targets)
    (fused * weights).sum().backward()
    plain_h = hidden.clone().requires_grad_(True)
    plain = torch.nn.functional.cross_entropy(torch.nn.functional.linear(plain_h, weight).float(), targets,
                                              reduction="none")
    (plain * weights).sum().backward()
    assert fused.dtype == torch.float32 and fused_h.grad.dtype == dtype
    torch.testing.assert_close(fused, plain.detach(), rtol=1e-6, atol=1e-6)  # the same logits, fp32 loss
    torch.testing.assert_close(fused_h.grad.float(), plain_h.grad.float(), rtol=tolerance, atol=tolerance)
    assert fused_h.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(head.head_nll(hidden, weight, targets), plain.detach(), rtol=1e-6, atol=1e-6)


def test_training_keeps_freed_memory_for_reuse_on_glibc():
    """keep_freed_memory: on Linux with glibc the allocator setting takes effect (mallopt accepts
    both thresholds), once per process; elsewhere it reports that it did not."""
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert allocator.keep_freed_memory() is expected
    assert allocator.keep_freed_memory() is expected


def test_auto_dtype_is_bf16_only_where_the_hardware_computes_it_natively(monkeypatch):
    from fedllm.config import ModelConfig, RunConfig
    from fedllm.model import loading as model

    assert RunConfig.from_flat({"model.dtype": "auto"}).model.dtype == "auto"
    assert model.base_dtype(ModelConfig(dtype="float32"), "cpu") == "float32"
    assert model.base_dtype(ModelConfig(dtype="bfloat16"), "cpu") == "bfloat16"
    auto = ModelConfig(name="tiny-random-llama", dtype="auto")
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(model, "native_bf16", lambda device, native=native: native)
        base, _ = model.load_model_and_tokenizer(auto, device="cpu")
        assert {p.dtype for p in base.parameters()} == {expected}
    assert model.quantized_dtype(auto) == "bfloat16"
    monkeypatch.undo()
    assert model.native_bf16("mps") is False
    assert model.native_bf16("cuda:0") is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # oneDNN held to AVX2: bf16 would be emulated
    assert model.native_bf16("cpu") is False


def test_rotary_function_matches_llamas_rotary_embedding_and_its_gradient():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64).transpose(1, 2).contiguous().transpose(1, 2)
    x.requires_grad_(True)
    cos, sin = torch.randn(2, 5, 8, generator=g, dtype=torch.float64), torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    torch.testing.assert_close(attention.Rotary.apply(x, cos, sin), expected)
    assert torch.autograd.gradcheck(lambda t: attention.Rotary.apply(t, cos, sin), (x,))


def test_lean_llama_attention_gives_the_model_s_own_values_and_leaves_generation_alone():
    """apply_lora (fast path on) gives Llama's attention the lean forward (Rotary): logits and per-example
    gradients equal the original forward's (fp32; bf16 to its precision); with a cache, as in
    generation, the original forward runs."""
    from tests.unit.test_model_families import (
        DTYPE_TOLERANCES,
        _assert_same_outputs,
        _batch_with_padding,
        _outputs,
        _random_lora,
    )

    ids, mask = _batch_with_padding()
    for dtype, tolerance in DTYPE_TOLERANCES:
        model = _random_lora("llama", dtype)
        lean = [m for m in model.modules() if getattr(m.forward, "__func__", None) is attention.lean_llama_attention_forward]
        assert len(lean) == 2
        with torch.no_grad():
            cached = model(input_ids=ids, attention_mask=mask, use_cache=True).logits.float()
        lean_outputs = _outputs(model, ids, mask)
        for m in lean:
            del m.forward
        own = _outputs(model, ids, mask)
        _assert_same_outputs(lean_outputs, own, tolerance)
        torch.testing.assert_close(cached, own[0], rtol=tolerance, atol=tolerance)


class _FastPathRan(AssertionError):
    pass


def _fail(name: str):
    def fail(*args, **kwargs):
        raise _FastPathRan(f"{name} ran with train.fast-path = false")
    return fail


@pytest.mark.parametrize("fast_path", [False, True])
def test_with_the_fast_path_off_none_of_it_runs(tmp_path, monkeypatch, fast_path):
    """``train.fast-path = false``: a site's DP round and its evaluation run the plain reference. No
    layer of the model has a forward from ``fedllm.fastpath``, no B factor a per-example rule, the
    attention is the model's own, and neither ``enable`` nor the allocator setting, the fused head,
    the timed products or the attention choice is ever called (each replaced by a function that
    fails). With ``train.fast-path = true`` the same site does call them: the check can fail."""
    import fedllm.fastpath as fastpath
    from fedllm.config import RunConfig, SiteConfig
    from fedllm.fastpath import lora, norms
    from fedllm.model.loading import build_tiny_model
    from fedllm.model.lora import get_adapter_state
    from fedllm.site.runtime import SiteRuntime

    for module, name in ((fastpath, "enable"), (fastpath, "use_lean_lora"), (fastpath, "use_lean_norms"),
                         (fastpath, "use_lean_attention"), (fastpath, "choose_attention"), (lora, "use_lean_lora"),
                         (norms, "use_lean_norms"), (attention, "use_lean_attention"),
                         (attention, "choose_attention"), (allocator, "keep_freed_memory"), (head, "head_nll"),
                         (products, "accumulate_product")):
        monkeypatch.setattr(module, name, _fail(f"{module.__name__}.{name}"))
    config = RunConfig.from_flat({"model.name": "tiny-random-llama", "lora.r": 2, "data.max-length": 48,
                                  "train.local-steps": 1, "train.batch-size": 4, "privacy.noise-multiplier": 1.0,
                                  "train.fast-path": fast_path})
    data = tmp_path / "site.jsonl"
    write_jsonl(data, ({"instruction": f"Q{i}?", "output": f"A{i}."} for i in range(16)))
    if fast_path:
        with pytest.raises(_FastPathRan):
            SiteRuntime(config, SiteConfig(name="s", data_path=str(data), max_epsilon=8.0), ledger_path=tmp_path / "l.json",
                        simulated=False)
        return
    site = SiteRuntime(config, SiteConfig(name="s", data_path=str(data), max_epsilon=8.0), ledger_path=tmp_path / "l.json",
                       simulated=False)
    start = get_adapter_state(site.model, trainable_only=True)
    outcome = site.train_round(run_id="r", server_round=1, adapter=start)
    assert any(not torch.equal(outcome.adapter[k], start[k]) for k in start)
    site.evaluate(outcome.adapter, run_id="r", server_round=1)
    model = site.model
    assert not fastpath.is_enabled(model)
    assert not [m for m in model.modules()
                if getattr(getattr(m.__dict__.get("forward"), "__func__", None), "__module__", "").startswith("fedllm.")]
    factors = [m.lora_B["default"] for m in model.modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
    assert factors and all(getattr(f, "per_example_rule", None) is None for f in factors)
    own = build_tiny_model("llama").config._attn_implementation
    assert model.get_base_model().config._attn_implementation == own != attention.GROUPED_ATTENTION


def test_a_model_with_the_fast_path_is_refused_by_a_plain_reference_run():
    """``fast_path=False`` must mean the plain reference: a model built with the fast path's layers
    is refused (build it with ``apply_lora(..., fast_path=False)``), one built without runs."""
    import fedllm.fastpath as fastpath
    from fedllm.config import LoraConfig
    from fedllm.data.formatting import TokenizedExample
    from fedllm.model.loading import build_tiny_model
    from fedllm.model.lora import apply_lora
    from fedllm.site.training import DPSettings, evaluate_loss, train_local

    examples = [TokenizedExample(tuple(range(1, 12)), (-100,) * 6 + tuple(range(7, 12)))] * 4
    kw = {"steps": 1, "batch_size": 2, "learning_rate": 0.1, "pad_id": 0, "dp": DPSettings(1.0, 1.0)}
    fast = apply_lora(build_tiny_model("llama"), LoraConfig(r=2))
    assert fastpath.is_enabled(fast)
    with pytest.raises(ValueError, match="fast-path = false"):
        train_local(fast, examples, fast_path=False, **kw)
    with pytest.raises(ValueError, match="fast-path = false"):
        evaluate_loss(fast, examples, batch_size=2, pad_id=0, fast_path=False)
    plain = apply_lora(build_tiny_model("llama"), LoraConfig(r=2), fast_path=False)
    assert not fastpath.is_enabled(plain)
    assert train_local(plain, examples, fast_path=False, **kw).steps == 1
    assert not fastpath.is_enabled(plain)


def test_a_frozen_factor_is_cast_once_and_again_when_its_values_change():
    from fedllm.fastpath.lora import frozen_in

    a = torch.nn.Parameter(torch.randn(4, 8), requires_grad=False)
    first = frozen_in(a, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, a.detach().to(torch.bfloat16))
    assert frozen_in(a, torch.bfloat16) is first  # cached
    assert frozen_in(a, torch.float32) is a  # already in that dtype
    with torch.no_grad():
        a.copy_(torch.randn(4, 8))  # an adapter loaded into it
    again = frozen_in(a, torch.bfloat16)
    assert again is not first and torch.equal(again, a.detach().to(torch.bfloat16))
