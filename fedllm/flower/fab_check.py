"""Which app bundles (FABs) a site accepts: fedllm's own, at the version the site runs, and nothing else.

A coordinator submits a FAB with every run; Flower's stock ``flwr-clientapp`` installs it and
imports the ClientApp it names, with the bundle's folder on ``sys.path``. A site that ran that code
would let the coordinator decide what reads its data. ``fedllm site start`` therefore never loads a
FAB's code (:mod:`fedllm.flower.site_runner` runs the fedllm ClientApp installed at the site); it
only accepts work whose FAB has exactly the shape that ``fedllm run`` submits
(:func:`fedllm.flower.processes.write_app_folder` built by ``flwr run``):

* the zip holds exactly ``pyproject.toml`` and ``.info/CONTENT`` (Flower's manifest), and the
  manifest lists exactly ``pyproject.toml`` with its SHA-256 and size: no Python file, no other file;
* ``[project]``: ``name = "fedllm"``, ``version`` = the site's pinned fedllm version, no dependencies;
* ``[tool.flwr.app]``: ``publisher = "fedllm"``, components exactly
  ``clientapp = "fedllm.flower.client_app:app"`` and ``serverapp = "fedllm.flower.server_app:app"``,
  a ``config`` table of plain values, and no other key (no include/exclude patterns, no federations);
* the run's app id (``fedllm/fedllm``) and version, as the SuperLink states them, agree;
* the bundle's hash is the SHA-256 of its bytes.

Pure: bytes and strings in, a list of problems out. Nothing here imports or executes the bundle.
"""

from __future__ import annotations

import hashlib
import io
import tomllib
import zipfile
from dataclasses import dataclass

import fedllm
from fedllm.errors import FedLLMError

APP_NAME = "fedllm"
PUBLISHER = "fedllm"
CLIENTAPP = "fedllm.flower.client_app:app"
SERVERAPP = "fedllm.flower.server_app:app"
PYPROJECT = "pyproject.toml"
MANIFEST = ".info/CONTENT"
FAB_FILES = frozenset({PYPROJECT, MANIFEST})
MAX_FAB_BYTES = 1 << 20  # fedllm's FAB is a few kB: a larger bundle is not fedllm's


class FabRefused(FedLLMError):
    """The run's app bundle is not fedllm's own at the site's pinned version."""


def installed_version() -> str:
    """The version of the fedllm code this Python imports (the code the site runs)."""
    return fedllm.__version__


@dataclass(frozen=True)
class FabPolicy:
    """What a site accepts: fedllm's ClientApp at ``version`` (default: the installed fedllm's)."""

    version: str = ""

    @property
    def pinned(self) -> str:
        return self.version or installed_version()


def _manifest_problems(zf: zipfile.ZipFile, pyproject: bytes) -> list[str]:
    try:
        lines = [line for line in zf.read(MANIFEST).decode("utf-8").splitlines() if line.strip()]
    except (KeyError, UnicodeDecodeError, zipfile.BadZipFile) as err:
        return [f"its manifest {MANIFEST} is unreadable ({err})"]
    expected = f"{PYPROJECT},{hashlib.sha256(pyproject).hexdigest()},{len(pyproject) * 8}"
    if lines != [expected]:
        listed = ", ".join(line.split(",", 1)[0] for line in lines) or "nothing"
        return [f"its manifest {MANIFEST} must list exactly {PYPROJECT} with its hash and size; it lists {listed}"]
    return []


def _pyproject_problems(config: dict, policy: FabPolicy) -> list[str]:
    problems = []
    extra_top = sorted(set(config) - {"build-system", "project", "tool"})
    if extra_top:
        problems.append(f"pyproject.toml has tables fedllm's FAB does not have: {', '.join(extra_top)}")
    project = config.get("project", {})
    if project.get("name") != APP_NAME:
        problems.append(f"[project] name = {project.get('name')!r}: the site runs only {APP_NAME!r}")
    if project.get("version") != policy.pinned:
        problems.append(f"[project] version = {project.get('version')!r}: this site runs fedllm {policy.pinned!r} "
                        "(the coordinator must run the same fedllm version, or the site changes "
                        "[connection] fedllm-version after installing that version)")
    if project.get("dependencies"):
        problems.append(f"[project] dependencies = {project.get('dependencies')!r}: fedllm's FAB installs nothing")
    tool = config.get("tool", {})
    if sorted(tool) != ["flwr"] or sorted(tool.get("flwr", {})) != ["app"]:
        problems.append(f"[tool] must hold only [tool.flwr.app]; it holds {sorted(tool)} / "
                        f"{sorted(tool.get('flwr', {}) if isinstance(tool.get('flwr'), dict) else [])}")
    app = tool.get("flwr", {}).get("app", {}) if isinstance(tool.get("flwr"), dict) else {}
    extra_app = sorted(set(app) - {"publisher", "components", "config"})
    if extra_app:
        problems.append(f"[tool.flwr.app] has keys fedllm's FAB does not have: {', '.join(extra_app)}")
    if app.get("publisher") != PUBLISHER:
        problems.append(f"[tool.flwr.app] publisher = {app.get('publisher')!r}: the site runs only {PUBLISHER!r}'s app")
    components = app.get("components", {})
    if components != {"clientapp": CLIENTAPP, "serverapp": SERVERAPP}:
        problems.append(f"[tool.flwr.app.components] = {components!r}: the site runs only clientapp = {CLIENTAPP!r} "
                        f"(with serverapp = {SERVERAPP!r})")
    run_config = app.get("config", {})
    if not isinstance(run_config, dict) or any(isinstance(v, (dict, list)) for v in run_config.values()):
        problems.append("[tool.flwr.app.config] must be a table of plain values")
    return problems


def fab_problems(content: bytes, *, fab_hash: str, fab_id: str, fab_version: str, policy: FabPolicy) -> list[str]:
    """Why the bundle is not fedllm's own at the site's pinned version ([] when it is)."""
    if len(content) > MAX_FAB_BYTES:
        return [f"the bundle is {len(content)} bytes; fedllm's FAB is a few kB"]
    problems = []
    if fab_hash and hashlib.sha256(content).hexdigest() != fab_hash:
        problems.append("the bundle's SHA-256 does not match the hash the SuperLink stated for it")
    try:
        zf = zipfile.ZipFile(io.BytesIO(content))
        names = zf.namelist()
    except zipfile.BadZipFile as err:
        return [*problems, f"the bundle is not a zip file ({err})"]
    if len(names) != len(set(names)) or set(names) != FAB_FILES:
        others = sorted(set(names) - FAB_FILES) or [f"{n} (twice)" for n in set(names) if names.count(n) > 1]
        missing = sorted(FAB_FILES - set(names))
        problems.append("it carries files fedllm's FAB does not: " + ", ".join(others) if others else
                        f"it lacks {', '.join(missing)}")
        if PYPROJECT not in names:
            return problems
    pyproject = zf.read(PYPROJECT)
    if set(names) == FAB_FILES:
        problems += _manifest_problems(zf, pyproject)
    try:
        config = tomllib.loads(pyproject.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        return [*problems, f"its pyproject.toml does not parse ({err})"]
    problems += _pyproject_problems(config, policy)
    if fab_id != f"{PUBLISHER}/{APP_NAME}":
        problems.append(f"the run's app is {fab_id!r}: the site runs only {PUBLISHER}/{APP_NAME}")
    if fab_version != policy.pinned:
        problems.append(f"the run's app version is {fab_version!r}: this site runs fedllm {policy.pinned!r}")
    return problems


def check_fab(content: bytes, *, fab_hash: str, fab_id: str, fab_version: str, policy: FabPolicy,
              site: str = "this site") -> None:
    """Raise :class:`FabRefused` naming every reason when the bundle is not fedllm's own."""
    problems = fab_problems(content, fab_hash=fab_hash, fab_id=fab_id, fab_version=fab_version, policy=policy)
    if problems:
        raise FabRefused(f"site {site} refused the run's app bundle (FAB) without running any of it: it is not "
                         f"fedllm {policy.pinned}'s own app: " + "; ".join(problems)
                         + ". The site runs only the fedllm ClientApp installed at the site; submit the run with "
                           f"`fedllm run` from fedllm {policy.pinned}")
