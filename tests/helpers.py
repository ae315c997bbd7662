"""Plain helpers shared by the tests (fixtures live in ``conftest.py``): data files, ledger
releases, in-place edits of a JSON file (how the tests tamper with ledgers and histories), and a
small random model saved as a model folder."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fedllm.privacy.ledger import LedgerEntry, PrivacyLedger

# One DP-SGD release of the "LLM site" row of docs/notes/dp-lora.md §2.1: 375 such steps give ε_PRV = 0.936.
RELEASE = {"sample_rate": 0.008, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "target_delta": 1e-5,
           "num_examples": 2000}


def record_release(ledger: PrivacyLedger, *, run_id: str = "run-a", server_round: int = 1, steps: int = 25,
                   **overrides: Any) -> LedgerEntry:
    """Record one release of :data:`RELEASE` (any field overridden) in ``ledger``; returns its entry."""
    return ledger.record(**{"run_id": run_id, "server_round": server_round, "steps": steps, **RELEASE, **overrides})


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    """A site's data file: one JSON record per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    """Read the JSON file at ``path``, let ``change`` edit the data in place, write it back."""
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


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
