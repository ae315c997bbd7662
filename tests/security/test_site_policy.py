"""A hostile coordinator against a site's privacy policy (issue 13, findings 1, 4 and 8).

Every attack is a run configuration a coordinator could send, tried against a real
``SiteRuntime`` (tiny model, real ledger, real DP-SGD): the site refuses it with a message naming
the setting, the run's value and the site's limit, takes no training step, and leaves its ledger
byte for byte as it was. The property test draws many run configurations and checks that the ε a
site records, at its own δ, never exceeds its own cap.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest

from fedllm import wire
from fedllm.config import RunConfig, SiteConfig
from fedllm.coordinator.protocol import Reply, Task
from fedllm.errors import BudgetExceededError, ConfigError, RunFailedError
from fedllm.model import lora as model_lora
from fedllm.model.lora import get_adapter_state
from fedllm.privacy.accounting import DPEvent, epsilon_for
from fedllm.privacy.ledger import PrivacyLedger, verify_ledger
from fedllm.site import runtime as site_runtime_module
from fedllm.site.policy import SitePolicyError
from fedllm.site.runtime import SiteRuntime
from tests.helpers import write_jsonl

pytestmark = pytest.mark.security

RECORDS = [{"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(12)]
CONFIG = {"model.name": "tiny-random-llama", "data.max-length": 48, "train.local-steps": 2, "train.batch-size": 2,
          "privacy.noise-multiplier": 1.0, "lora.r": 2, "lora.alpha": 4}


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", RECORDS)


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the local training calls the site makes (a refused run must make none)."""
    calls: list[int] = []
    real = site_runtime_module.train_local

    def counted(*args, **kwargs):
        calls.append(kwargs.get("steps", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(site_runtime_module, "train_local", counted)
    return calls


def _site(data_file: Path, **policy) -> SiteConfig:
    return SiteConfig.from_dict({"site-name": "cardiology", "data-path": str(data_file), "max-epsilon": 8.0, **policy})


def _runtime(tmp_path: Path, site: SiteConfig, **run) -> SiteRuntime:
    config = RunConfig.from_flat({**CONFIG, **run})
    return SiteRuntime(config, site, ledger_path=tmp_path / "ledger" / f"{site.name}.json", simulated=False)


def _with_one_release(tmp_path: Path, site: SiteConfig, **run) -> tuple[Path, bytes]:
    """The site's ledger after one honest round (so that 'unchanged' means something), and its bytes."""
    honest = _runtime(tmp_path, site, **run)
    honest.train_round(run_id="honest", server_round=1, adapter=get_adapter_state(honest.model, trainable_only=True))
    return honest.ledger_path, honest.ledger_path.read_bytes()


def _refused(runtime: SiteRuntime) -> SitePolicyError:
    adapter = get_adapter_state(runtime.model, trainable_only=True)
    with pytest.raises(SitePolicyError) as exc:
        runtime.train_round(run_id="hostile", server_round=1, adapter=adapter)
    return exc.value


# --- finding 1: δ belongs to the site ---------------------------------------------------------------


def test_a_run_asking_for_a_larger_delta_than_the_sites_is_refused(tmp_path, data_file, steps):
    site = _site(data_file)  # max-delta = 0: automatic, min(1e-5, 1/(10·n)) = 1e-05 for ~10 records
    ledger, before = _with_one_release(tmp_path, site)
    steps.clear()
    hostile = _runtime(tmp_path, site, **{"privacy.target-delta": 0.01})
    message = str(_refused(hostile))
    assert message.startswith("Site 'cardiology' refuses this run: privacy.target-delta = 0.01 exceeds its "
                              "max-delta = 1e-05 (automatic: the smaller of 1e-5 and 1/(10·n)")
    assert "The coordinator must lower privacy.target-delta to at most 1e-05." in message
    assert steps == [] and ledger.read_bytes() == before


def test_an_explicit_max_delta_is_the_limit_and_named_as_the_site_files(tmp_path, data_file, steps):
    site = _site(data_file, **{"max-delta": 1e-7})
    ledger, before = _with_one_release(tmp_path, site, **{"privacy.target-delta": 1e-8})
    steps.clear()
    message = str(_refused(_runtime(tmp_path, site, **{"privacy.target-delta": 1e-5})))
    assert ("privacy.target-delta = 1e-05 exceeds its max-delta = 1e-07 (max-delta in its site file)" in message)
    assert steps == [] and ledger.read_bytes() == before


def test_the_site_records_and_enforces_its_epsilon_at_its_own_delta(tmp_path, data_file):
    """A run asking for a smaller δ is served, but the cap check, the ledger entry and the reported ε
    are at the site's δ, with the site's policy recorded in the entry."""
    site = _site(data_file, **{"max-delta": 1e-5})
    runtime = _runtime(tmp_path, site, **{"privacy.target-delta": 1e-7})
    outcome = runtime.train_round(run_id="r", server_round=1,
                                  adapter=get_adapter_state(runtime.model, trainable_only=True))
    entry = PrivacyLedger.open(runtime.ledger_path, site="cardiology").entries[-1]
    assert entry.target_delta == 1e-5 and entry.site_max_delta == 1e-5 and entry.site_max_epsilon == 8.0
    assert outcome.metrics[wire.DELTA] == 1e-5 and outcome.metrics[wire.EPSILON_CAP] == 8.0
    assert outcome.metrics[wire.EPSILON] == pytest.approx(
        epsilon_for([entry.event], target_delta=1e-5, accountant=entry.accountant))


def test_ledger_verify_flags_an_entry_recorded_at_a_larger_delta_than_the_sites(tmp_path):
    from fedllm.cli.main import main

    ledger = PrivacyLedger.open(tmp_path / "l.json", site="cardiology")
    common = {"steps": 500, "sample_rate": 0.04, "noise_multiplier": 0.8, "max_grad_norm": 1.0, "num_examples": 50}
    ledger.record(run_id="hostile", server_round=1, target_delta=0.01, **common)  # how main 5ee93d2 recorded it
    ledger.record(run_id="honest", server_round=1, target_delta=1e-5, site_max_delta=1e-5, site_max_epsilon=5.0,
                  **common)
    result = verify_ledger(ledger.path)
    assert not result.ok and result.first_bad_entry == 1
    assert any(p.startswith("entry 1: recorded at δ=0.01, larger than the site's δ=1e-05") for p in result.problems)
    spent = epsilon_for([DPEvent(0.8, 0.04, 500)] * 2, target_delta=1e-5)
    assert result.final_epsilon == pytest.approx(spent) and result.site_delta == 1e-5
    assert any("above the site's cap max-epsilon = 5" in p for p in result.problems)  # 1000 steps: ε ≈ 13 > 5
    assert main(["ledger", "verify", str(ledger.path)]) == 1


def test_ledger_verify_checks_an_older_ledger_at_the_delta_it_is_given(tmp_path, capsys):
    from fedllm.cli.main import main

    ledger = PrivacyLedger.open(tmp_path / "l.json", site="cardiology")
    ledger.record(run_id="r", server_round=1, steps=500, sample_rate=0.04, noise_multiplier=0.8, max_grad_norm=1.0,
                  target_delta=0.01, num_examples=50)
    assert main(["ledger", "verify", str(ledger.path)]) == 0  # no policy recorded and none given
    capsys.readouterr()
    assert main(["ledger", "verify", str(ledger.path), "--max-delta", "1e-5", "--max-epsilon", "5"]) == 1
    out = capsys.readouterr().out
    assert "cumulative ε = 9.50 at the site's own δ=1e-05" in out and "recorded at δ=0.01" in out


def test_epsilon_is_never_negative_at_a_large_delta():
    """The issue's numbers: σ = 0.8, q = 0.04, 500 steps."""
    events = [DPEvent(0.8, 0.04, 500)]
    values = {delta: epsilon_for(events, target_delta=delta) for delta in (1e-5, 0.1, 0.5, 0.9)}
    assert values[1e-5] == pytest.approx(9.50, abs=0.01)
    assert values[0.1] == pytest.approx(2.75, abs=0.01)
    assert values[0.5] == pytest.approx(0.27, abs=0.01)
    assert values[0.9] == 0.0  # the conversion went negative; ε = 0 is the true bound there
    assert epsilon_for(events, target_delta=0.9, accountant="rdp") >= 0.0


# --- finding 4: the site's cap is its own ------------------------------------------------------------


def test_a_site_without_its_own_cap_is_refused_with_the_key_to_add(tmp_path, data_file):
    from fedllm.deploy.site_file import load_site_file

    path = tmp_path / "x.toml"
    path.write_text(f'site-name = "x"\ndata-path = "{data_file}"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_site_file(path)
    assert str(exc.value).startswith(str(path))
    assert "max-epsilon: required; add max-epsilon = 8.0 (your cap on this site's cumulative ε)" in str(exc.value)
    for cap in (0, 0.0, math.inf):  # 0 used to mean "the run's cap"
        with pytest.raises(ConfigError, match="max-epsilon = "):
            SiteConfig.from_node_config({"site-name": "x", "data-path": str(data_file), "max-epsilon": cap})


def test_a_run_cap_cannot_loosen_the_sites_cap(tmp_path, data_file, steps):
    site = _site(data_file, **{"max-epsilon": 0.5})
    ledger, before = _with_one_release(tmp_path, _site(data_file, **{"max-epsilon": 8.0}))
    steps.clear()
    hostile = _runtime(tmp_path, site, **{"privacy.max-epsilon": 1e6, "privacy.noise-multiplier": 0.6,
                                          "train.local-steps": 20})
    assert hostile.cap == 0.5
    with pytest.raises(BudgetExceededError, match=r"cap 0\.50"):
        hostile.train_round(run_id="hostile", server_round=1,
                            adapter=get_adapter_state(hostile.model, trainable_only=True))
    assert steps == [] and ledger.read_bytes() == before


def test_a_run_cap_the_site_cannot_honour_is_refused(tmp_path, data_file, steps):
    site = _site(data_file)
    ledger, before = _with_one_release(tmp_path, site)
    steps.clear()
    hostile = _runtime(tmp_path, site)
    hostile.config = dataclasses.replace(hostile.config, privacy=dataclasses.replace(hostile.config.privacy,
                                                                                     max_epsilon=math.nan))
    message = str(_refused(hostile))
    assert "privacy.max-epsilon = nan is not a finite number > 0" in message and "max-epsilon = 8" in message
    assert steps == [] and ledger.read_bytes() == before


def test_dp_off_is_refused_as_a_policy_refusal(tmp_path, data_file, steps):
    site = _site(data_file)
    ledger, before = _with_one_release(tmp_path, site)
    steps.clear()
    message = str(_refused(_runtime(tmp_path, site, **{"privacy.enabled": False})))
    assert message.startswith("Site 'cardiology' refuses this run: privacy.enabled = false, but the site requires "
                              "differential privacy (require-dp = true in its site file).")
    assert steps == [] and ledger.read_bytes() == before


# --- finding 8: a run in which no site trained fails, with the sites' reasons -------------------------


class RuntimeFederation:
    """Real ``SiteRuntime``s behind the coordinator's protocol, mapping refusals as the ClientApp does."""

    def __init__(self, runtimes: dict[int, SiteRuntime]) -> None:
        self.runtimes = runtimes

    def node_ids(self) -> list[int]:
        return list(self.runtimes)

    def send_and_receive(self, tasks: list[Task], *, timeout: float) -> list[Reply]:
        import torch

        replies = []
        for task in tasks:
            site = self.runtimes[task.node_id]
            adapter = {k: torch.tensor(v) for k, v in task.arrays.items()}
            if task.kind == "evaluate":
                try:
                    replies.append(Reply(task.node_id, site=site.name, metrics=site.evaluate(
                        adapter, run_id="run-1", server_round=int(task.config[wire.SERVER_ROUND]))))
                except SitePolicyError as exc:
                    replies.append(Reply(task.node_id, error_code=wire.POLICY_REFUSED, error_reason=str(exc)))
                continue
            try:
                out = site.train_round(run_id="run-1", server_round=int(task.config[wire.SERVER_ROUND]),
                                       adapter=adapter)
            except SitePolicyError as exc:
                replies.append(Reply(task.node_id, error_code=wire.POLICY_REFUSED, error_reason=str(exc)))
                continue
            except BudgetExceededError as exc:
                replies.append(Reply(task.node_id, error_code=wire.BUDGET_REFUSED, error_reason=str(exc)))
                continue
            arrays = {k: v.detach().cpu().numpy() for k, v in out.adapter.items()}
            replies.append(Reply(task.node_id, site=site.name, arrays=arrays, metrics=out.metrics))
        return replies


@pytest.mark.usefixtures("flower_task_identity")
def test_a_run_that_every_site_refused_fails_with_the_sites_reasons(tmp_path, data_file, steps):
    import json

    from fedllm.coordinator.rounds import run_federation
    from fedllm.flower.coordinator_strategy import make_strategy

    model_lora._RESIDENT.clear()
    flat = {**CONFIG, "privacy.enabled": False, "num-server-rounds": 2, "output-dir": str(tmp_path / "run"),
            "strategy.min-available-sites": 2}
    sites = {1: _site(data_file), 2: dataclasses.replace(_site(data_file), name="oncology")}
    config = RunConfig.from_flat(flat)
    fed = RuntimeFederation({n: SiteRuntime(config, s, ledger_path=tmp_path / f"{s.name}.json", simulated=False)
                             for n, s in sites.items()})
    with pytest.raises(RunFailedError) as exc:
        run_federation(fed, make_strategy, config, run_id="run-1")
    text = str(exc.value)
    assert text.startswith("no site trained: every site refused every round up to round 1")
    # every reply was a refusal (no site name reached the coordinator): each reason names its site
    assert "Site 'cardiology' refuses this run: privacy.enabled = false" in text
    assert "Site 'oncology' refuses this run: privacy.enabled = false" in text
    history = json.loads((tmp_path / "run" / "history.json").read_text(encoding="utf-8"))
    assert history["status"] == "failed" and "no site trained" in history["error"]
    assert not (tmp_path / "run" / "adapter").exists()  # no untrained adapter exported as a result
    assert steps == [] and not (tmp_path / "cardiology.json").exists()


def test_the_summary_prints_each_sites_own_cap_not_the_runs():
    from fedllm.reports.summary import summary_text

    metrics = dict.fromkeys(wire.TRAIN_METRIC_KEYS, 1.0) | {wire.EPSILON: 2.5, wire.DELTA: 1e-6,
                                                           wire.EPSILON_CAP: 3.0}
    history = {"run-id": "r", "status": "completed", "num-server-rounds": 1,
               "rounds": [{"round": 1, "train": {"sites": {"cardiology": metrics}, "refused": {}}}]}
    text = summary_text(history, output_dir=Path("/tmp/x"), privacy_enabled=True, max_epsilon=10.0)
    row = next(line for line in text.splitlines() if line.startswith("cardiology"))
    assert row.split()[-3:] == ["2.50", "3", "1e-06"]
    assert "cap 10" not in text


# --- property: no run config makes a site's recorded ε at its own δ exceed its cap --------------------


def test_no_run_config_makes_the_recorded_epsilon_at_the_sites_delta_exceed_its_cap(tmp_path, data_file):
    rng = random.Random(13)
    site = _site(data_file, **{"max-epsilon": 3.0})
    base = _runtime(tmp_path, site)  # loads the model and data once; each case gets its own ledger
    cases = refused = 0
    for case in range(40):
        flat = {**CONFIG,
                "privacy.target-delta": rng.choice([1e-7, 1e-6, 1e-5, 1e-3, 0.01, 0.1, 0.3, 0.5]),
                "privacy.noise-multiplier": rng.choice([0.4, 0.6, 0.8, 1.2]),
                "privacy.max-epsilon": rng.choice([1.0, 3.0, 10.0, 1e6]),
                "privacy.accountant": rng.choice(["prv", "rdp"]),
                "train.local-steps": rng.randint(1, 3), "train.batch-size": rng.randint(1, 4),
                "num-server-rounds": 3}
        config = RunConfig.from_flat(flat)
        runtime = _case_runtime(base, config, tmp_path / f"case-{case}.json")
        adapter = get_adapter_state(runtime.model, trainable_only=True)
        for server_round in (1, 2, 3):
            try:
                runtime.train_round(run_id=f"run-{case}", server_round=server_round, adapter=adapter)
            except BudgetExceededError:  # SitePolicyError included: a refusal is always allowed
                refused += 1
        cases += 1
        if not runtime.ledger_path.exists():
            continue
        entries = PrivacyLedger.open(runtime.ledger_path, site="cardiology").entries
        for entry in entries:
            assert entry.target_delta == runtime.policy.delta, (case, flat)
            assert entry.epsilon <= site.max_epsilon, (case, flat, entry)
        at_site_delta = epsilon_for([e.event for e in entries], target_delta=runtime.policy.delta,
                                    accountant=entries[-1].accountant)
        assert at_site_delta <= site.max_epsilon + 1e-9, (case, flat)
    assert cases == 40 and refused > 0


def _case_runtime(base: SiteRuntime, config: RunConfig, ledger: Path) -> SiteRuntime:
    """``base`` (model and data already loaded) serving another run config with its own ledger: what
    ``SiteRuntime.__init__`` sets from the config, without loading anything again."""
    runtime = object.__new__(SiteRuntime)
    runtime.__dict__.update(base.__dict__)
    runtime.config, runtime.ledger_path, runtime._sigma = config, ledger, {}
    runtime.release_cache = site_runtime_module.ReleaseCache(ledger.parent / ledger.stem, site=base.name)
    runtime.cap = runtime.policy.cap(config.privacy)
    return runtime
