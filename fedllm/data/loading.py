"""Read a site's records from a local file and check their schema.

Accepted sources: JSON Lines (``.jsonl``), JSON (``.json``: a list of objects), CSV (``.csv``, a
header row), Parquet (``.parquet``), and a folder written by Hugging Face ``datasets``'
``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` of which the ``train`` split is read; read
with ``datasets.load_from_disk``, so only such folders need the optional ``datasets`` library). Accepted records, one kind per record:

* instruction: ``instruction`` (str), optional ``input`` (str), ``output`` (str);
* chat: ``messages``, a list of ``{"role": "system"|"user"|"assistant", "content": str}`` that
  contains at least one assistant turn;
* ShareGPT conversations: ``conversations``, a list of ``{"from": "system"|"human"|"gpt",
  "value": str}`` (also ``user``/``assistant``/``bot``) with at least one ``gpt`` turn;
* plain text: ``text`` (str).

A site's column mapping (its ``data-columns``) such as
``"instruction=question, input=context, output=answer"`` reads fedllm's fields from other column
names; with a mapping, only the mapped columns are read.

Every record is normalised to ``{"messages": [...]}`` or ``{"text": ...}``. Any problem stops the
load with a ``DataError`` naming the file, the record number (1-based; for JSONL and CSV also
the line), the field and what was expected, before any training starts.
"""

from __future__ import annotations

import csv
import difflib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedllm.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SOURCES_TEXT = ".jsonl, .json, .csv or .parquet file, or a folder saved by Hugging Face datasets' save_to_disk"
FIELDS = ("instruction", "input", "output", "messages", "conversations", "text")
FORMATS = ("auto", "instruction", "chat", "sharegpt", "text")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "bot": "assistant"}
ROLES = ("system", "user", "assistant")

Record = dict[str, Any]


def load_records(path: str | Path, *, format: str = "auto", columns: str | Mapping[str, str] = "") -> list[Record]:
    """All records of one file or saved dataset, normalised; raises ``DataError`` on the first bad
    one. ``columns``: fedllm field -> column name (``parse_columns``)."""
    path = Path(path)
    if format not in FORMATS:
        raise DataError(f"{path}: unknown data format {format!r}; use one of {', '.join(FORMATS)}")
    mapping = parse_columns(columns) if isinstance(columns, str) else dict(columns)
    raw_records = read_raw(path)
    if mapping:
        raw_records = _apply_columns(path, raw_records, mapping)
    records = []
    for where, raw in raw_records:
        try:
            records.append(normalise_record(raw, format=format, where=f"{path}: {where}"))
        except DataError as exc:
            raise DataError(_name_columns(str(exc), mapping)) from None
    if not records:
        raise DataError(f"{path}: no records; a site needs at least 2 records (train + held-out)")
    return records


def read_raw(path: Path) -> list[tuple[str, Any]]:
    """(where, raw record) for every record of a file or saved dataset, before any checks."""
    if path.is_dir():
        return list(_read_saved_dataset(path))
    if not path.is_file():
        raise DataError(f"{path}: data file not found; check the site's data path (a {SOURCES_TEXT})")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use a {SOURCES_TEXT}")
    return list(_read_raw(path, suffix))


def parse_columns(text: str) -> dict[str, str]:
    """``"instruction=question, output=answer"`` -> ``{"instruction": "question", "output": "answer"}``."""
    problem = columns_problem(text)
    if problem:
        raise DataError(f"data columns {text!r}: {problem}")
    pairs = (part.partition("=") for part in text.split(",") if part.strip())
    return {field_name.strip(): column.strip() for field_name, _, column in pairs}


def columns_problem(value: Any) -> str | None:
    """What is wrong with a column mapping (a site's ``data-columns``), or None when it is valid."""
    if not isinstance(value, str):
        return 'must be a string "FIELD=COLUMN, ..."'
    seen: set[str] = set()
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        field_name, sep, column = (x.strip() for x in part.partition("="))
        if not sep or not field_name or not column:
            return f'{part!r} is not FIELD=COLUMN; e.g. "instruction=question, output=answer"'
        if field_name not in FIELDS:
            close = difflib.get_close_matches(field_name, FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            return f"unknown field {field_name!r}{hint}; fields: {', '.join(FIELDS)}"
        if field_name in seen:
            return f"field {field_name!r} is mapped twice"
        seen.add(field_name)
    return None


def _apply_columns(path: Path, raw_records: list[tuple[str, Any]], mapping: dict[str, str]) -> list[tuple[str, Any]]:
    """Rename mapped columns to fedllm's fields and drop the rest. A mapped column that no record
    has is a mistake in the mapping, reported with the columns the data does have."""
    seen: set[str] = set()
    for _, raw in raw_records:
        if isinstance(raw, dict):
            seen.update(raw)
    for field_name, column in mapping.items():
        if column not in seen:
            close = difflib.get_close_matches(column, sorted(seen), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise DataError(f"{path}: data columns map {field_name} from column {column!r}, which no record has{hint}; "
                            f"the data's columns: {', '.join(sorted(seen)) or 'none'}")
    return [(where, {f: raw[c] for f, c in mapping.items() if c in raw} if isinstance(raw, dict) else raw)
            for where, raw in raw_records]


def _name_columns(message: str, mapping: dict[str, str]) -> str:
    """Errors speak of fedllm's fields; with a mapping, also name the data's column."""
    for field_name, column in mapping.items():
        if column != field_name and f"'{field_name}'" in message:
            return message.replace(f"'{field_name}'", f"'{field_name}' (column '{column}')", 1)
    return message


def _read_saved_dataset(folder: Path) -> Iterator[tuple[str, Any]]:
    """Rows of a Hugging Face ``datasets`` folder (``save_to_disk``), read with
    ``datasets.load_from_disk``; for a ``DatasetDict`` the ``train`` split, or its only split."""
    if not (folder / "state.json").is_file() and not (folder / "dataset_dict.json").is_file():
        raise DataError(f"{folder}: a folder, but not one written by datasets' save_to_disk (no state.json or "
                        f"dataset_dict.json); use a {SOURCES_TEXT}")
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{folder}: reading a folder saved by Hugging Face datasets needs the datasets library: "
                          "pip install datasets (it comes with fedllm's dependency flwr-datasets)") from None
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # the library raises several kinds (FileNotFoundError, ArrowInvalid, JSON errors)
        raise DataError(f"{folder}: cannot read this saved dataset ({exc}); save it again with save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
        if split is None:
            raise DataError(f"{folder}: a DatasetDict with splits {', '.join(splits)} and no 'train' split; point "
                            f"data-path at the split's folder, e.g. {folder / splits[0]}")
        loaded = loaded[split]
    for number, row in enumerate(loaded, start=1):
        yield f"record {number}", {k: v for k, v in row.items() if v is not None}


def _read_raw(path: Path, suffix: str) -> Iterator[tuple[str, Any]]:
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            number = 0
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                number += 1
                where = f"record {number} (line {line_no})"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: {where}: invalid JSON ({exc.msg}); each line must be one JSON object") from None
    elif suffix == ".json":
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of record objects, found {type(data).__name__}")
        for number, raw in enumerate(data, start=1):
            yield f"record {number}", raw
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            for number, row in enumerate(reader, start=1):
                yield f"record {number} (line {reader.line_num})", {k: v for k, v in row.items() if k and v != ""}
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - pyarrow is a dependency
            raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:
            raise DataError(f"{path}: cannot read Parquet: {exc}") from None
        for number, row in enumerate(rows, start=1):
            yield f"record {number}", {k: v for k, v in row.items() if v is not None}


def _text_field(raw: dict, key: str, where: str, *, required: bool) -> str | None:
    if key not in raw:
        if required:
            raise DataError(f"{where}: missing field '{key}' (expected a non-empty string)")
        return None
    value = raw[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, found {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty; expected a non-empty string")
    return value


def _kind(raw: dict) -> str | None:
    if "messages" in raw:
        return "chat"
    if "conversations" in raw:
        return "sharegpt"
    if "instruction" in raw or "output" in raw:
        return "instruction"
    if "text" in raw:
        return "text"
    return None


def normalise_record(raw: Any, *, format: str = "auto", where: str = "record") -> Record:
    """One raw record -> ``{"messages": [...]}`` or ``{"text": str}``."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(raw).__name__}")
    kind = _kind(raw) if format == "auto" else format
    if kind is None:
        raise DataError(
            f"{where}: unrecognised record with fields {sorted(raw)}; expected 'instruction'/'output' "
            "(optional 'input'), 'messages' (list of role/content), 'conversations' (ShareGPT: list of "
            "from/value), or 'text'"
        )
    if kind == "instruction":
        instruction = _text_field(raw, "instruction", where, required=True)
        extra = _text_field(raw, "input", where, required=False)
        output = _text_field(raw, "output", where, required=True)
        prompt = instruction if not extra or not extra.strip() else f"{instruction}\n\n{extra}"
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]}
    if kind == "chat":
        return {"messages": _messages(raw, where)}
    if kind == "sharegpt":
        return {"messages": _sharegpt(raw, where)}
    return {"text": _text_field(raw, "text", where, required=True)}


def _turns(raw: dict, key: str, keys: str, where: str) -> list:
    """The non-empty list in field ``key`` (CSV and Parquet carry it as a JSON string)."""
    turns = raw.get(key)
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field '{key}' is a string that is not a JSON list") from None
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of {{{keys}}} objects")
    return turns


def _messages(raw: dict, where: str) -> list[dict[str, str]]:
    messages = _turns(raw, "messages", "role, content", where)
    out = []
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role = {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: messages[{i}].content must be a non-empty string")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: field 'messages' has no assistant turn; there is nothing to learn")
    return out


def _sharegpt(raw: dict, where: str) -> list[dict[str, str]]:
    """ShareGPT ``conversations`` (``from``/``value``) -> chat messages (``role``/``content``)."""
    turns = _turns(raw, "conversations", "from, value", where)
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: conversations[{i}] must be an object with 'from' and 'value'")
        speaker, value = turn.get("from"), turn.get("value")
        if speaker not in SHAREGPT_ROLES:
            raise DataError(f"{where}: conversations[{i}].from = {speaker!r}; expected one of "
                            f"{', '.join(SHAREGPT_ROLES)}")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: conversations[{i}].value must be a non-empty string")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return _messages({"messages": messages}, where)
