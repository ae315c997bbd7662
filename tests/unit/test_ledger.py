"""The per-site privacy ledger: persistence, composition, refusal at the cap, corrupt files."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from fedllm.errors import BudgetExceededError, LedgerError
from fedllm.privacy.accounting import DPEvent, epsilon_for
from fedllm.privacy.ledger import LEDGER_FORMAT, LEDGER_VERSION, LedgerEntry, PrivacyLedger

RELEASE = {"sample_rate": 0.008, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "target_delta": 1e-5}


def _record(ledger: PrivacyLedger, run_id: str = "run-a", server_round: int = 1, steps: int = 25, **overrides):
    return ledger.record(
        **{"run_id": run_id, "server_round": server_round, "steps": steps, "num_examples": 2000, **RELEASE, **overrides}
    )


@pytest.fixture
def ledger_file(tmp_path: Path) -> Path:
    ledger = PrivacyLedger.open(tmp_path / "cardiology.json", site="cardiology")
    _record(ledger, server_round=1)
    _record(ledger, server_round=2)
    return ledger.path


def test_record_persists_and_reopens(tmp_path):
    path = tmp_path / "sites" / "cardiology" / "ledger.json"  # parent folders do not exist yet
    ledger = PrivacyLedger.open(path, site="cardiology")
    assert ledger.entries == () and not path.exists()  # nothing written before the first record
    first = _record(ledger, server_round=1)
    second = _record(ledger, server_round=2, steps=50)
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
    after_first = _record(rounds, server_round=1, steps=250)
    after_second = _record(rounds, run_id="run-b", server_round=1, steps=250)
    single = _record(one, steps=500)
    assert after_first.epsilon < after_second.epsilon
    assert after_second.epsilon == pytest.approx(single.epsilon, rel=1e-9)
    assert after_second.epsilon == pytest.approx(1.0562, abs=1e-4)  # dp-lora.md §2.3, PRV
    assert rounds.epsilon(target_delta=1e-5) == after_second.epsilon
    assert rounds.epsilon(target_delta=1e-5, accountant="rdp") == pytest.approx(1.4012, abs=1e-4)


def test_check_refuses_the_release_that_crosses_the_cap(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "l.json", site="cardiology")
    _record(ledger, steps=375)  # ε_PRV = 0.936 (dp-lora.md §2.1, "LLM site" row)
    planned = {"noise_multiplier": 1.0, "sample_rate": 0.008, "steps": 100, "target_delta": 1e-5}
    with pytest.raises(BudgetExceededError) as info:
        ledger.check(max_epsilon=1.0, **planned)
    assert str(info.value) == (
        "Site 'cardiology' would exceed its privacy budget: spent ε=0.94, this round +0.10, cap 1.00 "
        "(δ=1e-05, prv). Refusing to train; raise privacy.max-epsilon or stop the run."
    )
    assert len(ledger.entries) == 1  # check() never records
    assert ledger.check(max_epsilon=1.1, **planned) == pytest.approx(1.0332, abs=1e-4)
    for no_cap in (0.0, -1.0, math.inf):
        assert ledger.check(max_epsilon=no_cap, **planned) > 1.0


def test_release_without_noise_is_inf_and_round_trips(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "l.json", site="s")
    _record(ledger, steps=25)
    no_noise = {"noise_multiplier": 0.0, "sample_rate": 0.008, "steps": 5, "target_delta": 1e-5}
    assert ledger.check(max_epsilon=1.0, **no_noise) == math.inf  # the cap never refuses it: the caller decides
    entry = _record(ledger, steps=5, noise_multiplier=0.0)
    assert entry.epsilon == math.inf
    assert json.loads(ledger.path.read_text())["entries"][1]["epsilon"] == "inf"
    reopened = PrivacyLedger.open(ledger.path, site="s")
    assert reopened.entries[1].epsilon == math.inf and reopened.epsilon(target_delta=1e-5) == math.inf
    with pytest.raises(BudgetExceededError, match=r"spent ε=inf, this round \+0\.\d\d, cap 8\.00"):
        reopened.check(max_epsilon=8.0, noise_multiplier=1.0, sample_rate=0.008, steps=1, target_delta=1e-5)
    assert _record(reopened, steps=1).epsilon == math.inf  # no DP release can undo it


def _corrupt(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_text("{not json"), "not valid JSON"),
        (lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]), "truncated"),
        (lambda p: p.write_bytes(b"\xff\xfe\x00"), "not valid JSON"),
        (lambda p: p.write_text("[]"), "not a fedllm privacy ledger"),
        (lambda p: _corrupt(p, lambda d: d.update(format="something-else")), "not a fedllm privacy ledger"),
        (lambda p: _corrupt(p, lambda d: d.update(version=2)), "version 2"),
        (lambda p: _corrupt(p, lambda d: d.update(site="oncology")), "belongs to site 'oncology', not 'cardiology'"),
        (lambda p: _corrupt(p, lambda d: d.update(entries={})), '"entries" must be a list'),
        (lambda p: _corrupt(p, lambda d: d["entries"][1].pop("noise_multiplier")), "entry 1, field 'noise_multiplier'"),
        (lambda p: _corrupt(p, lambda d: d["entries"][1].update(steps="ten")), "entry 1, field 'steps'"),
        (lambda p: _corrupt(p, lambda d: d["entries"][0].update(steps=True)), "entry 0, field 'steps'"),
        (lambda p: _corrupt(p, lambda d: d["entries"][0].update(sample_rate=1.5)), "entry 0, field 'sample_rate'"),
        (lambda p: _corrupt(p, lambda d: d["entries"][0].update(accountant="gdp")), "entry 0, field 'accountant'"),
        (lambda p: _corrupt(p, lambda d: d["entries"][0].update(epsilon=-1)), "entry 0, field 'epsilon'"),
        (lambda p: _corrupt(p, lambda d: d["entries"][0].update(timestamp="yesterday")), "entry 0, field 'timestamp'"),
        (lambda p: _corrupt(p, lambda d: d["entries"][0].update(extra=1)), "entry 0, field 'extra'"),
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
    _corrupt(ledger_file, lambda d: d["entries"][1].update(steps="ten"))
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
        _record(ledger, server_round=3)
    monkeypatch.undo()
    assert ledger_file.read_bytes() == before
    assert len(ledger.entries) == 2 and len(PrivacyLedger.open(ledger_file, site="cardiology").entries) == 2
    assert sorted(os.listdir(ledger_file.parent)) == [ledger_file.name]
    _record(ledger, server_round=3)  # the ledger object is still usable
    assert len(PrivacyLedger.open(ledger_file, site="cardiology").entries) == 3


def test_concurrent_writer_is_detected(ledger_file):
    first = PrivacyLedger.open(ledger_file, site="cardiology")
    second = PrivacyLedger.open(ledger_file, site="cardiology")
    _record(first, server_round=3)
    with pytest.raises(LedgerError, match="changed on disk"):
        _record(second, server_round=3)
    assert len(PrivacyLedger.open(ledger_file, site="cardiology").entries) == 3


def test_bad_release_is_not_recorded(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "l.json", site="s")
    with pytest.raises(ValueError, match="run_id"):
        _record(ledger, run_id="")
    with pytest.raises(ValueError, match="sample_rate"):
        _record(ledger, sample_rate=2.0)
    assert ledger.entries == () and not ledger.path.exists()


def test_summary_lines(tmp_path):
    ledger = PrivacyLedger.open(tmp_path / "l.json", site="cardiology")
    assert ledger.summary_lines()[1:] == ["no releases recorded", "cumulative ε = 0.00 (nothing released)"]
    _record(ledger, server_round=1)
    _record(ledger, run_id="run-b", server_round=1, max_grad_norm=0.5)
    assert ledger.summary_lines() == [
        f"Privacy ledger of site 'cardiology': {ledger.path}",
        "run    round  steps  q      σ  C    δ      accountant  cumulative ε",
        "run-a  1      25     0.008  1  1    1e-05  prv         0.39",
        "run-b  1      25     0.008  1  0.5  1e-05  prv         0.47",
        "cumulative ε = 0.47 (δ=1e-05, prv)",  # 50 steps at σ=1, q=0.008: PRV 0.4728
    ]
    _record(ledger, run_id="run-c", server_round=1, noise_multiplier=0.0)
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
