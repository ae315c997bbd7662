"""The model families fedllm supports, with published facts and a memory estimate (``fedllm models``).

Pure: numbers in, numbers out (no torch, no downloads). Shapes and context lengths are those in each
model's published ``config.json``; licenses as published by the model's authors (check the model
card before use: some are not open-source licenses). Parameter counts are computed from the shapes
(``tests/unit/test_catalog.py`` checks them against the published sizes).

Memory estimate for DP-LoRA at one site (one process, ``physical`` examples per forward/backward):

* base weights: parameters × bytes per parameter (fp32 4, bf16 2, 4-bit 0.5 plus 1/16 for the
  quantisation constants of 64-value blocks, as in bitsandbytes NF4 with double quantisation);
* adapter: A and B in fp32; trained B (FFA-LoRA) also needs its gradient, two AdamW moments, and
  Opacus's per-example gradients: ``physical`` × B's size × 4 bytes;
* activations kept for the backward pass: per token and layer about 24·h + 4·i values (the
  inputs of every projection, the norms, the attention internals and the MLP intermediates; with
  a fused memory-efficient attention, no S² scores) in the compute dtype (fp32 for fp32, else
  bf16); with gradient checkpointing only one value per token and layer (h) plus one layer's set;
* logits: physical × S × vocab × 4 bytes (the loss is computed in fp32), four times (logits,
  log-softmax, and their gradients).

The constants are calibrated on one measured run (SmolLM2-135M, fp32, r = 8 on every projection,
DP-SGD, about 1,500 tokens in the largest batch: 5.7 GB measured above the process's size before
training; docs/models.md). It is an estimate to see what fits, not a guarantee: the framework
itself (~0.5–1 GB), the allocator and fragmentation come on top.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

BYTES = {"fp32": 4.0, "bf16": 2.0, "4bit": 0.5 + 0.5 / 16}
ACT_BYTES = {"fp32": 4.0, "bf16": 2.0, "4bit": 2.0}


@dataclass(frozen=True)
class Shape:
    """One published model size."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    context: int
    head_dim: int = 0  # 0: hidden / heads
    experts: int = 0  # mixture of experts: experts per layer (0: dense)
    gated_mlp: bool = True  # gate/up/down (SwiGLU/GeGLU); False: up/down
    tied: bool = False  # input embedding shared with lm_head

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def attention_params(self) -> int:
        q = self.hidden * self.heads * self.hd
        kv = 2 * self.hidden * self.kv_heads * self.hd
        return q + kv + self.heads * self.hd * self.hidden

    def mlp_params(self) -> int:
        one = (3 if self.gated_mlp else 2) * self.hidden * self.intermediate
        return one * self.experts + self.hidden * self.experts if self.experts else one

    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * (self.attention_params() + self.mlp_params())


@dataclass(frozen=True)
class Family:
    """One architecture family: what ``fedllm models`` shows."""

    name: str
    tiny: str  # the tiny-random-<name> model the tests run
    model_type: str
    license: str
    sizes: tuple[Shape, ...]
    lora_targets: str
    dp_notes: str


def _llama(name, h, i, layers, heads, kv, vocab, ctx, **kw) -> Shape:
    return Shape(name, h, i, layers, heads, kv, vocab, ctx, **kw)


FAMILIES: tuple[Family, ...] = (
    Family("Llama 3.1", "llama", "llama", "Llama 3.1 Community License", (
        _llama("8B", 4096, 14336, 32, 32, 8, 128256, 131072),
        _llama("70B", 8192, 28672, 80, 64, 8, 128256, 131072),
        _llama("405B", 16384, 53248, 126, 128, 8, 128256, 131072)),
        "q,k,v,o,gate,up,down_proj", "dense; every projection is an nn.Linear with an Opacus rule"),
    Family("Mistral / OpenChat", "mistral", "mistral", "Apache-2.0", (
        _llama("7B", 4096, 14336, 32, 32, 8, 32768, 32768),),
        "q,k,v,o,gate,up,down_proj", "dense; OpenChat 3.5 is a Mistral-7B fine-tune (same shapes)"),
    Family("Mixtral", "mixtral", "mixtral", "Apache-2.0", (
        _llama("8x7B", 4096, 14336, 32, 32, 8, 32000, 32768, experts=8),
        _llama("8x22B", 6144, 16384, 56, 48, 8, 32768, 65536, experts=8)),
        "q,k,v,o_proj only", "mixture of experts: experts and router frozen (no Opacus rule for "
                             "the fused experts); see docs/models.md"),
    Family("Falcon", "falcon", "falcon", "Apache-2.0 (7B, 40B); Falcon-180B TII License", (
        Shape("7B", 4544, 18176, 32, 71, 1, 65024, 2048, gated_mlp=False),
        Shape("40B", 8192, 32768, 60, 128, 8, 65024, 2048, gated_mlp=False),
        Shape("180B", 14848, 59392, 80, 232, 8, 65024, 2048, gated_mlp=False)),
        "query_key_value,dense,dense_h_to_4h,dense_4h_to_h", "dense; fused QKV projection"),
    Family("MPT", "mpt", "mpt", "Apache-2.0", (
        Shape("7B", 4096, 16384, 32, 32, 32, 50432, 2048, gated_mlp=False, tied=True),
        Shape("30B", 7168, 28672, 48, 64, 64, 50432, 8192, gated_mlp=False, tied=True)),
        "Wqkv,out_proj,up_proj,down_proj", "dense; ALiBi positions; fused QKV"),
    Family("Phi-3", "phi3", "phi3", "MIT", (
        _llama("mini 3.8B", 3072, 8192, 32, 32, 32, 32064, 131072),
        _llama("medium 14B", 5120, 17920, 40, 40, 10, 32064, 131072)),
        "qkv_proj,o_proj,gate_up_proj,down_proj", "dense; fused QKV and gate/up projections"),
    Family("Command R+", "cohere", "cohere", "CC-BY-NC-4.0 (non-commercial)", (
        _llama("R 35B", 8192, 22528, 40, 64, 64, 256000, 131072, tied=True),
        _llama("R+ 104B", 12288, 33792, 64, 96, 8, 256000, 131072, tied=True)),
        "q,k,v,o,gate,up,down_proj", "dense; parallel attention and MLP blocks"),
    Family("Gemma", "gemma", "gemma / gemma2 / gemma3_text", "Gemma Terms of Use", (
        _llama("Gemma 7B", 3072, 24576, 28, 16, 16, 256000, 8192, head_dim=256, tied=True),
        _llama("Gemma 2 9B", 3584, 14336, 42, 16, 8, 256000, 8192, head_dim=256, tied=True),
        _llama("Gemma 2 27B", 4608, 36864, 46, 32, 16, 256000, 8192, head_dim=128, tied=True)),
        "q,k,v,o,gate,up,down_proj", "dense; tied embeddings stay frozen; tests cover Gemma 1, 2 and 3"),
    Family("Yi", "llama", "llama", "Apache-2.0 (Yi-1.5)", (
        _llama("6B", 4096, 11008, 32, 32, 4, 64000, 4096),
        _llama("34B", 7168, 20480, 60, 56, 8, 64000, 4096)),
        "q,k,v,o,gate,up,down_proj", "Llama architecture"),
    Family("Qwen2.5", "qwen2", "qwen2", "Apache-2.0 (most sizes; 3B and 72B: Qwen License)", (
        _llama("7B", 3584, 18944, 28, 28, 4, 152064, 131072),
        _llama("72B", 8192, 29568, 80, 64, 8, 152064, 131072)),
        "q,k,v,o,gate,up,down_proj", "dense"),
    Family("SmolLM2", "llama", "llama", "Apache-2.0", (
        _llama("135M", 576, 1536, 30, 9, 3, 49152, 8192, tied=True),
        _llama("1.7B", 2048, 8192, 24, 32, 32, 49152, 8192, tied=True)),
        "q,k,v,o,gate,up,down_proj", "Llama architecture; fedllm's default model (135M)"),
)


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    base_gb: float
    adapter_gb: float  # A and B, B's gradient and AdamW moments
    per_example_grads_gb: float
    activations_gb: float
    logits_gb: float

    @property
    def total_gb(self) -> float:
        return self.base_gb + self.adapter_gb + self.per_example_grads_gb + self.activations_gb + self.logits_gb

    def to_dict(self) -> dict:
        return {**asdict(self), "total_gb": self.total_gb}


def lora_sizes(shape: Shape, *, rank: int) -> tuple[int, int]:
    """(A parameters, B parameters) of LoRA at ``rank`` on the family's default targets: every
    attention and MLP projection (attention only for a mixture of experts)."""
    h, hd = shape.hidden, shape.hd
    pairs = [(h, shape.heads * hd), (h, shape.kv_heads * hd), (h, shape.kv_heads * hd), (shape.heads * hd, h)]
    if not shape.experts:
        up = [(h, shape.intermediate)] * (2 if shape.gated_mlp else 1)
        pairs += [*up, (shape.intermediate, h)]
    a = sum(rank * i for i, _ in pairs) * shape.layers
    b = sum(rank * o for _, o in pairs) * shape.layers
    return a, b


def estimate_memory(shape: Shape, *, rank: int, seq_len: int, physical_batch: int, precision: str,
                    checkpointing: bool = False) -> MemoryEstimate:
    """DP-LoRA memory at one site (see the module docstring), in GB (10^9 bytes)."""
    if precision not in BYTES:
        raise ValueError(f"precision {precision!r}: choose fp32, bf16 or 4bit")
    gb = 1e9
    params = shape.parameters()
    a, b = lora_sizes(shape, rank=rank)
    tokens = physical_batch * seq_len
    per_layer = 24 * shape.hidden + 4 * shape.intermediate * (2 if shape.experts else 1)
    act = ACT_BYTES[precision]
    if checkpointing:
        activations = tokens * (shape.layers * shape.hidden + per_layer) * act
    else:
        activations = tokens * shape.layers * per_layer * act
    return MemoryEstimate(
        parameters=params,
        base_gb=params * BYTES[precision] / gb,
        adapter_gb=(a + b + 3 * b) * 4 / gb,
        per_example_grads_gb=physical_batch * b * 4 / gb,
        activations_gb=activations / gb,
        logits_gb=4 * tokens * shape.vocab * 4 / gb,
    )


def human(count: int) -> str:
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"


def context_text(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens >= 1024 else str(tokens)


def _estimates(fam: Family, **estimate) -> list[tuple[Shape, MemoryEstimate]]:
    return [(shape, estimate_memory(shape, **estimate)) for shape in fam.sizes]


def table_lines(*, rank: int, seq_len: int, physical_batch: int, precision: str, checkpointing: bool,
                family: str | None = None) -> list[str]:
    """The ``fedllm models`` table."""
    estimate = dict(rank=rank, seq_len=seq_len, physical_batch=physical_batch, precision=precision,
                    checkpointing=checkpointing)
    title = (f"DP-LoRA memory estimate per site: rank {rank}, {seq_len} tokens, physical batch {physical_batch}, "
             f"{precision} base{', gradient checkpointing' if checkpointing else ''} (an estimate: add ~1 GB for the "
             "framework; see docs/models.md)")
    lines = [title, ""]
    header = f"{'family':<20} {'size':<12} {'params':>7} {'context':>7} {'memory':>9}  license"
    lines += [header, "-" * len(header)]
    for fam in FAMILIES:
        if family and family.lower() not in (fam.name.lower(), fam.tiny):
            continue
        for shape, est in _estimates(fam, **estimate):
            lines.append(f"{fam.name:<20} {shape.name:<12} {human(est.parameters):>7} {context_text(shape.context):>7} "
                         f"{est.total_gb:>7.1f}GB  {fam.license}")
        lines.append(f"{'':<20} LoRA targets: {fam.lora_targets}; test model tiny-random-{fam.tiny}; {fam.dp_notes}")
    if precision == "4bit":
        lines += ["", "4-bit (QLoRA) bases: model.quantization = \"4bit\" on a CUDA site with bitsandbytes "
                      "(docs/models.md, Large models)."]
    return lines


def table_json(*, rank: int, seq_len: int, physical_batch: int, precision: str, checkpointing: bool) -> list[dict]:
    estimate = dict(rank=rank, seq_len=seq_len, physical_batch=physical_batch, precision=precision,
                    checkpointing=checkpointing)
    out = []
    for fam in FAMILIES:
        for shape, est in _estimates(fam, **estimate):
            out.append({"family": fam.name, "size": shape.name, "model-type": fam.model_type, "license": fam.license,
                        "context": shape.context, "lora-targets": fam.lora_targets, "dp-notes": fam.dp_notes,
                        "test-model": f"tiny-random-{fam.tiny}", "memory-gb": round(est.total_gb, 2),
                        "memory": {k: round(v, 3) if isinstance(v, float) else v for k, v in est.to_dict().items()}})
    return out


def check_inputs(*, rank: int, seq_len: int, physical_batch: int) -> None:
    for name, value in (("--rank", rank), ("--seq-len", seq_len), ("--batch", physical_batch)):
        if value < 1 or not math.isfinite(value):
            raise ValueError(f"{name} {value}: must be >= 1")
