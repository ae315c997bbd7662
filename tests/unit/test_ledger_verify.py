"""Ledger integrity: every kind of tampering is found and the right entry (1-based) named; a ledger
moved to other data is found by ``verify_ledger`` and refused by the site; signatures verify and a
wrong key fails; ``fedllm ledger verify``/``keygen`` exit codes 0/1/2.

The attacker below re-hashes a ledger from the format as documented (canonical JSON, SHA-256), not
with fedllm's own functions: what an attacker without the site's key can do, and a check that the
documented format is the implemented one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from fedllm.cli.main import main
from fedllm.data.fingerprint import dataset_fingerprint
from fedllm.data.loading import load_records
from fedllm.errors import LedgerError
from fedllm.privacy.accounting import DPEvent, epsilon_for
from fedllm.privacy.ledger import PrivacyLedger, verify_ledger
from fedllm.privacy.signing import Ed25519PrivateKey, key_id
from tests.helpers import edit_json, record_release, write_jsonl

RECORDS = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(6)]
STEPS = (25, 30, 35)  # one release per round, all different so that no two entries are alike


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "site.jsonl", RECORDS)


@pytest.fixture
def fingerprint(data_file: Path) -> str:
    return dataset_fingerprint(load_records(data_file))


def _make_ledger(path: Path, fingerprint: str, key: Ed25519PrivateKey | None = None) -> Path:
    ledger = PrivacyLedger.open(path, site="cardiology", dataset_fingerprint=fingerprint, signing_key=key)
    for server_round, steps in enumerate(STEPS, start=1):
        record_release(ledger, server_round=server_round, steps=steps)
    return path


@pytest.fixture
def ledger(tmp_path: Path, fingerprint: str) -> Path:
    return _make_ledger(tmp_path / "cardiology.json", fingerprint)


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def signed(tmp_path: Path, fingerprint: str, key: Ed25519PrivateKey) -> Path:
    return _make_ledger(tmp_path / "signed.json", fingerprint, key)


def _sha(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
                          .encode("ascii")).hexdigest()


def _attacker_rehash(data: dict) -> None:
    """Recompute every prev-hash, entry-hash and the head as documented, without any key."""
    prev = _sha({"format": data["format"], "site": data["site"], "dataset-fingerprint": data["dataset-fingerprint"]})
    for entry in data["entries"]:
        entry["prev-hash"] = prev
        entry["entry-hash"] = prev = _sha({k: v for k, v in entry.items() if k not in ("entry-hash", "signature")})
    data["head"] = {"entries": len(data["entries"]), "entry-hash": prev}


def test_an_intact_ledger_verifies(ledger, fingerprint):
    result = verify_ledger(ledger, dataset_fingerprint=fingerprint)
    assert result.ok and result.problems == [] and result.first_bad_entry is None
    assert (result.entries, result.site, result.version) == (3, "cardiology", 2)
    assert result.dataset_fingerprint == fingerprint
    assert not result.signed and not result.signature_checked and result.key_id == ""
    expected = epsilon_for([DPEvent(1.0, 0.008, sum(STEPS))], target_delta=1e-5)
    assert result.final_epsilon == pytest.approx(expected, rel=1e-12) == result.recorded_epsilon
    assert (result.target_delta, result.accountant) == (1e-5, "prv")


def test_the_documented_hash_format_is_the_implemented_one(ledger):
    before = json.loads(ledger.read_text())
    after = copy.deepcopy(before)
    _attacker_rehash(after)
    assert after == before


def _delete(index):
    return lambda d: d["entries"].pop(index)


def _swap(d):
    d["entries"][1], d["entries"][2] = d["entries"][2], d["entries"][1]


def _attacker_edits_epsilon(d):
    d["entries"][1]["epsilon"] = d["entries"][1]["epsilon"] / 2  # halve the recorded spend of entry 2
    _attacker_rehash(d)


@pytest.mark.parametrize(
    ("tamper", "first_bad", "message"),
    [
        (lambda d: d["entries"][1].update(steps=26), 2, "entry 2: its content does not match its entry-hash"),
        (lambda d: d["entries"][1].update(noise_multiplier=1.5), 2, "entry 2: its content does not match"),
        (lambda d: d["entries"][1].update(run_id="run-b"), 2, "entry 2: its content does not match its entry-hash"),
        (_delete(1), 2, "entry 2: its prev-hash does not match the entry-hash of entry 1"),
        (_delete(0), 1, "entry 1: its prev-hash does not match the ledger header"),
        (_delete(2), 3, "entry 3 is missing: the header records 3 entries, the file has 2"),
        (lambda d: d["entries"].insert(1, copy.deepcopy(d["entries"][0])), 2, "entry 2 is a copy of entry 1"),
        (lambda d: d["entries"].append(copy.deepcopy(d["entries"][2])), 4, "entry 4 is a copy of entry 3"),
        (_swap, 2, "entry 2: its prev-hash does not match the entry-hash of entry 1"),
        (_attacker_edits_epsilon, 2, "entry 2: its cumulative ε"),
        (lambda d: d.update(site="oncology"), 1, "entry 1: its prev-hash does not match the ledger header"),
    ],
    ids=["edit-steps", "edit-sigma", "edit-run-id", "delete-middle", "delete-first", "delete-last", "insert-copy",
         "append-copy", "swap", "rehashed-epsilon", "rename-site"],
)
def test_each_kind_of_tampering_is_found_and_the_entry_named(ledger, tamper, first_bad, message):
    edit_json(ledger, tamper)
    result = verify_ledger(ledger)
    assert not result.ok
    assert result.first_bad_entry == first_bad, result.problems
    assert any(p.startswith(message) for p in result.problems), result.problems


def test_a_consistently_rehashed_epsilon_is_caught_only_by_the_recomputation(ledger):
    edit_json(ledger, _attacker_edits_epsilon)
    result = verify_ledger(ledger)
    assert len(result.problems) == 1, result.problems  # the chain itself is consistent again
    assert result.problems[0].startswith("entry 2: its cumulative ε 0.2") and "recomputed from the recorded " \
        "parameters of entries 1–2 (prv, δ=1e-05)" in result.problems[0]
    assert result.final_epsilon == pytest.approx(result.recorded_epsilon, rel=1e-12)  # entry 3 was left alone


def test_a_rehashed_header_fingerprint_is_caught_when_the_data_is_given(ledger, fingerprint, tmp_path):
    other = dataset_fingerprint(RECORDS[:-1])  # one record removed
    edit_json(ledger, lambda d: d["entries"][0].update({"dataset-fingerprint": other}))
    naive = verify_ledger(ledger)
    assert naive.first_bad_entry == 1 and any("its dataset fingerprint" in p for p in naive.problems)

    def move(d):
        d["dataset-fingerprint"] = other
        for entry in d["entries"]:
            entry["dataset-fingerprint"] = other
        _attacker_rehash(d)

    edit_json(ledger, move)
    assert verify_ledger(ledger).ok  # unsigned and re-hashed: consistent in itself (docs/privacy.md says so)
    result = verify_ledger(ledger, dataset_fingerprint=fingerprint)
    assert not result.ok and result.first_bad_entry == 1
    assert result.problems == [f"entry 1: the ledger is bound to the dataset {other}, but the given data has the "
                               f"fingerprint {fingerprint}: this ledger was not written for this data"]


def test_a_ledger_presented_with_other_data_fails(ledger, tmp_path):
    edited = [*RECORDS[:-1], {"instruction": "Question 5?", "output": "Answer five."}]
    other = dataset_fingerprint(load_records(write_jsonl(tmp_path / "other.jsonl", edited)))
    result = verify_ledger(ledger, dataset_fingerprint=other)
    assert not result.ok and result.first_bad_entry == 1 and other in result.problems[0]


def test_the_fingerprint_depends_on_the_data_only():
    shuffled = list(reversed(RECORDS))
    assert dataset_fingerprint(shuffled) == dataset_fingerprint(RECORDS)
    assert dataset_fingerprint(RECORDS + RECORDS[:1]) != dataset_fingerprint(RECORDS)  # a duplicate counts
    assert dataset_fingerprint([{**RECORDS[0], "output": "Answer 0!"}, *RECORDS[1:]]) != dataset_fingerprint(RECORDS)
    assert dataset_fingerprint(RECORDS).startswith("sha256:") and len(dataset_fingerprint(RECORDS)) == 71


def test_the_fingerprint_does_not_depend_on_the_file_type(tmp_path, data_file):
    import csv

    with open(tmp_path / "site.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["instruction", "output"])
        writer.writeheader()
        writer.writerows(RECORDS)
    assert dataset_fingerprint(load_records(tmp_path / "site.csv")) == dataset_fingerprint(load_records(data_file))


# -- signatures --------------------------------------------------------------------------------------------


def test_a_signed_ledger_verifies_with_the_sites_key(signed, key, fingerprint):
    result = verify_ledger(signed, public_key=key.public_key(), dataset_fingerprint=fingerprint)
    assert result.ok, result.problems
    assert result.signed and result.signature_checked and result.key_id == key_id(key)
    alone = verify_ledger(signed)  # consistency with the key in the file only
    assert alone.ok and alone.signed and not alone.signature_checked


def test_a_wrong_public_key_fails(signed):
    other = Ed25519PrivateKey.generate()
    result = verify_ledger(signed, public_key=other.public_key())
    assert not result.ok and result.first_bad_entry == 1 and result.signature_checked
    assert result.problems == [f"entry 1 is signed with key {key_id(signed_key_of(signed))}, not with the given key "
                               f"{key_id(other)}: this ledger was not signed by that site"]


def signed_key_of(path: Path) -> str:
    return json.loads(path.read_text())["public-key"]


def test_an_unsigned_ledger_fails_when_a_key_is_expected(ledger, key):
    result = verify_ledger(ledger, public_key=key.public_key())
    assert not result.ok and result.first_bad_entry == 1 and "entry 1 is not signed" in result.problems[0]


def test_an_unsigned_entry_in_a_signed_ledger_fails(signed, key):
    edit_json(signed, lambda d: d["entries"][2].pop("signature"))
    result = verify_ledger(signed, public_key=key.public_key())
    assert not result.ok and result.first_bad_entry == 3
    assert result.problems == ["entry 3 is not signed, but entry 1 before it is: it was added or altered by someone "
                               "without the site's key"]


def test_an_attacker_without_the_key_cannot_rehash_a_signed_ledger(signed, key):
    def edit(d):
        d["entries"][1]["noise_multiplier"] = 2.0
        _attacker_rehash(d)

    edit_json(signed, edit)
    result = verify_ledger(signed, public_key=key.public_key())
    assert not result.ok and result.first_bad_entry == 2
    assert any(p.startswith("entry 2: its signature does not verify") for p in result.problems)
    assert any(p.startswith("the header's head-signature does not verify") for p in result.problems)


def test_an_appended_entry_in_a_signed_ledger_fails(signed, key):
    def append(d):
        extra = copy.deepcopy(d["entries"][2])
        extra.pop("signature")
        extra.update(server_round=4, run_id="run-b")
        d["entries"].append(extra)
        _attacker_rehash(d)
        for entry, original in zip(d["entries"][:3], json.loads(signed.read_text())["entries"]):
            entry["signature"] = original["signature"]  # unchanged entries keep their valid signatures

    edit_json(signed, append)
    result = verify_ledger(signed, public_key=key.public_key())
    assert not result.ok and result.first_bad_entry == 4
    assert ("entry 4 is not signed, but entry 1 before it is: it was added or altered by someone without the "
            "site's key") in result.problems
    assert result.problems[0].startswith("the header's head-signature does not verify")


def test_a_ledger_re_signed_with_another_key_fails_against_the_sites_key(signed, key):
    from fedllm.privacy.signing import public_key_text, sign

    forger = Ed25519PrivateKey.generate()

    def resign(d):
        d["entries"][0]["steps"] = 1
        _attacker_rehash(d)
        d["public-key"] = public_key_text(forger)
        for entry in d["entries"]:
            entry["signature"] = sign(forger, b"fedllm-privacy-ledger/v2 entry " + entry["entry-hash"].encode())
        head = {"site": d["site"], "entries": d["head"]["entries"], "entry-hash": d["head"]["entry-hash"]}
        d["head-signature"] = sign(forger, b"fedllm-privacy-ledger/v2 head " +
                                   json.dumps(head, sort_keys=True, separators=(",", ":")).encode())

    edit_json(signed, resign)
    assert [p for p in verify_ledger(signed).problems if "signature" in p] == []  # consistent with its own key
    result = verify_ledger(signed, public_key=key.public_key())
    assert not result.ok and result.first_bad_entry == 1 and "not with the given key" in result.problems[0]


# -- the site refuses a ledger of other data ---------------------------------------------------------------


def test_the_site_refuses_a_ledger_written_for_other_data(tmp_path, data_file, fingerprint, key):
    from fedllm.config import RunConfig, SiteConfig
    from fedllm.privacy.signing import generate_signing_key
    from fedllm.site.runtime import SiteRuntime

    config = RunConfig.from_flat({"model.name": "tiny-random-llama", "data.max-length": 64, "train.local-steps": 1,
                                  "train.batch-size": 2, "privacy.noise-multiplier": 1.0})
    private, public = generate_signing_key(tmp_path / "keys", site="cardiology")
    from fedllm.site.holdout import load_or_create_split_key, policy_for, split_key_path

    # eval-fraction 0: the training subset is the whole file (the ``fingerprint`` fixture)
    site = SiteConfig(name="cardiology", data_path=str(data_file), max_epsilon=8.0, signing_key=str(private),
                      eval_fraction=0.0)
    other = dataset_fingerprint(RECORDS[:3])
    split = policy_for(site, load_or_create_split_key(split_key_path(tmp_path / "wrong.json", "cardiology")))
    wrong = tmp_path / "wrong.json"  # under the site's own split policy, but for other data
    ledger = PrivacyLedger.open(wrong, site="cardiology", dataset_fingerprint=other, held_out_split=split.to_json())
    record_release(ledger)
    with pytest.raises(LedgerError) as info:
        SiteRuntime(config, site, ledger_path=wrong)
    assert fingerprint in str(info.value) and other in str(info.value) and "Refusing to train" in str(info.value)

    runtime = SiteRuntime(config, site, ledger_path=tmp_path / "right.json")
    assert runtime.dataset_fingerprint == fingerprint
    from fedllm.model.lora import get_adapter_state

    runtime.train_round(run_id="r", server_round=1, adapter=get_adapter_state(runtime.model, trainable_only=True))
    result = verify_ledger(tmp_path / "right.json", public_key=public, dataset_fingerprint=fingerprint)
    assert result.ok and result.entries == 1 and result.signature_checked, result.problems


# -- the command line --------------------------------------------------------------------------------------


def test_verify_exits_0_when_everything_checks(signed, tmp_path, key, data_file, capsys):
    from cryptography.hazmat.primitives import serialization

    pem = tmp_path / "site.pub"
    pem.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    assert main(["ledger", "verify", str(signed), "--public-key", str(pem), "--data", str(data_file)]) == 0
    out = capsys.readouterr().out
    assert "OK: hash chain intact" in out and key_id(key) in out and "checked against the given public key" in out
    assert main(["ledger", "verify", str(signed), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["entries"] == 3 and report["signed"] and not report["signature-checked"]


def test_verify_exits_1_and_names_the_first_bad_entry(ledger, tmp_path, capsys):
    edit_json(ledger, _swap)
    assert main(["ledger", "verify", str(ledger)]) == 1
    out = capsys.readouterr().out
    assert "FAILED: first bad entry: 2 (entries are numbered from 1)" in out
    assert "  - entry 2: its prev-hash does not match the entry-hash of entry 1" in out
    assert main(["ledger", "verify", str(ledger), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["first-bad-entry"] == 2


def test_verify_exits_1_on_other_data(ledger, tmp_path, capsys):
    other = write_jsonl(tmp_path / "other.jsonl", RECORDS[:-1])
    assert main(["ledger", "verify", str(ledger), "--data", str(other)]) == 1
    assert "first bad entry: 1" in capsys.readouterr().out


def test_verify_exits_1_on_a_version_1_ledger(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "fedllm-privacy-ledger", "version": 1, "site": "s", "entries": []}))
    assert main(["ledger", "verify", str(old)]) == 1
    assert "version 1 ledger: it has no hash chain" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["missing", "not-json", "other-format", "bad-key", "missing-data"])
def test_verify_exits_2_on_unreadable_input(ledger, tmp_path, damage, capsys):
    args = ["ledger", "verify", str(ledger)]
    if damage == "missing":
        args[2] = str(tmp_path / "nope.json")
    elif damage == "not-json":
        ledger.write_text(ledger.read_text()[:100])
    elif damage == "other-format":
        ledger.write_text('{"format": "something-else"}')
    elif damage == "bad-key":
        (tmp_path / "bad.pub").write_text("not a key")
        args += ["--public-key", str(tmp_path / "bad.pub")]
    else:
        args += ["--data", str(tmp_path / "nope.jsonl")]
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("fedllm: error:")


def test_keygen_writes_a_private_key_only_the_owner_can_read(tmp_path, fingerprint, capsys):
    assert main(["ledger", "keygen", "--out", str(tmp_path / "keys"), "--site", "cardiology"]) == 0
    private, public = tmp_path / "keys" / "cardiology.key", tmp_path / "keys" / "cardiology.pub"
    if os.name == "posix":
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert "signing-key=" in capsys.readouterr().out
    from fedllm.privacy.signing import load_private_key

    path = _make_ledger(tmp_path / "l.json", fingerprint, load_private_key(private))
    assert main(["ledger", "verify", str(path), "--public-key", str(public)]) == 0
    assert main(["ledger", "keygen", "--out", str(tmp_path / "keys"), "--site", "cardiology"]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_ledger_show_says_what_the_ledger_is_bound_to_and_who_signed_it(signed, key, fingerprint, capsys):
    assert main(["ledger", "show", str(signed)]) == 0
    out = capsys.readouterr().out
    assert f"dataset: {fingerprint}" in out and f"signed by {key_id(key)}" in out and "chain of 3 entries intact" in out
    edit_json(signed, _swap)
    assert main(["ledger", "show", str(signed)]) == 2
    assert "hash chain is broken" in capsys.readouterr().err


def test_the_site_signing_key_is_a_node_config_key(tmp_path):
    from fedllm.config import SiteConfig
    from fedllm.errors import ConfigError
    from fedllm.privacy.signing import generate_signing_key

    private, _ = generate_signing_key(tmp_path, site="cardiology")
    node = {"site-name": "cardiology", "data-path": "/data/c.jsonl", "max-epsilon": 8.0, "signing-key": str(private)}
    site = SiteConfig.from_node_config(node)
    assert site.signing_key == str(private) and SiteConfig.from_dict(site.to_dict()) == site
    assert SiteConfig.from_node_config({**node, "signing-key": ""}).signing_key == ""
    with pytest.raises(ConfigError, match="signing-key = .*no such file; create a key with 'fedllm ledger keygen"):
        SiteConfig.from_node_config({**node, "signing-key": str(tmp_path / "missing.key")})
    with pytest.raises(ConfigError, match="signing-kye.*did you mean 'signing-key'"):
        SiteConfig.from_node_config({"site-name": "c", "data-path": "/d.jsonl", "max-epsilon": 8.0, "signing-kye": str(private)})
