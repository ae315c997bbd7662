"""The site's own ClientApp runner: only the fedllm installed at the site runs at the site.

Flower's stock chain (``flower-supernode`` → ``flower-superexec`` → ``flwr-clientapp``) installs the
coordinator's app bundle (FAB) under ``$FLWR_HOME/apps`` and imports the ClientApp it names with
that folder on ``sys.path`` (flwr 1.42: ``flwr/supernode/runtime/run_clientapp.py``,
``install_from_fab`` then ``load_client_app_fn``). Flower's own guard, ``--trusted-entities``, needs
the SuperLink to mark the FAB ``valid_license``, which the open-source SuperLink does not do, so
every run would be refused (``supernode/start_client_internal.py`` line 345: "App verification is
not supported by the connected SuperLink").

``fedllm site start`` therefore starts the SuperNode with ``--isolation process`` (the SuperNode
launches no app process at all) and runs this module from the site's own install instead:

* ``serve`` takes each ClientApp task the SuperNode queues (the SuperExec's job) and starts one
  ``task`` process for it, as Flower does (one process per message);
* ``task`` pulls the message, context, run and FAB through the SuperNode's Runtime API, checks the
  FAB with :func:`fedllm.flower.fab_check.check_fab` and then calls the ClientApp imported from the
  installed ``fedllm.flower.client_app``. The FAB is never unpacked, installed, put on ``sys.path``
  or imported: a refused FAB gets an error reply (Flower's ``INVALID_FAB`` code, fedllm's reason),
  which the coordinator sees as that site's failure, and the refusal is logged at the site.

Flower has no public hook for "verify, then run this ClientApp", so this module uses Flower's
Runtime API client the way Flower's own processes do. Every Flower-internal name it needs is
imported in :func:`_flower_runtime` (one place; ``tests/security/test_fab.py`` fails when Flower
moves or renames one of them).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import time
from types import SimpleNamespace

from fedllm.flower.fab_check import FabPolicy, FabRefused, check_fab
from fedllm.logs import configure_app_logging

log = logging.getLogger("fedllm.site")


def _flower_runtime() -> SimpleNamespace:
    """The Flower 1.42 internals the runner needs, in one place. Where Flower's own code uses them:

    * ``RuntimeHttpClient``, ``RuntimeVersionHttpInterceptor``, ``RuntimeTokenHttpInterceptor``,
      ``make_simple_http_retry_invoker``, ``HeartbeatSender``/``make_task_heartbeat_fn_http``:
      ``flwr/supernode/runtime/run_clientapp.py`` ``run_clientapp`` (lines 98-108, 147);
    * ``pull_task_input``, ``push_message``, ``push_task_output``: the same file (lines 237, 272, 309);
      Flower's runner installs and imports the FAB between the two (lines 155 and 180-190), we don't;
    * ``AcquireTaskRequest`` with ``TaskType.CLIENT_APP``: ``flwr/supercore/superexec/run_superexec.py``
      ``run_superexec`` (lines 256-262); the SuperNode's handler is
      ``flwr/supernode/servicer/runtime/runtime_handlers.py`` ``acquire_task``.
    """
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    def client(address: str, *, token: str = "", component: str) -> RuntimeHttpClient:
        interceptors: list = [RuntimeVersionHttpInterceptor(component_name=component)]
        if token:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                     interceptors=interceptors,
                                                     retry_invoker=make_simple_http_retry_invoker())

    return SimpleNamespace(
        client=client, acquire_request=lambda: AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]),
        heartbeat=lambda c: HeartbeatSender(make_task_heartbeat_fn_http(c)),
        pull_task_input=pull_task_input, push_message=push_message, push_task_output=push_task_output,
        Error=Error, Message=Message, INVALID_FAB=ErrorCode.INVALID_FAB,
        RAISED=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, COMPLETED=SubStatus.COMPLETED, FAILED=SubStatus.FAILED)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(address: str, *, version: str, parent_pid: int = 0, poll: float = 0.5) -> int:
    """Take the SuperNode's ClientApp tasks one by one; one ``task`` process each. Returns when the
    parent (``fedllm site start``) is gone."""
    configure_app_logging()
    flwr = _flower_runtime()
    client = flwr.client(address, component="SuperExec")
    children: list[subprocess.Popen] = []
    waiting_since = time.monotonic()
    try:
        while not parent_pid or _alive(parent_pid):
            try:
                res = client.AcquireTask(flwr.acquire_request())
            except Exception as err:  # the SuperNode's Runtime API not up yet, or restarting
                if time.monotonic() - waiting_since > 60:
                    log.warning("the SuperNode's Runtime API at %s does not answer: %s", address, err)
                    waiting_since = time.monotonic()
                time.sleep(1.0)
                continue
            waiting_since = time.monotonic()
            if res.HasField("task") and res.token:
                children.append(subprocess.Popen(
                    [sys.executable, "-m", "fedllm.flower.site_runner", "task", "--runtime-api-address", address,
                     "--token", res.token, "--fedllm-version", version]))
            children = [c for c in children if c.poll() is None]
            time.sleep(poll)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        client.close()
    return 0


def run_task(address: str, token: str, *, policy: FabPolicy) -> int:
    """One ClientApp task: pull its input, refuse any FAB that is not fedllm's own, else run the
    installed fedllm ClientApp; push the reply and the task's status. 0 when the app ran."""
    configure_app_logging()
    flwr = _flower_runtime()
    client = flwr.client(address, token=token, component="flwr-clientapp")
    heartbeat = flwr.heartbeat(client)
    heartbeat.start()
    context, reply, status, details = None, None, flwr.FAILED, "ClientApp task failed due to unknown reason"
    try:
        message, context, run, fab = flwr.pull_task_input(client)
        site = str(context.node_config.get("site-name", "this site"))
        try:
            check_fab(fab.content, fab_hash=fab.hash_str, fab_id=run.fab_id, fab_version=run.fab_version,
                      policy=policy, site=site)
        except FabRefused as err:
            log.error("%s", err)
            reply, details = flwr.Message(flwr.Error(code=flwr.INVALID_FAB, reason=str(err)), reply_to=message), str(err)
        else:
            from fedllm.flower.client_app import app  # the site's installed fedllm, never the FAB's files

            try:
                reply = app(message=message, context=context)
                status, details = flwr.COMPLETED, ""
            except Exception as ex:  # reported to the coordinator as Flower's runner does
                log.exception("the fedllm ClientApp raised")
                details = f"{type(ex)}:<'{ex}'>"
                reply = flwr.Message(flwr.Error(code=flwr.RAISED, reason=details), reply_to=message)
        flwr.push_message(client, reply, context)
    finally:
        with contextlib.suppress(Exception):
            flwr.push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()
    return 0 if status == flwr.COMPLETED else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedllm.flower.site_runner", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "task"):
        p = sub.add_parser(name)
        p.add_argument("--runtime-api-address", required=True)
        p.add_argument("--fedllm-version", default="", help="the fedllm version the site accepts (default: installed)")
        if name == "serve":
            p.add_argument("--parent-pid", type=int, default=0)
        else:
            p.add_argument("--token", required=True)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.runtime_api_address, version=args.fedllm_version, parent_pid=args.parent_pid)
    return run_task(args.runtime_api_address, args.token, policy=FabPolicy(args.fedllm_version))


if __name__ == "__main__":
    sys.exit(main())
