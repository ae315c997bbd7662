"""Site files (``sites/<name>.toml``) and ``fedllm site check``.

The file: relative paths resolve from the file's folder, every problem is reported at once with
the key and a did-you-mean, the ``--node-config`` string survives Flower's own parser unchanged
(spaces, quotes, ``=`` in paths), the template and the example load. The check: record counts,
split sizes and token lengths are the site's, the ledger is verified against the data, keys and
certificates are parsed as Flower parses them, and nothing touches the network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest

from fedllm.cli.main import build_parser
from fedllm.config import SITE_KEYS, SiteConfig
from fedllm.data.fingerprint import dataset_fingerprint
from fedllm.data.loading import load_records
from fedllm.deploy.site_check import (
    FAILED,
    OK,
    WARNING,
    check_site,
    cmd_site_check,
    sample_indices,
)
from fedllm.deploy.site_file import CONNECTION_KEYS, load_site_file
from fedllm.errors import ConfigError, DataError
from fedllm.privacy.ledger import PrivacyLedger
from fedllm.site.holdout import split_key_path, split_records
from tests.helpers import REPO, write_jsonl

TINY = "tiny-random-llama"


def _site(folder: Path, text: str, name: str = "site.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "sites" / "data" / "train.jsonl",
                       [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(20)])


# ---------------------------------------------------------------------------------- the file


def test_relative_paths_resolve_from_the_file_folder_and_defaults_are_fixed_at_the_site(
        tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _site(tmp_path / "sites", 'site-name = "cardiology"\ndata-path = "data/train.jsonl"\nmax-epsilon = 8.0\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    site_file = load_site_file(Path(os.path.relpath(path, elsewhere)))
    folder = tmp_path / "sites"
    assert site_file.path == path
    assert site_file.site == SiteConfig(name="cardiology", data_path=str(data), max_epsilon=8.0,
                                        ledger_path=str(folder / "ledgers" / "cardiology.json"))
    conn = site_file.connection
    assert (conn.server, conn.root_certificates, conn.auth_key, conn.runtime_port) == ("", "", "", 0)
    assert conn.state_dir == str(folder / ".fedllm-site" / "cardiology")


def test_connection_table_is_read_and_its_paths_resolved(tmp_path: Path, data: Path) -> None:
    keys = tmp_path / "sites" / "keys"
    keys.mkdir(parents=True)
    (keys / "ca.crt").write_text("x")
    (keys / "node").write_text("x")
    path = _site(tmp_path / "sites", '''site-name = "a"\ndata-path = "data/train.jsonl"\nmax-epsilon = 8.0\nledger-path = "../l/a.json"
[connection]
server = "coordinator.example.org:9092"
root-certificates = "keys/ca.crt"
auth-key = "keys/node"
runtime-port = 9094
state-dir = "state"
''')
    site_file = load_site_file(path)
    assert site_file.site.ledger_path == str(tmp_path / "l" / "a.json")
    conn = site_file.connection
    assert conn.server == "coordinator.example.org:9092"
    assert conn.root_certificates == str(keys / "ca.crt")
    assert conn.auth_key == str(keys / "node")
    assert conn.runtime_port == 9094
    assert conn.state_dir == str(tmp_path / "sites" / "state")


def test_every_problem_is_reported_at_once_with_key_value_and_did_you_mean(tmp_path: Path) -> None:
    path = _site(tmp_path, '''site-nam = "a"
data-path = "missing.jsonl"
max-epsilon = -1
device = "gpu"
signing-key = "nokey.pem"
server = "x:1"
[connection]
server = "coordinator"
runtime-port = 70000
root-certificate = "ca.crt"
auth-key = "nokey"
ledger-path = "l.json"
''')
    with pytest.raises(ConfigError) as err:
        load_site_file(path)
    text = str(err.value)
    assert text.startswith(str(path))
    lines = [line for line in text.splitlines() if line.startswith("  - ")]
    expected = [
        "site-nam: unknown key (did you mean 'site-name'?)",
        "server: unknown key (it belongs in the [connection] table)",
        "connection.root-certificate: unknown key (did you mean 'root-certificates'?)",
        "connection.ledger-path: unknown key (it belongs at the top level",
        "site-name: required",
        "data-path = 'missing.jsonl' (resolved to",
        "max-epsilon = -1: must be a finite number > 0",
        "device = 'gpu': must be \"cpu\", \"cuda\", \"cuda:N\" or \"mps\"",
        "signing-key = 'nokey.pem' (resolved to",
        "connection.server = 'coordinator': must be \"HOST:PORT\"",
        "connection.runtime-port = 70000: must be an integer from 0 to 65535",
        "connection.auth-key = 'nokey' (resolved to",
    ]
    for piece in expected:
        assert any(piece in line for line in lines), f"{piece!r} not in:\n{text}"
    assert len(lines) == len(expected)


@pytest.mark.parametrize("name", ["../etc", "a b", ".hidden", "a/b", "", "ü"])
def test_site_name_must_be_usable_as_a_file_name(tmp_path: Path, data: Path, name: str) -> None:
    path = _site(tmp_path / "sites", f'site-name = {json.dumps(name)}\ndata-path = "data/train.jsonl"\nmax-epsilon = 8.0\n')
    with pytest.raises(ConfigError, match="site-name"):
        load_site_file(path)


@pytest.mark.parametrize(("server", "ok"), [
    ("", True), ("localhost:9092", True), ("10.0.0.1:1", True), ("[::1]:65535", True),
    ("localhost", False), (":9092", False), ("host:0", False), ("host:65536", False), ("::1:9092", False),
    ("host:port", False), ("[::1:9092", False),
])
def test_server_is_empty_or_host_colon_port(tmp_path: Path, data: Path, server: str, ok: bool) -> None:
    path = _site(tmp_path / "sites", f'site-name = "a"\ndata-path = "data/train.jsonl"\nmax-epsilon = 8.0\n[connection]\n'
                                     f'server = {json.dumps(server)}\n')
    if ok:
        assert load_site_file(path).connection.server == server
    else:
        with pytest.raises(ConfigError, match="connection.server"):
            load_site_file(path)


def test_missing_file_and_bad_toml_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "nope.toml"))):
        load_site_file(tmp_path / "nope.toml")
    bad = _site(tmp_path, 'site-name = "a\n')
    with pytest.raises(ConfigError, match=re.escape(str(bad)) + ".*not valid TOML"):
        load_site_file(bad)


@pytest.mark.parametrize("folder_name", ["plain", "with space", 'quote"double', "quote'single", "eq=uals ü"])
def test_node_config_survives_flowers_own_parser(tmp_path: Path, folder_name: str) -> None:
    from flwr.common.config import parse_config_args

    folder = tmp_path / folder_name
    data = write_jsonl(folder / "my data's \"file\".jsonl", [{"text": "hello"}])
    key = folder / "k e y.pem"
    key.write_text("not checked here")
    path = _site(folder, f'''site-name = "x.y-z_1"
data-path = {json.dumps(data.name)}
ledger-path = "ledger dir/x.json"
max-epsilon = 3
device = "cuda:1"
signing-key = {json.dumps(key.name)}
''')
    site_file = load_site_file(path)
    text = site_file.node_config()
    parsed = parse_config_args([text])
    assert parsed == {"site-name": "x.y-z_1", "data-path": str(data), "ledger-path": str(folder / "ledger dir" / "x.json"),
                      "max-epsilon": 3.0, "device": "cuda:1", "signing-key": str(key)}
    assert SiteConfig.from_node_config(parsed) == site_file.site


def test_node_config_leaves_out_defaults_and_round_trips(tmp_path: Path, data: Path) -> None:
    from flwr.common.config import parse_config_args

    site_file = load_site_file(_site(tmp_path / "sites", 'site-name = "a"\ndata-path = "data/train.jsonl"\nmax-epsilon = 8.0\n'))
    text = site_file.node_config()
    assert "device" not in text and "signing-key" not in text
    assert "max-epsilon" in text  # required: always written, never a default
    assert SiteConfig.from_node_config(parse_config_args([text])) == site_file.site


def test_template_has_every_key_and_loads_once_the_two_required_values_are_filled_in(tmp_path: Path, data: Path) -> None:
    template = (REPO / "sites" / "_template.toml").read_text(encoding="utf-8")
    for key in (*SITE_KEYS, *CONNECTION_KEYS):
        assert re.search(rf"^#? ?{re.escape(key)} = ", template, re.MULTILINE), key
    unfilled = _site(tmp_path / "sites", template, "unfilled.toml")
    with pytest.raises(ConfigError) as err:
        load_site_file(unfilled)
    assert "site-name: required" in str(err.value) and "data-path: required" in str(err.value)
    filled = template.replace('site-name = ""', 'site-name = "cardiology"', 1)
    filled = filled.replace('data-path = ""', 'data-path = "data/train.jsonl"', 1)
    site_file = load_site_file(_site(tmp_path / "sites", filled, "cardiology.toml"))
    assert site_file.site.name == "cardiology" and site_file.site.data_path == str(data)


def test_example_site_file_is_valid_except_its_data_path(tmp_path: Path) -> None:
    copy = tmp_path / "example-hospital.toml"
    shutil.copy(REPO / "sites" / "example-hospital.toml", copy)
    with pytest.raises(ConfigError) as err:
        load_site_file(copy)
    problems = [line for line in str(err.value).splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and problems[0].startswith("  - data-path = '/srv/fedllm/example-hospital/train.jsonl'")
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": "x"}])
    copy.write_text(copy.read_text().replace("/srv/fedllm/example-hospital/train.jsonl", str(data)))
    site_file = load_site_file(copy)
    assert site_file.site.max_epsilon == 4.0 and site_file.connection.server == "coordinator.example.org:9092"


# ---------------------------------------------------------------------------------- site check


def _by_name(report) -> dict:
    return {check.name: check for check in report.checks}


def _text_site(tmp_path: Path, lengths: list[int], extra: str = "") -> Path:
    write_jsonl(tmp_path / "sites" / "text.jsonl", [{"text": "x" * n} for n in lengths])
    cap = "" if "max-epsilon" in extra else "max-epsilon = 8.0\n"
    return _site(tmp_path / "sites", f'site-name = "alpha"\ndata-path = "text.jsonl"\n{cap}{extra}')


def test_check_reports_records_split_and_token_lengths(tmp_path: Path) -> None:
    lengths = list(range(10, 60))  # the byte tokenizer: n ASCII characters + EOS = n + 1 tokens
    site_file = load_site_file(_text_site(tmp_path, lengths))
    key_file = split_key_path(site_file.site.ledger_path, "alpha")  # the site's split key, beside its ledger
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text("ab" * 32 + "\n")
    report = check_site(site_file, model=TINY, max_length=40, data_format="auto", sample=200)
    checks = _by_name(report)
    assert checks["data"].values["records"] == 50
    split = split_records([{"text": "x" * n} for n in lengths], key=bytes.fromhex("ab" * 32), eval_fraction=0.1,
                          max_eval=64)  # the site's defaults
    assert (checks["split"].values["train"], checks["split"].values["held-out"]) == (
        len(split.train), len(split.held_out))
    assert len(split.held_out) >= 1 and len(split.train) + len(split.held_out) == 50
    assert checks["split"].status == OK
    tokens = checks["tokens"].values
    assert (tokens["sampled"], tokens["min"], tokens["max"]) == (50, 11, 60)
    assert tokens["truncated"] == sum(n + 1 > 40 for n in lengths) == 20
    assert tokens["p95"] == 58  # nearest rank: the 48th of 50 sorted lengths 11..60
    assert checks["tokens"].status == WARNING
    assert report.ok
    assert _by_name(check_site(site_file, model=TINY, max_length=256, data_format="auto", sample=200))[
        "tokens"].status == OK


def test_sample_is_evenly_spaced_deterministic_and_bounded() -> None:
    assert sample_indices(1000, 4) == [0, 250, 500, 750]
    assert sample_indices(3, 200) == [0, 1, 2]
    assert sample_indices(5, 0) == []
    assert len(set(sample_indices(201, 200))) == 200


def test_truncation_keeps_responses_and_a_record_without_response_tokens_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedllm.data import formatting

    records = [{"instruction": "q" * 200, "output": "a"}, *({"instruction": "q", "output": "a"} for _ in range(9))]
    write_jsonl(tmp_path / "sites" / "d.jsonl", records)
    site_file = load_site_file(_site(tmp_path / "sites", 'site-name = "a"\ndata-path = "d.jsonl"\nmax-epsilon = 8.0\n'))
    tokens = _by_name(check_site(site_file, model=TINY, max_length=64, sample=200))["tokens"]
    assert tokens.status == WARNING and tokens.values["truncated"] == 1 and tokens.values["no-response-tokens"] == []

    real = formatting.tokenize_record

    def no_response_for_long_prompts(record, tokenizer, *, max_length):  # a template that loses the response
        example = real(record, tokenizer, max_length=max_length)
        if len(record["messages"][0]["content"]) > 100:
            return formatting.TokenizedExample(example.input_ids, (formatting.IGNORE_INDEX,) * len(example.labels))
        return example

    monkeypatch.setattr(formatting, "tokenize_record", no_response_for_long_prompts)
    report = check_site(site_file, model=TINY, max_length=64, sample=200)
    tokens = _by_name(report)["tokens"]
    assert tokens.status == FAILED and tokens.values["no-response-tokens"] == [1]
    assert "record(s) 1 keep no response token" in tokens.detail
    assert not report.ok


def test_fewer_training_records_than_the_batch_size_is_a_warning(tmp_path: Path) -> None:
    site_file = load_site_file(_text_site(tmp_path, [5, 6, 7, 8, 9]))
    report = check_site(site_file, model=TINY, max_length=256, data_format="auto", sample=200)
    split = _by_name(report)["split"]
    assert split.status == WARNING and "q would be 1" in split.detail.replace("sample rate ", "")
    assert report.ok  # warnings do not fail the check


def _site_ledger(site_file) -> PrivacyLedger:
    """The site's ledger as the site opens it: bound to its training subset under its own split."""
    from fedllm.site.holdout import policy_for, site_split_key
    from fedllm.site.runtime import training_fingerprint

    site = site_file.site
    key = site_split_key(site.ledger_path, site.name)
    return PrivacyLedger.open(site.ledger_path, site=site.name, held_out_split=policy_for(site, key).to_json(),
                              dataset_fingerprint=training_fingerprint(site, load_records(site.data_path), key))


def test_an_older_ledger_or_a_changed_split_fails_the_check(tmp_path: Path) -> None:
    site_file = load_site_file(_text_site(tmp_path, list(range(10, 40)), 'max-epsilon = 3\n'))
    records = load_records(site_file.site.data_path)
    old = PrivacyLedger.open(site_file.site.ledger_path, site="alpha", dataset_fingerprint=dataset_fingerprint(records))
    old.record(run_id="r", server_round=1, steps=5, sample_rate=0.1, noise_multiplier=2.0, max_grad_norm=1.0,
               target_delta=1e-5, num_examples=30)  # bound to the whole file, no split recorded
    ledger = _by_name(check_site(site_file, model=TINY, max_length=64, sample=5))["ledger"]
    assert ledger.status == FAILED and "written before sites owned their held-out split" in ledger.detail
    Path(site_file.site.ledger_path).unlink()
    _site_ledger(site_file).record(run_id="r", server_round=1, steps=5, sample_rate=0.1, noise_multiplier=2.0,
                                   max_grad_norm=1.0, target_delta=1e-5, num_examples=27)
    assert _by_name(check_site(site_file, model=TINY, max_length=64, sample=5))["ledger"].status == OK
    changed = load_site_file(_text_site(tmp_path, list(range(10, 40)), 'max-epsilon = 3\neval-fraction = 0.3\n'))
    ledger = _by_name(check_site(changed, model=TINY, max_length=64, sample=5))["ledger"]
    assert ledger.status == FAILED and "eval-fraction 0.1 when the ledger was written, now 0.3" in ledger.detail


def test_ledger_absent_verified_and_for_other_data(tmp_path: Path) -> None:
    site_file = load_site_file(_text_site(tmp_path, [20] * 12, 'max-epsilon = 3\n'))
    ledger = _by_name(check_site(site_file, model=TINY, max_length=64, sample=5))["ledger"]
    assert ledger.status == OK and "a new ledger will be created" in ledger.detail
    book = _site_ledger(site_file)
    book.record(run_id="r", server_round=1, steps=5, sample_rate=0.1, noise_multiplier=2.0, max_grad_norm=1.0,
                target_delta=1e-5, num_examples=11)
    ledger = _by_name(check_site(site_file, model=TINY, max_length=64, sample=5))["ledger"]
    assert ledger.status == OK and ledger.values["entries"] == 1 and ledger.values["cap"] == 3.0
    assert 0 < ledger.values["epsilon"] < 3
    write_jsonl(Path(site_file.site.data_path), [{"text": "other"}] * 12)  # the data changed under the ledger
    report = check_site(site_file, model=TINY, max_length=64, sample=5)
    assert _by_name(report)["ledger"].status == FAILED and not report.ok


def test_a_spent_budget_is_a_warning(tmp_path: Path) -> None:
    site_file = load_site_file(_text_site(tmp_path, [20] * 12, 'max-epsilon = 0.5\n'))
    book = _site_ledger(site_file)
    book.record(run_id="r", server_round=1, steps=50, sample_rate=0.5, noise_multiplier=0.8, max_grad_norm=1.0,
                target_delta=1e-5, num_examples=11)
    ledger = _by_name(check_site(site_file, model=TINY, max_length=64, sample=5))["ledger"]
    assert ledger.status == WARNING and "budget is spent" in ledger.detail


def test_keys_and_certificates_are_parsed_as_flower_parses_them(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedllm.deploy.certs import create_dev_pki
    from fedllm.privacy.signing import generate_signing_key

    create_dev_pki(tmp_path / "sites" / "certs", server_names=[], sites=["alpha"])
    generate_signing_key(tmp_path / "sites" / "keys", site="alpha")
    good = '[connection]\nroot-certificates = "certs/ca.crt"\nauth-key = "certs/sites/alpha"\n'
    site_file = load_site_file(_text_site(tmp_path, [5] * 10, f'signing-key = "keys/alpha.key"\n{good}'))
    checks = _by_name(check_site(site_file, model=TINY, max_length=64, sample=5))
    assert [checks[n].status for n in ("signing key", "root certificates", "auth key")] == [OK, OK, OK]

    unset = _by_name(check_site(load_site_file(_text_site(tmp_path, [5] * 10)), model=TINY, max_length=64, sample=5))
    assert unset["root certificates"].status == WARNING and "--insecure" in unset["root certificates"].detail
    assert unset["auth key"].status == WARNING

    pem_key = tmp_path / "sites" / "pem-key"  # what `ssh-keygen -m PEM` writes: Flower cannot load it
    pem_key.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    pem_key.chmod(0o600)
    (tmp_path / "sites" / "garbage.crt").write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    bad = ('signing-key = "certs/ca.key"\n[connection]\nroot-certificates = "garbage.crt"\nauth-key = "pem-key"\n')
    report = check_site(load_site_file(_text_site(tmp_path, [5] * 10, bad)), model=TINY, max_length=64, sample=5)
    checks = _by_name(report)
    assert [checks[n].status for n in ("signing key", "root certificates", "auth key")] == [FAILED] * 3
    assert "ssh-keygen -t ecdsa" in checks["auth key"].detail
    assert not report.ok


def test_check_opens_no_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedllm.deploy.certs import create_dev_pki

    create_dev_pki(tmp_path / "sites" / "certs", server_names=[], sites=["alpha"])
    site_file = load_site_file(_text_site(
        tmp_path, [5] * 10, '[connection]\nserver = "127.0.0.1:9092"\nroot-certificates = "certs/ca.crt"\n'
                            'auth-key = "certs/sites/alpha"\n'))

    def refuse(*args, **kwargs):
        raise AssertionError("fedllm site check opened a network connection")

    for name in ("connect", "connect_ex", "sendto", "bind"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    report = check_site(site_file, model=TINY, max_length=64, sample=5)
    assert report.ok and len(report.checks) == 10


def _run_cli(argv: list[str]) -> int:
    """``fedllm site check ARGV`` as the CLI parses it, with errors raised instead of mapped to exit 2."""
    args = build_parser().parse_args(["site", "check", *argv])
    assert args.func is cmd_site_check
    return args.func(args)


def test_command_exit_codes_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _text_site(tmp_path, [5] * 12)
    assert _run_cli([str(path), "--model", TINY, "--sample", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Site 'alpha'") and out[-1].startswith("OK: the site is ready")
    assert any(re.match(r"warning\s+auth key", line) for line in out)
    assert _run_cli([str(path), "--model", TINY, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["site"] == "alpha"
    assert [c["check"] for c in data["checks"]] == ["site file", "device", "data", "split", "privacy policy", "tokens",
                                                    "signing key", "ledger", "root certificates", "auth key"]
    (tmp_path / "sites" / "bad.crt").write_text("not a certificate")
    failing = _site(tmp_path / "sites", 'site-name = "alpha"\ndata-path = "text.jsonl"\nmax-epsilon = 8.0\n[connection]\n'
                                        'root-certificates = "bad.crt"\n', "failing.toml")
    assert _run_cli([str(failing), "--model", TINY]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_bad_data_and_bad_file_raise_for_exit_code_2(tmp_path: Path) -> None:
    path = _text_site(tmp_path, [5] * 3)
    with open(tmp_path / "sites" / "text.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"text": 3}\n')
    with pytest.raises(DataError, match=r"record 4 \(line 4\).*'text'"):
        _run_cli([str(path), "--model", TINY])
    with pytest.raises(ConfigError):
        _run_cli([str(tmp_path / "missing.toml"), "--model", TINY])


def test_a_site_with_its_own_columns_and_a_saved_dataset_folder(tmp_path: Path) -> None:
    """data-columns travels in the node config; site check (and the site) read the data with it;
    data-path may be a datasets save_to_disk folder."""
    from flwr.common.config import parse_config_args

    datasets = pytest.importorskip("datasets")
    rows = [{"question": f"Question {i}?", "answer": f"Answer {i}."} for i in range(20)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "sites" / "qa"))
    site_file = load_site_file(_site(tmp_path / "sites", 'site-name = "a"\ndata-path = "qa"\nmax-epsilon = 8.0\n'
                                     'data-columns = "instruction=question, output=answer"\n'))
    assert site_file.site.data_columns == "instruction=question, output=answer"
    assert SiteConfig.from_node_config(parse_config_args([site_file.node_config()])) == site_file.site
    report = check_site(site_file, model=TINY, max_length=64, sample=5)
    assert report.ok and _by_name(report)["data"].values["records"] == 20
    with pytest.raises(ConfigError, match="data-columns = 'instruction=question, outptu=answer': unknown field 'outptu'"):
        load_site_file(_site(tmp_path / "sites", 'site-name = "a"\ndata-path = "qa"\nmax-epsilon = 8.0\n'
                             'data-columns = "instruction=question, outptu=answer"\n', "bad.toml"))
