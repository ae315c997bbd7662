"""Every architecture family fedllm supports runs a federated DP round through the real code path:
two sites train (SiteRuntime: ledger, DP-SGD with Opacus), Flower's FedAvg aggregates the two
updates, the adapter is exported in PEFT format and loads with ``PeftModel.from_pretrained``.
Tiny random models built from each family's transformers config (seconds, no downloads)."""

from __future__ import annotations

import math

import pytest
import torch

from fedllm import fastpath, wire
from fedllm.config import RunConfig, SiteConfig
from fedllm.fastpath.lora import uses_lean_lora_forward
from fedllm.model.loading import TINY_CONFIGS, build_tiny_model
from fedllm.model.lora import get_adapter_state, save_adapter, target_modules
from fedllm.site.runtime import SiteRuntime
from fedllm.site.training import DPSettings, train_local
from tests.helpers import with_random_lora, write_jsonl

RECORDS = [{"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(16)]
FAMILIES = sorted(TINY_CONFIGS)


pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


def _config(family: str, **overrides) -> RunConfig:
    return RunConfig.from_flat({"model.name": f"tiny-random-{family}", "lora.r": 2, "lora.alpha": 4,
                                "data.max-length": 48, "train.local-steps": 2, "train.batch-size": 4,
                                "privacy.noise-multiplier": 1.0, "lora.seed": 1, **overrides})


@pytest.mark.parametrize("family", FAMILIES)
def test_family_runs_a_federated_dp_round_and_exports_a_loadable_adapter(family, tmp_path):
    from flwr.app import ArrayRecord, MessageType, MetricRecord, RecordDict
    from flwr.app.message.message import make_message
    from flwr.app.metadata import Metadata
    from peft import PeftModel

    from fedllm.flower.strategies import build_strategy
    from fedllm.model.lora import shared_model

    config = _config(family)
    replies, metrics = [], []
    for i, half in enumerate((RECORDS[:8], RECORDS[8:])):
        data = tmp_path / f"site{i}.jsonl"
        write_jsonl(data, half)
        site = SiteRuntime(config, SiteConfig(name=f"site{i}", data_path=str(data), max_epsilon=10.0,
                                                 release_metrics="exact"),
                           ledger_path=tmp_path / f"site{i}.json", simulated=False)
        start = get_adapter_state(site.model, trainable_only=True)
        outcome = site.train_round(run_id="r", server_round=1, adapter=start)
        assert set(outcome.adapter) == set(start) and start
        assert any(not torch.equal(outcome.adapter[k], start[k]) for k in start)  # every site trained something
        assert 0 < outcome.metrics[wire.EPSILON] < math.inf
        meta = Metadata(run_id=1, message_id=f"m{i}", src_node_id=i + 1, dst_node_id=0, reply_to_message_id="x",
                        group_id="1", created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN)
        replies.append(make_message(meta, content=RecordDict({
            wire.ARRAYS: ArrayRecord(outcome.adapter), wire.METRICS: MetricRecord(outcome.metrics)})))
        metrics.append(outcome.metrics)
    arrays, _ = build_strategy(config.strategy).aggregate_train(1, replies)
    peft_model, _ = shared_model(config)
    save_adapter(peft_model, arrays.to_torch_state_dict(), tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(build_tiny_model(family), tmp_path / "adapter")
    exported = get_adapter_state(loaded)
    for key, value in arrays.to_torch_state_dict().items():
        assert torch.allclose(exported[key], value), key


@pytest.mark.parametrize("family", FAMILIES)
def test_family_clips_every_example_to_c(family):
    """σ = 0, plain SGD with lr 1: one step moves the adapter by the clipped sum over the expected
    batch, so its norm is at most C · (examples in the batch) / (expected batch size)."""
    from fedllm.data.formatting import tokenize_records
    from fedllm.data.loading import normalise_record
    from fedllm.model.loading import build_byte_tokenizer
    from fedllm.model.lora import apply_lora

    config = _config(family)
    model = apply_lora(build_tiny_model(family), config.lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n in trainable)  # FFA-LoRA: only B trains
    assert not any("embed" in n or "lm_head" in n or "wte" in n for n in trainable)  # tied embeddings frozen
    tokenizer = build_byte_tokenizer()
    examples = tokenize_records([normalise_record(r) for r in RECORDS], tokenizer, max_length=48, source="t")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    clip = 0.01
    result = train_local(model, examples, steps=1, batch_size=8, learning_rate=1.0, weight_decay=0.0,
                         optimizer="sgd", physical_batch_size=0, pad_id=tokenizer.pad_token_id,
                         dp=DPSettings(noise_multiplier=0.0, max_grad_norm=clip), proximal_mu=0.0, device="cpu",
                         sampling_generator=torch.Generator().manual_seed(0))
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    step = math.sqrt(sum(float(((after[n] - before[n]) ** 2).sum()) for n in before))
    assert result.examples_seen > 0 and step > 0
    assert step <= clip * result.examples_seen / 8 + 1e-6


def test_mixture_of_experts_trains_attention_only_and_keeps_experts_and_router_frozen():
    config = _config("mixtral")
    model = build_tiny_model("mixtral")
    targets = target_modules(config.lora, model)
    assert targets == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert target_modules(config.lora, build_tiny_model("llama")) == "all-linear"


def _random_lora(family: str, dtype: torch.dtype = torch.float32, freeze_a: bool = False, alpha: int = 4):
    """A tiny model of ``family`` with a trainable, random LoRA (A and B), so every factor has a gradient."""
    from fedllm.config import LoraConfig

    return with_random_lora(build_tiny_model(family, dtype=dtype), LoraConfig(r=2, alpha=alpha, freeze_a=freeze_a, seed=1))


def _per_example_gradients(model, ids, mask) -> dict[str, torch.Tensor]:
    from opacus.grad_sample import GradSampleModule

    model.train()
    net = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        logits = net(input_ids=ids, attention_mask=mask, use_cache=False).logits
        (logits.float().log_softmax(-1)[..., 7] * mask).sum().backward()
        return {n: p.grad_sample.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    finally:
        net._close()
        model.zero_grad(set_to_none=True)
        model.eval()


def _outputs(model, ids, mask) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits (no key/value cache) and the per-example gradients of ``model`` on a batch."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    return logits, _per_example_gradients(model, ids, mask)


def _assert_same_outputs(got, expected, tolerance: float) -> None:
    """Logits and per-example gradients agree (gradients relative to their largest entry)."""
    torch.testing.assert_close(got[0], expected[0], rtol=tolerance, atol=tolerance)
    assert got[1].keys() == expected[1].keys() and all(g.abs().sum() > 0 for g in expected[1].values())
    for name, grad in expected[1].items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(got[1][name], grad, rtol=tolerance, atol=tolerance * scale)


def _batch_with_padding() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    return ids, mask


DTYPE_TOLERANCES = ((torch.float32, 1e-4), (torch.bfloat16, 3e-2))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_gradient_checkpointing_gives_the_same_per_example_gradients(family):
    from fedllm.model.lora import set_gradient_checkpointing

    ids, mask = _batch_with_padding()
    plain = _per_example_gradients(_random_lora(family), ids, mask)
    model = _random_lora(family)
    set_gradient_checkpointing(model, True)
    checkpointed = _per_example_gradients(model, ids, mask)
    assert plain.keys() == checkpointed.keys() and all(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


def test_bf16_base_trains_an_fp32_adapter_with_the_same_clipped_step():
    """model.dtype = bfloat16: the frozen base in bf16, the adapter and its per-example gradients,
    clipping and noise in fp32; the step matches the fp32 model's to bf16 precision and is
    bounded by C."""
    from fedllm.config import ModelConfig
    from fedllm.data.formatting import tokenize_records
    from fedllm.data.loading import normalise_record
    from fedllm.model.loading import build_byte_tokenizer, load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(ModelConfig(name="tiny-random-llama", dtype="bfloat16"))
    assert {p.dtype for p in base.parameters()} == {torch.bfloat16}
    tokenizer = build_byte_tokenizer()
    examples = tokenize_records([normalise_record(r) for r in RECORDS], tokenizer, max_length=48, source="t")
    steps = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _random_lora("llama", dtype)
        adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert {p.dtype for p in adapter.values()} == {torch.float32}
        before = {n: p.detach().clone() for n, p in adapter.items()}
        train_local(model, examples, steps=1, batch_size=8, learning_rate=1.0, optimizer="sgd", pad_id=tokenizer.pad_token_id,
                    dp=DPSettings(noise_multiplier=0.0, max_grad_norm=0.01),
                    sampling_generator=torch.Generator().manual_seed(4))
        steps[dtype] = torch.cat([(adapter[n].detach() - before[n]).flatten() for n in adapter])
    assert 0 < float(steps[torch.bfloat16].norm()) <= 0.01 * 16 / 8 + 1e-6
    cosine = torch.nn.functional.cosine_similarity(steps[torch.float32], steps[torch.bfloat16], dim=0)
    assert float(cosine) > 0.98


@pytest.mark.parametrize("family", FAMILIES)
def test_family_response_only_logits_and_lean_lora_give_peft_and_the_full_forward_s_results(family):
    """The two speed-ups of the training step change no value: the loss computed with vocabulary
    logits on response tokens only equals the loss from the model's full forward, and fedllm's lean
    LoRA forward gives the same outputs and per-example gradients as peft's own (A frozen, and A
    trained)."""
    from fedllm.site.training import per_sequence_loss, sequence_losses

    ids, mask = _batch_with_padding()
    labels = ids.clone()
    labels[:, :5] = -100
    labels[2, 7:] = -100
    labels[1, 5:9] = -100  # a gap inside the response
    for freeze_a in (True, False):
        model = _random_lora(family, freeze_a=freeze_a)
        with torch.no_grad():
            full = per_sequence_loss(model(input_ids=ids, attention_mask=mask).logits, labels)
            fast = sequence_losses(model, ids, mask, labels, fast=fastpath.enable(model))
            assert torch.allclose(fast, full, rtol=1e-5, atol=1e-6)
        lean = _per_example_gradients(model, ids, mask)
        lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
        assert lora_layers and all(uses_lean_lora_forward(m) for m in lora_layers)
        for m in lora_layers:
            m.forward = type(m).forward.__get__(m)  # peft's own forward
        peft = _per_example_gradients(model, ids, mask)
        assert lean.keys() == peft.keys() and all(("lora_A" in n) != freeze_a for n in peft if "lora_A" in n)
        for name in peft:
            torch.testing.assert_close(lean[name], peft[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_fused_ffa_lora_layer_gives_peft_s_outputs_gradients_and_opacus_per_example_gradients(family):
    """With A frozen (FFA-LoRA, the default) every LoRA layer runs as one ``FrozenBaseLoRA``: its
    outputs and B's summed gradients equal peft's own forward's, and the per-example gradients it
    stores for DP equal Opacus' GradSampleModule's on peft's forward (scaling 1.5: not a power of two)."""
    from fedllm.fastpath.lora import fused_lora_factors
    from fedllm.site.per_example import use_fused_per_example_gradients

    ids, mask = _batch_with_padding()

    def loss_of(model):
        return (model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)[..., 7] * mask).sum()

    model = _random_lora(family, freeze_a=True, alpha=3)
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert layers and all(len(fused_lora_factors(m)) == 1 for m in layers)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    fused_loss = loss_of(model)
    fused_loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in trained.items()}
    model.zero_grad(set_to_none=True)
    assert use_fused_per_example_gradients(model, True)
    try:
        loss_of(model).backward()
        own = {n: p.grad_sample.clone() for n, p in trained.items()}
        assert all(p.grad is None for p in trained.values())
    finally:
        use_fused_per_example_gradients(model, False)
        for p in trained.values():
            p.grad_sample = None
    for m in layers:
        m.forward = type(m).forward.__get__(m)  # peft's own forward
    peft_loss = loss_of(model)
    peft_loss.backward()
    torch.testing.assert_close(fused_loss, peft_loss, rtol=1e-5, atol=1e-5)
    for name, p in trained.items():
        torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)
    opacus = _per_example_gradients(model, ids, mask)
    assert own.keys() == opacus.keys() and all(g.abs().sum() > 0 for g in opacus.values())
    for name in opacus:
        torch.testing.assert_close(own[name], opacus[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_attention_chosen_for_short_sequences_on_a_cpu_gives_eager_attention_s_values(family, monkeypatch):
    """On a CPU where eager attention times faster (forced here: the timing is the machine's),
    ``choose_attention`` picks fedllm's grouped eager attention for the families whose attention is
    transformers' generic one (not for the others): the logits and the per-example gradients equal
    those of eager attention, with padding in the batch; on a bf16 base they agree to bf16
    precision. Where SDPA times faster, or eager only by a near tie, SDPA is kept; GPUs and long
    sequences are not timed."""
    from fedllm.fastpath import attention
    from fedllm.fastpath.attention import GROUPED_ATTENTION, choose_attention

    timed = []
    monkeypatch.setattr(attention, "_time_attention", lambda *shape: timed.append(shape) or (0.5, 1.0))  # eager, SDPA
    monkeypatch.setattr(attention, "_eager_faster", {})
    ids, mask = _batch_with_padding()
    for dtype, tolerance in DTYPE_TOLERANCES:
        model = _random_lora(family, dtype)
        chosen = choose_attention(model, device="cpu", max_length=64)
        assert (chosen == GROUPED_ATTENTION) == (family not in ("gemma2", "gemma3", "falcon", "mpt"))
        chosen_outputs = _outputs(model, ids, mask)
        model.get_base_model().set_attn_implementation("eager")
        _assert_same_outputs(chosen_outputs, _outputs(model, ids, mask), tolerance)
    assert choose_attention(model, device="cuda", max_length=64) == model.get_base_model()._fedllm_original_attention
    count = len(timed)
    original = model.get_base_model()._fedllm_original_attention
    assert choose_attention(model, device="cpu", max_length=attention.EAGER_ATTENTION_MAX_LENGTH + 1) == original
    assert len(timed) == count  # too long for eager attention's memory: not timed
    model = _random_lora(family)
    original = model.get_base_model().config._attn_implementation
    # SDPA faster, or eager faster by less than EAGER_TIME_SHARE (a near tie): the model's own
    for times in ((1.2, 1.0), (0.9, 1.0)):
        monkeypatch.setattr(attention, "_eager_faster", {})
        monkeypatch.setattr(attention, "_time_attention", lambda *shape, times=times: times)
        assert choose_attention(model, device="cpu", max_length=64) == original


@pytest.mark.parametrize("family", FAMILIES)
def test_family_lean_rms_norm_gives_the_model_s_own_values(family):
    """Llama-style RMSNorms run as ``FrozenRMSNorm`` after ``apply_lora``: logits and per-example
    gradients equal those of the model's own norm forward (fp32), and agree to bf16 precision on a
    bf16 base; other families keep their own norms."""
    from fedllm.fastpath.norms import lean_rms_norm_forward

    ids, mask = _batch_with_padding()
    for dtype, tolerance in DTYPE_TOLERANCES:
        model = _random_lora(family, dtype)
        norms = [m for m in model.modules() if getattr(m.forward, "__func__", None) is lean_rms_norm_forward]
        assert bool(norms) == (family in ("llama", "mistral", "mixtral", "qwen2", "phi3"))
        if not norms:
            return
        lean = _outputs(model, ids, mask)
        for m in norms:
            del m.forward  # the class's own forward again
        _assert_same_outputs(lean, _outputs(model, ids, mask), tolerance)


def _dp_step_at_a_site(family: str, tmp_path, *, fast_path: bool, start: dict | None = None):
    """One DP round of one step at a site (SiteRuntime, as a real site runs it) with
    ``train.fast-path = fast_path``, from ``start`` (default: a random B); returns (start, update, site)."""
    config = _config(family, **{"train.local-steps": 1, "train.optimizer": "sgd", "train.learning-rate": 1.0,
                                "privacy.noise-multiplier": 0.5, "privacy.max-grad-norm": 1.0,
                                "train.fast-path": fast_path})
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "site.jsonl"
    write_jsonl(data, RECORDS)
    (tmp_path / "site.split-key").write_text("5a" * 32)  # one split key: the same training records on and off
    site = SiteRuntime(config, SiteConfig(name="site", data_path=str(data), max_epsilon=10.0,
                                          release_metrics="exact"), ledger_path=tmp_path / "ledger.json",
                       simulated=False)
    if start is None:
        g = torch.Generator().manual_seed(5)
        start = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in
                 get_adapter_state(site.model, trainable_only=True).items()}
    outcome = site.train_round(run_id="r", server_round=1, adapter=start)
    assert outcome.metrics[wire.EXAMPLES_SEEN] > 0
    return start, {k: outcome.adapter[k] - start[k] for k in start}, site


@pytest.mark.parametrize("family", FAMILIES)
def test_family_dp_step_is_the_same_with_the_fast_path_on_and_off(family, tmp_path, monkeypatch):
    """``train.fast-path`` changes no value: one DP-SGD step at a site from the same adapter (a
    random B, FFA-LoRA), on the same Poisson batch with the same noise draw (the sampling and noise
    generators seeded), gives the same LoRA update with the fast path on (fused layers and their
    per-example gradients, response-only logits and the fused head, fedllm's attention kernel, the
    allocator setting) and off (peft's layers, Opacus' GradSampleModule, full logits, the model's
    own attention).

    Tolerance (fp32), absolute: atol = 5e-7, rtol = 0. The two paths compute the same sums in other
    orders (fused products, the per-example product against Opacus' einsum, a summed loss against
    Opacus' rescaled mean, logsumexp over chunks). The update is SGD with lr 1 (linear in the
    gradient, unlike Adam's first step, which would magnify rounding near zero) of (clipped sum +
    noise) / 4 with C = 1, σ = 0.5: entries up to about 0.5, where one fp32 step (ulp) is 3e-8; the
    measured differences are at most one ulp, and 5e-7 is about 16. The noise dominates every entry,
    so a relative tolerance would say nothing about the gradients. Measured on the tiny models: a
    fused per-example gradient off by 0.1% changes the update by 3e-6 to 1e-4, and fails. C = 1
    leaves most examples unclipped (clipping is scale-invariant) and clips some (gemma2)."""
    import fedllm.site.training as training

    monkeypatch.setattr(training, "fresh_generator", lambda device="cpu": torch.Generator(device=device).manual_seed(7))
    start, fast, fast_site = _dp_step_at_a_site(family, tmp_path / "on", fast_path=True)
    assert fastpath.is_enabled(fast_site.model)
    _, plain, plain_site = _dp_step_at_a_site(family, tmp_path / "off", fast_path=False, start=start)
    assert not fastpath.is_enabled(plain_site.model) and plain_site.model is not fast_site.model
    assert fast.keys() == plain.keys() and fast
    assert all(float(u.abs().max()) > 0 for u in plain.values())
    for key in plain:
        torch.testing.assert_close(fast[key], plain[key], rtol=0, atol=5e-7, msg=key)
