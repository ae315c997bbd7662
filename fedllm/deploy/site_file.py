"""A site file ``sites/<name>.toml``: one institution's own settings, read and checked in one go.

The top-level keys are the site's Flower *node config* (``SiteConfig.NODE_KEYS``): ``site-name``,
``data-path``, ``ledger-path``, ``max-epsilon``, ``device``, ``signing-key``, ``require-dp``,
``data-columns``. An optional
``[connection]`` table holds what ``fedllm site start`` needs to reach the coordinator:
``server``, ``root-certificates``, ``auth-key``, ``runtime-port``, ``state-dir``.

* Relative paths are resolved against the folder that contains the site file (not the current
  directory), after ``~`` is expanded, so a site file and its data can move together.
* ``ledger-path = ""`` becomes ``<folder of the site file>/ledgers/<site-name>.json``: in
  deployment the ledger must stay in one fixed place at the site, whatever the run's settings.
* ``state-dir = ""`` becomes ``<folder of the site file>/.fedllm-site/<site-name>``.
* Validation gathers every problem into one ``ConfigError`` that names the file, the key, the bad
  value and what is allowed, with a did-you-mean for misspelt keys.

:meth:`SiteFile.node_config` renders the site part as the ``--node-config`` string of
``flower-supernode``; Flower parses it back (``flwr.common.config.parse_config_args``) into the
same values, which ``SiteConfig.from_node_config`` turns into the same ``SiteConfig``.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm.config import SiteConfig, read_toml
from fedllm.data.loading import SOURCES_TEXT, columns_problem
from fedllm.errors import ConfigError

CONNECTION_TABLE = "connection"
CONNECTION_KEYS = ("server", "root-certificates", "auth-key", "runtime-port", "state-dir")
TOP_KEYS = (*SiteConfig.NODE_KEYS, CONNECTION_TABLE)

SITE_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
DEVICE_RE = re.compile(r"cpu|cuda(:[0-9]+)?|mps")
DEVICES_TEXT = '"cpu", "cuda", "cuda:N" or "mps"'

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


@dataclass(frozen=True)
class SiteFile:
    """A loaded, checked site file."""

    path: Path
    site: SiteConfig  # absolute paths; ledger_path always set
    connection: ConnectionSettings

    def node_config(self) -> str:
        """The ``--node-config`` string for ``flower-supernode``: space-separated ``key=value`` with
        TOML values, only the keys that differ from ``SiteConfig``'s defaults (site-name, data-path
        and ledger-path always)."""
        site = self.site
        items: list[tuple[str, Any]] = [
            ("site-name", site.name), ("data-path", site.data_path), ("ledger-path", site.ledger_path)]
        if site.max_epsilon > 0:
            items.append(("max-epsilon", site.max_epsilon))
        if site.device != "cpu":
            items.append(("device", site.device))
        if site.signing_key:
            items.append(("signing-key", site.signing_key))
        if not site.require_dp:
            items.append(("require-dp", False))
        if site.data_columns:
            items.append(("data-columns", site.data_columns))
        return " ".join(f"{key}={node_config_value(value)}" for key, value in items)


def node_config_value(value: str | float) -> str:
    """One value as TOML that survives Flower's ``--node-config`` parser.

    Flower splits the string with the pattern ``key=("[^"]*"|'[^']*'|\\S+)``, so a double-quoted
    value must not contain a ``"`` at all, not even escaped (``json.dumps`` would write ``\\"``
    and Flower would cut the value there). Strings are therefore TOML basic strings with ``"``,
    backslash and control characters written as escapes (``\\u0022``, ``\\\\``, ``\\uXXXX``).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    out = []
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"' or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


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

    for key in raw:
        if key not in TOP_KEYS:
            hint = (f" (it belongs in the [{CONNECTION_TABLE}] table)" if key in CONNECTION_KEYS
                    else _did_you_mean(key, TOP_KEYS))
            check.add(f"{key}: unknown key{hint}; allowed: {', '.join(SiteConfig.NODE_KEYS)} and a "
                      f"[{CONNECTION_TABLE}] table")
    table = raw.get(CONNECTION_TABLE, {})
    if not isinstance(table, dict):
        check.add(f"{CONNECTION_TABLE} = {table!r}: must be a table ([{CONNECTION_TABLE}]) with the keys "
                  f"{', '.join(CONNECTION_KEYS)}")
        table = {}
    for key in table:
        if key not in CONNECTION_KEYS:
            hint = (" (it belongs at the top level, before the [connection] table)" if key in SiteConfig.NODE_KEYS
                    else _did_you_mean(key, CONNECTION_KEYS))
            check.add(f"{CONNECTION_TABLE}.{key}: unknown key{hint}; allowed: {', '.join(CONNECTION_KEYS)}")

    # -- the site (node config)
    name = check.string(raw, "site-name", "site-name", "the site's name")
    if name == "" or (name is not None and not SITE_NAME_RE.fullmatch(name)):
        shown = "site-name" if "site-name" not in raw else f"site-name = {name!r}"
        check.add(f"{shown}: required; letters, digits, '.', '_' and '-' only, not starting with '.' (it names "
                  "the ledger and state files), e.g. \"cardiology\"")
        name = None
    data = check.string(raw, "data-path", "data-path", "the path of the site's data file")
    if data == "":
        check.add(f"data-path: required; the site's data (a {SOURCES_TEXT})")
    elif data is not None:
        resolved = _resolve(data, folder)
        if not resolved.exists():
            check.add(f"data-path = {_shown(data, resolved)}: no such file or folder; must be the site's data "
                      f"(a {SOURCES_TEXT})")
        data = str(resolved)
    columns = check.string(raw, "data-columns", "data-columns", '"FIELD=COLUMN, ..." or ""')
    if columns and (why := columns_problem(columns)):
        check.add(f"data-columns = {columns!r}: {why}")
    ledger = check.string(raw, "ledger-path", "ledger-path", "the path of the site's privacy ledger")
    if ledger:
        resolved = _resolve(ledger, folder)
        if resolved.is_dir():
            check.add(f"ledger-path = {_shown(ledger, resolved)}: is a folder; must be the ledger's file "
                      "(e.g. ledgers/<site-name>.json)")
        ledger = str(resolved)
    elif ledger == "" and name:
        ledger = str(folder / LEDGER_FOLDER / f"{name}.json")
    cap = raw.get("max-epsilon", 0.0)
    if (not isinstance(cap, (int, float)) or isinstance(cap, bool) or not math.isfinite(cap) or cap < 0):
        check.add(f"max-epsilon = {cap!r}: must be a finite number >= 0 (the site's own cap on its cumulative ε; "
                  "0 = the run's privacy.max-epsilon)")
    device = raw.get("device", "cpu")
    if not isinstance(device, str) or not DEVICE_RE.fullmatch(device):
        check.add(f"device = {device!r}: must be {DEVICES_TEXT}")
    signing_key = check.path(raw, "signing-key", "signing-key",
                             "the site's Ed25519 private key (PEM) that signs its ledger, or \"\"",
                             must_exist=True, hint="; create one with 'fedllm ledger keygen --out DIR --site NAME'")

    require_dp = raw.get("require-dp", True)
    if not isinstance(require_dp, bool):
        check.add(f"require-dp = {require_dp!r}: must be true (refuse runs without differential privacy, the "
                  "default) or false")
        require_dp = True

    # -- the connection
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

    if check.problems:
        count = len(check.problems)
        raise ConfigError(f"{path}: invalid site file ({count} problem{'s' if count != 1 else ''}; relative paths "
                          f"are resolved from {folder}):\n  - " + "\n  - ".join(check.problems))
    node: dict[str, Any] = {"site-name": name, "data-path": data, "ledger-path": ledger,
                            "max-epsilon": cap, "device": device}
    if signing_key:
        node["signing-key"] = signing_key
    node["require-dp"] = require_dp
    if columns:
        node["data-columns"] = columns
    try:
        site = SiteConfig.from_node_config(node)
    except ConfigError as exc:  # pragma: no cover - every check above is at least as strict
        raise ConfigError(f"{path}: {exc}") from None
    connection = ConnectionSettings(server=server or "", root_certificates=root, auth_key=auth,
                                    runtime_port=port, state_dir=state_dir)
    return SiteFile(path=Path(os.path.abspath(path)), site=site, connection=connection)
