"""Site data: every file type loads and normalises, malformed records are rejected with file,
record, line and field; labels cover exactly the assistant responses; truncation keeps the
response; splits and partitions are reproducible and lose nothing; PubMedQA sites."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedllm.data.formatting import (
    IGNORE_INDEX,
    render,
    tokenize_record,
    tokenize_records,
)
from fedllm.data.loading import load_records, normalise_record
from fedllm.data.partition import (
    PartitionError,
    partition_dirichlet,
    partition_iid,
    partition_natural_id,
    partition_pathological,
    partition_shard,
)
from fedllm.data.pubmedqa import SITES, pubmedqa_site_records, site_of
from fedllm.errors import DataError
from fedllm.model.loading import build_byte_tokenizer
from fedllm.site.holdout import split_records
from tests.helpers import PUBMEDQA_DIR, write_jsonl

INSTRUCTION = {"instruction": "Summarise the note.", "input": "BP 120/80, no fever.", "output": "Vitals normal."}
CHAT = {
    "messages": [
        {"role": "system", "content": "You are a triage nurse."},
        {"role": "user", "content": "I have a headache."},
        {"role": "assistant", "content": "How long has it lasted?"},
    ]
}
TEXT = {"text": "Aspirin is an NSAID."}
EXPECTED = [
    {"messages": [{"role": "user", "content": "Summarise the note.\n\nBP 120/80, no fever."},
                  {"role": "assistant", "content": "Vitals normal."}]},
    CHAT,
    TEXT,
]


# --------------------------------------------------------------------------------- file writers


def _write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _write_csv(path: Path, rows: list[dict]) -> Path:
    fields = sorted({k for r in rows for k in r})
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    fields = sorted({k for r in rows for k in r})  # (from_pylist would take the columns of row 1 only)
    pq.write_table(pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in fields}), path)
    return path


WRITERS = {".jsonl": write_jsonl, ".json": _write_json, ".csv": _write_csv, ".parquet": _write_parquet}


# ------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_each_file_type_loads_and_normalises_all_record_kinds(tmp_path, suffix):
    path = WRITERS[suffix](tmp_path / f"site{suffix}", [INSTRUCTION, CHAT, TEXT])
    assert load_records(path) == EXPECTED


def test_instruction_without_input_and_blank_jsonl_lines(tmp_path):
    path = tmp_path / "site.jsonl"
    path.write_text('\n{"instruction": "Q?", "output": "A."}\n\n{"instruction": "R?", "input": " ", "output": "B."}\n')
    assert load_records(path) == [
        {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]},
        {"messages": [{"role": "user", "content": "R?"}, {"role": "assistant", "content": "B."}]},
    ]


def test_explicit_format_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "site.jsonl", [{"text": "plain", "output": "ignored"}])
    assert load_records(path, format="text") == [{"text": "plain"}]
    with pytest.raises(DataError, match="missing field 'instruction'"):
        load_records(path)  # auto: 'output' makes it an instruction record


# (suffix, file content or rows, the substrings the message must contain, in order)
MALFORMED = [
    pytest.param(".jsonl", '{"text": "ok"}\n\n{"text": "ok"}\n{"text": "broken\n',
                 ["record 3 (line 4)", "invalid JSON"], id="jsonl-bad-json"),
    pytest.param(".jsonl", [TEXT, {"instruction": "Q?"}],
                 ["record 2 (line 2)", "missing field 'output'"], id="jsonl-missing-output"),
    pytest.param(".json", [TEXT, {"instruction": "Q?", "output": 42}],
                 ["record 2", "field 'output' must be a string, found int"], id="json-non-string"),
    pytest.param(".json", [TEXT, "just a string"],
                 ["record 2", "expected a JSON object, found str"], id="json-non-object"),
    pytest.param(".json", {"records": [TEXT]}, ["expected a JSON list"], id="json-not-a-list"),
    pytest.param(".csv", [TEXT, {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}],
                 ["record 2 (line 3)", "messages[2].role = 'bot'", "expected one of system, user, assistant"],
                 id="csv-bad-role"),
    pytest.param(".csv", [INSTRUCTION, {"instruction": "Q?", "output": ""}],
                 ["record 2 (line 3)", "missing field 'output'"], id="csv-empty-output"),
    pytest.param(".parquet", [{"messages": [{"role": "user", "content": "hi"}]}],
                 ["record 1", "field 'messages' has no assistant turn"], id="parquet-no-assistant"),
    pytest.param(".jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}],
                 ["record 1 (line 1)", "messages[2].content must be a non-empty string"], id="jsonl-empty-content"),
    pytest.param(".jsonl", [{"prompt": "x", "completion": "y"}],
                 ["record 1 (line 1)", "unrecognised record", "['completion', 'prompt']"], id="jsonl-unknown-kind"),
    pytest.param(".jsonl", "\n\n", ["no records"], id="jsonl-empty"),
    pytest.param(".csv", "instruction,output\n", ["no records"], id="csv-header-only"),
    pytest.param(".txt", "hello\n", ["unsupported file type '.txt'"], id="unsupported-suffix"),
]


@pytest.mark.parametrize("suffix, content, expected", MALFORMED)
def test_malformed_record_is_rejected_naming_file_record_and_field(tmp_path, suffix, content, expected):
    path = tmp_path / f"site{suffix}"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    elif suffix == ".json":
        _write_json(path, content)
    else:
        WRITERS[suffix](path, content)
    with pytest.raises(DataError) as exc:
        load_records(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ")
    position = 0
    for part in expected:
        found = message.find(part, position)
        assert found >= 0, f"{part!r} not in {message!r}"
        position = found + len(part)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DataError, match="absent.jsonl: data file not found"):
        load_records(path)


def test_unknown_format_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "site.jsonl", [TEXT])
    with pytest.raises(DataError, match="unknown data format 'xml'"):
        load_records(path, format="xml")


# ------------------------------------------------------------------------- formatting & labels


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def _label_runs(example) -> list[list[int]]:
    """Contiguous runs of labelled (trained-on) tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in example.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


def test_instruction_labels_cover_only_the_response(tokenizer):
    record = normalise_record({"instruction": "What is 2+2?", "output": "Four."})
    example = tokenize_record(record, tokenizer, max_length=256)
    assert len(example.input_ids) == len(example.labels)
    first = next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)
    assert all(t == IGNORE_INDEX for t in example.labels[:first])
    assert example.labels[first:] == example.input_ids[first:]
    # the masked part is exactly the prompt up to the assistant header
    prompt = render(tokenizer, record["messages"][:1], add_generation_prompt=True)
    assert tokenizer.decode(example.input_ids[:first]) == prompt
    # the trained part is the response and the end-of-turn token (then ChatML's turn separator "\n")
    (run,) = _label_runs(example)
    assert tokenizer.decode(run) == "Four." + tokenizer.eos_token + "\n"
    assert tokenizer.eos_token_id in run


def test_multi_turn_chat_labels_every_assistant_turn_and_no_other(tokenizer):
    record = normalise_record({"messages": [
        {"role": "system", "content": "SYSTEM-PROMPT"},
        {"role": "user", "content": "USER-ONE"},
        {"role": "assistant", "content": "ANSWER-ONE"},
        {"role": "user", "content": "USER-TWO"},
        {"role": "assistant", "content": "ANSWER-TWO"},
    ]})
    example = tokenize_record(record, tokenizer, max_length=512)
    eos = tokenizer.eos_token
    assert [tokenizer.decode(run) for run in _label_runs(example)] == [f"ANSWER-ONE{eos}\n", f"ANSWER-TWO{eos}\n"]
    masked = tokenizer.decode([i for i, t in zip(example.input_ids, example.labels) if t == IGNORE_INDEX])
    for text in ("SYSTEM-PROMPT", "USER-ONE", "USER-TWO"):
        assert text in masked
    for text in ("ANSWER-ONE", "ANSWER-TWO"):
        assert text not in masked
    # the whole conversation is there, in order
    assert tokenizer.decode(example.input_ids) == render(tokenizer, record["messages"], add_generation_prompt=False)


def test_text_records_train_on_every_token(tokenizer):
    example = tokenize_record({"text": "Aspirin is an NSAID."}, tokenizer, max_length=256)
    assert example.labels == example.input_ids
    assert tokenizer.decode(example.input_ids) == "Aspirin is an NSAID." + tokenizer.eos_token
    assert example.num_label_tokens == len(example.input_ids)


def test_without_chat_template_the_fallback_layout_still_masks_the_prompt(tokenizer):
    plain = build_byte_tokenizer()
    plain.chat_template = None
    record = normalise_record({"instruction": "Q?", "output": "A."})
    example = tokenize_record(record, plain, max_length=256)
    (run,) = _label_runs(example)
    assert plain.decode(run) == "A." + plain.eos_token
    masked = plain.decode([i for i, t in zip(example.input_ids, example.labels) if t == IGNORE_INDEX])
    assert masked == "### User:\nQ?\n\n### Assistant:\n"


def test_truncation_cuts_the_start_of_a_long_prompt_and_keeps_the_response(tokenizer):
    response = "The answer is yes."
    record = normalise_record({"instruction": "START" + "x" * 500 + "END", "output": response})
    example = tokenize_record(record, tokenizer, max_length=64)
    assert len(example.input_ids) == len(example.labels) == 64
    text = tokenizer.decode(example.input_ids)
    assert "START" not in text  # the prompt's start went first
    assert text.endswith(f"END{tokenizer.eos_token}\n<|im_start|>assistant\n{response}{tokenizer.eos_token}\n")
    (run,) = _label_runs(example)
    assert tokenizer.decode(run) == response + tokenizer.eos_token + "\n"


def test_truncation_keeps_at_least_half_the_window_for_a_long_response(tokenizer):
    record = normalise_record({"instruction": "p" * 300, "output": "r" * 300})
    for max_length in (8, 9, 64):
        example = tokenize_record(record, tokenizer, max_length=max_length)
        assert len(example.input_ids) == max_length
        assert example.num_label_tokens >= max_length - max_length // 2
        assert example.num_label_tokens < max_length  # some prompt context is kept too


def test_record_with_no_response_tokens_is_rejected_naming_it(tokenizer):
    # a template that renders the assistant header but drops its content leaves nothing to learn
    silent = build_byte_tokenizer()
    silent.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] != 'assistant' %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    good = {"text": "fine"}
    bad = normalise_record({"instruction": "Q?", "output": "A."})
    with pytest.raises(DataError, match=r"^site\.jsonl: record 2: no response tokens left"):
        tokenize_records([good, bad], silent, max_length=64, source="site.jsonl")


def test_non_incremental_template_is_rejected_naming_the_record(tokenizer):
    reorders = build_byte_tokenizer()  # renders the last message first: not a prefix of the longer chat
    reorders.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}"
    bad = normalise_record({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]})
    with pytest.raises(DataError, match=r"^site\.jsonl: record 1: the chat template does not render"):
        tokenize_records([bad], reorders, max_length=64, source="site.jsonl")


# ------------------------------------------------------------------------ splits and partitions


@pytest.mark.parametrize("n", [2, 3, 10, 101])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_site_split_is_reproducible_disjoint_and_complete(n, fraction):
    records = [{"text": f"r{i}"} for i in range(n)]
    key = bytes(range(32))
    split = split_records(records, key=key, eval_fraction=fraction)
    assert split == split_records(records, key=key, eval_fraction=fraction)
    assert not set(split.train) & set(split.held_out)
    assert sorted(split.train + split.held_out) == list(range(n))
    assert len(split.held_out) >= 1 and len(split.train) >= 1


def test_site_split_key_cap_and_zero_fraction():
    records = [{"text": f"r{i}"} for i in range(400)]
    held_a = split_records(records, key=b"a" * 32, eval_fraction=0.2).held_out
    held_b = split_records(records, key=b"b" * 32, eval_fraction=0.2).held_out
    assert 50 <= len(held_a) <= 110 and 50 <= len(held_b) <= 110 and held_a != held_b  # ~80 each, another key
    capped = split_records(records, key=b"a" * 32, eval_fraction=0.5, max_eval=12)
    assert len(capped.held_out) == 12 and len(capped.train) == 388
    assert split_records(records, key=b"a" * 32, eval_fraction=0.0).held_out == []


@pytest.mark.parametrize("n, sites", [(3, 3), (10, 3), (90, 4), (1000, 7)])
def test_partition_iid(n, sites):
    items = list(range(n))
    parts = partition_iid(items, num_sites=sites, seed=3)
    assert parts == partition_iid(items, num_sites=sites, seed=3)
    assert len(parts) == sites and all(parts)
    assert sorted(x for p in parts for x in p) == items  # disjoint and complete
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    if n >= 10:
        assert parts != partition_iid(items, num_sites=sites, seed=4)


def test_partition_iid_is_a_seeded_shuffle_dealt_in_order():
    """Flower's IidPartitioner over Dataset.shuffle(seed): the same split as a seeded permutation
    cut into contiguous parts (what fedllm wrote by hand before)."""
    order = np.random.default_rng(5).permutation(23)
    expected = [sorted(part.tolist()) for part in np.array_split(order, 4)]
    assert partition_iid(list(range(23)), num_sites=4, seed=5) == expected


@pytest.mark.parametrize("alpha", [0.5, 100.0])
@pytest.mark.parametrize("n, sites", [(60, 10), (500, 5)])
def test_partition_dirichlet(n, sites, alpha):
    labels = [("yes", "no", "maybe")[i % 3] for i in range(n)]
    parts = partition_dirichlet(labels, num_sites=sites, alpha=alpha, seed=11)
    assert parts == partition_dirichlet(labels, num_sites=sites, alpha=alpha, seed=11)
    assert parts != partition_dirichlet(labels, num_sites=sites, alpha=alpha, seed=12)
    assert len(parts) == sites and all(parts), [len(p) for p in parts]
    assert sorted(i for p in parts for i in p) == list(range(n))


def test_partition_dirichlet_min_partition_size():
    labels = [("yes", "no", "maybe")[i % 3] for i in range(500)]
    parts = partition_dirichlet(labels, num_sites=5, alpha=1.0, seed=0, min_partition_size=40)
    assert min(map(len, parts)) >= 40


@pytest.mark.parametrize("n, sites, alpha", [(8, 8, 0.01), (8, 8, 100.0), (60, 10, 0.01)])
def test_partition_dirichlet_refuses_a_split_that_leaves_a_site_empty(n, sites, alpha):
    """Flower's DirichletPartitioner redraws up to 10 times; it does not move records into an
    empty site as the hand-written split did, so these splits are refused, saying why."""
    labels = [("yes", "no", "maybe")[i % 3] for i in range(n)]
    with pytest.raises(PartitionError, match=rf"each of 11 draws from Dirichlet\(alpha={alpha}\) left a site with "
                                             r"fewer than 1 record\(s\)"):
        partition_dirichlet(labels, num_sites=sites, alpha=alpha, seed=11)


def test_partition_dirichlet_small_alpha_is_non_iid():
    labels = ["a"] * 300 + ["b"] * 300
    parts = partition_dirichlet(labels, num_sites=4, alpha=0.05, seed=0)
    share_a = [sum(labels[i] == "a" for i in p) / len(p) for p in parts]
    assert max(share_a) - min(share_a) > 0.5


def test_partition_natural_id_gives_one_site_per_value_in_sorted_order():
    ids = ["north", "south", "north", 7, "east", "south", 7]
    parts = partition_natural_id(ids)
    assert parts == [[3, 6], [4], [0, 2], [1, 5]]  # "7" < "east" < "north" < "south"
    assert parts == partition_natural_id(ids)


def test_partition_shard():
    labels = [i % 10 for i in range(200)]  # 20 records per label
    parts = partition_shard(labels, num_sites=5, seed=1, num_shards_per_partition=2, shard_size=20)
    assert parts == partition_shard(labels, num_sites=5, seed=1, num_shards_per_partition=2, shard_size=20)
    assert parts != partition_shard(labels, num_sites=5, seed=2, num_shards_per_partition=2, shard_size=20)
    assert [len(p) for p in parts] == [40] * 5  # two shards of 20 each, every record used once
    assert sorted(i for p in parts for i in p) == list(range(200))
    assert all(len({labels[i] for i in p}) == 2 for p in parts)  # a shard of 20 sorted records = one label
    with pytest.raises(PartitionError, match="number of usable shards is smaller"):
        partition_shard(labels, num_sites=5, seed=1, shard_size=50)  # 4 shards for 5 sites


def test_partition_pathological():
    labels = [("a", "b", "c", "d")[i % 4] for i in range(80)]
    parts = partition_pathological(labels, num_sites=4, seed=0, num_classes_per_partition=2,
                                   class_assignment_mode="deterministic")
    assert [sorted({labels[i] for i in p}) for p in parts] == [["a", "b"], ["b", "c"], ["c", "d"], ["a", "d"]]
    assert sorted(i for p in parts for i in p) == list(range(80))  # each label held by two sites, split evenly
    random = partition_pathological(labels, num_sites=4, seed=3, num_classes_per_partition=1)
    assert random == partition_pathological(labels, num_sites=4, seed=3, num_classes_per_partition=1)
    assert all(len({labels[i] for i in p}) == 1 for p in random)
    with pytest.raises(PartitionError, match="greater than the number of unique classes"):
        partition_pathological(labels, num_sites=4, seed=0, num_classes_per_partition=5)


def test_partitions_refuse_more_sites_than_records():
    with pytest.raises(ValueError, match="cannot split 3 records into 4 sites"):
        partition_iid([1, 2, 3], num_sites=4, seed=0)
    with pytest.raises(ValueError, match="cannot split 3 records into 4 sites"):
        partition_dirichlet(["a", "b", "c"], num_sites=4, alpha=1.0, seed=0)
    with pytest.raises(ValueError, match="cannot split 3 records into 4 sites"):
        partition_shard(["a", "b", "c"], num_sites=4, seed=0, shard_size=1)


# ------------------------------------------------------------------------------------- PubMedQA


@pytest.mark.parametrize(
    "meshes, site",
    [
        (["Humans", "Child", "Aged"], "pediatric"),  # first match wins
        (["Aged", "Adult", "Middle Aged"], "geriatric"),
        (["Infant, Newborn"], "pediatric"),
        (["Aged, 80 and over"], "geriatric"),
        ([" Young Adult "], "adult"),
        (["Humans", "Female"], "other"),
        ([], "other"),
    ],
)
def test_pubmedqa_site_of(meshes, site):
    assert site_of(meshes) == site


def test_pubmedqa_site_counts_from_shared_copy():
    if not (PUBMEDQA_DIR / "ori_pqal.json").is_file():
        pytest.skip(f"shared PubMedQA copy not present at {PUBMEDQA_DIR}")
    sites = pubmedqa_site_records(PUBMEDQA_DIR)
    assert {name: len(records) for name, records in sites.items()} == {
        "pediatric": 276, "geriatric": 335, "adult": 208, "other": 181}
    assert tuple(sites) == SITES
    for records in sites.values():
        for raw in records:
            normalised = normalise_record(raw)  # valid instruction records
            answer = normalised["messages"][1]["content"]
            assert answer.split(".", 1)[0] in ("yes", "no", "maybe")


def test_pubmedqa_missing_folder_points_to_the_shared_copy(tmp_path):
    with pytest.raises(DataError) as exc:
        pubmedqa_site_records(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "ori_pqal.json") in str(exc.value)
    assert "../shared/data/pubmedqa" in str(exc.value)


def test_pubmedqa_malformed_record_is_named(tmp_path):
    (tmp_path / "ori_pqal.json").write_text(json.dumps({"123": {"QUESTION": "q?", "CONTEXTS": ["c"]}}))
    with pytest.raises(DataError, match=r"record 123: missing or malformed field 'final_decision'"):
        pubmedqa_site_records(tmp_path)


# -- ShareGPT conversations -------------------------------------------------------------------------


def test_sharegpt_conversations_become_chat_messages(tmp_path):
    from fedllm.data.loading import load_records

    path = tmp_path / "sharegpt.jsonl"
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                               {"from": "gpt", "value": "Hello."}]},
            {"id": "x", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
                                          {"from": "human", "value": "and 3+3?"}, {"from": "gpt", "value": "6"}]}]
    write_jsonl(path, rows)
    records = load_records(path)
    assert records[0] == {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                                       {"role": "assistant", "content": "Hello."}]}
    assert [m["role"] for m in records[1]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert load_records(path, format="sharegpt") == records


@pytest.mark.parametrize("row, message", [
    ({"conversations": []}, "'conversations' must be a non-empty list"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "conversations[1].from = 'alien'"),
    ({"conversations": [{"from": "human", "value": ""}]}, "conversations[1].value must be a non-empty string"),
    ({"conversations": [{"from": "human", "value": "only a question"}]}, "no assistant turn"),
    ({"conversations": "not json"}, "not a JSON list"),
])
def test_a_sharegpt_record_that_does_not_fit_is_named(tmp_path, row, message):
    from fedllm.data.loading import load_records
    from fedllm.errors import DataError

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": "ok"}, {"from": "gpt", "value": "ok"}]})
                    + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert "record 2 (line 2)" in str(info.value) and message in str(info.value)


def test_sharegpt_in_csv_carries_the_conversation_as_json(tmp_path):
    import csv

    from fedllm.data.loading import load_records

    path = tmp_path / "sharegpt.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["conversations"])
        writer.writerow([json.dumps([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}])])
    assert load_records(path)[0]["messages"][1] == {"role": "assistant", "content": "Hello"}


# -- column mapping (data.columns / a site's data-columns) ------------------------------------------

QA_ROWS = [{"question": "Is aspirin an NSAID?", "context": "Pharmacology note.", "answer": "yes", "id": "1"},
           {"question": "Does rest cure a fracture?", "answer": "partly", "id": "2"}]
QA_MAPPING = "instruction=question, input=context, output=answer"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_column_mapping_reads_fedllms_fields_from_other_columns(tmp_path, suffix):
    path = WRITERS[suffix](tmp_path / f"qa{suffix}", QA_ROWS)
    records = load_records(path, columns=QA_MAPPING)
    assert records == [
        {"messages": [{"role": "user", "content": "Is aspirin an NSAID?\n\nPharmacology note."},
                      {"role": "assistant", "content": "yes"}]},
        {"messages": [{"role": "user", "content": "Does rest cure a fracture?"},
                      {"role": "assistant", "content": "partly"}]},
    ]
    assert load_records(path, columns={"instruction": "question", "output": "answer"})[0]["messages"][0] == \
        {"role": "user", "content": "Is aspirin an NSAID?"}
    with pytest.raises(DataError, match="unrecognised record"):  # without the mapping these rows mean nothing
        load_records(path)


def test_a_mapped_text_or_conversation_column(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "Aspirin is an NSAID.", "text": "ignored"},
                                              {"body": "Rest helps.", "text": "ignored"}])
    assert load_records(path, columns="text=body") == [{"text": "Aspirin is an NSAID."}, {"text": "Rest helps."}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"dialog": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}])
    assert load_records(path, columns="conversations=dialog")[0]["messages"][1] == {"role": "assistant", "content": "Yo"}


@pytest.mark.parametrize("mapping, message", [
    ("instruction=question, output=answr", "column 'answr', which no record has (did you mean 'answer'?); "
                                           "the data's columns: answer, context, id, question"),
    ("instruktion=question", "unknown field 'instruktion' (did you mean 'instruction'?)"),
    ("instruction question", "'instruction question' is not FIELD=COLUMN"),
    ("output=answer, output=id", "field 'output' is mapped twice"),
])
def test_a_bad_column_mapping_is_named(tmp_path, mapping, message):
    path = _write_csv(tmp_path / "qa.csv", QA_ROWS)
    with pytest.raises(DataError) as info:
        load_records(path, columns=mapping)
    assert message in str(info.value)


def test_a_record_missing_a_mapped_column_names_the_record_field_and_column(tmp_path):
    path = _write_csv(tmp_path / "qa.csv", [*QA_ROWS, {"question": "Unanswered?", "id": "3"}])
    with pytest.raises(DataError) as info:
        load_records(path, columns=QA_MAPPING)
    assert str(info.value) == (f"{path}: record 3 (line 4): missing field 'output' (column 'answer') "
                               "(expected a non-empty string)")


def test_column_mappings_are_checked_in_site_configurations():
    from fedllm.config import SiteConfig
    from fedllm.errors import ConfigError

    site = SiteConfig.from_node_config({"site-name": "a", "data-path": "a.csv", "max-epsilon": 8.0, "data-columns": "text=body"})
    assert site.data_columns == "text=body"
    assert SiteConfig.from_dict(site.to_dict()) == site
    with pytest.raises(ConfigError, match="data-columns = 'txt=body': unknown field 'txt'"):
        SiteConfig.from_node_config({"site-name": "a", "data-path": "a.csv", "max-epsilon": 8.0, "data-columns": "txt=body"})


def test_scenario_sites_and_partitions_take_a_column_mapping(tmp_path):
    from fedllm.errors import ConfigError
    from fedllm.simulation.scenario import load_scenario, materialise_sites

    _write_csv(tmp_path / "qa.csv", QA_ROWS * 4)
    (tmp_path / "run.toml").write_text("")
    (tmp_path / "sites.toml").write_text(f'[[site]]\nsite-name = "a"\ndata-path = "qa.csv"\nmax-epsilon = 8.0\ndata-columns = "{QA_MAPPING}"\n')
    [site] = materialise_sites(load_scenario(str(tmp_path)), tmp_path / "out")
    assert site.data_columns == QA_MAPPING and len(load_records(site.data_path, columns=site.data_columns)) == 8
    (tmp_path / "sites.toml").write_text(f'[partition]\nmax-epsilon = 8.0\ndata = "qa.csv"\nnum-sites = 2\ndata-columns = "{QA_MAPPING}"\n')
    sites = materialise_sites(load_scenario(str(tmp_path)), tmp_path / "out2")
    assert sum(len(load_records(s.data_path)) for s in sites) == 8  # written normalised: no mapping needed
    (tmp_path / "sites.toml").write_text('[partition]\nmax-epsilon = 8.0\ndata = "qa.csv"\nnum-sites = 2\ndata-columns = "q=question"\n')
    with pytest.raises(ConfigError, match=r"\[partition\]: data-columns = 'q=question': unknown field 'q'"):
        materialise_sites(load_scenario(str(tmp_path)), tmp_path / "out3")


# -- Hugging Face datasets saved to disk --------------------------------------------------------------


def test_a_dataset_saved_to_disk_loads_like_a_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [INSTRUCTION, CHAT, TEXT] * 3
    datasets.Dataset.from_list([{"instruction": None, "input": None, "output": None, "messages": None, "text": None, **r}
                                for r in rows]).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    assert len(list((tmp_path / "ds").glob("*.arrow"))) == 2  # shards are read in order
    assert load_records(tmp_path / "ds") == EXPECTED * 3
    qa = datasets.Dataset.from_list([{**r, "context": r.get("context")} for r in QA_ROWS])
    datasets.DatasetDict({"train": qa, "test": qa.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_records(tmp_path / "dd", columns=QA_MAPPING)) == 2  # a DatasetDict: its train split
    assert len(load_records(tmp_path / "dd" / "test", columns=QA_MAPPING)) == 1


def test_a_bad_record_in_a_saved_dataset_is_named(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([INSTRUCTION, {**INSTRUCTION, "output": ""}]).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError) as info:
        load_records(tmp_path / "ds")
    assert str(info.value) == f"{tmp_path / 'ds'}: record 2: field 'output' is empty; expected a non-empty string"


def test_a_folder_that_is_not_a_saved_dataset_is_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_records(tmp_path / "plain")
    qa = datasets.Dataset.from_list(QA_ROWS[:1])
    datasets.DatasetDict({"a": qa, "b": qa}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="splits a, b and no 'train' split; point data-path at the split's folder"):
        load_records(tmp_path / "dd")
