"""Read a site's records from a local file and check their schema.

Accepted files: JSON Lines (``.jsonl``), JSON (``.json``: a list of objects), CSV (``.csv``, a
header row) and Parquet (``.parquet``). Accepted records, one kind per record:

* instruction: ``instruction`` (str), optional ``input`` (str), ``output`` (str);
* chat: ``messages``, a list of ``{"role": "system"|"user"|"assistant", "content": str}`` that
  contains at least one assistant turn;
* ShareGPT conversations: ``conversations``, a list of ``{"from": "system"|"human"|"gpt",
  "value": str}`` (also ``user``/``assistant``/``bot``) with at least one ``gpt`` turn;
* plain text: ``text`` (str).

Every record is normalised to ``{"messages": [...]}`` or ``{"text": ...}``. Any problem stops the
load with a ``DataError`` naming the file, the record number (1-based; for JSONL and CSV also
the line), the field and what was expected, before any training starts.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedllm.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
FORMATS = ("auto", "instruction", "chat", "sharegpt", "text")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "bot": "assistant"}
ROLES = ("system", "user", "assistant")

Record = dict[str, Any]


def load_records(path: str | Path, *, format: str = "auto") -> list[Record]:
    """All records of one file, normalised; raises ``DataError`` on the first bad one."""
    path = Path(path)
    if format not in FORMATS:
        raise DataError(f"{path}: unknown data format {format!r}; use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: data file not found; check the site's data path")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    records = [
        normalise_record(raw, format=format, where=f"{path}: {where}")
        for where, raw in _read_raw(path, suffix)
    ]
    if not records:
        raise DataError(f"{path}: no records; a site needs at least 2 records (train + held-out)")
    return records


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
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many types
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


def _messages(raw: dict, where: str) -> list[dict[str, str]]:
    messages = raw.get("messages")
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field 'messages' is a string that is not a JSON list") from None
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
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
    turns = raw.get("conversations")
    if isinstance(turns, str):  # CSV and Parquet carry it as a JSON string
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field 'conversations' is a string that is not a JSON list") from None
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} objects")
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
