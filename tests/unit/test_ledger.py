"""The per-site privacy ledger: persistence, composition, refusal at the cap, corrupt files."""

from __future__ import annotations

import json
import math
import os
import re
from datetime import datetime
from pathlib import Path

import pytest

from fedllm.data.fingerprint import dataset_fingerprint
from fedllm.errors import BudgetExceededError, LedgerError
from fedllm.privacy.accounting import DPEvent, epsilon_for
from fedllm.privacy.ledger import (
    LEDGER_FORMAT,
    LEDGER_VERSION,
    LedgerEntry,
    PrivacyLedger,
)
from tests.helpers import edit_json, record_release

FINGERPRINT = dataset_fingerprint([{"text": "one record"}, {"text": "another record"}])
OTHER_DATA = dataset_fingerprint([{"text": "one record"}, {"text": "another record, edited"}])


@pytest.fixture
def ledger_file(tmp_path: Path) -> Path:
    ledger = PrivacyLedger.open(tmp_path / "cardiology.json", site="cardiology")
    record_release(ledger, server_round=1)
    record_release(ledger, server_round=2)
    return ledger.path


def test_record_persists_and_reopens(tmp_path):
    path = tmp_path / "sites" / "cardiology" / "ledger.json"  # parent folders do not exist yet
    ledger = PrivacyLedger.open(path, site="cardiology")
    assert ledger.entries == () and not path.exists()  # nothing written before the first record
    first = record_release(ledger, server_round=1)
    second = record_release(ledger, server_round=2, steps=50)
    reopened = PrivacyLedger.open(path, site="cardiology")
    assert reopened.entries == (first, second)
    assert reopened.events() == [DPEvent(1.0, 0.008, 25), DPEvent(1.0, 0.008, 50)]
    data = json.loads(path.read_text())
    assert (data["format"], data["version"], data["site"]) == (LEDGER_FORMAT, LEDGER_VERSION, "cardiology")
    assert data["entries"][1]["steps"] == 50 and data["entries"][1]["run_id"] == "run-a"
    assert second.timestamp.endswith("+00:00")
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.json"]  # no temp files left


def test_cumulative_epsilon_is_composed_over_the_whole_history(tmp_path):
    rounds = PrivacyLedger.open(tmp_path / "rounds.json", site="s")
    one = PrivacyLedger.open(tmp_path / "one.json", site="s")
    after_first = record_release(rounds, server_round=1, steps=250)
    after_second = record_release(rounds, run_id="run-b", server_round=1, steps=250)
    single = record_release(one, steps=500)
    assert after_first.epsilon < after_second.epsilon
    assert after_second.epsilon == pytest.approx(single.epsilon, rel=1e-9)
    assert after_second.epsilon == pytest.approx(1.0562, abs=1e-4)  # docs/notes/dp-lora.md §2.3, PRV
    assert rounds.epsilon(target_delta=1e-5) == after_second.epsilon
    assert rounds.epsilon(target_delta=1e-5, accountant="rdp") == pytest.approx(1.4012, abs=1e-4)


def test_check_refuses_the_release_that_crosses_the_cap(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "l.json", site="cardiology")
    record_release(ledger, steps=375)  # ε_PRV = 0.936 (docs/notes/dp-lora.md §2.1, "LLM site" row)
    planned = {"noise_multiplier": 1.0, "sample_rate": 0.008, "steps": 100, "target_delta": 1e-5}
    with pytest.raises(BudgetExceededError) as info:
        ledger.check(max_epsilon=1.0, **planned)
    assert str(info.value) == (
        "Site 'cardiology' would exceed its privacy budget: spent ε=0.94, this round +0.10, cap 1.00 "
        "(δ=1e-05, prv). Refusing to train; the site's budget is spent (only the site can raise its max-epsilon), "
        "or stop the run."
    )
    assert len(ledger.entries) == 1  # check() never records
    assert ledger.check(max_epsilon=1.1, **planned) == pytest.approx(1.0332, abs=1e-4)
    for no_cap in (0.0, -1.0, math.inf):
        assert ledger.check(max_epsilon=no_cap, **planned) > 1.0


def test_release_without_noise_is_inf_and_round_trips(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "l.json", site="s")
    record_release(ledger, steps=25)
    no_noise = {"noise_multiplier": 0.0, "sample_rate": 0.008, "steps": 5, "target_delta": 1e-5}
    assert ledger.check(max_epsilon=1.0, **no_noise) == math.inf  # the cap never refuses it: the caller decides
    entry = record_release(ledger, steps=5, noise_multiplier=0.0)
    assert entry.epsilon == math.inf
    assert json.loads(ledger.path.read_text())["entries"][1]["epsilon"] == "inf"
    reopened = PrivacyLedger.open(ledger.path, site="s")
    assert reopened.entries[1].epsilon == math.inf and reopened.epsilon(target_delta=1e-5) == math.inf
    with pytest.raises(BudgetExceededError, match=r"spent ε=inf, this round \+0\.\d\d, cap 8\.00"):
        reopened.check(max_epsilon=8.0, noise_multiplier=1.0, sample_rate=0.008, steps=1, target_delta=1e-5)
    assert record_release(reopened, steps=1).epsilon == math.inf  # no DP release can undo it


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_text("{not json"), "not valid JSON"),
        (lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]), "truncated"),
        (lambda p: p.write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
        (lambda p: p.write_text("[]"), "not a fedllm privacy ledger"),
        (lambda p: edit_json(p, lambda d: d.update(format="something-else")), "not a fedllm privacy ledger"),
        (lambda p: edit_json(p, lambda d: d.update(version=3)), "version 3"),
        (lambda p: edit_json(p, lambda d: d.update(site="oncology")), "belongs to site 'oncology', not 'cardiology'"),
        (lambda p: edit_json(p, lambda d: d.update(entries={})), '"entries" must be a list'),
        (lambda p: edit_json(p, lambda d: d["entries"][1].pop("noise_multiplier")), "entry 2, field 'noise_multiplier'"),
        (lambda p: edit_json(p, lambda d: d["entries"][1].update(steps="ten")), "entry 2, field 'steps'"),
        (lambda p: edit_json(p, lambda d: d["entries"][0].update(steps=True)), "entry 1, field 'steps'"),
        (lambda p: edit_json(p, lambda d: d["entries"][0].update(sample_rate=1.5)), "entry 1, field 'sample_rate'"),
        (lambda p: edit_json(p, lambda d: d["entries"][0].update(accountant="gdp")), "entry 1, field 'accountant'"),
        (lambda p: edit_json(p, lambda d: d["entries"][0].update(epsilon=-1)), "entry 1, field 'epsilon'"),
        (lambda p: edit_json(p, lambda d: d["entries"][0].update(timestamp="yesterday")), "entry 1, field 'timestamp'"),
        (lambda p: edit_json(p, lambda d: d["entries"][0].update(extra=1)), "entry 1, field 'extra'"),
        (lambda p: edit_json(p, lambda d: d["entries"][1].pop("prev-hash")), "entry 2, field 'prev-hash'"),
        (lambda p: edit_json(p, lambda d: d["entries"][1].update({"entry-hash": "00"})), "entry 2, field 'entry-hash'"),
        (lambda p: edit_json(p, lambda d: d.pop("head")), "header field 'head'"),
        (lambda p: edit_json(p, lambda d: d["entries"][0].update(steps=26)), "entry 1: its content does not match"),
        (lambda p: edit_json(p, lambda d: d["entries"].pop(0)), "entry 1: its prev-hash does not match the ledger header"),
        (lambda p: p.write_text(re.sub(r'"epsilon": [0-9.e+-]+', '"epsilon": NaN', p.read_text(), count=1)), "NaN"),
    ],
)
def test_damaged_ledger_is_an_error_naming_the_file(ledger_file, damage, message):
    damage(ledger_file)
    with pytest.raises(LedgerError) as info:
        PrivacyLedger.open(ledger_file, site="cardiology")
    assert str(ledger_file) in str(info.value)
    assert message in str(info.value)


def test_field_errors_say_what_to_do(ledger_file):
    edit_json(ledger_file, lambda d: d["entries"][1].update(steps="ten"))
    with pytest.raises(LedgerError, match="expected an integer >= 0, got 'ten'.*restore it from a backup"):
        PrivacyLedger.open(ledger_file, site="cardiology")


@pytest.mark.parametrize("failing", ["os.replace", "json.dumps"])
def test_failed_write_keeps_the_old_ledger(ledger_file, monkeypatch, failing):
    before = ledger_file.read_bytes()
    ledger = PrivacyLedger.open(ledger_file, site="cardiology")
    module, name = failing.split(".")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(f"fedllm.privacy.ledger.{module}.{name}", fail)
    with pytest.raises(OSError, match="disk full"):
        record_release(ledger, server_round=3)
    monkeypatch.undo()
    assert ledger_file.read_bytes() == before
    assert len(ledger.entries) == 2 and len(PrivacyLedger.open(ledger_file, site="cardiology").entries) == 2
    assert sorted(os.listdir(ledger_file.parent)) == [ledger_file.name]
    record_release(ledger, server_round=3)  # the ledger object is still usable
    assert len(PrivacyLedger.open(ledger_file, site="cardiology").entries) == 3


def test_concurrent_writer_is_detected(ledger_file):
    first = PrivacyLedger.open(ledger_file, site="cardiology")
    second = PrivacyLedger.open(ledger_file, site="cardiology")
    record_release(first, server_round=3)
    with pytest.raises(LedgerError, match="changed on disk"):
        record_release(second, server_round=3)
    assert len(PrivacyLedger.open(ledger_file, site="cardiology").entries) == 3


def test_bad_release_is_not_recorded(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "l.json", site="s")
    with pytest.raises(ValueError, match="run_id"):
        record_release(ledger, run_id="")
    with pytest.raises(ValueError, match="sample_rate"):
        record_release(ledger, sample_rate=2.0)
    assert ledger.entries == () and not ledger.path.exists()


def test_summary_lines(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "l.json", site="cardiology", dataset_fingerprint=FINGERPRINT)
    assert ledger.summary_lines()[1:] == [f"dataset: {FINGERPRINT}", "integrity: nothing written yet",
                                          "no releases recorded", "cumulative ε = 0.00 (nothing released)"]
    record_release(ledger, server_round=1)
    record_release(ledger, run_id="run-b", server_round=1, max_grad_norm=0.5)
    assert ledger.summary_lines() == [
        f"Privacy ledger of site 'cardiology': {ledger.path}",
        f"dataset: {FINGERPRINT}",
        "integrity: hash chain of 2 entries intact (checked on opening); unsigned",
        "run    round  steps  q      σ  C    δ      accountant  cumulative ε",
        "run-a  1      25     0.008  1  1    1e-05  prv         0.39",
        "run-b  1      25     0.008  1  0.5  1e-05  prv         0.47",
        "cumulative ε = 0.47 (δ=1e-05, prv; the ledger records no site δ policy: check it with 'fedllm ledger "
        "verify FILE --max-delta SITE_DELTA')",  # 50 steps at σ=1, q=0.008: PRV 0.4728
    ]
    record_release(ledger, run_id="run-c", server_round=1, noise_multiplier=0.0)
    lines = ledger.summary_lines()
    assert lines[-2].endswith("inf (no DP)")
    assert lines[-1] == "cumulative ε = inf: no DP guarantee (a release without noise)"


def test_entries_from_the_constructor(tmp_path):
    entry = LedgerEntry("r", 1, 100, 0.01, 4.0, 1.0, 1e-5, "rdp", 0.0, 10, "2026-01-01T00:00:00+00:00")
    ledger = PrivacyLedger(tmp_path / "l.json", site="s", entries=[entry])
    assert ledger.epsilon(target_delta=1e-5, accountant="rdp") == pytest.approx(
        epsilon_for([DPEvent(4.0, 0.01, 100)], target_delta=1e-5, accountant="rdp")
    )
    assert ledger.epsilon_after(noise_multiplier=4.0, sample_rate=0.01, steps=9900, target_delta=1e-5,
                                accountant="rdp") == pytest.approx(1.035, abs=1e-3)


# -- format version 2: dataset binding, hash chain, signing key, version-1 migration ---------------


def _v1_ledger(path: Path, site: str = "cardiology", rounds: int = 2) -> list[float]:
    """A ledger as the foundation (version 1) wrote it: no fingerprint, no hashes. Returns its ε values."""
    epsilons = [epsilon_for([DPEvent(1.0, 0.008, 25)] * r, target_delta=1e-5) for r in range(1, rounds + 1)]
    entries = [
        {"run_id": "old-run", "server_round": r, "steps": 25, "sample_rate": 0.008, "noise_multiplier": 1.0,
         "max_grad_norm": 1.0, "target_delta": 1e-05, "accountant": "prv", "epsilon": eps, "num_examples": 2000,
         "timestamp": "2026-01-01T00:00:00+00:00"}
        for r, eps in zip(range(1, rounds + 1), epsilons)
    ]
    path.write_text(json.dumps({"format": LEDGER_FORMAT, "version": 1, "site": site, "entries": entries}, indent=2))
    return epsilons


def test_version_1_ledger_loads_and_is_chained_at_the_first_record(tmp_path):
    path = tmp_path / "cardiology.json"
    old_eps = _v1_ledger(path)
    ledger = PrivacyLedger.open(path, site="cardiology", dataset_fingerprint=FINGERPRINT)
    assert [e.epsilon for e in ledger.entries] == old_eps
    assert "version 1 ledger without a hash chain" in ledger.summary_lines()[2]
    assert json.loads(path.read_text())["version"] == 1  # reading never rewrites
    new = record_release(ledger, run_id="new-run")
    assert new.epsilon == pytest.approx(epsilon_for([DPEvent(1.0, 0.008, 25)] * 3, target_delta=1e-5), rel=1e-12)
    data = json.loads(path.read_text())
    assert data["version"] == LEDGER_VERSION == 2 and data["dataset-fingerprint"] == FINGERPRINT
    assert data["migrated"]["from-version"] == 1 and data["migrated"]["entries"] == 2
    assert datetime.fromisoformat(data["migrated"]["time"]).tzinfo is not None
    assert [e.get("migrated", False) for e in data["entries"]] == [True, True, False]
    assert [e["epsilon"] for e in data["entries"][:2]] == old_eps  # the old entries keep their values
    assert all(e["dataset-fingerprint"] == FINGERPRINT for e in data["entries"])
    reopened = PrivacyLedger.open(path, site="cardiology", dataset_fingerprint=FINGERPRINT)
    assert reopened.entries == ledger.entries
    record_release(reopened, run_id="new-run", server_round=2)  # a second write keeps the migration as it was
    again = json.loads(path.read_text())
    assert again["migrated"] == data["migrated"] and again["entries"][:3] == data["entries"]


def test_a_ledger_is_bound_to_its_data(tmp_path):
    path = tmp_path / "l.json"
    ledger = PrivacyLedger.open(path, site="cardiology", dataset_fingerprint=FINGERPRINT)
    record_release(ledger)
    reopened = PrivacyLedger.open(path, site="cardiology", dataset_fingerprint=FINGERPRINT)
    assert reopened.dataset_fingerprint == FINGERPRINT
    assert PrivacyLedger.open(path, site="cardiology").dataset_fingerprint == FINGERPRINT  # reading needs no data
    with pytest.raises(LedgerError) as info:
        PrivacyLedger.open(path, site="cardiology", dataset_fingerprint=OTHER_DATA)
    message = str(info.value)
    assert str(path) in message and FINGERPRINT in message and OTHER_DATA in message
    assert "Refusing to train" in message and "its own ledger" in message and "Never delete" in message


def test_an_unbound_ledger_cannot_be_taken_over_by_a_site(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "l.json", site="s")  # written by a tool, without data
    record_release(ledger)
    assert json.loads(ledger.path.read_text())["dataset-fingerprint"] is None
    with pytest.raises(LedgerError, match="is not bound to any dataset"):
        PrivacyLedger.open(ledger.path, site="s", dataset_fingerprint=FINGERPRINT)


def test_a_broken_chain_refuses_to_open_and_says_what_to_do(ledger_file):
    edit_json(ledger_file, lambda d: d["entries"][1].update(run_id="someone-else"))
    with pytest.raises(LedgerError) as info:
        PrivacyLedger.open(ledger_file, site="cardiology")
    message = str(info.value)
    assert str(ledger_file) in message and "entry 2: its content does not match its entry-hash" in message
    assert "Restore it from a backup" in message and "do not delete it" in message and "fedllm ledger verify" in message


def test_signed_ledger_is_written_only_with_its_key(tmp_path):
    from fedllm.privacy.signing import Ed25519PrivateKey, key_id, public_key_text

    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    path = tmp_path / "l.json"
    record_release(PrivacyLedger.open(path, site="s", dataset_fingerprint=FINGERPRINT, signing_key=key))
    data = json.loads(path.read_text())
    assert data["public-key"] == public_key_text(key) and data["entries"][0]["signature"] and data["head-signature"]
    unkeyed = PrivacyLedger.open(path, site="s", dataset_fingerprint=FINGERPRINT)  # reading needs no key
    assert key_id(key) in unkeyed.integrity_line()
    with pytest.raises(LedgerError, match="no signing key was given"):
        record_release(unkeyed)
    wrong_key = f"signed with key {key_id(key)}, but the site's signing key is {key_id(other)}"
    with pytest.raises(LedgerError, match=wrong_key):
        PrivacyLedger.open(path, site="s", dataset_fingerprint=FINGERPRINT, signing_key=other)
    assert len(json.loads(path.read_text())["entries"]) == 1


def test_signing_can_start_on_an_unsigned_ledger(tmp_path):
    from fedllm.privacy.ledger import verify_ledger
    from fedllm.privacy.signing import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    path = tmp_path / "l.json"
    record_release(PrivacyLedger.open(path, site="s", dataset_fingerprint=FINGERPRINT), server_round=1)
    record_release(PrivacyLedger.open(path, site="s", dataset_fingerprint=FINGERPRINT, signing_key=key), server_round=2)
    data = json.loads(path.read_text())
    assert "signature" not in data["entries"][0] and "signature" in data["entries"][1]
    result = verify_ledger(path, public_key=key.public_key())
    assert result.ok and result.signed and result.signature_checked, result.problems
    assert result.notes == ["entry 1 was written before the site began signing; the signature of entry 2 covers "
                            "it through the hash chain"]
