"""The shipped ``bank`` scenario: its illustrative data is what make_data.py writes, byte for byte;
the natural-id split gives one site per bank with the sizes and intent mixes that its READMEs
document; every answer is one of run.toml's choices."""

from __future__ import annotations

import collections
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedllm.config import RunConfig
from fedllm.simulation.scenario import load_scenario, materialise_sites
from tests.helpers import REPO

FOLDER = REPO / "simulations" / "bank"
DATA = FOLDER / "data" / "bank.jsonl"
# site -> (bank, records): the natural-id split names sites in the banks' sorted order
SITES = {"site-00": ("alder-retail", 380), "site-01": ("birchway-mortgage", 170),
         "site-02": ("cobalt-business", 260), "site-03": ("driftwood-cu", 140)}


def make_data():
    spec = importlib.util.spec_from_file_location("bank_make_data", FOLDER / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def raw_records() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]


def test_make_data_reproduces_the_committed_file_byte_for_byte(tmp_path):
    out = tmp_path / "bank.jsonl"
    subprocess.run([sys.executable, str(FOLDER / "make_data.py"), "--output", str(out)], check=True,
                   capture_output=True, timeout=60)
    assert out.read_bytes() == DATA.read_bytes()


def test_records_are_instruction_records_with_a_bank_and_no_repeated_message():
    records = raw_records()
    assert 900 <= len(records) <= 1200 and DATA.stat().st_size < 300_000
    instruction = make_data().INSTRUCTION
    for record in records:
        assert list(record) == ["instruction", "input", "output", "bank"]
        assert record["instruction"] == instruction and record["input"].strip()
    messages = [r["input"].lower() for r in records]
    assert len(set(messages)) == len(messages)


def test_every_answer_is_one_of_the_run_choices_and_the_instruction_names_them_all():
    config = RunConfig.from_flat(load_scenario("bank").run_overrides)
    choices = config.evaluate.choice_list
    assert choices == make_data().INTENTS and len(choices) == 12
    assert config.evaluate.metric_names == ("exact-match", "choice") and config.evaluate.reference == "response"
    # single lower-case words: normalization (lower case, punctuation removed) leaves them unchanged,
    # and no intent is a prefix of another (exact-match takes the first option the answer starts with)
    assert all(re.fullmatch(r"[a-z]+", c) for c in choices)
    assert not [(a, b) for a in choices for b in choices if a != b and b.startswith(a)]
    records = raw_records()
    assert {r["output"] for r in records} == set(choices)
    for choice in choices:
        assert choice in records[0]["instruction"]


def test_natural_id_partition_gives_one_site_per_bank_with_the_documented_sizes(tmp_path):
    sites = materialise_sites(load_scenario("bank"), tmp_path)
    assert [site.name for site in sites] == list(SITES)
    by_bank = collections.defaultdict(list)
    for record in raw_records():
        by_bank[record["bank"]].append(record)
    for site in sites:
        bank, size = SITES[site.name]
        assert site.max_epsilon == 10.0 and site.release_metrics == "exact" and site.eval_fraction == 0.15
        written = [json.loads(line) for line in Path(site.data_path).read_text(encoding="utf-8").splitlines()]
        assert len(written) == size == len(by_bank[bank])
        # the site's file holds exactly that bank's records, in file order
        assert [r["messages"][1]["content"] for r in written] == [r["output"] for r in by_bank[bank]]
        assert [r["messages"][0]["content"] for r in written] == [
            f"{r['instruction']}\n\n{r['input']}" for r in by_bank[bank]]
    for readme in (FOLDER / "README.md", FOLDER / "data" / "README.md", FOLDER / "sites.toml"):
        text = readme.read_text(encoding="utf-8")
        for bank, size in SITES.values():
            assert re.search(rf"`?{bank}`?[^\n]*?\b{size}\b", text), f"{readme.name} does not give {bank}'s {size}"


def documented_mixes() -> dict[str, dict[str, int]]:
    """data/README.md's table: bank -> intent -> records."""
    lines = (FOLDER / "data" / "README.md").read_text(encoding="utf-8").splitlines()
    header = next(line for line in lines if line.startswith("| bank | kind |"))
    intents = [cell.strip() for cell in header.strip("|").split("|")][2:-1]
    mixes = {}
    for line in lines:
        match = re.match(r"\| `([a-z-]+)` \|", line)
        if match and match.group(1) in {bank for bank, _ in SITES.values()}:
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            mixes[match.group(1)] = dict(zip(intents, map(int, cells[2:-1]), strict=True))
            assert int(cells[-1]) == sum(mixes[match.group(1)].values())
    return mixes


def test_intent_mixes_are_the_documented_non_iid_ones():
    actual = collections.defaultdict(collections.Counter)
    for record in raw_records():
        actual[record["bank"]][record["output"]] += 1
    documented = documented_mixes()
    assert set(documented) == set(actual)
    for bank, mix in documented.items():
        assert {k: v for k, v in mix.items() if v} == dict(actual[bank]), bank
    # non-IID: each specialised bank's most frequent intent is a different one, and some banks lack
    # intents that others hold
    top = {bank: max(mix, key=mix.get) for bank, mix in documented.items() if bank != "driftwood-cu"}
    assert top == {"alder-retail": "lost", "birchway-mortgage": "mortgage", "cobalt-business": "transfer"}
    assert documented["birchway-mortgage"]["atm"] == documented["alder-retail"]["mortgage"] == 0
    assert max(documented["driftwood-cu"].values()) <= 2 * min(documented["driftwood-cu"].values())


@pytest.mark.parametrize("size, weights", [(380, (14, 12, 6)), (7, (1, 1, 1)), (10, (0, 3, 1))])
def test_intent_counts_sum_to_the_bank_size(size, weights):
    module = make_data()
    full = weights + (0,) * (len(module.INTENTS) - len(weights))
    counts = module.intent_counts(size, full)
    assert sum(counts.values()) == size and all(counts[i] == 0 for i, w in zip(module.INTENTS, full) if w == 0)
