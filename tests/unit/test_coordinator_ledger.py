"""The coordinator's central-DP ledger: every noisy aggregate recorded before it leaves, hash-chained
like a site's ledger, composed across runs (and across a resume), checked by ``fedllm ledger verify``."""

from __future__ import annotations

import json

import pytest

from fedllm.cli.main import main
from fedllm.coordinator.checkpoint import load_server_state
from fedllm.errors import LedgerError
from fedllm.privacy.ledger import PrivacyLedger, verify_ledger
from fedllm.privacy.site_level import site_level_epsilon
from tests.unit.test_round_loop import SITES, FakeFederation, _Killed, _run

pytestmark = pytest.mark.usefixtures("flower_task_identity")

CENTRAL = {"central-dp.enabled": True, "central-dp.noise-multiplier": 2.0}


def _eps(rounds: int) -> float:
    return site_level_epsilon(noise_multiplier=2.0, sites_per_round=4, total_sites=4, rounds=rounds,
                              target_delta=1e-5, sampling="all")


def test_two_runs_on_one_ledger_compose_and_the_history_reports_both(tmp_path):
    ledger = tmp_path / "federation" / "central-dp.json"  # outside both run folders
    flat = {**CENTRAL, "central-dp.ledger-path": str(ledger)}
    first = _run(FakeFederation(SITES), tmp_path / "run-1", **flat, **{"federation.run-id": "first"}).data
    second = _run(FakeFederation(SITES), tmp_path / "run-2", **flat, **{"federation.run-id": "second"}).data
    assert first["central-dp"]["epsilon"] == pytest.approx(_eps(3)) == first["central-dp"]["cumulative-epsilon"]
    assert second["central-dp"]["epsilon"] == pytest.approx(_eps(3))  # this run's own releases
    assert second["central-dp"]["cumulative-epsilon"] == pytest.approx(_eps(6))  # both runs, from the ledger
    assert [r["central-dp"]["cumulative-epsilon"] for r in second["rounds"][1:]] == pytest.approx(
        [_eps(4), _eps(5), _eps(6)])
    data = json.loads(ledger.read_text())
    assert data["kind"] == "central-dp" and data["site"] == "coordinator"
    assert [(e["run_id"], e["server_round"]) for e in data["entries"]] == [
        (run, r) for run in ("first", "second") for r in (1, 2, 3)]
    entry = data["entries"][0]
    assert (entry["steps"], entry["sample_rate"], entry["noise_multiplier"], entry["target_delta"]) == (1, 1.0, 2.0, 1e-5)
    assert entry["central_dp"] == {"sites_per_round": 4, "total_sites": 4, "sampling": "all", "clipping": "fixed"}
    result = verify_ledger(ledger)
    assert result.ok and result.kind == "central-dp" and result.entries == 6
    assert result.final_epsilon == pytest.approx(_eps(6))
    assert main(["ledger", "verify", str(ledger)]) == 0
    assert main(["ledger", "show", str(ledger)]) == 0


def _tamper(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


@pytest.mark.parametrize("what, edit, expected", [
    ("a smaller z", lambda d: d["entries"][1].update(noise_multiplier=4.0), "entry 2: its content does not match"),
    ("an entry deleted", lambda d: d["entries"].pop(1), "entry 2: its prev-hash does not match"),
    ("the kind removed", lambda d: d.pop("kind"), "entry 1 carries a central_dp block"),
    ("m edited", lambda d: d["entries"][0]["central_dp"].update(sites_per_round=2, sampling="fixed-subset"),
     "entry 1: its content does not match"),
])
def test_ledger_verify_fails_on_a_tampered_coordinator_ledger(tmp_path, capsys, what, edit, expected):
    ledger = tmp_path / "central-dp.json"
    _run(FakeFederation(SITES), tmp_path / "run", **CENTRAL, **{"central-dp.ledger-path": str(ledger)})
    assert main(["ledger", "verify", str(ledger)]) == 0
    _tamper(ledger, edit)
    capsys.readouterr()
    assert main(["ledger", "verify", str(ledger)]) == 1, what
    assert expected in capsys.readouterr().out
    with pytest.raises(LedgerError):  # the next run refuses to continue a broken ledger
        PrivacyLedger.open(ledger, site="coordinator", kind="central-dp")


def test_a_site_ledger_and_the_coordinator_ledger_cannot_be_mixed_up(tmp_path):
    site = PrivacyLedger.open(tmp_path / "site.json", site="cardiology")
    site.record(run_id="r", server_round=1, steps=10, sample_rate=0.1, noise_multiplier=1.0, max_grad_norm=1.0,
                target_delta=1e-5, num_examples=100)
    with pytest.raises(LedgerError, match="is a site ledger, not a central-dp ledger"):
        PrivacyLedger.open(tmp_path / "site.json", site="cardiology", kind="central-dp")
    assert verify_ledger(tmp_path / "site.json").ok and verify_ledger(tmp_path / "site.json").kind == "site"


def test_a_resumed_run_continues_the_ledger_in_its_folder(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(_Killed):
        _run(FakeFederation(SITES, kill_at=3), out, **CENTRAL)
    state = load_server_state(out)
    assert state.server_round == 2 and state.central["ledger"] == str(out / "ledgers" / "_coordinator.json")
    assert state.central["ledger-releases"] == 2
    history = _run(FakeFederation(SITES), out, **CENTRAL, **{"federation.resume": True}).data
    assert history["central-dp"]["rounds"] == 3 and history["central-dp"]["epsilon"] == pytest.approx(_eps(3))
    data = json.loads((out / "ledgers" / "_coordinator.json").read_text())
    assert [e["server_round"] for e in data["entries"]] == [1, 2, 3]
    assert verify_ledger(out / "ledgers" / "_coordinator.json").ok
