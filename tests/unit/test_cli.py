"""The `fedllm` command's planning and inspection subcommands (no processes started)."""

from __future__ import annotations

import json

import pytest

from fedllm.cli.main import main
from fedllm.privacy.accounting import DPEvent, epsilon_for
from fedllm.privacy.ledger import PrivacyLedger
from tests.helpers import record_release


def test_budget_answers_both_planning_questions(capsys):
    assert main(["budget", "--epsilon", "8", "--dataset-size", "1000", "--batch-size", "16",
                 "--rounds", "10", "--local-steps", "20", "--json"]) == 0
    sigma = json.loads(capsys.readouterr().out)["noise-multiplier"]
    eps = epsilon_for([DPEvent(sigma, 0.016, 200)], target_delta=1e-5)
    assert 7.9 <= eps <= 8.0
    assert main(["budget", "--noise-multiplier", "1.0", "--dataset-size", "2000", "--batch-size", "16",
                 "--steps", "375", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon"] == pytest.approx(0.936, abs=0.002)  # docs/notes/dp-lora.md §2.1, PRV upper bound


def test_budget_without_steps_is_a_clear_error(capsys):
    assert main(["budget", "--epsilon", "8", "--dataset-size", "100", "--batch-size", "8"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_ledger_show_prints_every_release_and_the_total(tmp_path, capsys):
    ledger = PrivacyLedger.open(tmp_path / "a.json", site="cardiology")
    for server_round in (1, 2):
        record_release(ledger, run_id="r1", server_round=server_round, steps=25)
    assert main(["ledger", "show", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    total = epsilon_for([DPEvent(1.0, 0.008, 50)], target_delta=1e-5)
    assert "cardiology" in out and out.count("r1") == 2 and f"cumulative ε = {total:.2f}" in out


def test_ledger_show_of_a_corrupt_file_fails(tmp_path, capsys):
    bad = tmp_path / "b.json"
    bad.write_text('{"format": "fedllm-privacy-ledger", "version": 1, "site": "x", "entries": [{"run_id": 3}]}')
    assert main(["ledger", "show", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_simulate_rejects_an_unknown_scenario(capsys):
    assert main(["simulate", "no-such-scenario"]) == 2
    assert "demo" in capsys.readouterr().err
