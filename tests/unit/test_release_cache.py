"""A site's release cache: the same round asked again with the same global adapter gets the same
update back (no second training, no second spend); anything else, or a damaged file, is a miss."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys

import pytest
import torch

from fedllm import wire
from fedllm.site import resend_store as release_cache
from fedllm.site.resend_store import ReleaseCache, adapter_digest


def _adapter(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(16, 4, generator=g),
            "base_model.model.layers.0.self_attn.v_proj.lora_B.weight": torch.randn(8, 4, generator=g)}


METRICS = {wire.NUM_EXAMPLES: 24, wire.TRAIN_LOSS: 2.25, wire.LOCAL_STEPS: 3, wire.EPSILON: 0.731, wire.DELTA: 1e-5}
GLOBAL = adapter_digest(_adapter(99))


def _store(cache: ReleaseCache, *, run_id="run-1", server_round=2, input_digest=GLOBAL, seed=0, entries=5):
    cache.store(run_id=run_id, server_round=server_round, input_digest=input_digest, adapter=_adapter(seed),
                metrics=METRICS, ledger_entries=entries)


# --------------------------------------------------------------------------------- digest


def test_adapter_digest_depends_on_names_dtypes_shapes_and_every_bit_but_not_on_order():
    a = _adapter()
    reordered = dict(reversed(list(a.items())))
    assert adapter_digest(a) == adapter_digest(reordered) == adapter_digest({k: v.clone() for k, v in a.items()})
    key = next(iter(a))
    changed = dict(a)
    changed[key] = a[key].clone()
    changed[key].view(-1)[7] = torch.nextafter(changed[key].view(-1)[7], torch.tensor(10.0))  # one ulp
    renamed = {k.replace("q_proj", "k_proj"): v for k, v in a.items()}
    reshaped = {k: v.reshape(-1) for k, v in a.items()}
    as_int = {k: v.view(torch.int32) for k, v in a.items()}  # same bytes, other dtype
    digests = {adapter_digest(x) for x in (a, changed, renamed, reshaped, as_int)}
    assert len(digests) == 5
    assert len(adapter_digest({"x": torch.ones(3, dtype=torch.bfloat16), "e": torch.zeros(0)})) == 64


# ---------------------------------------------------------------------------------- cache


def test_a_stored_release_is_found_again_bit_identical(tmp_path):
    cache = ReleaseCache(tmp_path / "cache", site="cardiology")
    _store(cache)
    hit = ReleaseCache(tmp_path / "cache", site="cardiology").lookup(run_id="run-1", server_round=2,
                                                                     input_digest=GLOBAL)
    assert hit is not None
    assert adapter_digest(hit.adapter) == adapter_digest(_adapter(0)) and list(hit.adapter) == list(_adapter(0))  # same order
    assert hit.metrics == METRICS and isinstance(hit.metrics[wire.NUM_EXAMPLES], int)
    assert (hit.run_id, hit.server_round, hit.input_digest, hit.ledger_entries) == ("run-1", 2, GLOBAL, 5)
    assert cache.path == tmp_path / "cache" / "cardiology.release.safetensors"
    if os.name == "posix":  # as sensitive as the update itself: owner only
        assert stat.S_IMODE(cache.path.stat().st_mode) == 0o600


@pytest.mark.parametrize("asked", [{"server_round": 3}, {"run_id": "run-2"},
                                   {"input_digest": adapter_digest(_adapter(98))}])
def test_another_round_run_or_global_adapter_is_a_miss(tmp_path, asked, caplog):
    cache = ReleaseCache(tmp_path, site="cardiology")
    _store(cache)
    query = {"run_id": "run-1", "server_round": 2, "input_digest": GLOBAL} | asked
    with caplog.at_level(logging.WARNING, logger="fedllm.site.resend_store"):
        assert cache.lookup(**query) is None
    assert not caplog.records  # an ordinary miss is not a warning


def test_nothing_stored_is_a_miss(tmp_path):
    assert ReleaseCache(tmp_path, site="a").lookup(run_id="r", server_round=1, input_digest=GLOBAL) is None


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_metadata(path):
    path.write_bytes(path.read_bytes().replace(b'"server-round":"2"', b'"server-round":"3"'))


@pytest.mark.parametrize("damage", [
    _flip_last_byte,  # a tensor bit
    _edit_metadata,  # the metadata, made to match another round
    lambda p: p.write_bytes(p.read_bytes()[:100]),  # truncated
    lambda p: p.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}}}}"),  # garbage header
    lambda p: p.write_bytes(b""),
])
def test_a_damaged_cache_is_a_miss_with_a_warning_never_an_error(tmp_path, damage, caplog):
    cache = ReleaseCache(tmp_path, site="cardiology")
    _store(cache)
    damage(cache.path)
    with caplog.at_level(logging.WARNING, logger="fedllm.site.resend_store"):
        for server_round in (2, 3):
            assert cache.lookup(run_id="run-1", server_round=server_round, input_digest=GLOBAL) is None
    assert "ignoring the release cache" in caplog.text and "trained again" in caplog.text


def test_another_sites_file_is_not_used(tmp_path, caplog):
    _store(ReleaseCache(tmp_path, site="oncology"))
    (tmp_path / "oncology.release.safetensors").rename(tmp_path / "cardiology.release.safetensors")
    with caplog.at_level(logging.WARNING, logger="fedllm.site.resend_store"):
        assert ReleaseCache(tmp_path, site="cardiology").lookup(run_id="run-1", server_round=2,
                                                                input_digest=GLOBAL) is None
    assert "not this site's release cache" in caplog.text


def test_only_the_last_release_is_kept(tmp_path):
    cache = ReleaseCache(tmp_path, site="cardiology")
    _store(cache, server_round=1, seed=1)
    _store(cache, server_round=2, seed=2)
    assert cache.lookup(run_id="run-1", server_round=1, input_digest=GLOBAL) is None
    hit = cache.lookup(run_id="run-1", server_round=2, input_digest=GLOBAL)
    assert adapter_digest(hit.adapter) == adapter_digest(_adapter(2))
    assert [p.name for p in tmp_path.iterdir()] == ["cardiology.release.safetensors"]


def test_a_crash_while_storing_keeps_the_previous_release(tmp_path, monkeypatch):
    cache = ReleaseCache(tmp_path, site="cardiology")
    _store(cache, server_round=1)

    def crash(*_a, **_k):
        raise OSError("disk full (simulated crash)")

    monkeypatch.setattr(release_cache, "write_bytes_atomic", crash)
    with pytest.raises(OSError):
        _store(cache, server_round=2)
    assert cache.lookup(run_id="run-1", server_round=1, input_digest=GLOBAL) is not None


def test_sites_have_their_own_files_and_odd_names_are_hashed(tmp_path):
    odd = ReleaseCache(tmp_path, site="../Kardiologie Süd")
    assert odd.path.parent == tmp_path and odd.path.name.startswith("site-")
    _store(odd)
    _store(ReleaseCache(tmp_path, site="oncology"), seed=3)
    assert adapter_digest(odd.lookup(run_id="run-1", server_round=2, input_digest=GLOBAL).adapter) == \
        adapter_digest(_adapter(0))


def test_non_finite_metrics_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'train-loss' = nan is not a finite number"):
        ReleaseCache(tmp_path, site="a").store(run_id="r", server_round=1, input_digest=GLOBAL, adapter=_adapter(),
                                               metrics={wire.TRAIN_LOSS: float("nan")}, ledger_entries=1)


def test_the_module_does_not_import_flower():
    code = "import sys, fedllm.site.resend_store; assert 'flwr' not in sys.modules, 'flwr imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
