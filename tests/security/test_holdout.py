"""Issue 13, finding 2: the coordinator chose which records go unprotected (held out, evaluated
without noise) through run settings (``data.eval-fraction`` up to 0.9, ``data.max-eval-examples``,
``data.seed``), and the positional split moved records whenever the file changed.

Now the split is the site's: its ``eval-fraction`` / ``max-eval-examples`` and a keyed hash of each
record's content with the site's split key beside its ledger. These tests are the attacks and
properties: a hostile run config cannot move a record; the old attack is refused with a message
saying the key is now the site's; the split is stable under reordering and insertion; the ledger
binds the training subset and the split policy, and refuses a changed split.
"""

from __future__ import annotations

import json
import os
import random
import stat

import pytest

from fedllm.config import RunConfig, SiteConfig
from fedllm.config.run import load_run_overrides, parse_set_option
from fedllm.data.fingerprint import dataset_fingerprint
from fedllm.data.loading import load_records
from fedllm.errors import ConfigError, LedgerError
from fedllm.model.lora import get_adapter_state
from fedllm.site.runtime import SiteRuntime
from tests.helpers import write_jsonl

RECORDS = [{"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(60)]
CONFIG = {"model.name": "tiny-random-llama", "data.max-length": 48, "train.local-steps": 1, "train.batch-size": 2,
          "privacy.noise-multiplier": 1.0, "lora.r": 2, "lora.alpha": 4}
KEY_HEX = "5a" * 32  # a fixed split key, so that the counts below are the same on every run
SITE_OWNED = ("data.eval-fraction", "data.max-eval-examples", "data.seed")

# The old attack (issue 13): most of the site's records held out, another seed to pick which.
OLD_ATTACK = {"data.eval-fraction": 0.9, "data.seed": 7}
# Hostile run configs: the removed keys (alone and together) and other run keys a coordinator controls.
HOSTILE = [
    OLD_ATTACK,
    {"data.eval-fraction": 0.5},
    {"data.max-eval-examples": 1000},
    {"data.max-eval-examples": 1},
    {"data.seed": 12345},
    {"lora.seed": 99, "num-server-rounds": 7, "train.batch-size": 1, "train.local-steps": 3},
    {"privacy.target-epsilon": 2.0, "privacy.noise-multiplier": 0.0, "strategy.fraction-evaluate": 1.0},
    {"data.format": "instruction", "train.eval-batch-size": 1, "simulation.client-cpus": 2},
]


def _ledger(folder):
    return folder / "ledger" / "cardiology.json"


def _with_key(folder):
    """The site's split key, written beside its ledger before the site first trains."""
    key = folder / "ledger" / "cardiology.split-key"
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text(KEY_HEX + "\n")
    return key


def _runtime(folder, data, *, site: dict | None = None, **overrides) -> SiteRuntime:
    config = RunConfig.from_flat({**CONFIG, **overrides})
    return SiteRuntime(config, SiteConfig(name="cardiology", data_path=str(data), max_epsilon=1000.0, **(site or {})),
                       ledger_path=_ledger(folder), simulated=False)


def _held_out_records(runtime: SiteRuntime) -> list[tuple[int, ...]]:
    """The held-out set as token sequences (sorted: which records, not their order)."""
    return sorted(ex.input_ids for ex in runtime.eval_examples)


def _train_one_round(runtime: SiteRuntime) -> None:
    runtime.train_round(run_id="run-1", server_round=1, adapter=get_adapter_state(runtime.model, trainable_only=True))


# ------------------------------------------------------------------------------- the run config


@pytest.mark.parametrize("key", SITE_OWNED)
def test_run_config_keys_that_chose_held_out_records_are_refused(key, tmp_path):
    value = {"data.eval-fraction": 0.9, "data.max-eval-examples": 1000, "data.seed": 7}[key]
    with pytest.raises(ConfigError, match=rf"{key} = .*no longer a run setting.*the site's own decision"):
        RunConfig.from_flat({key: value})
    with pytest.raises(ConfigError, match=rf"{key}"):  # through `--set KEY=VALUE` as `fedllm run` reads it
        RunConfig.from_flat(dict([parse_set_option(f"{key}={value}")]))
    section, name = key.split(".")
    run_toml = tmp_path / "run.toml"  # and in a scenario's run.toml
    run_toml.write_text(f"[{section}]\n{name} = {value}\n")
    with pytest.raises(ConfigError, match=rf"(?s)run.toml: .*{key} = "):
        load_run_overrides(run_toml)


def test_the_old_attack_is_refused_with_a_message_naming_the_site_setting():
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_flat(OLD_ATTACK)
    text = str(caught.value)
    assert "data.eval-fraction = 0.9" in text and "eval-fraction in the site file / sites.toml [[site]]" in text
    assert "data.seed = 7" in text and "split key" in text
    assert "data.eval-fraction" not in RunConfig().to_flat() and "data.seed" not in RunConfig().to_flat()


def test_no_run_config_moves_a_record_between_train_and_held_out(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    _with_key(tmp_path)
    baseline = _runtime(tmp_path, data)
    held, train = _held_out_records(baseline), sorted(ex.input_ids for ex in baseline.train_examples)
    assert 1 <= len(held) < len(RECORDS) // 2
    for hostile in HOSTILE:
        try:
            runtime = _runtime(tmp_path, data, **hostile)
        except ConfigError as exc:  # refused outright: the key is the site's
            assert any(key in str(exc) for key in SITE_OWNED), (hostile, exc)
            continue
        assert _held_out_records(runtime) == held, hostile
        assert sorted(ex.input_ids for ex in runtime.train_examples) == train, hostile
        assert runtime.dataset_fingerprint == baseline.dataset_fingerprint


# ---------------------------------------------------------------------------- the split itself


def test_the_split_is_stable_under_reordering_and_insertion(tmp_path):
    records = RECORDS * 1  # 60 records
    shuffled = records[:]
    random.Random(3).shuffle(shuffled)
    inserted = [*records[:30], {"instruction": "A new question?", "output": "A new answer."}, *records[30:]]
    sets = {}
    for name, rows in (("original", records), ("shuffled", shuffled), ("inserted", inserted)):
        folder = tmp_path / name
        folder.mkdir()
        _with_key(folder)  # the same site key in every copy
        runtime = _runtime(folder, write_jsonl(folder / "data.jsonl", rows))
        sets[name] = (set(_held_out_records(runtime)), {ex.input_ids for ex in runtime.train_examples})
    assert sets["shuffled"] == sets["original"]
    new_held, new_train = sets["inserted"]
    old_held, old_train = sets["original"]
    assert old_held <= new_held and old_train <= new_train  # no existing record moved
    assert len(new_held - old_held) + len(new_train - old_train) == 1  # only the new record is new


def test_duplicates_land_on_one_side_and_the_key_decides(tmp_path):
    from fedllm.site.holdout import split_records

    records = [{"text": f"record {i % 50}"} for i in range(200)]  # each content 4 times
    for key in (b"\x01" * 32, b"\x02" * 32, os.urandom(32)):
        split = split_records(records, key=key, eval_fraction=0.3)
        held = {records[i]["text"] for i in split.held_out}
        assert held.isdisjoint(records[i]["text"] for i in split.train)
    a = split_records(records, key=b"\x01" * 32, eval_fraction=0.3).held_out
    b = split_records(records, key=b"\x02" * 32, eval_fraction=0.3).held_out
    assert a != b  # without the site's key nobody can say which records are held out


def test_the_split_key_is_created_once_private_and_never_overwritten(tmp_path):
    from fedllm.site.holdout import load_or_create_split_key

    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    first = _runtime(tmp_path, data)
    key_file = tmp_path / "ledger" / "cardiology.split-key"
    text = key_file.read_text()
    assert len(text.strip()) == 64 and int(text, 16) >= 0
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert load_or_create_split_key(key_file) == bytes.fromhex(text.strip())
    again = _runtime(tmp_path, data)
    assert key_file.read_text() == text and _held_out_records(again) == _held_out_records(first)
    assert [p.name for p in key_file.parent.iterdir() if p.name.endswith(".tmp")] == []


# ------------------------------------------------------------------------------ the ledger binds it


def test_the_ledger_binds_the_training_subset_and_the_split_policy(tmp_path, capsys):
    from fedllm.cli.main import main
    from fedllm.site.holdout import split_key_id, split_records

    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    _with_key(tmp_path)
    runtime = _runtime(tmp_path, data)
    _train_one_round(runtime)
    document = json.loads(_ledger(tmp_path).read_text())
    records = load_records(data)
    assert document["dataset-fingerprint"] == runtime.dataset_fingerprint != dataset_fingerprint(records)
    assert len(runtime.train_examples) + len(runtime.eval_examples) == len(records)
    assert document["held-out-split"] == {"eval-fraction": 0.1, "max-eval-examples": 64,
                                          "split-key-id": split_key_id(bytes.fromhex(KEY_HEX))}
    assert KEY_HEX not in _ledger(tmp_path).read_text()  # only the key's id
    assert main(["ledger", "verify", str(_ledger(tmp_path)), "--data", str(data)]) == 0  # key found beside it
    other_key = tmp_path / "other.split-key"
    other_key.write_text("11" * 32)
    capsys.readouterr()
    assert main(["ledger", "verify", str(_ledger(tmp_path)), "--data", str(data), "--split-key", str(other_key)]) == 2
    assert "give the site's split key with --split-key" in capsys.readouterr().err
    split = split_records(records, key=bytes.fromhex(KEY_HEX), eval_fraction=0.1, max_eval=64)
    edited = [dict(r) for r in RECORDS]
    edited[split.train[0]]["output"] += " (edited)"  # a training record changed: not the data the ledger covers
    assert main(["ledger", "verify", str(_ledger(tmp_path)), "--data",
                 str(write_jsonl(tmp_path / "edited.jsonl", edited))]) == 1
    key = bytes.fromhex(KEY_HEX)
    added = next(row for row in ({"instruction": f"New {i}?", "output": "Yes."} for i in range(1000))
                 if split_records([*records, *load_records(write_jsonl(tmp_path / "one.jsonl", [row]))], key=key,
                                  eval_fraction=0.1, max_eval=64).held_out[-1] == len(records))
    # a record added that the site's key holds out: the training subset, and so the binding, is unchanged
    assert main(["ledger", "verify", str(_ledger(tmp_path)), "--data",
                 str(write_jsonl(tmp_path / "held.jsonl", [*RECORDS, added]))]) == 0


@pytest.mark.parametrize("change, says", [
    ({"site": {"eval_fraction": 0.3}}, "eval-fraction 0.1 when the ledger was written, now 0.3"),
    ({"site": {"max_eval_examples": 2}}, "max-eval-examples 64 when the ledger was written, now 2"),
    ({"key": "77" * 32}, "split key (id)"),
])
def test_a_site_whose_split_changed_refuses_to_train(tmp_path, change, says):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    key_file = _with_key(tmp_path)
    _train_one_round(_runtime(tmp_path, data))
    before = _ledger(tmp_path).read_bytes()
    if "key" in change:
        key_file.write_text(change["key"])
    with pytest.raises(LedgerError) as caught:
        _runtime(tmp_path, data, site=change.get("site"))
    text = str(caught.value)
    assert says in text and "Refusing to train" in text
    assert "new ledger-path: a new ledger is a new privacy history" in text
    assert _ledger(tmp_path).read_bytes() == before  # the ledger is unchanged


def test_a_missing_split_key_is_not_silently_replaced(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    key_file = _with_key(tmp_path)
    _train_one_round(_runtime(tmp_path, data))
    key_file.unlink()
    with pytest.raises(LedgerError, match="split key .* which is missing.*restore the key file from a backup"):
        _runtime(tmp_path, data)
    assert not key_file.exists()


def test_an_older_ledger_bound_to_the_whole_file_gets_a_clear_message(tmp_path):
    from fedllm.privacy.ledger import PrivacyLedger
    from tests.helpers import record_release

    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    whole = dataset_fingerprint(load_records(data))  # what a ledger was bound to before this change
    record_release(PrivacyLedger.open(_ledger(tmp_path), site="cardiology", dataset_fingerprint=whole))
    with pytest.raises(LedgerError) as caught:
        _runtime(tmp_path, data)
    text = str(caught.value)
    assert "written before sites owned their held-out split" in text and "whole data file" in text
    assert "a new ledger is a new privacy history" in text and "never delete it" in text
