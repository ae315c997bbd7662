"""Only the site's own code runs at the site (issue 13, finding 3).

A coordinator submits an app bundle (FAB) with every run. The site accepts only fedllm's own FAB, as
``fedllm run`` builds it, at the site's fedllm version, and never imports anything from it: the unit
tests check the verifier (:mod:`fedllm.flower.fab_check`) and the Flower internals the site's runner
relies on; the integration test submits a hostile FAB with ``flwr run`` to a real SuperLink and a
real ``fedllm site start`` SuperNode.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import zipfile
from pathlib import Path

import pytest

from fedllm.config import RunConfig
from fedllm.flower import fab_check
from fedllm.flower.fab_check import FabPolicy, FabRefused, check_fab, fab_problems
from fedllm.flower.processes import write_app_folder

VERSION = fab_check.installed_version()


def _fedllm_app(folder: Path) -> Path:
    write_app_folder(folder, RunConfig().to_flat())
    return folder


def _build(folder: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk  # what `flwr run APP` (and so `fedllm run`) submits

    return build_fab_from_disk(folder)


def _check(content: bytes, *, fab_id: str = "fedllm/fedllm", fab_version: str = VERSION, pinned: str = "") -> None:
    check_fab(content, fab_hash=hashlib.sha256(content).hexdigest(), fab_id=fab_id, fab_version=fab_version,
              policy=FabPolicy(pinned), site="a")


def _edit_pyproject(folder: Path, old: str, new: str) -> None:
    path = folder / "pyproject.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_fedllms_own_fab_as_fedllm_run_builds_it_is_accepted(tmp_path: Path) -> None:
    content = _build(_fedllm_app(tmp_path / "app"))
    assert sorted(zipfile.ZipFile(io.BytesIO(content)).namelist()) == [".info/CONTENT", "pyproject.toml"]
    _check(content)
    _check(content, pinned=VERSION)


def test_a_fab_with_an_extra_python_file_is_refused(tmp_path: Path) -> None:
    app = _fedllm_app(tmp_path / "app")
    (app / "exfiltrate.py").write_text("open('/etc/hostname').read()\n")
    with pytest.raises(FabRefused) as err:
        _check(_build(app))
    assert "exfiltrate.py" in str(err.value) and "site a refused" in str(err.value)


def test_a_fab_whose_only_file_was_swapped_in_the_zip_is_refused(tmp_path: Path) -> None:
    """A hand-made zip: the same names, but a pyproject.toml the manifest does not describe."""
    content = _build(_fedllm_app(tmp_path / "app"))
    src = zipfile.ZipFile(io.BytesIO(content))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("pyproject.toml", src.read("pyproject.toml").replace(b"num-server-rounds", b"num-server-round"))
        zf.writestr(".info/CONTENT", src.read(".info/CONTENT"))
    with pytest.raises(FabRefused, match="manifest"):
        _check(out.getvalue())


def test_a_fab_naming_another_clientapp_is_refused(tmp_path: Path) -> None:
    app = _fedllm_app(tmp_path / "app")
    _edit_pyproject(app, 'clientapp = "fedllm.flower.client_app:app"', 'clientapp = "fedllm.site.evil:app"')
    with pytest.raises(FabRefused) as err:
        _check(_build(app))
    assert "fedllm.site.evil:app" in str(err.value) and "clientapp = 'fedllm.flower.client_app:app'" in str(err.value)


def test_a_fab_of_another_fedllm_version_is_refused(tmp_path: Path) -> None:
    app = _fedllm_app(tmp_path / "app")
    _edit_pyproject(app, f'version = "{VERSION}"', 'version = "0.0.9"')
    with pytest.raises(FabRefused) as err:
        _check(_build(app), fab_version="0.0.9")
    assert "'0.0.9'" in str(err.value) and f"this site runs fedllm {VERSION!r}" in str(err.value)
    # and the site's own pin decides, not the installed version alone
    with pytest.raises(FabRefused, match="this site runs fedllm '9.9.9'"):
        _check(_build(_fedllm_app(tmp_path / "app2")), pinned="9.9.9")


def test_a_fab_of_another_publisher_or_app_name_is_refused(tmp_path: Path) -> None:
    app = _fedllm_app(tmp_path / "app")
    _edit_pyproject(app, 'publisher = "fedllm"', 'publisher = "mallory"')
    with pytest.raises(FabRefused) as err:
        _check(_build(app), fab_id="mallory/fedllm")
    assert "publisher = 'mallory'" in str(err.value) and "'mallory/fedllm'" in str(err.value)
    app = _fedllm_app(tmp_path / "app2")
    _edit_pyproject(app, 'name = "fedllm"', 'name = "fedllm-plus"')
    with pytest.raises(FabRefused, match="name = 'fedllm-plus'"):
        _check(_build(app), fab_id="fedllm/fedllm-plus")


def test_a_fab_with_dependencies_or_include_patterns_is_refused(tmp_path: Path) -> None:
    app = _fedllm_app(tmp_path / "app")
    _edit_pyproject(app, "dependencies = []", 'dependencies = ["evil-package"]')
    problems = fab_problems(_build(app), fab_hash="", fab_id="fedllm/fedllm", fab_version=VERSION, policy=FabPolicy())
    assert any("evil-package" in p for p in problems)


def test_a_bundle_whose_hash_differs_from_the_stated_one_is_refused(tmp_path: Path) -> None:
    content = _build(_fedllm_app(tmp_path / "app"))
    problems = fab_problems(content, fab_hash="0" * 64, fab_id="fedllm/fedllm", fab_version=VERSION, policy=FabPolicy())
    assert problems == ["the bundle's SHA-256 does not match the hash the SuperLink stated for it"]


def test_the_flower_internals_the_site_runner_uses_are_still_there() -> None:
    """The runner (fedllm/flower/site_runner.py) mirrors Flower 1.42's own ClientApp process minus
    the install/import of the FAB. If Flower moves one of these names, this fails (not the site)."""
    from flwr.supernode.runtime import run_clientapp

    from fedllm.flower.site_runner import _flower_runtime

    flwr = _flower_runtime()  # imports every internal name
    assert list(inspect.signature(run_clientapp.pull_task_input).parameters) == ["client"]
    assert list(inspect.signature(run_clientapp.push_message).parameters) == ["client", "message", "context"]
    assert list(inspect.signature(run_clientapp.push_task_output).parameters) == [
        "client", "context", "sub_status", "details"]
    assert flwr.acquire_request().supported_task_types == ["flwr-clientapp"]
    # Flower's own runner is where the FAB gets installed and imported: the step the site skips
    source = inspect.getsource(run_clientapp.run_clientapp)
    assert "install_from_fab(fab.content" in source and "load_client_app_fn(" in source


def test_flowers_trusted_entities_cannot_vouch_for_a_locally_submitted_fab() -> None:
    """Why fedllm does not rely on `flower-supernode --trusted-entities` (docs/notes/flower-1.42.md):
    the SuperNode then demands `valid_license`, which the SuperLink sets only for FABs fetched from
    Flower Hub (control_handlers._format_verification), never for one submitted by `flwr run APP`."""
    from flwr.superlink.servicer.control import control_handlers
    from flwr.supernode import start_client_internal

    assert 'fab.verifications.get("valid_license", "")' in inspect.getsource(start_client_internal)
    assert '"valid_license": "Valid"' in inspect.getsource(control_handlers._format_verification)
    assert "_get_remote_fab" in inspect.getsource(control_handlers)
