"""Real deployments on 127.0.0.1: ``fedllm server start`` (a Flower SuperLink with TLS and
SuperNode authentication), ``fedllm site start`` per site (SuperNodes), ``fedllm run``.

Every process is started in its own session and carries a marker in its environment; each test
kills them all and checks that none is left, also when it fails. Ports are chosen free at run time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedllm.flower.processes import free_port
from tests.helpers import SMOKE_DATA
from tests.integration.test_simulation import _processes_with
from tests.integration.wire import RecordingProxy, pushed_messages, pushed_objects

pytestmark = pytest.mark.integration

RUN_TOML = """\
[model]
name = "tiny-random-llama"
[lora]
r = 4
alpha = 8
[data]
max-length = 64
[train]
local-steps = 3
batch-size = 4
[privacy]
target-epsilon = 4.0
max-epsilon = 6.0
"""




class Federation:
    """The processes of one test: started by name, logged to files, all killed at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.marker = uuid.uuid4().hex
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "FEDLLM_TEST_RUN": self.marker}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def fedllm(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedllm.cli.main", *args], check=False, cwd=self.tmp, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        env = {**self.env, "FEDLLM_TEST_PROC": f"{name}-{self.marker}"}  # marks everything this command starts
        with open(log, "a") as out:
            proc = subprocess.Popen([sys.executable, "-m", "fedllm.cli.main", *args], cwd=self.tmp, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace") if name in self.logs else ""

    def wait_for(self, predicate, what: str, timeout: float = 180, poll: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(poll)
        raise AssertionError(f"timed out waiting for {what}\n" + "\n".join(
            f"--- {n}:\n{self.log(n)[-3000:]}" for n in self.logs))

    def kill(self, name: str) -> None:
        """A crash: SIGKILL the command and every process it started (SuperLink or SuperNode, apps)."""
        marker = f"FEDLLM_TEST_PROC={name}-{self.marker}"
        for _ in range(20):
            left = _processes_with(marker)
            if not left:
                break
            for line in left:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(line.split(":")[0]), signal.SIGKILL)
            time.sleep(0.2)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.procs[name].wait(timeout=30)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        deadline = time.monotonic() + 30
        while (left := _processes_with(self.marker)) and time.monotonic() < deadline:
            for line in left:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(line.split(":")[0]), signal.SIGKILL)
            time.sleep(0.5)


@pytest.fixture
def federation(tmp_path):
    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        fed.close()
    assert not _processes_with(fed.marker), "processes left behind"


def _prepare(fed: Federation, sites: list[str], *, extra: str = "") -> Path:
    """Development PKI, per-site data and site files; returns the folder of registered keys."""
    res = fed.fedllm("certs", "--out", "certs", "--sites", ",".join([*sites, "rogue"]))
    assert res.returncode == 0, res.stdout + res.stderr
    registered = fed.tmp / "registered"
    registered.mkdir()
    for name in sites:
        shutil.copy(fed.tmp / "certs" / "sites" / f"{name}.pub", registered)
    lines = SMOKE_DATA.read_text().splitlines(keepends=True)
    for i, name in enumerate([*sites, "rogue"]):
        folder = fed.tmp / f"site-{name}"
        folder.mkdir()
        (folder / "data.jsonl").write_text("".join(lines[(i % 3) * 30:(i % 3 + 1) * 30]))
        shutil.copy(fed.tmp / "certs" / "sites" / name, folder / "node.key")
        os.chmod(folder / "node.key", 0o600)
        shutil.copy(fed.tmp / "certs" / "ca.crt", folder / "ca.crt")
        (fed.tmp / f"{name}.toml").write_text(
            f'site-name = "{name}"\ndata-path = "site-{name}/data.jsonl"\nmax-epsilon = 8.0\nledger-path = "site-{name}/ledger.json"\n'
            'eval-fraction = 0.2\n'
            f'[connection]\nroot-certificates = "site-{name}/ca.crt"\nauth-key = "site-{name}/node.key"\n')
    (fed.tmp / "run.toml").write_text(RUN_TOML + extra)
    return registered


def _start_server(fed: Federation, port: int, *, name: str = "server") -> None:
    fed.start(name, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--certs", "certs",
              "--site-keys", "registered", "--state", "server-state")
    proc = fed.procs[name]
    fed.wait_for(lambda: "listening on" in fed.log(name) or proc.poll() is not None, "the coordinator to start")
    assert proc.poll() is None, fed.log(name)


def _ledger(fed: Federation, site: str, release: str = "update") -> list[dict]:
    """The site's ledger entries of one kind: "update" (a trained round) or "metrics" (a held-out release
    under release-metrics = "dp", the sites' default here)."""
    path = fed.tmp / f"site-{site}" / "ledger.json"
    entries = json.loads(path.read_text())["entries"] if path.is_file() else []
    return [e for e in entries if e.get("release", "update") == release]


def test_tls_federation_survives_a_site_crash_and_a_coordinator_crash_and_only_the_adapter_leaves(federation):
    """One federation, every deployment promise: coordinator + 3 sites over TLS with SuperNode
    authentication; an unregistered site is refused; site a talks through a recording proxy; site c
    is killed (SIGKILL) mid-round 1 and round 1 completes without it; c rejoins; the coordinator is
    killed after a site recorded round 2 and before round 2 completed; restarted and resumed, the run
    completes with a loadable adapter, no ledger entry twice, and site a sent nothing but adapter
    arrays, the agreed metrics and its name."""
    fed = federation
    registered = _prepare(fed, ["a", "b", "c"], extra="[federation]\nround-timeout = 600.0\nmin-completed-sites = 2\n")
    assert sorted(p.name for p in registered.iterdir()) == ["a.pub", "b.pub", "c.pub"]
    port = free_port()
    _start_server(fed, port)

    # a site whose key is not registered is refused and says so
    rogue = fed.start("rogue", "site", "start", "rogue.toml", "--server", f"127.0.0.1:{port}")
    rogue.wait(timeout=180)
    assert rogue.returncode == 1, fed.log("rogue")
    assert "refused this site" in fed.log("rogue") and "not registered" in fed.log("rogue")

    # site a reaches the coordinator through a recording proxy (TLS terminated with the server's cert)
    certs = fed.tmp / "certs"
    proxy = RecordingProxy(upstream=port, cert=str(certs / "server.pem"), key=str(certs / "server.key"),
                           ca=str(certs / "ca.crt")).start()
    try:
        fed.start("site-a", "site", "start", "a.toml", "--server", f"127.0.0.1:{proxy.port}")
        for name in ("b", "c"):
            fed.start(f"site-{name}", "site", "start", f"{name}.toml", "--server", f"127.0.0.1:{port}")
        run = fed.start("run", "run", "--server", f"127.0.0.1:{port}", "--root-certificates", "certs/ca.crt",
                        "--config", "run.toml", "--rounds", "2", "--output", "run")

        # site c crashes in round 1, as soon as its round's work arrived (its ClientApp then needs seconds
        # to load the model and data and train: the kill lands before c can reply, on any machine)
        fed.wait_for(lambda: "[round 1/2] site c | received the global adapter" in fed.log("site-c"),
                     "site c to receive round 1", poll=0.05)
        fed.kill("site-c")
        assert "[round 1/2] site c | trained" not in fed.log("site-c")
        fed.wait_for(lambda: "[round 1/2] 2/3 sites trained" in fed.log("run"), "round 1 to complete without c",
                     timeout=300)
        fed.start("site-c2", "site", "start", "c.toml", "--server", f"127.0.0.1:{port}")  # c rejoins

        # the coordinator dies after a site recorded round 2 and before round 2 completed
        fed.wait_for(lambda: any(e["server_round"] == 2 for s in "ab" for e in _ledger(fed, s)),
                     "a site to record round 2", timeout=300)
        fed.kill("server")
        run.wait(timeout=180)
        assert run.returncode == 1, fed.log("run")
        assert "--resume" in fed.log("run")
        history_file = fed.tmp / "run" / "history.json"
        history = json.loads(history_file.read_text())
        assert max(r["round"] for r in history["rounds"] if "evaluate" in r) == 1
        spent_before = {s: _ledger(fed, s) for s in "abc"}

        # the coordinator restarts (registrations kept in its state), sites reconnect by themselves
        _start_server(fed, port, name="server2")
        res = fed.fedllm("run", "--server", f"127.0.0.1:{port}", "--root-certificates", "certs/ca.crt",
                         "--resume", "run", timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr + fed.log("server2")
    finally:
        proxy.stop()
    assert "resuming" in res.stdout and "[round 2/2] 3/3 sites trained" in res.stdout

    history = json.loads(history_file.read_text())
    assert history["status"] == "completed" and [r["round"] for r in history["rounds"]] == [0, 1, 2]
    assert len(history["resumed"]) == 1 and history["resumed"][0]["from-round"] == 2
    first = history["rounds"][1]["train"]
    assert sorted(first["sites"]) == ["a", "b"] and [f["site"] for f in first["failed"]] == ["c"]
    assert sorted(history["rounds"][2]["train"]["sites"]) == ["a", "b", "c"]
    assert "min-available-sites = 3" in (fed.tmp / "run" / "config.toml").read_text()  # waited for 3 registered

    for site in "abc":  # one ledger entry per round a site trained, never two for the same round
        entries = _ledger(fed, site)
        rounds = [e["server_round"] for e in entries]
        assert len(rounds) == len(set(rounds)) and len({e["run_id"] for e in entries}) == 1, (site, rounds)
        if 2 in [e["server_round"] for e in spent_before[site]]:  # released round 2 before the crash:
            assert entries == spent_before[site]  # re-sent the same update, spent nothing more
    assert [e["server_round"] for e in _ledger(fed, "a")] == [1, 2]
    for site in "ab":  # one held-out release per evaluated round (0, 1, 2), across the crash: never asked twice
        assert [e["server_round"] for e in _ledger(fed, site, "metrics")] == [0, 1, 2]
    assert "re-sending the update" in fed.log("site-a")

    from peft import PeftModel

    from fedllm.model.loading import build_tiny_model
    from fedllm.model.lora import get_adapter_state

    loaded = get_adapter_state(PeftModel.from_pretrained(build_tiny_model("llama"), fed.tmp / "run" / "adapter"))
    assert any("lora_B" in k and bool(v.abs().sum() > 0) for k, v in loaded.items())

    _assert_only_adapter_and_metrics_left(proxy, fed.tmp / "site-a" / "data.jsonl", fed.tmp, loaded)

    # the sites hand copies of their ledgers to an auditor: every release the coordinator received,
    # across the crash and the resume, is in the ledgers, and every ε recomputes
    (fed.tmp / "run" / "ledgers").mkdir()
    for site in "abc":
        shutil.copy(fed.tmp / f"site-{site}" / "ledger.json", fed.tmp / "run" / "ledgers" / f"{site}.json")
    audit = fed.fedllm("audit", "run")
    assert audit.returncode == 0, audit.stdout + audit.stderr


def _assert_only_adapter_and_metrics_left(proxy: RecordingProxy, data: Path, tmp: Path, adapter: dict) -> None:
    """Everything site a sent: only adapter arrays, the agreed metrics and its name; no text, token
    ids or paths."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import (
        get_object_body,
        get_object_type_from_object_content,
    )
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    from fedllm import wire
    from fedllm.model.loading import build_byte_tokenizer

    requests = proxy.requests()
    paths = {r.path for r in requests}
    assert "/v1/fleet/push-object" in paths and "/v1/fleet/push-messages" in paths, paths
    assert all("content-encoding" not in r.headers for r in requests)  # bodies are plain: the scan below sees all
    objects = pushed_objects(requests)
    types = {get_object_type_from_object_content(c) for c in objects.values()}
    assert types <= {"Message", "RecordDict", "ArrayRecord", "Array", "ArrayChunk", "MetricRecord", "ConfigRecord"}, types

    # every reply site a pushed: its message type comes with push-messages, whatever the SuperLink already held
    kinds = [m.metadata.message_type for m in pushed_messages(requests)]
    assert set(kinds) <= {"train", "evaluate"}, kinds
    # rounds 1-2 trained: the run waits for them, so both are pushed (round 2 re-sent after the resume). Held-out
    # releases: rounds 0-2 are in a's ledger, but the run may end before a's round-2 reply is pushed (2 of 3 sites
    # complete a round), so only rounds 0-1 are certain to be on the wire
    assert kinds.count("train") >= 2 and kinds.count("evaluate") >= 2, kinds

    # each pushed object on its own: a reply's children that the SuperLink already held (content-addressed:
    # the same bytes pushed earlier by anyone and not yet deleted) are not pushed again, so whole replies
    # cannot always be rebuilt from the recording (seen in CI); every object that was pushed is checked
    def body(content: bytes, cls: type) -> dict[str, str]:
        return json.loads(get_object_body(content, cls))

    record_types = {wire.ARRAYS: "ArrayRecord", wire.METRICS: "MetricRecord", wire.SITE: "ConfigRecord"}
    held = []  # (record key, object id) of children the recording lacks: the diagnosis if a count fails
    checked = {"train": 0, "evaluate": 0, "ArrayRecord": 0, "Array": 0, "ConfigRecord": 0}
    for object_id, content in objects.items():
        kind = get_object_type_from_object_content(content)
        if kind == "RecordDict":  # a reply's content: the site's name, its metrics and (train) adapter arrays
            refs = body(content, RecordDict)
            assert set(refs) <= set(record_types) and {wire.METRICS, wire.SITE} <= set(refs), set(refs)
            for key, child in refs.items():
                if child in objects:
                    assert get_object_type_from_object_content(objects[child]) == record_types[key], key
                else:
                    held.append((key, child))
        elif kind == "ArrayRecord":  # FFA-LoRA: B only, float32, the adapter's shapes
            refs = body(content, ArrayRecord)
            assert refs and set(refs) <= set(adapter) and all("lora_B" in k for k in refs), set(refs)
            checked["ArrayRecord"] += 1
            for name, child in refs.items():
                try:
                    array = inflate_object_from_contents(child, dict(objects), keep_object_contents=True)
                except KeyError:
                    held.append((name, child))
                    continue
                assert array.dtype == "float32" and tuple(array.shape) == tuple(adapter[name].shape), name
                checked["Array"] += 1
        elif kind == "MetricRecord":
            metrics = inflate_object_from_contents(object_id, dict(objects), keep_object_contents=True)
            assert isinstance(metrics, MetricRecord) and all(isinstance(v, (int, float)) for v in metrics.values())
            assert set(metrics) in (set(wire.TRAIN_METRIC_KEYS), set(wire.EVALUATE_METRIC_KEYS)), set(metrics)
            checked["train" if set(metrics) == set(wire.TRAIN_METRIC_KEYS) else "evaluate"] += 1
        elif kind == "ConfigRecord":
            config = inflate_object_from_contents(object_id, dict(objects), keep_object_contents=True)
            assert isinstance(config, ConfigRecord) and dict(config) == {wire.SITE_NAME: "a"}, dict(config)
            checked["ConfigRecord"] += 1
    # every kind seen at least once (each kind's bytes are new at least once: round 1's arrays and metrics)
    assert all(n >= 1 for n in checked.values()), (checked, held)

    wire = proxy.all_sent()
    assert len(wire) > 10_000
    for forbidden in (str(data), str(data.parent), str(tmp), "data.jsonl"):
        assert forbidden.encode() not in wire, forbidden
    tokenizer = build_byte_tokenizer()
    found = []
    for line in data.read_text().splitlines():
        record = json.loads(line)
        for value in record.values():
            text = value if isinstance(value, str) else json.dumps(value)
            for start in range(0, max(1, len(text) - 16), 8):  # every 16-character piece of every field
                piece = text[start:start + 16]
                if len(piece) == 16 and piece.encode() in wire:
                    found.append(piece)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:12]
            if len(ids) >= 6:
                for fmt in ("<%dq", "<%di", "<%df"):
                    if struct.pack(fmt % 6, *ids[:6]) in wire:
                        found.append(f"token ids {ids[:6]} as {fmt}")
    assert not found, found[:5]
