"""TOML in and out: ``tomllib`` reads, ``tomli_w`` writes; nothing here formats TOML by hand.

* :func:`read_toml` names the file in every error (missing file, bad TOML).
* :func:`toml_text` writes a mapping (nested mappings become tables) with an optional header of
  ``#`` comment lines; what it writes parses back with ``tomllib`` to the same values (strings with
  quotes, backslashes, control characters and non-ASCII included; floats ``inf``/``nan`` too).
* :func:`toml_value` is one value as TOML (``true``, ``1e-05``, ``"a \\"b\\""``), for messages and
  for command-line values such as Flower's ``--node-config``.
* :func:`flatten` turns nested tables into the flat dotted keys Flower's run config uses.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedllm.errors import ConfigError

_PROBE = "v"


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file with an error that names the file and the TOML problem."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def toml_text(data: Mapping[str, Any], header: str = "") -> str:
    """``data`` as a TOML document, after ``header`` written as ``# `` comment lines."""
    comments = "".join(f"# {line}\n" for line in header.splitlines()) if header else ""
    return comments + tomli_w.dumps(data)


def toml_value(value: bool | int | float | str) -> str:
    """One value as TOML (the right-hand side of ``key = value``)."""
    line = tomli_w.dumps({_PROBE: value})
    return line[len(f"{_PROBE} = "):].rstrip("\n")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables -> flat dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{full}."))
        else:
            out[full] = value
    return out
