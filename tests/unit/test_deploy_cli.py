"""The coordinator's commands without a network: argument checks, what a new run and a resumed
run submit, and the clear errors before anything starts."""

from __future__ import annotations

import argparse
import json

import pytest

from fedllm.cli.main import build_parser, main
from fedllm.deploy.server_commands import _local_address, _run_overrides, _valid_address
from fedllm.errors import ConfigError, FedLLMError
from tests.helpers import write_jsonl


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", "--server", "127.0.0.1:9092", *argv])


def test_server_addresses_are_checked():
    assert _valid_address("coordinator.example.org:9092") == "coordinator.example.org:9092"
    for bad in ("coordinator", "coordinator:0", ":9092", "host:70000", "host:port"):
        with pytest.raises(argparse.ArgumentTypeError):
            _valid_address(bad)


def test_a_new_run_gets_deployment_defaults_that_the_user_can_override(tmp_path):
    (tmp_path / "run.toml").write_text('[train]\nlocal-steps = 4\n')
    overrides, output = _run_overrides(_args("--config", str(tmp_path / "run.toml"), "--rounds", "5",
                                             "--output", str(tmp_path / "out")))
    assert output == (tmp_path / "out").resolve()
    assert overrides["train.local-steps"] == 4 and overrides["num-server-rounds"] == 5
    assert overrides["federation.tolerated-failures"] == -1  # a lost site does not end a deployment run
    assert overrides["federation.run-id"].startswith("out-") and overrides["federation.resume"] is False
    overrides, _ = _run_overrides(_args("--set", "federation.tolerated-failures=1", "--set",
                                        "federation.run-id=trial-7", "--output", str(tmp_path / "o2")))
    assert overrides["federation.tolerated-failures"] == 1 and overrides["federation.run-id"] == "trial-7"

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "history.json").write_text("{}")
    with pytest.raises(FedLLMError, match="not empty.*--resume"):
        _run_overrides(_args("--output", str(tmp_path / "busy")))


def test_resume_continues_the_recorded_run_and_refuses_a_finished_one(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('num-server-rounds = 3\noutput-dir = "/elsewhere"\n[federation]\n'
                                     'run-id = "trial-1"\n')
    history = {"run-id": "123", "status": "failed", "rounds": [{"round": 0, "evaluate": {}},
                                                               {"round": 1, "train": {}, "evaluate": {}}]}
    (run / "history.json").write_text(json.dumps(history))
    overrides, output = _run_overrides(_args("--resume", str(run)))
    assert output == run.resolve() and overrides["output-dir"] == str(run.resolve())
    assert overrides["federation.resume"] is True and overrides["federation.run-id"] == "trial-1"
    assert overrides["num-server-rounds"] == 3

    history["status"] = "completed"
    history["rounds"].append({"round": 2, "evaluate": {}})
    history["rounds"].append({"round": 3, "evaluate": {}})
    (run / "history.json").write_text(json.dumps(history))
    with pytest.raises(ConfigError, match="already completed all 3 rounds"):
        _run_overrides(_args("--resume", str(run)))
    overrides, _ = _run_overrides(_args("--resume", str(run), "--rounds", "5"))  # train on: 2 more rounds
    assert overrides["num-server-rounds"] == 5
    with pytest.raises(ConfigError, match="no config.toml"):
        _run_overrides(_args("--resume", str(tmp_path)))


def test_the_coordinator_reaches_itself_by_a_name_its_certificate_holds(tmp_path):
    from fedllm.deploy.certs import create_dev_pki

    create_dev_pki(tmp_path / "a", server_names=[], sites=[])
    assert _local_address(tmp_path / "a" / "server.pem", 9092) == "127.0.0.1:9092"
    create_dev_pki(tmp_path / "b", server_names=["coordinator.example.org"], sites=[])
    assert _local_address(tmp_path / "b" / "server.pem", 9092) == "coordinator.example.org:9092"
    assert _local_address(None, 9092) == "127.0.0.1:9092"


def test_tls_is_the_default_and_missing_files_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["server", "start", "--certs", "nowhere", "--state", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err
    assert "nowhere/ca.crt" in err and "fedllm certs" in err and "--insecure" in err
    assert not (tmp_path / "state").exists()
    assert main(["run", "--server", "127.0.0.1:9092", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "certs/ca.crt" in err and "--root-certificates" in err
    assert not (tmp_path / "out").exists()  # nothing written before the checks pass


def test_insecure_with_site_keys_is_refused_because_flower_needs_tls_for_authentication(tmp_path, capsys):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "a.pub").write_text("ecdsa-sha2-nistp384 AAAA a\n")
    assert main(["server", "start", "--insecure", "--site-keys", str(keys), "--state", str(tmp_path / "s")]) == 2
    assert "needs TLS" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_site_start_refuses_a_ledger_signed_with_another_key_before_connecting(tmp_path, capsys):
    from fedllm.data.fingerprint import dataset_fingerprint
    from fedllm.data.loading import load_records
    from fedllm.deploy.site_commands import _preflight
    from fedllm.deploy.site_file import load_site_file
    from fedllm.privacy.ledger import PrivacyLedger
    from fedllm.privacy.signing import generate_signing_key, load_private_key

    data = tmp_path / "data.jsonl"
    write_jsonl(data, ({"text": f"record {i}"} for i in range(4)))
    mine, _ = generate_signing_key(tmp_path / "mine", site="a")
    other, _ = generate_signing_key(tmp_path / "other", site="a")
    from fedllm.config import SiteConfig
    from fedllm.site.holdout import site_split_key
    from fedllm.site.runtime import training_fingerprint

    site = SiteConfig(name="a", data_path=str(data), max_epsilon=8.0)  # the training subset, as the site binds it
    fingerprint = training_fingerprint(site, load_records(data), site_split_key(tmp_path / "ledger.json", "a"))
    assert fingerprint != dataset_fingerprint(load_records(data))  # one record is held out
    ledger = PrivacyLedger.open(tmp_path / "ledger.json", site="a", dataset_fingerprint=fingerprint,
                                signing_key=load_private_key(other))
    ledger.record(run_id="r", server_round=1, steps=1, sample_rate=0.5, noise_multiplier=1.0, max_grad_norm=1.0,
                  target_delta=1e-5, num_examples=4)
    (tmp_path / "a.toml").write_text(f'site-name = "a"\ndata-path = "data.jsonl"\nmax-epsilon = 8.0\nledger-path = "ledger.json"\n'
                                     f'signing-key = "{mine}"\n')
    with pytest.raises(FedLLMError, match="does not verify"):
        _preflight(load_site_file(tmp_path / "a.toml"))
    (tmp_path / "a.toml").write_text(f'site-name = "a"\ndata-path = "data.jsonl"\nmax-epsilon = 8.0\nledger-path = "ledger.json"\n'
                                     f'signing-key = "{other}"\n')
    _preflight(load_site_file(tmp_path / "a.toml"))  # its own key: fine
    assert "1 releases" in capsys.readouterr().out


def test_a_site_restarting_with_the_ledger_it_wrote_passes_its_own_start_checks(tmp_path, capsys):
    # regression (CI): site start checked the ledger against all records, while the site binds it to its
    # training subset (the held-out records excluded): a site could never restart once it had a ledger
    from fedllm.config import RunConfig
    from fedllm.deploy.site_commands import _preflight
    from fedllm.deploy.site_file import load_site_file
    from fedllm.model.lora import get_adapter_state
    from fedllm.site.runtime import SiteRuntime

    write_jsonl(tmp_path / "data.jsonl", ({"instruction": f"Say {i}.", "output": f"{i}."} for i in range(20)))
    (tmp_path / "a.toml").write_text('site-name = "a"\ndata-path = "data.jsonl"\nmax-epsilon = 8.0\n'
                                     'ledger-path = "ledger.json"\neval-fraction = 0.2\n')
    site_file = load_site_file(tmp_path / "a.toml")
    config = RunConfig.from_flat({"model.name": "tiny-random-llama", "data.max-length": 32, "train.local-steps": 1,
                                  "train.batch-size": 2, "privacy.noise-multiplier": 1.0, "lora.r": 2})
    runtime = SiteRuntime(config, site_file.site, ledger_path=tmp_path / "ledger.json", simulated=False)
    assert runtime.eval_examples  # some records are held out: the training subset is not the whole file
    runtime.train_round(run_id="r", server_round=1, adapter=get_adapter_state(runtime.model, trainable_only=True))
    _preflight(site_file)
    assert "1 releases" in capsys.readouterr().out


def test_free_ports_come_from_below_the_ephemeral_range_and_are_bindable():
    # outgoing connections take ports from the ephemeral range; a listener's port picked there can be
    # taken between picking and binding ("address already in use", seen in CI)
    import socket

    from fedllm.flower.processes import _ephemeral_range, free_port

    low, _ = _ephemeral_range()
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1  # chosen at random, not one fixed port
    for port in ports:
        assert 10000 <= port < low
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
