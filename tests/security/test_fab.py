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



def _site_file(tmp_path: Path, connection: str = "") -> Path:
    from tests.helpers import SMOKE_DATA as SMOKE

    (tmp_path / "data.jsonl").write_text("".join(SMOKE.read_text().splitlines(keepends=True)[:5]))
    path = tmp_path / "a.toml"
    path.write_text(f'site-name = "a"\ndata-path = "data.jsonl"\nmax-epsilon = 8.0\n[connection]\n{connection}')
    return path


def test_site_start_refuses_a_pinned_version_other_than_the_installed_one(tmp_path: Path) -> None:
    import argparse

    from fedllm.deploy.site_commands import cmd_site_start
    from fedllm.errors import ConfigError

    args = argparse.Namespace(file=str(_site_file(tmp_path, 'fedllm-version = "9.9.9"\n')), server="127.0.0.1:9",
                              insecure=True, root_certificates=None, verbose=False)
    with pytest.raises(ConfigError) as err:
        cmd_site_start(args)
    assert "fedllm-version = '9.9.9'" in str(err.value) and f"installed here is {VERSION!r}" in str(err.value)
    assert not (tmp_path / ".fedllm-site").exists()  # refused before anything started


def test_the_site_supernode_runs_no_app_process_of_its_own_and_the_sites_runner_takes_its_tasks(tmp_path: Path) -> None:
    from fedllm.deploy.site_commands import runner_command, supernode_command
    from fedllm.deploy.site_file import load_site_file

    cmd = supernode_command(load_site_file(_site_file(tmp_path)), server="127.0.0.1:9", insecure=True,
                            root_certificates="", port=9094)
    assert cmd[cmd.index("--isolation") + 1] == "process"  # no flower-superexec, no flwr-clientapp
    runner = runner_command(9094, version=VERSION)
    assert runner[1:4] == ["-m", "fedllm.flower.site_runner", "serve"] and "127.0.0.1:9094" in runner

# --------------------------------------------------------------------------------------------
# a real SuperLink and a real `fedllm site start` SuperNode, a hostile FAB submitted with `flwr run`

HOSTILE_CLIENT = '''\
from pathlib import Path

Path({marker!r}).write_text("the coordinator's code ran at the site")  # on import, before any check could run

from flwr.clientapp import ClientApp

app = ClientApp()
'''

HOSTILE_SERVER = '''\
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = []
    for _ in range(120):
        nodes = list(grid.get_node_ids())
        if nodes:
            break
        time.sleep(1)
    messages = [Message(RecordDict(), message_type="train", dst_node_id=node) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=240))
    reasons = [reply.error.reason if reply.has_error() else "no error" for reply in replies]
    Path({replies!r}).write_text("\\n".join(reasons) or "no reply")
    if any(reply.has_error() for reply in replies) or not replies:
        raise RuntimeError("the sites refused the app: " + " | ".join(reasons))
'''


def _hostile_app(folder: Path, *, marker: Path, replies: Path) -> Path:
    """fedllm's own pyproject (publisher, name, version), but its components point at the bundle's
    own modules: a ClientApp that writes ``marker`` the moment it is imported."""
    write_app_folder(folder, {})
    _edit_pyproject(folder, 'clientapp = "fedllm.flower.client_app:app"', 'clientapp = "hostile_client:app"')
    _edit_pyproject(folder, 'serverapp = "fedllm.flower.server_app:app"', 'serverapp = "hostile_server:app"')
    (folder / "hostile_client.py").write_text(HOSTILE_CLIENT.format(marker=str(marker)))
    (folder / "hostile_server.py").write_text(HOSTILE_SERVER.format(replies=str(replies)))
    return folder


@pytest.mark.integration
def test_a_hostile_fab_is_refused_at_a_real_site_before_any_of_its_code_is_imported(tmp_path: Path) -> None:
    import time

    from fedllm.flower.processes import CONNECTION, Connection, flower_env, flwr_json, free_port
    from tests.helpers import SMOKE_DATA as SMOKE
    from tests.integration.test_deployment import Federation
    from tests.integration.test_simulation import _processes_with

    fed = Federation(tmp_path)
    try:
        port = free_port()
        server = fed.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--insecure",
                           "--state", "server-state")
        fed.wait_for(lambda: "listening on" in fed.log("server") or server.poll() is not None, "the coordinator")
        assert server.poll() is None, fed.log("server")

        (tmp_path / "site-a").mkdir()
        data = tmp_path / "site-a" / "data.jsonl"
        data.write_text("".join(SMOKE.read_text().splitlines(keepends=True)[:30]))
        (tmp_path / "a.toml").write_text('site-name = "a"\ndata-path = "site-a/data.jsonl"\n'
                                         'ledger-path = "site-a/ledger.json"\nmax-epsilon = 8.0\n')
        site = fed.start("site-a", "site", "start", "a.toml", "--server", f"127.0.0.1:{port}", "--insecure")
        supernode_log = tmp_path / ".fedllm-site" / "a" / "supernode.log"
        fed.wait_for(lambda: "SuperNode ID" in (supernode_log.read_text() if supernode_log.is_file() else "")
                     or site.poll() is not None, "the site to connect")
        assert site.poll() is None, fed.log("site-a")

        marker, replies = tmp_path / "MARKER", tmp_path / "replies.txt"
        app = _hostile_app(tmp_path / "hostile", marker=marker, replies=replies)
        cli_home = tmp_path / "cli-home"
        Connection(f"127.0.0.1:{port}", insecure=True).write(cli_home)
        env = {**flower_env(cli_home), "FEDLLM_TEST_PROC": f"cli-{fed.marker}"}
        submitted = flwr_json(["run", str(app), CONNECTION], env=env, cwd=tmp_path, timeout=300)
        assert submitted.get("success", True) and submitted.get("run-id"), submitted
        run_id = str(submitted["run-id"])

        status = ""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not status.startswith("finished"):
            listed = flwr_json(["list", CONNECTION, "--run-id", run_id], env=env, cwd=tmp_path)
            status = str((listed.get("runs") or [{}])[0].get("status", ""))
            time.sleep(2)

        assert status == "finished:failed", (status, fed.log("site-a"), fed.log("server"))
        assert not marker.exists(), "the hostile ClientApp was imported at the site"
        reported = replies.read_text()  # what the coordinator received from the site
        assert "site a refused the run's app bundle (FAB) without running any of it" in reported
        assert "hostile_client.py" in reported and "hostile_client:app" in reported
        assert "site a refused the run's app bundle" in fed.log("site-a")  # logged at the site
        assert not (tmp_path / "site-a" / "ledger.json").exists()  # nothing trained, nothing spent
        assert site.poll() is None  # the site keeps serving (the next, honest run is accepted)
    finally:
        fed.close()
    assert not _processes_with(fed.marker), "processes left behind"
