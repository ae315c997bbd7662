"""Plain helpers shared by the tests (fixtures live in ``conftest.py``): the checkout's folders,
data files, ledger releases, in-place edits of a JSON file (how the tests tamper with ledgers and
histories), ConfigError problem lines, small models (a random Llama saved as a model folder, a random
LoRA on a frozen model) and hand-made Flower replies with just enough of a Grid or Federation for a
strategy's sampling.

torch, transformers and flwr are imported inside the helpers that need them, so that a test that uses
none of them does not pay for their import."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedllm.errors import ConfigError
from fedllm.privacy.ledger import LedgerEntry, PrivacyLedger

# ----------------------------------------------------------------------------------- folders

REPO = Path(__file__).resolve().parents[1]  # the checkout (tests/ lies in it)
SMOKE_DATA = REPO / "simulations" / "smoke" / "data" / "smoke.jsonl"  # 90 records: the smoke scenario's one site
PUBMEDQA_DIR = REPO.parent / "shared" / "data" / "pubmedqa"  # PubMedQA, where the machine has it beside the checkout

# ------------------------------------------------------------------------------ files, ledgers

# One DP-SGD release of the "LLM site" row of docs/notes/dp-lora.md §2.1: 375 such steps give ε_PRV = 0.936.
RELEASE = {"sample_rate": 0.008, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "target_delta": 1e-5,
           "num_examples": 2000}


def record_release(ledger: PrivacyLedger, *, run_id: str = "run-a", server_round: int = 1, steps: int = 25,
                   **overrides: Any) -> LedgerEntry:
    """Record one release of :data:`RELEASE` (any field overridden) in ``ledger``; returns its entry."""
    return ledger.record(**{"run_id": run_id, "server_round": server_round, "steps": steps, **RELEASE, **overrides})


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    """A site's data file: one JSON record per line (its folder made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    """Read the JSON file at ``path``, let ``change`` edit the data in place, write it back."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def problem_lines(exc: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    """The '  - ...' lines of a ConfigError, one per problem (without the dash)."""
    return [line.strip()[2:] for line in str(exc.value).splitlines() if line.strip().startswith("- ")]


# ------------------------------------------------------------------------------------ models


def save_random_llama(folder: Path, **config: Any) -> Path:
    """A random Llama (seed 0) with ``config`` (``hidden_size``, ``pad_token_id``, ...) saved to ``folder``
    with fedllm's byte tokenizer (vocabulary 259, end of sequence 256): a folder ``model.name`` can name."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fedllm.model.loading import build_byte_tokenizer

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=259, eos_token_id=256, **config))
        model.save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)
    return folder


def with_random_lora(model: Any, lora: Any) -> Any:
    """``model`` frozen under a LoRA adapter (``lora``: a ``fedllm.config.LoraConfig``) whose B factors are
    random (normal, σ = 0.1, each drawn from a generator seeded by its parameter name's length): B = 0, as
    at init, would zero A's gradient and make every step start from the same point. Returns the PEFT model."""
    import torch

    from fedllm.model.lora import apply_lora

    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = apply_lora(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return peft_model


# ------------------------------------------------------------------ hand-made adapter updates

# The adapter of the screening and aggregation tests: one A and one B factor, 6 numbers each.
SMALL_ADAPTER = {"layer.lora_A.weight": (2, 3), "layer.lora_B.weight": (3, 2)}


def filled_adapter(fill: float, shapes: dict[str, tuple[int, ...]] = SMALL_ADAPTER) -> dict[str, np.ndarray]:
    """An adapter of ``shapes`` (float32) with every number ``fill``."""
    return {k: np.full(s, fill, dtype=np.float32) for k, s in shapes.items()}


def reply_message(node: int, content: Any = None, *, error: Any = None, kind: str | None = None) -> Any:
    """A Flower reply from ``node`` (message id ``m<node>``, run 1, to the server) holding ``content`` (a
    RecordDict) or ``error`` (a Flower Error); ``kind`` is its message type (default: train). Needs the
    ``flower_task_identity`` fixture."""
    from flwr.app import MessageType
    from flwr.app.message.message import make_message
    from flwr.app.metadata import Metadata

    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type=kind or MessageType.TRAIN)
    return make_message(meta, error=error) if error is not None else make_message(meta, content=content)


class FakeGrid:
    """Just enough of a Flower Grid for a Flower strategy's sampling: the node ids ``nodes``."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def create_message(self, *a: Any, **k: Any) -> Any:  # pragma: no cover - the strategies here do not call it
        raise NotImplementedError


class FakeNodes:
    """Just enough of the coordinator's ``Federation`` for sampling: the node ids ``nodes``."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = list(nodes)

    def node_ids(self) -> list[int]:
        return list(self.nodes)


def devices_of_a_dp_step(model: Any, examples: list, *, pad_id: int, device: str, fast_path: bool = True) -> dict:
    """One DP-SGD step of ``train_local`` on ``model`` (already on ``device``), every operation's
    floating-point outputs recorded by a dispatch mode: device -> how many. Device-agnostic: on a
    GPU everything the step computes (batches' activations, per-example gradients, clipping, the
    noise, the fused head's chunks, the optimizer) must be on the GPU. The Poisson sampling (a
    draw of integers on the CPU, by design) and the batches' token ids built before their move
    are not floating point and not counted."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from fedllm.site.training import DPSettings, train_local

    seen: dict[str, int] = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    seen[t.device.type] = seen.get(t.device.type, 0) + 1
            return out

    with Record():
        train_local(model, examples, steps=2, batch_size=4, learning_rate=0.1, pad_id=pad_id,
                    dp=DPSettings(1.0, 1.0), device=device, fast_path=fast_path,
                    sampling_generator=torch.Generator().manual_seed(0))
    return seen
