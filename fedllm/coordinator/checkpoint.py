"""The coordinator's state after its last completed round, so that ``fedllm run --resume RUN_DIR``
continues exactly where the run stopped.

What is saved (after a round has fully completed: adapter checkpoint and history written):

* the global adapter after that round (the arrays the next round sends), in its key order;
* the strategy's state carried from round to round, read from the installed Flower 1.42 source:
  FedAdam/FedAdagrad/FedYogi (``FedOpt``): ``m_t``, ``v_t`` and ``current_arrays`` (the arrays
  sent last; ``configure_train`` overwrites it, it is kept for exactness). There is no step
  counter: Adam's bias correction uses ``server_round``. FedAvg and FedProx carry nothing.
  fedllm's central-DP wrappers (``SiteLevelFixedClipping``, ``SiteLevelAdaptiveClipping``):
  ``current_arrays``, ``num_sampled_clients``, ``round_clipping_norm``, ``round_sites`` and,
  adaptive only, ``clipping_norm`` (C moves every round). The wrappers' noise is drawn after a
  fresh 256-bit reseed every round, so there is no generator state to keep. Flower's privacy
  accountant (unused by fedllm) is refused. Hyperparameters (``eta``, ``beta_1``, noise
  multiplier, ...) are saved too and must be equal when restoring: the state only means
  something for the same maths;
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

Flower glue (``ArrayRecord``, strategy classes); numpy + safetensors for tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedProx, FedYogi
from safetensors import SafetensorError

from fedllm.errors import ConfigError
from fedllm.files import write_bytes_atomic, write_json_atomic
from fedllm.flower.strategies import SiteLevelAdaptiveClipping, SiteLevelFixedClipping

log = logging.getLogger(__name__)

STATE_DIR = "state"
STATE_FILE = "server-state.json"
KIND = "fedllm-server-state"
FORMAT = 1
_OWNED = re.compile(r"(global-adapter|strategy)\.r\d+\.[0-9a-f]{16}\.safetensors")
_OWNED_TMP = re.compile(r"\.(global-adapter|strategy|server-state)\..*\.tmp")

# Per strategy class (exact type): hyperparameters that must match, scalar state, array state.
_SPEC: dict[type, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    FedAvg: ((), (), ()),
    FedProx: (("proximal_mu",), (), ()),
    FedAdam: (("eta", "eta_l", "beta_1", "beta_2", "tau"), (), ("current_arrays", "m_t", "v_t")),
    FedAdagrad: (("eta", "eta_l", "beta_1", "beta_2", "tau"), (), ("current_arrays", "m_t", "v_t")),
    FedYogi: (("eta", "eta_l", "beta_1", "beta_2", "tau"), (), ("current_arrays", "m_t", "v_t")),
    SiteLevelFixedClipping: (("noise_multiplier", "clipping_norm"),
                             ("num_sampled_clients", "round_clipping_norm", "round_sites"), ("current_arrays",)),
    SiteLevelAdaptiveClipping: (("noise_multiplier", "clipped_count_stddev", "target_clipped_quantile", "clip_norm_lr"),
                                ("clipping_norm", "num_sampled_clients", "round_clipping_norm", "round_sites"),
                                ("current_arrays",)),
}
_WRAPPERS = (SiteLevelFixedClipping, SiteLevelAdaptiveClipping)


@dataclass(frozen=True)
class ServerState:
    """A verified saved state. ``arrays`` is the global adapter after ``server_round`` (send it in
    round ``server_round + 1``); ``run_ids`` lists every run that worked on it, the first being
    the original; ``strategy_state`` is what :func:`restore_strategy` puts back."""

    server_round: int
    run_id: str
    run_ids: tuple[str, ...]
    names: dict[int, str]
    central: dict | None
    arrays: ArrayRecord
    strategy_class: str
    saved: str
    state_dir: Path
    strategy_state: dict = field(repr=False, default_factory=dict)


# ------------------------------------------------------------------------------------- save


def save_server_state(run_dir: Path, *, server_round: int, arrays: ArrayRecord, strategy: Any,
                      names: dict[int, str], central: dict | None, run_id: str) -> None:
    """Save the state after ``server_round`` (>= 1) completed; call it after the round's adapter
    checkpoint and ``history.save()``. ``arrays`` is the new global adapter, ``central`` a
    JSON-serialisable dict (or None without central DP). Crash-safe (module docstring).
    Raises ``ValueError`` for a strategy whose state this module does not know."""
    if not isinstance(server_round, int) or server_round < 1:
        raise ValueError(f"server_round must be an int >= 1, not {server_round!r}")
    json.dumps(central, allow_nan=False)  # TypeError/ValueError now, before anything is written
    state_dir = Path(run_dir) / STATE_DIR
    layers, tensors = _describe_strategy(strategy)
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
        state_dir, "global-adapter", server_round, {k: arrays[k].numpy() for k in adapter_keys})
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
        "strategy": {"class": _class_label(strategy), "layers": layers},
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


def _layers(strategy: Any) -> list[Any]:
    layers = [strategy]
    while isinstance(layers[-1], _WRAPPERS):
        layers.append(layers[-1].strategy)
    return layers


def _class_label(strategy: Any) -> str:
    names = [type(layer).__name__ for layer in _layers(strategy)]
    return "".join(f"{n}(" for n in names[:-1]) + names[-1] + ")" * (len(names) - 1)


def _describe_strategy(strategy: Any) -> tuple[list[dict], dict[str, np.ndarray]]:
    """(JSON description of each layer, the tensors under unique names)."""
    layers, tensors = [], {}
    for index, layer in enumerate(_layers(strategy)):
        spec = _SPEC.get(type(layer))
        if spec is None:
            raise ValueError(f"cannot save the state of a {type(layer).__name__} strategy (known: "
                             f"{', '.join(sorted(t.__name__ for t in _SPEC))})")
        if getattr(layer, "accountant", None) is not None or getattr(layer, "_pending_events", None):
            raise ValueError("cannot save the state of Flower's privacy accountant (fedllm does not use it)")
        settings_names, scalar_names, array_names = spec
        groups: dict[str, dict] = {}
        for group in array_names:
            value = getattr(layer, group)
            if value is None:
                groups[group] = {"kind": "none", "keys": []}
                continue
            kind = "arrayrecord" if isinstance(value, ArrayRecord) else "ndarrays"
            keys = list(value.keys())
            for key in keys:
                tensors[f"{index}.{group}/{key}"] = value[key].numpy() if kind == "arrayrecord" else np.asarray(value[key])
            groups[group] = {"kind": kind, "keys": keys}
        layers.append({
            "class": type(layer).__name__,
            "settings": {name: _scalar(getattr(layer, name)) for name in settings_names},
            "scalars": {name: _scalar(getattr(layer, name)) for name in scalar_names},
            "arrays": groups,
        })
    return layers, tensors


def _scalar(value: Any) -> int | float:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"unexpected bool strategy attribute {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"cannot save a non-finite strategy attribute ({value})")
    return value


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
        layers = data["strategy"]["layers"]
        for index, layer in enumerate(layers):
            for group, spec in layer["arrays"].items():
                missing = [k for k in spec["keys"] if f"{index}.{group}/{k}" not in strategy_tensors]
                if missing:
                    raise fail(f"the strategy file lacks {group} tensor {missing[0]!r}")
        return ServerState(
            server_round=int(data["round"]),
            run_id=str(data["run-id"]),
            run_ids=tuple(str(r) for r in data["run-ids"]),
            names={int(node): str(name) for node, name in data["names"].items()},
            central=data["central-dp"],
            arrays=ArrayRecord({k: Array(np.array(adapter[k])) for k in adapter_keys}),
            strategy_class=str(data["strategy"]["class"]),
            saved=str(data["saved"]),
            state_dir=state_dir,
            strategy_state={"layers": layers, "tensors": strategy_tensors},
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


def restore_strategy(strategy: Any, state: ServerState) -> None:
    """Put the saved strategy state into ``strategy``, freshly built from the run's configuration
    (``build_strategy``, then ``with_central_dp`` when enabled). The strategy must be of the same
    classes with the same hyperparameters, else ``ConfigError``."""
    layers = _layers(strategy)
    saved = state.strategy_state["layers"]
    built = [type(layer).__name__ for layer in layers]
    if built != [entry["class"] for entry in saved]:
        raise ConfigError(f"{state.state_dir}: the state was saved by a {state.strategy_class} strategy, this run "
                          f"builds {_class_label(strategy)}; cannot resume; resume with the run's own configuration "
                          "(strategy.name and central-dp.* as in RUN_DIR/config.toml)")
    tensors = state.strategy_state["tensors"]
    for index, (layer, entry) in enumerate(zip(layers, saved, strict=True)):
        settings_names, _, _ = _SPEC[type(layer)]
        differ = [f"{name} {entry['settings'][name]!r} (now {_scalar(getattr(layer, name))!r})"
                  for name in settings_names if entry["settings"][name] != _scalar(getattr(layer, name))]
        if differ:
            raise ConfigError(f"{state.state_dir}: {entry['class']} was run with {'; '.join(differ)}; cannot resume; "
                              "resume with the run's own configuration (RUN_DIR/config.toml)")
        for name, value in entry["scalars"].items():
            setattr(layer, name, value)
        for group, spec in entry["arrays"].items():
            values = {k: np.array(tensors[f"{index}.{group}/{k}"]) for k in spec["keys"]}
            if spec["kind"] == "none":
                setattr(layer, group, None)
            elif spec["kind"] == "arrayrecord":
                setattr(layer, group, ArrayRecord({k: Array(v) for k, v in values.items()}))
            else:
                setattr(layer, group, values)
