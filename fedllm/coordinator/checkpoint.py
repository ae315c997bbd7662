"""The coordinator's state after its last completed round, so that ``fedllm run --resume RUN_DIR``
continues exactly where the run stopped.

What is saved (after a round has fully completed: adapter checkpoint and history written):

* the global adapter after that round (the arrays the next round sends), in its key order;
* the strategy's state carried from round to round, as the strategy describes it
  (``Strategy.state()`` of ``coordinator.protocol``: a JSON description naming its classes,
  and tensors; for Flower's strategies see ``fedllm.flower.strategy_state``). It is restored into
  a strategy freshly built from the run's configuration, which refuses a state that does not fit;
* the round counter, every run id that worked on the run, the node-id → site-name map, and the
  caller's central-DP block (JSON-serialisable, stored as given).

Layout, all in ``RUN_DIR/state/``::

    server-state.json                              everything above but tensors, the file names
                                                   with their sha256, and its own checksum
    global-adapter.r<round>.<sha256[:16]>.safetensors   the global adapter
    strategy.r<round>.<sha256[:16]>.safetensors         the strategy's tensors (when it has any)

Crash safety: tensor files are written under new, content-addressed names (fsynced, renamed
into place), then ``server-state.json`` is replaced atomically and is the only thing that says
which files are current; files it no longer names are deleted afterwards. A crash at any point
leaves the old state or the new one, never a mix. Loading checks the JSON's checksum and every
file's sha256; anything wrong raises ``ConfigError`` ("RUN_DIR/state: ... cannot resume; ...").

numpy + safetensors for tensors; no Flower types (the strategy describes its own state).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from fedllm.coordinator.protocol import Arrays, Strategy
from fedllm.errors import ConfigError
from fedllm.files import write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

STATE_DIR = "state"
STATE_FILE = "server-state.json"
KIND = "fedllm-server-state"
FORMAT = 1
_OWNED = re.compile(r"(global-adapter|strategy)\.r\d+\.[0-9a-f]{16}\.safetensors")
_OWNED_TMP = re.compile(r"\.(global-adapter|strategy|server-state)\..*\.tmp")


@dataclass(frozen=True)
class ServerState:
    """A verified saved state. ``arrays`` is the global adapter after ``server_round`` (send it in
    round ``server_round + 1``); ``run_ids`` lists every run that worked on it, the first being
    the original; ``strategy_state`` (``"description"``, ``"tensors"``) is what
    :func:`restore_strategy` puts back."""

    server_round: int
    run_id: str
    run_ids: tuple[str, ...]
    names: dict[int, str]
    central: dict | None
    arrays: Arrays
    strategy_class: str
    saved: str
    state_dir: Path
    strategy_state: dict = field(repr=False, default_factory=dict)


# ------------------------------------------------------------------------------------- save


def save_server_state(run_dir: Path, *, server_round: int, arrays: Arrays, strategy: Strategy,
                      names: dict[int, str], central: dict | None, run_id: str) -> None:
    """Save the state after ``server_round`` (>= 1) completed; call it after the round's adapter
    checkpoint and ``history.save()``. ``arrays`` is the new global adapter, ``central`` a
    JSON-serialisable dict (or None without central DP). Crash-safe (module docstring).
    Raises ``ValueError`` for a strategy whose state cannot be saved (``Strategy.state``)."""
    if not isinstance(server_round, int) or server_round < 1:
        raise ValueError(f"server_round must be an int >= 1, not {server_round!r}")
    json.dumps(central, allow_nan=False)  # TypeError/ValueError now, before anything is written
    state_dir = Path(run_dir) / STATE_DIR
    description, tensors = strategy.state()
    json.dumps(description, allow_nan=False)
    state_dir.mkdir(parents=True, exist_ok=True)
    previous = _read_json_quietly(state_dir / STATE_FILE)
    run_ids = [run_id]
    if (previous is not None and isinstance(previous.get("round"), int) and previous["round"] < server_round
            and isinstance(previous.get("run-ids"), list)):
        run_ids = [str(r) for r in previous["run-ids"]]  # a resumed run goes on
        if run_id not in run_ids:
            run_ids.append(run_id)
    adapter_keys = list(arrays.keys())
    files: dict[str, dict] = {}
    files["global-adapter"] = _write_tensors(
        state_dir, "global-adapter", server_round, {k: arrays[k] for k in adapter_keys})
    files["global-adapter"]["keys"] = adapter_keys
    if tensors:
        files["strategy"] = _write_tensors(state_dir, "strategy", server_round, tensors)
    data = {
        "kind": KIND,
        "format": FORMAT,
        "round": server_round,
        "run-id": run_id,
        "run-ids": run_ids,
        "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "names": {str(node): name for node, name in sorted(names.items())},
        "central-dp": central,
        "strategy": description,
        "files": files,
    }
    data["checksum"] = _checksum(data)
    write_json_atomic(state_dir / STATE_FILE, data)
    _remove_obsolete(state_dir, {f["name"] for f in files.values()})


def clear_server_state(run_dir: Path) -> None:
    """Remove a saved state (the files this module writes in ``RUN_DIR/state``); a fresh run
    into an existing folder calls it first so that ``--resume`` never picks up an older run."""
    state_dir = Path(run_dir) / STATE_DIR
    with contextlib.suppress(FileNotFoundError):
        (state_dir / STATE_FILE).unlink()
    if state_dir.is_dir():
        _remove_obsolete(state_dir, set())


def _write_tensors(state_dir: Path, stem: str, server_round: int, tensors: dict[str, np.ndarray]) -> dict:
    blob = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    digest = hashlib.sha256(blob).hexdigest()
    name = f"{stem}.r{server_round}.{digest[:16]}.safetensors"  # new content never overwrites a named file
    write_bytes_atomic(state_dir / name, blob)
    return {"name": name, "sha256": digest}


def _remove_obsolete(state_dir: Path, keep: set[str]) -> None:
    for path in state_dir.iterdir():
        if path.name in keep or not (_OWNED.fullmatch(path.name) or _OWNED_TMP.fullmatch(path.name)):
            continue
        try:
            path.unlink()
        except OSError as exc:  # an old file left behind is harmless: the JSON does not name it
            log.warning("could not remove obsolete state file %s: %s", path, exc)


def _checksum(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=False).encode("utf-8")).hexdigest()


def _read_json_quietly(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------- load


def load_server_state(run_dir: Path) -> ServerState | None:
    """The verified state of the last completed round in ``RUN_DIR/state``; None when no round
    was saved. A corrupt, tampered or incomplete state raises ``ConfigError``."""
    state_dir = Path(run_dir) / STATE_DIR
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{state_dir}: {problem}; cannot resume; restore {state_dir} from a backup, or start "
                           "a new run (without --resume) into another output folder")

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(f"{STATE_FILE} is unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise fail(f"{STATE_FILE} is not a fedllm server state")
    if data.get("format") != FORMAT:
        raise fail(f"{STATE_FILE} has format {data.get('format')!r}, this fedllm reads format {FORMAT}")
    try:
        if data.get("checksum") != _checksum(data):
            raise fail(f"{STATE_FILE} does not match its own checksum (edited or corrupt)")
        files = data["files"]
        adapter_blob = _read_verified(state_dir, files["global-adapter"], fail)
        adapter = safetensors.numpy.load(adapter_blob)
        adapter_keys = list(files["global-adapter"]["keys"])
        if set(adapter) != set(adapter_keys):
            raise fail(f"{files['global-adapter']['name']} does not hold the adapter keys {STATE_FILE} lists")
        strategy_tensors = {}
        if "strategy" in files:
            strategy_tensors = safetensors.numpy.load(_read_verified(state_dir, files["strategy"], fail))
        description = data["strategy"]
        if not isinstance(description, dict) or not isinstance(description["class"], str):
            raise fail(f"{STATE_FILE} has no strategy description")
        return ServerState(
            server_round=int(data["round"]),
            run_id=str(data["run-id"]),
            run_ids=tuple(str(r) for r in data["run-ids"]),
            names={int(node): str(name) for node, name in data["names"].items()},
            central=data["central-dp"],
            arrays={k: np.array(adapter[k]) for k in adapter_keys},
            strategy_class=description["class"],
            saved=str(data["saved"]),
            state_dir=state_dir,
            strategy_state={"description": description, "tensors": strategy_tensors},
        )
    except SafetensorError as exc:
        raise fail(f"a tensor file is unreadable ({exc})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # the JSON's structure
        raise fail(f"{STATE_FILE} is malformed ({exc.__class__.__name__}: {exc})") from None


def _read_verified(state_dir: Path, entry: dict, fail: Any) -> bytes:
    name = str(entry["name"])
    if not _OWNED.fullmatch(name):
        raise fail(f"{STATE_FILE} names an unexpected file {name!r}")
    try:
        blob = (state_dir / name).read_bytes()
    except OSError as exc:
        raise fail(f"{name} is missing or unreadable ({exc.__class__.__name__})") from None
    if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise fail(f"{name} does not match its sha256 in {STATE_FILE} (changed or corrupt)")
    return blob


# ---------------------------------------------------------------------------------- restore


def restore_strategy(strategy: Strategy, state: ServerState) -> None:
    """Put the saved strategy state into ``strategy``, freshly built from the run's configuration.
    A state that does not fit (other strategy classes or hyperparameters, missing tensors) raises
    ``ConfigError`` naming the state folder (``Strategy.restore``'s reason)."""
    try:
        strategy.restore(state.strategy_state["description"], state.strategy_state["tensors"])
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{state.state_dir}: {exc}") from None
