"""A site file ``sites/<name>.toml``: one institution's own settings, read and checked in one go.

The top-level keys are the site's Flower *node config*, the site schema of
:mod:`fedllm.config.site` (``SITE_KEYS``: ``site-name``, ``data-path``, ``ledger-path``,
``max-epsilon``, ``device``, ``signing-key``, ``require-dp``, ``data-columns``, ``max-delta``, ``eval-fraction``,
``max-eval-examples``), checked by its one
validator. An optional ``[connection]`` table holds what ``fedllm site start`` needs to reach the
coordinator: ``server``, ``root-certificates``, ``auth-key``, ``runtime-port``, ``state-dir``, and
which fedllm version it runs (``fedllm-version``, see :mod:`fedllm.flower.fab_check`).
This module adds the file-level work only: paths, files that must exist, the connection, and
messages that name the file.

* Relative paths are resolved against the folder that contains the site file (not the current
  directory), after ``~`` is expanded, so a site file and its data can move together.
* ``ledger-path = ""`` becomes ``<folder of the site file>/ledgers/<site-name>.json``: in
  deployment the ledger must stay in one fixed place at the site, whatever the run's settings.
* ``state-dir = ""`` becomes ``<folder of the site file>/.fedllm-site/<site-name>``.
* Validation gathers every problem (the schema's and the file's) into one ``ConfigError`` that
  names the file, the key, the bad value and what is allowed, with a did-you-mean for misspelt keys.

:meth:`SiteFile.node_config` renders the site part as the ``--node-config`` string of
``flower-supernode``; Flower parses it back (``flwr.common.config.parse_config_args``) into the
same values, which ``SiteConfig.from_node_config`` turns into the same ``SiteConfig``. Values are
written with ``tomli_w`` and then made safe for Flower's splitter (:func:`node_config_value`).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.config import SITE_DEFAULTS, SITE_KEYS, SITE_NAME_RE, SiteConfig, read_toml, site_problems, toml_value
from fedllm.data.loading import SOURCES_TEXT
from fedllm.errors import ConfigError

CONNECTION_TABLE = "connection"
CONNECTION_KEYS = ("server", "root-certificates", "auth-key", "runtime-port", "state-dir", "fedllm-version")
ALWAYS_IN_NODE_CONFIG = ("site-name", "data-path", "ledger-path")

LEDGER_FOLDER = "ledgers"
STATE_FOLDER = ".fedllm-site"


@dataclass(frozen=True)
class ConnectionSettings:
    """How the site's SuperNode reaches the coordinator. Paths are absolute; "" means unset."""

    server: str = ""  # "HOST:PORT" of the coordinator's SuperLink (Fleet API); "": give --server
    root_certificates: str = ""  # CA certificate (PEM) that signed the coordinator's TLS certificate
    auth_key: str = ""  # the SuperNode's private key (OpenSSH, NIST EC curve) for SuperNode authentication
    runtime_port: int = 0  # local port of the SuperNode's own Runtime API; 0: pick a free one
    state_dir: str = ""  # the SuperNode's Flower home (always set after load_site_file)
    fedllm_version: str = ""  # the fedllm version whose app bundle the site accepts; "": the installed one


@dataclass(frozen=True)
class SiteFile:
    """A loaded, checked site file."""

    path: Path
    site: SiteConfig  # absolute paths; ledger_path always set
    connection: ConnectionSettings

    def node_config(self) -> str:
        """The ``--node-config`` string for ``flower-supernode``: space-separated ``key=value`` with
        TOML values, only the keys that differ from the schema's defaults (site-name, data-path and
        ledger-path always)."""
        return " ".join(f"{key}={node_config_value(value)}" for key, value in self.site.to_dict().items()
                        if key in ALWAYS_IN_NODE_CONFIG or key not in SITE_DEFAULTS  # required: always
                        or value != SITE_DEFAULTS[key])


_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def node_config_value(value: str | float | bool) -> str:
    """One value as TOML (``tomli_w``) that survives Flower's ``--node-config`` parser.

    Flower splits the string with the pattern ``key=("[^"]*"|'[^']*'|\\S+)``, so a double-quoted
    value must not contain a ``"`` at all, not even escaped (``tomli_w`` writes ``\\"`` and Flower
    would cut the value there). Each ``\\"`` escape is therefore rewritten as ``\\u0022``, which
    TOML reads back as the same quote.
    """
    return _ESCAPE.sub(lambda m: "\\u0022" if m.group(1) == '"' else m.group(0), toml_value(value))


def _did_you_mean(key: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _resolve(value: str, folder: Path) -> Path:
    """``~`` expanded; relative to ``folder``; normalised (symbolic links are not resolved)."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = folder / path
    return Path(os.path.normpath(path))


def _shown(value: str, resolved: Path) -> str:
    """``'x.jsonl'`` or ``'x.jsonl' (resolved to /abs/x.jsonl)`` when the two differ."""
    return repr(value) if str(resolved) == value else f"{value!r} (resolved to {resolved})"


class _Checker:
    """Collects every problem of one site file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.problems: list[str] = []

    def add(self, text: str) -> None:
        self.problems.append(text)

    def string(self, table: Mapping[str, Any], key: str, name: str, what: str) -> str | None:
        """The string value of ``key`` ("" when absent); None (and a problem) when not a string."""
        value = table.get(key, "")
        if not isinstance(value, str):
            self.add(f"{name} = {value!r}: must be a string ({what})")
            return None
        return value

    def path(self, table: Mapping[str, Any], key: str, name: str, what: str, *, must_exist: bool,
             hint: str = "") -> str:
        """An optional path value, resolved; "" when unset or invalid (the problem is recorded)."""
        value = self.string(table, key, name, what)
        if not value:
            return ""
        resolved = _resolve(value, self.folder)
        if must_exist and not resolved.is_file():
            where = "no such file" if not resolved.exists() else "not a file"
            self.add(f"{name} = {_shown(value, resolved)}: {where}; must be {what}{hint}")
        return str(resolved)


def _check_server(value: str) -> str | None:
    """Why ``value`` is not "" or HOST:PORT (None: it is fine)."""
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        return 'must be "HOST:PORT" (e.g. "coordinator.example.org:9092"), or "" to give --server on the command line'
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            return 'an IPv6 address must be in brackets: "[::1]:9092"'
    elif ":" in host:
        return 'an IPv6 address must be in brackets: "[2001:db8::1]:9092"'
    if any(ch.isspace() for ch in host):
        return "the host name contains white space"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"port {port!r} must be a number from 1 to 65535"
    return None


def load_site_file(path: Path | str) -> SiteFile:
    """Read and check ``sites/<name>.toml``; ``ConfigError`` naming the file and every problem."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder, not a site file" if path.is_dir() else "no such site file"
        raise ConfigError(f"{path}: {what}; copy sites/_template.toml and fill in site-name and data-path")
    raw = read_toml(path)  # ConfigError naming the file for bad TOML
    folder = Path(os.path.abspath(path)).parent
    check = _Checker(folder)
    node = _check_site(raw, folder, check)
    name = node.get("site-name")
    name = name if isinstance(name, str) and SITE_NAME_RE.fullmatch(name) else None
    connection = _check_connection(raw.get(CONNECTION_TABLE, {}), folder, name, check)
    if check.problems:
        count = len(check.problems)
        raise ConfigError(f"{path}: invalid site file ({count} problem{'s' if count != 1 else ''}; relative paths "
                          f"are resolved from {folder}):\n  - " + "\n  - ".join(check.problems))
    try:
        site = SiteConfig.from_node_config(node)
    except ConfigError as exc:  # pragma: no cover - the same validator already passed above
        raise ConfigError(f"{path}: {exc}") from None
    return SiteFile(path=Path(os.path.abspath(path)), site=site, connection=connection)


def _check_site(raw: Mapping[str, Any], folder: Path, check: _Checker) -> dict[str, Any]:
    """The site schema's problems, then the file's own (paths resolved from ``folder``, files that
    must exist); returns the node config with absolute paths and the ledger's default place."""
    entry = {key: value for key, value in raw.items() if key != CONNECTION_TABLE}
    misplaced = {key: f"it belongs in the [{CONNECTION_TABLE}] table" for key in CONNECTION_KEYS}
    for problem in site_problems(entry, also_allowed=(CONNECTION_TABLE,), misplaced=misplaced):
        check.add(problem)
    node = dict(entry)
    data = entry.get("data-path")
    if isinstance(data, str) and data:
        resolved = _resolve(data, folder)
        if not resolved.exists():
            check.add(f"data-path = {_shown(data, resolved)}: no such file or folder; must be the site's data "
                      f"(a {SOURCES_TEXT})")
        node["data-path"] = str(resolved)
    ledger = entry.get("ledger-path", "")
    if isinstance(ledger, str) and ledger:
        resolved = _resolve(ledger, folder)
        if resolved.is_dir():
            check.add(f"ledger-path = {_shown(ledger, resolved)}: is a folder; must be the ledger's file "
                      "(e.g. ledgers/<site-name>.json)")
        node["ledger-path"] = str(resolved)
    elif ledger == "" and isinstance(entry.get("site-name"), str) and SITE_NAME_RE.fullmatch(entry["site-name"]):
        node["ledger-path"] = str(folder / LEDGER_FOLDER / f"{entry['site-name']}.json")
    if isinstance(entry.get("signing-key"), str):
        node["signing-key"] = check.path(entry, "signing-key", "signing-key",
                                         "the site's Ed25519 private key (PEM) that signs its ledger, or \"\"",
                                         must_exist=True,
                                         hint="; create one with 'fedllm ledger keygen --out DIR --site NAME'")
    return node


def _check_connection(table: Any, folder: Path, name: str | None, check: _Checker) -> ConnectionSettings:
    """The ``[connection]`` table's problems; its paths resolved from ``folder``."""
    if not isinstance(table, dict):
        check.add(f"{CONNECTION_TABLE} = {table!r}: must be a table ([{CONNECTION_TABLE}]) with the keys "
                  f"{', '.join(CONNECTION_KEYS)}")
        table = {}
    for key in table:
        if key not in CONNECTION_KEYS:
            hint = (" (it belongs at the top level, before the [connection] table)" if key in SITE_KEYS
                    else _did_you_mean(key, CONNECTION_KEYS))
            check.add(f"{CONNECTION_TABLE}.{key}: unknown key{hint}; allowed: {', '.join(CONNECTION_KEYS)}")
    server = check.string(table, "server", f"{CONNECTION_TABLE}.server", '"HOST:PORT" or ""')
    if server:
        why = _check_server(server)
        if why:
            check.add(f"{CONNECTION_TABLE}.server = {server!r}: {why}")
    root = check.path(table, "root-certificates", f"{CONNECTION_TABLE}.root-certificates",
                      "the CA certificate (PEM) that signed the coordinator's TLS certificate, or \"\"",
                      must_exist=True, hint="; for a trial, 'fedllm certs' writes certs/ca.crt")
    auth = check.path(table, "auth-key", f"{CONNECTION_TABLE}.auth-key",
                      "the SuperNode's private key (OpenSSH, EC P-384), or \"\"",
                      must_exist=True, hint="; for a trial, 'fedllm certs --sites NAME' writes certs/sites/NAME")
    port = table.get("runtime-port", 0)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        check.add(f"{CONNECTION_TABLE}.runtime-port = {port!r}: must be an integer from 0 to 65535 "
                  "(0 = pick a free port)")
        port = 0
    state_dir = check.path(table, "state-dir", f"{CONNECTION_TABLE}.state-dir",
                           "the folder for the SuperNode's Flower home, or \"\"", must_exist=False)
    if state_dir and Path(state_dir).is_file():
        check.add(f"{CONNECTION_TABLE}.state-dir = {table['state-dir']!r}: is a file; must be a folder")
    if not state_dir and name:
        state_dir = str(folder / STATE_FOLDER / name)
    version = check.string(table, "fedllm-version", f"{CONNECTION_TABLE}.fedllm-version",
                           'the fedllm version this site runs, e.g. "0.1.0", or "" for the installed one')
    return ConnectionSettings(server=server or "", root_certificates=root, auth_key=auth, runtime_port=port,
                              state_dir=state_dir, fedllm_version=(version or "").strip())
