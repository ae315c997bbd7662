"""The DP-SGD mechanism of the local loop, checked exactly on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch

from fedllm.config import LoraConfig, ModelConfig
from fedllm.data.formatting import tokenize_records
from fedllm.model.loading import load_model_and_tokenizer
from fedllm.model.lora import apply_lora, get_adapter_state, set_adapter_state
from fedllm.site.training import (
    DPSettings,
    _poisson_batch,
    collate,
    evaluate_loss,
    per_sequence_loss,
    train_local,
)
from tests.helpers import with_random_lora

RECORDS = [
    {"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                  {"role": "assistant", "content": f"The answer is {2 * i}" + "!" * (i % 5)}]}
    for i in range(24)
]


def _tiny_lora(freeze_a: bool):
    """A tiny Llama with LoRA r=4 and a random B (B = 0 at init would zero A's gradient and
    make every step start from the same point)."""
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name="tiny-random-llama"))
    return with_random_lora(model, LoraConfig(r=4, alpha=8, freeze_a=freeze_a)), tokenizer, tokenize_records(RECORDS, tokenizer, max_length=64)


@pytest.fixture(scope="module")
def setup():
    """A and B trained: Opacus' hooks give the per-example gradients."""
    return _tiny_lora(freeze_a=False)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _run(model, examples, pad_id, *, sigma, clip, seed=0, noise_seed=1, lr=1.0, steps=1, batch=8, **kw):
    return train_local(model, examples, steps=steps, batch_size=batch, learning_rate=lr, pad_id=pad_id,
                       dp=None if sigma is None else DPSettings(sigma, clip), optimizer="sgd",
                       sampling_generator=torch.Generator().manual_seed(seed),
                       noise_generator=torch.Generator().manual_seed(noise_seed), **kw)


def test_dp_step_changes_every_lora_parameter_and_no_base_parameter(setup):
    model, tok, examples = setup
    start = get_adapter_state(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    _run(model, examples, tok.pad_token_id, sigma=1.0, clip=1.0, lr=0.01)
    after = {n: p for n, p in model.named_parameters()}
    lora = [n for n in after if "lora_" in n]
    assert lora and all(after[n].requires_grad for n in lora)
    state = get_adapter_state(model)
    assert all(not torch.equal(state[k], start[k]) for k in start), "a LoRA tensor did not move"
    assert all(torch.equal(after[n], base[n]) for n in base), "a base parameter moved"
    set_adapter_state(model, start)


def test_ffa_lora_keeps_a_frozen():
    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny-random-llama"))
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8, freeze_a=True))
    examples = tokenize_records(RECORDS, tok, max_length=64)
    start = get_adapter_state(peft_model)
    _run(peft_model, examples, tok.pad_token_id, sigma=1.0, clip=1.0, lr=0.01)
    state = get_adapter_state(peft_model)
    for key in start:
        moved = not torch.equal(state[key], start[key])
        assert moved == ("lora_B" in key), key


def _manual_clipped_sum(model, examples, batch, pad_id, clip):
    """Σ_i clip(g_i) from one backward pass per example (independent of Opacus)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in batch:
        model.zero_grad(set_to_none=True)
        ids, mask, labels = collate([examples[i]], pad_id)
        per_sequence_loss(model(input_ids=ids, attention_mask=mask).logits, labels).sum().backward()
        grads = [p.grad.detach().clone() for p in params]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        norms.append(float(norm))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    model.zero_grad(set_to_none=True)
    return total, norms


def test_per_example_gradients_are_clipped_to_c(setup):
    model, tok, examples = setup
    clip = 0.05
    start = get_adapter_state(model)
    params_before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    batch = _poisson_batch(len(examples), 8 / len(examples), torch.Generator().manual_seed(3))
    assert len(batch) >= 2
    expected, norms = _manual_clipped_sum(model, examples, batch, tok.pad_token_id, clip)
    assert min(norms) > clip, "test needs every example to be clipped"
    _run(model, examples, tok.pad_token_id, sigma=0.0, clip=clip, seed=3)  # no noise: Δθ = -Σclip(g_i)/B
    params_after = [p.detach() for p in model.parameters() if p.requires_grad]
    expected_batch = round(8 / len(examples) * len(examples))
    for before, after, want in zip(params_before, params_after, expected):
        torch.testing.assert_close(before - after, want / expected_batch, rtol=1e-4, atol=1e-7)
    step_norm = math.sqrt(sum(float(((b - a) ** 2).sum()) for b, a in zip(params_before, params_after)))
    assert step_norm <= clip * len(batch) / expected_batch + 1e-6
    set_adapter_state(model, start)


@pytest.fixture(scope="module")
def ffa():
    """FFA-LoRA (A frozen, the default): fedllm's own per-example gradients."""
    return _tiny_lora(freeze_a=True)


def test_ffa_lora_uses_fedllms_own_per_example_gradients_equal_to_opacus(ffa):
    from opacus.grad_sample import GradSampleModule

    from fedllm import fastpath
    from fedllm.site.per_example import use_fused_per_example_gradients
    from fedllm.site.training import sequence_losses

    model, tok, examples = ffa
    fast = fastpath.enable(model)
    ids, mask, labels = collate(examples[:5], tok.pad_token_id)
    model.train()
    net = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    sequence_losses(model, ids, mask, labels, net, fast=fast).sum().backward()
    opacus = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
    net._close()
    model.zero_grad(set_to_none=True)
    assert use_fused_per_example_gradients(model, True)
    try:
        sequence_losses(model, ids, mask, labels, fast=fast).sum().backward()
        own = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.grad is None for p in model.parameters())  # only per-example gradients, no sum
    finally:
        use_fused_per_example_gradients(model, False)
        for p in model.parameters():
            p.grad_sample = None
        model.eval()
    assert own.keys() == opacus.keys() and len(own) == 7 * 2  # q,k,v,o,gate,up,down B in 2 layers
    for name in own:
        assert own[name].shape[0] == 5
        torch.testing.assert_close(own[name], opacus[name], rtol=1e-5, atol=1e-7)


def _assert_step_is_the_clipped_sum(model, tok, examples, clip=0.05, **kw):
    """σ = 0, SGD with lr 1: the step equals Σ clip(g_i) / B with g_i from one backward pass per
    example (every example's gradient longer than C); the adapter is restored afterwards."""
    start = get_adapter_state(model)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    batch = _poisson_batch(len(examples), 8 / len(examples), torch.Generator().manual_seed(3))
    expected, norms = _manual_clipped_sum(model, examples, batch, tok.pad_token_id, clip)
    assert min(norms) > clip and len(batch) >= 4
    _run(model, examples, tok.pad_token_id, sigma=0.0, clip=clip, seed=3, **kw)
    after = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    for b, a, want in zip(before, after, expected):
        torch.testing.assert_close(b - a, want / 8, rtol=1e-4, atol=1e-7)
    set_adapter_state(model, start)


@pytest.mark.parametrize("physical, checkpointing", [(0, False), (2, False), (0, True)])
def test_ffa_lora_dp_step_is_the_clipped_sum(ffa, physical, checkpointing):
    model, tok, examples = ffa
    _assert_step_is_the_clipped_sum(model, tok, examples, physical_batch_size=physical,
                                    gradient_checkpointing=checkpointing)
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


@pytest.mark.parametrize("physical", [1, 3])
def test_physical_batches_clip_each_example_and_add_noise_once(setup, physical):
    """Chunked (physical) batches give exactly the whole batch's clipped sum; noise is added once."""
    model, tok, examples = setup
    clip = 0.05
    start = get_adapter_state(model)
    _assert_step_is_the_clipped_sum(model, tok, examples, clip, physical_batch_size=physical)  # > 1 chunk: batch ≥ 4
    # noise: the same batch with two noise seeds differs by noise of std σ·C/B, not √chunks times more
    sigma = 1.3
    runs = []
    for noise_seed in (11, 22):
        _run(model, examples, tok.pad_token_id, sigma=sigma, clip=clip, seed=3, noise_seed=noise_seed,
             physical_batch_size=physical)
        runs.append([p.detach().clone() for p in model.parameters() if p.requires_grad])
        set_adapter_state(model, start)
    diff = torch.cat([(a - b).flatten() for a, b in zip(*runs)])
    assert float(diff.std()) * 8 / math.sqrt(2) == pytest.approx(sigma * clip, rel=0.05)


@pytest.mark.parametrize("physical", [0, 3])
def test_gradient_checkpointing_keeps_per_example_gradients_exact(setup, physical):
    """With checkpointing (reentrant + input grads, docs/notes/dp-lora.md P9) the DP step is the same clipped
    sum of per-example gradients; afterwards the model is back to normal."""
    model, tok, examples = setup
    _assert_step_is_the_clipped_sum(model, tok, examples, physical_batch_size=physical, gradient_checkpointing=True)
    assert not model.get_base_model().is_activation_checkpointing


def test_non_reentrant_checkpointing_would_lose_the_per_example_gradients(setup):
    """Why the mode matters: with transformers' default (non-reentrant) checkpointing Opacus' hooks
    see no activations and the LoRA layers get no per-example gradient."""
    from opacus.grad_sample import GradSampleModule

    _, tok, examples = setup
    ids, mask, labels = collate(examples[:3], tok.pad_token_id)
    for reentrant in (True, False):
        base, _ = load_model_and_tokenizer(ModelConfig(name="tiny-random-llama"))  # a fresh one: this leaves state behind
        for p in base.parameters():
            p.requires_grad_(False)
        model = apply_lora(base, LoraConfig(r=4, alpha=8, freeze_a=False))
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
        base.enable_input_require_grads()
        model.train()
        net = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        try:
            per_sequence_loss(net(input_ids=ids, attention_mask=mask).logits, labels).mean().backward()
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad_sample is None]
        finally:
            net._close()
        assert bool(missing) == (not reentrant)


def test_physical_batches_without_dp_accumulate_the_batch_mean(setup):
    model, tok, examples = setup
    start = get_adapter_state(model)
    _run(model, examples, tok.pad_token_id, sigma=None, clip=1.0, seed=5, lr=0.1)
    whole = get_adapter_state(model)
    set_adapter_state(model, start)
    _run(model, examples, tok.pad_token_id, sigma=None, clip=1.0, seed=5, lr=0.1, physical_batch_size=2)
    chunked = get_adapter_state(model)
    set_adapter_state(model, start)
    assert any(not torch.equal(whole[k], start[k]) for k in start)
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-4, atol=1e-6)


def test_noise_std_is_sigma_times_c(setup):
    model, tok, examples = setup
    sigma, clip = 1.3, 0.7
    start = get_adapter_state(model)
    p0 = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    _run(model, examples, tok.pad_token_id, sigma=sigma, clip=clip, noise_seed=11)
    p1 = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    set_adapter_state(model, start)
    _run(model, examples, tok.pad_token_id, sigma=sigma, clip=clip, noise_seed=22)  # same batch, other noise
    p2 = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    set_adapter_state(model, start)
    diff = torch.cat([(a - b).flatten() for a, b in zip(p1, p2)])  # = (n2 - n1) / B
    expected_batch = 8
    measured = float(diff.std()) * expected_batch / math.sqrt(2)
    assert diff.numel() > 5000
    assert measured == pytest.approx(sigma * clip, rel=0.05)
    assert abs(float(diff.mean())) < 0.05 * float(diff.std())
    assert not all(torch.equal(a, b) for a, b in zip(p0, p1))


def test_empty_poisson_batch_takes_a_noise_only_step(setup):
    model, tok, examples = setup
    start = get_adapter_state(model)
    # a seed whose Poisson draw at q = 1/20 selects nobody
    many = examples[:20]
    empty_seed = next(s for s in range(5000) if not _poisson_batch(20, 1 / 20, torch.Generator().manual_seed(s)))
    result = train_local(model, many, steps=1, batch_size=1, learning_rate=1.0, pad_id=tok.pad_token_id,
                         dp=DPSettings(1.0, 1.0), optimizer="sgd",
                         sampling_generator=torch.Generator().manual_seed(empty_seed))
    assert result.examples_seen == 0 and result.steps == 1 and math.isnan(result.train_loss)
    state = get_adapter_state(model)
    moved = torch.cat([(state[k] - start[k]).flatten() for k in start if "lora_B" in k or "lora_A" in k])
    assert float(moved.abs().max()) > 0, "an empty batch must still release noise"
    assert float(moved.std()) == pytest.approx(1.0, rel=0.1)  # noise σC / B with B = 1
    set_adapter_state(model, start)


def test_per_sequence_loss_does_not_couple_examples(setup):
    model, tok, examples = setup
    a, b, c = examples[0], examples[1], examples[7]
    with torch.no_grad():
        ids, mask, labels = collate([a, b], tok.pad_token_id)
        first = per_sequence_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
        ids, mask, labels = collate([a, c], tok.pad_token_id)
        second = per_sequence_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
    torch.testing.assert_close(first[0], second[0], rtol=1e-5, atol=1e-5)


def test_training_without_dp_lowers_held_out_loss(setup):
    model, tok, examples = setup
    start = get_adapter_state(model)
    before = evaluate_loss(model, examples, batch_size=8, pad_id=tok.pad_token_id)
    train_local(model, examples, steps=30, batch_size=8, learning_rate=0.01, pad_id=tok.pad_token_id, dp=None,
                sampling_generator=torch.Generator().manual_seed(0))
    after = evaluate_loss(model, examples, batch_size=8, pad_id=tok.pad_token_id)
    assert after.loss < before.loss - 0.1
    assert after.perplexity == pytest.approx(math.exp(after.loss))
    set_adapter_state(model, start)



def test_chunk_plan_keeps_every_sampled_record_once_and_groups_similar_lengths():
    """Length-bucketed passes (fast path): the sampled set is unchanged (each record in exactly one
    pass), passes respect the physical limit and the minimum size, and padding falls."""
    from fedllm.site.training import MIN_CHUNK_TOKENS, plan_chunks

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 30, (1,), generator=g))
        lengths = torch.randint(20, 385, (n,), generator=g).tolist()
        for limit, max_tokens in ((0, 0), (1, 0), (3, 0), (4, 0), (8, 0), (0, 1024), (4, 1024), (0, 300)):
            groups = plan_chunks(lengths, limit, max_tokens)
            assert sorted(i for grp in groups for i in grp) == list(range(n))
            assert all(grp for grp in groups) and (limit == 0 or all(len(grp) <= limit for grp in groups))
            assert not max_tokens or all(len(g) == 1 or max(lengths[i] for i in g) * len(g) <= max_tokens for g in groups)
            if max_tokens:
                continue  # the token limit may cost padding: the checks below are of the row limit alone
            flat = [lengths[i] for grp in groups for i in grp]
            assert flat == sorted(flat, reverse=True)  # consecutive groups of the records by length
            for grp in groups[:-1]:
                assert max(lengths[i] for i in grp) * len(grp) >= MIN_CHUNK_TOKENS or len(grp) == limit
            padded = sum(max(lengths[i] for i in grp) * len(grp) for grp in groups)
            size = limit or n
            in_order = sum(max(lengths[i:i + size]) * len(lengths[i:i + size]) for i in range(0, n, size))
            assert padded <= in_order + 32 * len(groups)
    assert plan_chunks([384] * 8) == [list(range(8))]  # equal lengths, no limit: one pass
    assert plan_chunks([300, 100, 290, 90, 310, 80, 95, 85]) == [[4, 0, 2], [1, 6, 3, 7, 5]]  # 930 + 500 vs 2480
    assert plan_chunks([]) == []
    assert plan_chunks([384] * 8, 4, 1024) == [[0, 1], [2, 3], [4, 5], [6, 7]]  # 2 x 384 a pass
    assert plan_chunks([2000, 384, 100], 0, 1024) == [[0], [1, 2]]  # a record over the limit runs alone
    # a token limit at or below the minimum pass size: as many records a pass as fit, not one each
    assert [len(g) for g in plan_chunks([160] * 8, 0, 512)] == [3, 3, 2]
    assert [len(g) for g in plan_chunks([150, 140, 130, 120, 60, 50], 0, 300)] == [2, 2, 2]


def test_automatic_pass_tokens_limit_a_cpu_pass_and_leave_a_gpu_unlimited():
    from fedllm.site.training import CPU_PASS_TOKENS, pass_token_limit

    assert pass_token_limit(0, "cpu", torch.bfloat16) == CPU_PASS_TOKENS == 1024
    assert pass_token_limit(0, "cpu", torch.float16) == 1024
    assert pass_token_limit(0, "cpu", torch.float32) == 512  # the same bytes of activations a pass
    assert pass_token_limit(0, "cuda:0", torch.bfloat16) == 0 and pass_token_limit(0, torch.device("cuda"), torch.float32) == 0
    assert pass_token_limit(512, "cpu", torch.float32) == 512 and pass_token_limit(4096, "cuda", torch.bfloat16) == 4096  # as set


def test_a_step_plans_its_passes_with_the_automatic_limit_of_the_base_s_dtype(monkeypatch):
    """train.pass-tokens = 0 on a CPU: a step on an fp32 base plans passes of at most 512 padded
    tokens (the limit read from the base's dtype; the limits per dtype are tested above), a value
    set is used as set."""
    import fedllm.site.training as training

    model, tok, examples = _tiny_lora(freeze_a=True)
    limits = []
    real = training.plan_chunks
    monkeypatch.setattr(training, "plan_chunks", lambda lengths, rows, tokens: limits.append(tokens) or real(lengths, rows, tokens))
    assert model.get_input_embeddings().weight.dtype == torch.float32
    every = len(examples)  # sample rate 1: every step has a batch to plan (a Poisson batch can be empty)
    train_local(model, examples, steps=1, batch_size=every, learning_rate=1e-3, pad_id=tok.pad_token_id,
                dp=DPSettings(1.0, 1.0))
    train_local(model, examples, steps=1, batch_size=every, learning_rate=1e-3, pad_id=tok.pad_token_id,
                dp=DPSettings(1.0, 1.0), pass_tokens=300)
    assert limits == [512, 300], limits


def test_length_bucketed_passes_give_the_same_clipped_sum(ffa, monkeypatch):
    """Forced into one pass per length group (no minimum size), the FFA-LoRA DP step is still exactly
    the clipped sum of the sampled records' per-example gradients over the expected batch."""
    import fedllm.site.training as training

    monkeypatch.setattr(training, "MIN_CHUNK_TOKENS", 0)
    monkeypatch.setattr(training, "CHUNK_COST_TOKENS", 0)
    model, tok, _ = ffa
    examples = tokenize_records(RECORDS, tok, max_length=512)  # untruncated: lengths differ
    batch = _poisson_batch(len(examples), 8 / len(examples), torch.Generator().manual_seed(3))
    assert len(training.plan_chunks([len(examples[i].input_ids) for i in batch])) > 1
    _assert_step_is_the_clipped_sum(model, tok, examples)


def _device_check(device: str) -> None:
    from tests.helpers import devices_of_a_dp_step

    for fast_path in (True, False):
        base, tokenizer = load_model_and_tokenizer(ModelConfig(name="tiny-random-llama"), device=device)
        for p in base.parameters():
            p.requires_grad_(False)
        model = apply_lora(base, LoraConfig(r=4, alpha=8), fast_path=fast_path).to(device)
        examples = tokenize_records(RECORDS, tokenizer, max_length=64)
        seen = devices_of_a_dp_step(model, examples, pad_id=tokenizer.pad_token_id, device=device, fast_path=fast_path)
        assert set(seen) == {torch.device(device).type} and sum(seen.values()) > 100, seen


def test_every_tensor_a_dp_step_computes_is_on_the_model_s_device(monkeypatch):
    """The device check of issue 17, device-agnostic (here on the CPU; the ``gpu`` test below on
    CUDA): every floating-point tensor a DP step builds is on the model's device, and the noise
    generator is created on the parameters' device (torch refuses a generator of another device)."""
    import fedllm.site.training as training

    _device_check("cpu")
    asked = []
    real = training.fresh_generator
    monkeypatch.setattr(training, "fresh_generator", lambda device="cpu": asked.append(torch.device(device)) or real(device))
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name="tiny-random-llama"))
    model = with_random_lora(model, LoraConfig(r=4, alpha=8))
    train_local(model, tokenize_records(RECORDS, tokenizer, max_length=64), steps=1, batch_size=8, learning_rate=0.1,
                pad_id=tokenizer.pad_token_id, dp=DPSettings(1.0, 1.0))
    assert asked == [torch.device("cpu"), next(model.parameters()).device]  # the sampling, then the noise


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_tensor_a_dp_step_computes_is_on_the_gpu():
    _device_check("cuda")
