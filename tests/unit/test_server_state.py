"""Coordinator resume: a run saved after round k and restored into fresh objects continues exactly
as if it had never stopped (FedAdam's moments, adaptive clipping's norm), the saved state is
verified, a crash while saving leaves the old or the new state, and the history reopens."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvgM

from fedllm import wire
from fedllm.config import CentralDPConfig, StrategyConfig
from fedllm.coordinator import checkpoint as server_state
from fedllm.coordinator.checkpoint import (
    clear_server_state,
    load_server_state,
    restore_strategy,
    save_server_state,
)
from fedllm.coordinator.history import RunHistory
from fedllm.coordinator.protocol import Reply
from fedllm.errors import ConfigError
from fedllm.flower.coordinator_strategy import FlowerStrategy
from fedllm.flower.strategies import build_strategy, with_central_dp
from tests.helpers import FakeNodes

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


SHAPES = {"model.q_proj.lora_B.weight": (6, 2), "model.v_proj.lora_B.weight": (4, 2)}
SITES = (1, 2, 3)


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _replies(server_round: int, current: dict[str, np.ndarray]) -> list[Reply]:
    """Each site's reply for a round: the arrays it was sent plus a fixed, round-dependent step."""
    out = []
    for node in SITES:
        rng = np.random.default_rng(1000 * server_round + node)
        arrays = {k: current[k] + (rng.standard_normal(current[k].shape) * node).astype(current[k].dtype)
                  for k in current}
        out.append(Reply(node, arrays=arrays, metrics={wire.NUM_EXAMPLES: 10 * node, wire.TRAIN_LOSS: 1.0}))
    return out


def _run_round(strategy, server_round: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    strategy.configure_train(server_round, arrays, {}, FakeNodes(SITES))
    return strategy.aggregate_train(server_round, _replies(server_round, arrays))


def _fedadam():
    return FlowerStrategy(build_strategy(StrategyConfig(name="fedadam", server_learning_rate=0.05)))


def _adaptive():
    config = CentralDPConfig(enabled=True, noise_multiplier=0.0, clipping="adaptive", clipping_norm=0.5,
                             clip_norm_lr=0.5)
    dp = with_central_dp(build_strategy(StrategyConfig(name="fedavg")), config, sites_per_round=len(SITES))
    dp.clipped_count_stddev = 0.0  # noise off (z = 0) and a noiseless clipped count: deterministic C
    return FlowerStrategy(dp)


def _fixed():
    config = CentralDPConfig(enabled=True, noise_multiplier=0.0, clipping="fixed", clipping_norm=2.0)
    return FlowerStrategy(with_central_dp(build_strategy(StrategyConfig(name="fedprox")), config,
                                          sites_per_round=len(SITES)))


def _equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a.keys()) == list(b.keys()) and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def _continuous_and_resumed(make, tmp_path, *, saved_after: int, rounds: int, restore: bool = True):
    straight = make()
    arrays = _initial()
    for r in range(1, rounds + 1):
        arrays = _run_round(straight, r, arrays)
    first = make()
    resumed = _initial()
    for r in range(1, saved_after + 1):
        resumed = _run_round(first, r, resumed)
    save_server_state(tmp_path, server_round=saved_after, arrays=resumed, strategy=first, names={1: "a"},
                      central=None, run_id="run-1")
    del first  # the coordinator died
    state = load_server_state(tmp_path)
    second = make()
    if restore:
        restore_strategy(second, state)
    resumed = state.arrays
    for r in range(state.server_round + 1, rounds + 1):
        resumed = _run_round(second, r, resumed)
    return straight, arrays, second, resumed


@pytest.mark.parametrize("saved_after, rounds", [(1, 2), (2, 3), (3, 5)])
def test_fedadam_resumed_after_a_round_ends_bit_identical_to_an_uninterrupted_run(tmp_path, saved_after, rounds):
    straight, arrays, second, resumed = _continuous_and_resumed(_fedadam, tmp_path, saved_after=saved_after,
                                                                rounds=rounds)
    assert _equal(arrays, resumed)
    for moment in ("m_t", "v_t"):
        for k in SHAPES:
            assert np.array_equal(getattr(straight.strategy, moment)[k], getattr(second.strategy, moment)[k])


def test_without_restoring_fedadams_moments_the_run_would_differ(tmp_path):
    _, arrays, _, resumed = _continuous_and_resumed(_fedadam, tmp_path, saved_after=1, rounds=2, restore=False)
    assert not _equal(arrays, resumed)


@pytest.mark.parametrize("saved_after, rounds", [(1, 2), (2, 4)])
def test_adaptive_clipping_resumed_keeps_its_clipping_norm_and_ends_identical(tmp_path, saved_after, rounds):
    straight, arrays, second, resumed = _continuous_and_resumed(_adaptive, tmp_path, saved_after=saved_after,
                                                                rounds=rounds)
    straight, second = straight.strategy, second.strategy
    assert straight.clipping_norm != 0.5  # C moved
    assert second.clipping_norm == straight.clipping_norm
    assert (second.round_clipping_norm, second.round_sites) == (straight.round_clipping_norm, straight.round_sites)
    assert _equal(arrays, resumed)
    _, arrays, second, resumed = _continuous_and_resumed(_adaptive, tmp_path, saved_after=saved_after,
                                                         rounds=rounds, restore=False)
    assert second.strategy.clipping_norm != straight.clipping_norm and not _equal(arrays, resumed)


def test_fixed_clipping_round_state_is_restored(tmp_path):
    straight, arrays, second, resumed = _continuous_and_resumed(_fixed, tmp_path, saved_after=2, rounds=2)
    assert _equal(arrays, resumed)
    second, straight = second.strategy, straight.strategy
    assert (second.round_clipping_norm, second.round_sites, second.num_sampled_clients) == (2.0, 3, 3)
    assert _equal(_plain(second.current_arrays), _plain(straight.current_arrays))


def _plain(record) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


# ------------------------------------------------------------------------------ the files


def _trained_fedadam():
    strategy = _fedadam()
    _run_round(strategy, 1, _initial())
    return strategy


def _save(tmp_path, server_round=1, *, strategy=None, run_id="run-1", arrays=None, **kw):
    args = {"server_round": server_round, "arrays": arrays or _initial(),
            "strategy": strategy or _trained_fedadam(), "names": {7: "cardiology", 12: "oncology"},
            "central": None, "run_id": run_id} | kw
    save_server_state(tmp_path, **args)


def test_no_saved_round_means_nothing_to_resume(tmp_path):
    assert load_server_state(tmp_path) is None
    (tmp_path / "state").mkdir()
    assert load_server_state(tmp_path) is None


def test_the_state_round_trips_names_central_dp_run_ids_and_the_adapter(tmp_path):
    central = {"enabled": True, "clipping": "fixed", "rounds": 2, "epsilon": 3.25, "sites-per-round": 3,
               "total-sites": 3, "sampling": "all"}
    arrays = _run_round(_fedadam(), 1, _initial())  # float64 out of FedAdam: dtypes are kept
    _save(tmp_path, 1, arrays=arrays, central=central)
    _save(tmp_path, 2, arrays=arrays, central=central, run_id="run-2")  # a resumed run went on
    state = load_server_state(tmp_path)
    assert (state.server_round, state.run_id, state.run_ids) == (2, "run-2", ("run-1", "run-2"))
    assert state.names == {7: "cardiology", 12: "oncology"} and state.central == central
    assert state.strategy_class == "FedAdam" and _equal(state.arrays, arrays)
    on_disk = json.loads((tmp_path / "state" / "server-state.json").read_text())
    assert on_disk["round"] == 2 and on_disk["strategy"]["class"] == "FedAdam"
    assert sorted(on_disk["files"]) == ["global-adapter", "strategy"]
    # a fresh run into the same folder starts its own list
    _save(tmp_path, 1, run_id="run-3")
    assert load_server_state(tmp_path).run_ids == ("run-3",)
    clear_server_state(tmp_path)
    assert load_server_state(tmp_path) is None and not list((tmp_path / "state").iterdir())


def test_the_wrapped_strategy_is_named_with_its_inner_strategy(tmp_path):
    _save(tmp_path, strategy=_fixed())
    assert load_server_state(tmp_path).strategy_class == "SiteLevelFixedClipping(FedProx)"


def test_only_the_files_of_the_latest_state_are_kept(tmp_path):
    strategy, arrays = _fedadam(), _initial()
    for r in (1, 2, 3):
        arrays = _run_round(strategy, r, arrays)
        _save(tmp_path, r, strategy=strategy, arrays=arrays)
    names = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert len(names) == 3 and names[1] == "server-state.json"
    assert names[0].startswith("global-adapter.r3.") and names[2].startswith("strategy.r3.")


def _fail(*_a, **_k):
    raise OSError("disk full (simulated crash)")


def test_a_crash_before_the_json_is_replaced_leaves_the_old_state(tmp_path, monkeypatch):
    strategy = _fedadam()
    one = _run_round(strategy, 1, _initial())
    _save(tmp_path, 1, strategy=strategy, arrays=one)
    two = _run_round(strategy, 2, one)
    monkeypatch.setattr(server_state, "write_json_atomic", _fail)
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, 2, strategy=strategy, arrays=two)
    monkeypatch.undo()
    state = load_server_state(tmp_path)  # verified: the old files were not touched
    assert state.server_round == 1 and _equal(state.arrays, one)
    assert len(list((tmp_path / "state").glob("*.r2.*"))) == 2  # the new files exist, unreferenced
    _save(tmp_path, 2, strategy=strategy, arrays=two)  # the next save removes leftovers
    assert not list((tmp_path / "state").glob("*.r1.*"))


def test_a_crash_after_the_json_is_replaced_leaves_the_new_state(tmp_path, monkeypatch):
    strategy = _fedadam()
    one = _run_round(strategy, 1, _initial())
    _save(tmp_path, 1, strategy=strategy, arrays=one)
    two = _run_round(strategy, 2, one)
    monkeypatch.setattr(server_state, "_remove_obsolete", _fail)
    with pytest.raises(OSError):
        _save(tmp_path, 2, strategy=strategy, arrays=two)
    state = load_server_state(tmp_path)
    assert state.server_round == 2 and _equal(state.arrays, two)


def _one(tmp_path, pattern: str):
    (path,) = (tmp_path / "state").glob(pattern)
    return path


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: _one(p, "global-adapter.*").write_bytes(_one(p, "global-adapter.*").read_bytes()[:-1] + b"\0"),
         "does not match its sha256 in server-state.json"),
        (lambda p: _one(p, "strategy.*").unlink(), "is missing or unreadable"),
        (lambda p: (p / "state" / "server-state.json").write_text("{not json"), "server-state.json is unreadable"),
        (lambda p: (p / "state" / "server-state.json").write_text(
            (p / "state" / "server-state.json").read_text().replace('"round": 1', '"round": 7')),
         "does not match its own checksum"),
        (lambda p: (p / "state" / "server-state.json").write_text('{"kind": "something-else"}'),
         "not a fedllm server state"),
        (lambda p: (p / "state" / "server-state.json").write_text(
            '{"kind": "fedllm-server-state", "format": 1, "round": NaN}'), "server-state.json is malformed"),
    ],
)
def test_a_damaged_state_refuses_to_resume(tmp_path, damage, reason):
    _save(tmp_path, 1)
    damage(tmp_path)
    with pytest.raises(ConfigError) as exc:
        load_server_state(tmp_path)
    message = str(exc.value)
    assert message.startswith(f"{tmp_path / 'state'}: ") and reason in message and "cannot resume" in message


def test_restoring_into_another_strategy_or_other_settings_is_refused(tmp_path):
    _save(tmp_path, 1, strategy=_fedadam())
    state = load_server_state(tmp_path)
    with pytest.raises(ConfigError, match=r"saved by a FedAdam strategy, this run builds FedAvg; cannot resume"):
        restore_strategy(FlowerStrategy(build_strategy(StrategyConfig())), state)
    with pytest.raises(ConfigError, match=r"FedAdam was run with eta 0.05 \(now 0.1\); cannot resume"):
        restore_strategy(FlowerStrategy(build_strategy(StrategyConfig(name="fedadam", server_learning_rate=0.1))), state)
    restore_strategy(_fedadam(), state)


def test_a_strategy_with_unknown_state_is_not_saved(tmp_path):
    with pytest.raises(ValueError, match="cannot save the state of a FedAvgM strategy"):
        _save(tmp_path, 1, strategy=FlowerStrategy(FedAvgM()))
    with pytest.raises(ValueError, match="server_round must be an int >= 1"):
        _save(tmp_path, 0)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        _save(tmp_path, 1, central={"epsilon": float("inf")})
    assert not (tmp_path / "state").exists()  # refused before anything was written


# ------------------------------------------------------------------------------- history


def _history(tmp_path) -> RunHistory:
    history = RunHistory(tmp_path / "history.json", run_id="first", num_rounds=5)
    for r in range(4):
        if r:
            history.record_train(r, sites={}, refused={}, rejected={}, failed=[], seconds=1.0)
        history.record_evaluate(r, sites={}, failed=[])
    history.finish("failed", error="RunFailedError: the coordinator was killed")
    return history


def test_history_reopens_for_a_resumed_run(tmp_path):
    original = _history(tmp_path)
    history = RunHistory.load(tmp_path / "history.json", keep_rounds=2, run_id="second")
    data = history.data
    assert [r["round"] for r in data["rounds"]] == [0, 1, 2]
    assert data["status"] == "running" and "finished" not in data and "error" not in data
    assert (data["run-id"], data["started"]) == ("first", original.data["started"])
    assert data["resumed"] == [{"run-id": "second", "from-round": 3, "at": data["resumed"][0]["at"]}]
    history.record_train(3, sites={}, refused={}, rejected={}, failed=[], seconds=2.0)
    history.record_evaluate(3, sites={}, failed=[], rejected={"node-4": "metrics: missing 'perplexity'"})
    history.save()
    again = RunHistory.load(tmp_path / "history.json", keep_rounds=3, run_id="third")
    assert [r["round"] for r in again.data["rounds"]] == [0, 1, 2, 3]
    assert [e["run-id"] for e in again.data["resumed"]] == ["second", "third"]
    assert again.data["rounds"][3]["evaluate"]["rejected"] == {"node-4": "metrics: missing 'perplexity'"}
    assert RunHistory.load(tmp_path / "history.json", keep_rounds=0, run_id="x").data["rounds"][0]["round"] == 0


def test_history_that_cannot_be_read_refuses_to_resume(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the run history .*; cannot resume"):
        RunHistory.load(tmp_path / "history.json", keep_rounds=1, run_id="r")
    (tmp_path / "history.json").write_text('{"rounds": 3}')
    with pytest.raises(ConfigError, match="not a fedllm run history"):
        RunHistory.load(tmp_path / "history.json", keep_rounds=1, run_id="r")
