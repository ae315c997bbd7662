"""Central (site-level) DP: the accountant against published and closed-form values, Flower's
server-side wrappers (as fedllm adapts them) on hand-made B-tensor updates, the configuration
section, and the human-readable warning (golden)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)

from fedllm import wire
from fedllm.config import (
    CentralDPConfig,
    RunConfig,
    StrategyConfig,
    defaults_flat,
    to_toml,
)
from fedllm.coordinator.central_dp import site_level_warning, start_central_dp
from fedllm.coordinator.screening import triage_replies, validate_update
from fedllm.errors import ConfigError, InvalidUpdateError
from fedllm.flower.grid import reply_from_message
from fedllm.flower.strategies import (
    build_strategy,
    clipped_count_stddev,
    with_central_dp,
)
from fedllm.privacy.accounting import PrivacyParameterError
from fedllm.privacy.site_level import site_level_epsilon
from tests.helpers import REPO, FakeGrid, reply_message

pytestmark = pytest.mark.usefixtures("flower_task_identity")  # tests/conftest.py


# ------------------------------------------------------------------------------------ accounting


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """ε of a μ-GDP mechanism (T Gaussian releases at noise z: μ = √T / z) at δ, exactly
    (Balle & Wang 2018, Thm 8: δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)), by bisection."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))
    delta_of = lambda e: phi(-e / mu + mu / 2) - math.exp(e) * phi(-e / mu - mu / 2)
    lo, hi = 0.0, 500.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("z, published_rdp, published_pld", [(1.0, 30.1, 28.4), (4.0, 5.38, 4.98)])
def test_site_level_epsilon_matches_published_and_closed_form(z, published_rdp, published_pld):
    # docs/notes/dp-lora.md §3.1: 5 sites all taking part, 20 rounds, δ = 1e-5
    args = dict(noise_multiplier=z, sites_per_round=5, total_sites=5, rounds=20, target_delta=1e-5, sampling="all")
    prv = site_level_epsilon(**args)
    rdp = site_level_epsilon(**args, accountant="rdp")
    exact = _exact_gaussian_epsilon(math.sqrt(20) / z, 1e-5)
    assert rdp == pytest.approx(published_rdp, abs=0.05)  # published to 3 digits
    assert prv == pytest.approx(published_pld, abs=0.03)
    assert exact - 1e-6 <= prv <= exact + 0.02  # PRV's upper bound of the exact value
    assert rdp > prv


def test_site_level_epsilon_ranges_given_in_the_issue():
    common = dict(sites_per_round=5, total_sites=5, rounds=20, target_delta=1e-5, sampling="all")
    assert 28 <= site_level_epsilon(noise_multiplier=1.0, **common) <= 30
    assert 5.0 <= site_level_epsilon(noise_multiplier=4.0, **common, accountant="rdp") <= 5.4
    assert 4.9 <= site_level_epsilon(noise_multiplier=4.0, **common) <= 5.4


def test_sampling_a_fixed_subset_gets_no_amplification():
    """Flower samples a fixed number of sites: q = 1 whatever the population (an upper bound)."""
    all_five = site_level_epsilon(noise_multiplier=2.0, sites_per_round=5, total_sites=5, rounds=10,
                                  target_delta=1e-5, sampling="all")
    five_of_100 = site_level_epsilon(noise_multiplier=2.0, sites_per_round=5, total_sites=100, rounds=10,
                                     target_delta=1e-5, sampling="fixed-subset")
    assert five_of_100 == pytest.approx(all_five)
    assert site_level_epsilon(noise_multiplier=2.0, sites_per_round=5, total_sites=5, rounds=11,
                              target_delta=1e-5) > all_five  # grows with every round


def test_site_level_epsilon_edge_cases_and_bad_parameters():
    common = dict(sites_per_round=3, total_sites=5, target_delta=1e-5)
    assert site_level_epsilon(noise_multiplier=1.0, rounds=0, **common) == 0.0
    assert site_level_epsilon(noise_multiplier=0.0, rounds=1, **common) == math.inf
    for bad in (dict(sampling="poisson"), dict(sampling="all"), dict(sites_per_round=6), dict(rounds=-1),
                dict(total_sites=0), dict(target_delta=0.0), dict(accountant="gdp")):
        kwargs = dict(noise_multiplier=1.0, rounds=2, **common) | bad
        with pytest.raises(PrivacyParameterError):
            site_level_epsilon(**kwargs)


# ------------------------------------------------------------------------------- the wrappers

SHAPES = {"model.layers.0.q_proj.lora_B.weight": (64, 4), "model.layers.0.v_proj.lora_B.weight": (32, 4)}


def _record(values: dict[str, np.ndarray], order=None) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(values[k], dtype=np.float32)) for k in (order or values)})


def _update(rng: np.random.Generator, norm: float, shapes=SHAPES) -> dict[str, np.ndarray]:
    """A random update of exactly ``norm`` (L2 over all tensors)."""
    parts = {k: rng.standard_normal(s) for k, s in shapes.items()}
    total = math.sqrt(sum(float((v ** 2).sum()) for v in parts.values()))
    return {k: v * norm / total for k, v in parts.items()}


def _reply(node: int, arrays: ArrayRecord, *, examples: int = 10):
    content = RecordDict({wire.ARRAYS: arrays,
                          wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: examples, wire.TRAIN_LOSS: 1.0}),
                          wire.SITE: ConfigRecord({wire.SITE_NAME: f"site{node}"})})
    return reply_message(node, content)


def _wrapped(*, clipping="fixed", z=0.0, s=1.0, m=4, strategy="fedavg", **kw):
    config = CentralDPConfig(enabled=True, noise_multiplier=z, clipping=clipping, clipping_norm=s, **kw)
    return with_central_dp(build_strategy(StrategyConfig(name=strategy)), config, sites_per_round=m)


def _round(dp, global_values, deltas, *, examples=None, orders=None, asked=None):
    """Configure a round from ``global_values`` asking ``asked`` sites (default: one per delta),
    send back global + delta from the first ``len(deltas)`` of them, aggregate."""
    current = _record(global_values)
    tasks = list(dp.configure_train(1, current, ConfigRecord(), FakeGrid(range(1, (asked or len(deltas)) + 1))))
    assert len(tasks) == (asked or len(deltas))
    replies = [_reply(i + 1, _record({k: global_values[k] + d[k] for k in d}, order=(orders or [None] * len(deltas))[i]),
                      examples=(examples or [10] * len(deltas))[i])
               for i, d in enumerate(deltas)]
    arrays, _ = dp.aggregate_train(1, replies)
    return {k: arrays[k].numpy() for k in arrays}, arrays


def _clip(delta, s):
    norm = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in delta.values()))
    return {k: v * min(1.0, s / norm) for k, v in delta.items()}


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_each_sites_update_relative_to_the_global_adapter_is_clipped_to_s_and_averaged_equally(clipping, strategy):
    rng = np.random.default_rng(0)
    global_values = {k: rng.standard_normal(s) * 3 for k, s in SHAPES.items()}  # far from zero: raw weights ≫ S
    deltas = [_update(rng, n) for n in (0.3, 0.8, 2.5, 7.0)]
    dp = _wrapped(clipping=clipping, z=0.0, s=1.0, strategy=strategy)
    assert isinstance(dp, (DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyServerSideAdaptiveClipping))
    # very different num-examples must NOT weight the mean (the noise is calibrated to S/m)
    out, arrays = _round(dp, global_values, deltas, examples=[1, 10, 1000, 5])
    clipped = [_clip(d, 1.0) for d in deltas]
    for k in SHAPES:
        expected = global_values[k] + sum(c[k] for c in clipped) / 4
        np.testing.assert_allclose(out[k], expected, rtol=0, atol=2e-5)
        assert arrays[k].dtype == "float32"  # stays valid against the next round's reference
    assert dp.round_clipping_norm == 1.0 and dp.round_sites == 4
    # the two small updates pass unchanged, the two large ones are cut to norm exactly S
    assert [round(math.sqrt(sum(float((v ** 2).sum()) for v in c.values())), 6) for c in clipped] == [0.3, 0.8, 1.0, 1.0]


def test_replies_with_tensors_in_another_order_are_paired_by_name():
    rng = np.random.default_rng(1)
    global_values = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    deltas = [_update(rng, 0.5), _update(rng, 0.5)]
    out, _ = _round(_wrapped(z=0.0, m=2), global_values, deltas, orders=[None, list(reversed(SHAPES))])
    for k in SHAPES:
        np.testing.assert_allclose(out[k], global_values[k] + (deltas[0][k] + deltas[1][k]) / 2, atol=2e-6)


BIG = {"lora_B.a": (400, 250), "lora_B.b": (200, 250)}  # 150,000 coordinates


@pytest.mark.usefixtures("seeded_randomness")  # the noise from fixed seeds: the same draws every run
@pytest.mark.parametrize("z, s, m, replies", [(1.0, 1.0, 4, 4), (2.0, 0.5, 5, 5), (1.0, 1.0, 4, 2)])
def test_fixed_clipping_noise_std_is_z_s_over_the_sites_asked(z, s, m, replies):
    rng = np.random.default_rng(2)
    global_values = {k: np.zeros(shape) for k, shape in BIG.items()}
    deltas = [_update(rng, s / 10, BIG) for _ in range(replies)]  # under S: no clipping
    dp = _wrapped(z=z, s=s, m=m)
    out, _ = _round(dp, global_values, deltas, asked=m)
    # the sum over the m sites asked (a missing site is a zero update) divided by m, plus z·S/m:
    # neither the mean nor the noise may depend on how many replies arrived
    noise = np.concatenate([(out[k] - sum(d[k] for d in deltas) / m).ravel() for k in BIG])
    expected = z * s / m
    assert (dp.round_sites, dp.round_updates) == (m, replies)
    assert dp.noise_stddev == pytest.approx(expected)
    assert noise.std() == pytest.approx(expected, rel=0.01)  # 150k draws: std error 0.18%
    assert abs(noise.mean()) < 4 * expected / math.sqrt(noise.size)


def test_the_noise_is_drawn_from_os_entropy_not_from_numpys_global_state():
    """Flower's wrapper draws from numpy's global generator; anyone who seeded it (or saw earlier
    draws) must not be able to reproduce a round's noise: each round reseeds it from the OS."""
    rng = np.random.default_rng(5)
    global_values = {k: np.zeros(shape) for k, shape in SHAPES.items()}
    deltas = [_update(rng, 0.1) for _ in range(4)]
    outs = []
    for _ in range(2):
        np.random.seed(0)
        out, _ = _round(_wrapped(z=1.0, s=1.0, m=4), global_values, deltas)
        outs.append(np.concatenate([v.ravel() for v in out.values()]))
    assert not np.allclose(outs[0], outs[1])


@pytest.mark.usefixtures("seeded_randomness")
def test_adaptive_clipping_noise_uses_the_norm_the_round_was_clipped_to():
    rng = np.random.default_rng(3)
    m, z = 20, 1.0
    global_values = {k: np.zeros(shape) for k, shape in BIG.items()}
    deltas = [_update(rng, 0.01, BIG) for _ in range(m)]  # all far below S: C must shrink a lot
    dp = _wrapped(clipping="adaptive", z=z, s=1.0, m=m, clip_norm_lr=2.0)
    sigma_b = clipped_count_stddev(noise_multiplier=z, sites_per_round=m)
    z_update = (z ** -2 - (2 * sigma_b) ** -2) ** -0.5
    assert dp.noise_multiplier == pytest.approx(z_update) and z_update == pytest.approx(2 / math.sqrt(3))
    out, _ = _round(dp, global_values, deltas)
    assert dp.round_clipping_norm == 1.0 and dp.clipping_norm < 0.6  # next round's C moved down
    noise = np.concatenate([(out[k] - sum(d[k] for d in deltas) / m).ravel() for k in BIG])
    assert noise.std() == pytest.approx(z_update * 1.0 / m, rel=0.01)  # this round's C, not the next one's


@pytest.mark.parametrize("norm, start, direction", [(2.0, 0.1, "up"), (0.01, 1.0, "down")])
def test_adaptive_clipping_moves_the_norm_toward_the_updates(norm, start, direction):
    rng = np.random.default_rng(4)
    global_values = {k: np.zeros(s) for k, s in SHAPES.items()}
    dp = _wrapped(clipping="adaptive", z=0.0, s=start, m=4)  # σ_b = m/20 = 0.2: a noisy count
    norms = [dp.clipping_norm]
    for _ in range(8):
        _round(dp, global_values, [_update(rng, norm) for _ in range(4)])
        norms.append(dp.clipping_norm)
    if direction == "up":  # every update clipped: C grows by ≈ exp(0.2 · 0.5) a round
        assert norms[-1] > start * 1.8 and norms[-1] < norm
    else:  # no update clipped: C shrinks
        assert norms[-1] < start / 1.8 and norms[-1] > norm


def test_adaptive_clipping_settles_at_the_target_quantile_of_update_norms():
    rng = np.random.default_rng(5)
    global_values = {k: np.zeros(s) for k, s in SHAPES.items()}
    dp = _wrapped(clipping="adaptive", z=0.0, s=0.1, m=20, target_quantile=0.5)
    for _ in range(80):  # lognormal update norms with median 2.0 (docs/notes/dp-lora.md §3.2)
        _round(dp, global_values, [_update(rng, float(2.0 * np.exp(0.3 * rng.standard_normal()))) for _ in range(20)])
    assert 1.5 < dp.clipping_norm < 2.7


def test_fedadam_cannot_be_wrapped():
    with pytest.raises(ValueError, match="FedAdam"):
        _wrapped(strategy="fedadam")


def test_an_update_identical_to_the_global_adapter_is_rejected_under_central_dp():
    """Flower's clipping divides by the update's norm: a zero update would crash the round."""
    current = _record({k: np.ones(s) for k, s in SHAPES.items()})
    plain = {k: v.numpy() for k, v in current.items()}
    validate_update(plain, plain)  # fine without central DP
    with pytest.raises(InvalidUpdateError, match="identical to the global adapter"):
        validate_update(plain, plain, require_change=True)
    reply = reply_from_message(_reply(1, current), kind="train", node_id=1)
    triage = triage_replies([reply], reference=plain, names={}, require_change=True)
    assert list(triage.rejected) == ["site1"] and not triage.accepted


# ------------------------------------------------------------------------- run bookkeeping


def _run_config(**central):
    flat = {"num-server-rounds": 20, "central-dp.enabled": True} | {f"central-dp.{k}": v for k, v in central.items()}
    return RunConfig.from_flat(flat)


def test_run_start_refuses_a_delta_that_is_not_below_one_over_the_number_of_sites(tmp_path):
    from fedllm.coordinator.history import RunHistory

    history = RunHistory(tmp_path / "history.json", run_id="r", num_rounds=20)
    with pytest.raises(ConfigError, match=r"central-dp.target-delta = 0.25 is not below 1/N = 0.2 for N = 5 sites"):
        start_central_dp(_run_config(**{"target-delta": 0.25}), history, connected=5)


def test_run_start_warns_plainly_and_rounds_record_the_guarantee(tmp_path, caplog):
    from fedllm.coordinator.history import RunHistory

    history = RunHistory(tmp_path / "history.json", run_id="r", num_rounds=20)
    assert history.data["central-dp"] == {"enabled": False}
    import logging

    server_log = logging.getLogger("fedllm.coordinator.central_dp")  # the app's handler may stop propagation
    server_log.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="fedllm.coordinator.central_dp"):
            central = start_central_dp(_run_config(), history, connected=5, ledger=tmp_path / "coordinator.json")
    finally:
        server_log.removeHandler(caplog.handler)
    assert "site-level ε would be 28.4 after 20 rounds with 5 sites at noise 1: too large" in caplog.text
    assert history.data["central-dp"] == {
        "enabled": True, "clipping": "fixed", "noise-multiplier": 1.0, "clipping-norm": 1.0, "sites-per-round": 5,
        "total-sites": 5, "rounds": 0, "sampling": "all", "epsilon": 0.0, "cumulative-epsilon": 0.0,
        "ledger": str(tmp_path / "coordinator.json"), "ledger-releases": 0, "delta": 1e-05, "accountant": "prv"}
    dp = _wrapped(z=1.0, m=5)
    rng = np.random.default_rng(6)
    zeros = {k: np.zeros(s) for k, s in SHAPES.items()}
    _round(dp, zeros, [_update(rng, 2.0) for _ in range(4)], asked=5)  # one site refused: m is still 5
    released = dict(clipping_norm=dp.round_clipping_norm, sites=dp.round_sites)
    central.record_round(history, 1, asked=5, connected=5, released=True, **released)
    _round(dp, zeros, [], asked=5)  # every site refused: the round still releases noise, m = 5
    central.record_round(history, 2, asked=5, connected=5, released=True,
                         clipping_norm=dp.round_clipping_norm, sites=dp.round_sites)
    central.record_round(history, 3, asked=3, connected=5, released=False,  # nobody asked: nothing released
                         clipping_norm=dp.clipping_norm, sites=0)
    rounds = {r["round"]: r["central-dp"] for r in history.data["rounds"]}
    eps1 = site_level_epsilon(noise_multiplier=1.0, sites_per_round=5, total_sites=5, rounds=1, target_delta=1e-5)
    eps2 = site_level_epsilon(noise_multiplier=1.0, sites_per_round=5, total_sites=5, rounds=2, target_delta=1e-5)
    one_run = dict(sites=5, **{"clipping-norm": 1.0})  # a first run on this ledger: cumulative = this run's
    assert rounds[1] == {**one_run, "epsilon": pytest.approx(eps1), "cumulative-epsilon": pytest.approx(eps1)}
    assert rounds[2] == {**one_run, "epsilon": pytest.approx(eps2), "cumulative-epsilon": pytest.approx(eps2)}
    assert rounds[3] == {"clipping-norm": 1.0, "sites": 0, "epsilon": pytest.approx(eps2),
                         "cumulative-epsilon": pytest.approx(eps2)}
    block = history.data["central-dp"]
    assert (block["rounds"], block["sampling"], block["epsilon"]) == (2, "fixed-subset", pytest.approx(eps2))
    assert (block["ledger-releases"], block["cumulative-epsilon"]) == (2, pytest.approx(eps2))
    history.save()  # valid JSON (no NaN/inf)


# ----------------------------------------------------------------------------------- config


def test_central_dp_section_defaults_and_round_trip():
    defaults = defaults_flat()
    assert {k: v for k, v in defaults.items() if k.startswith("central-dp.")} == {
        "central-dp.enabled": False, "central-dp.noise-multiplier": 1.0, "central-dp.clipping": "fixed",
        "central-dp.clipping-norm": 1.0, "central-dp.target-quantile": 0.5, "central-dp.clip-norm-lr": 0.2,
        "central-dp.target-delta": 1e-5, "central-dp.ledger-path": "",
    }
    flat = {"central-dp.enabled": True, "central-dp.noise-multiplier": 4, "central-dp.clipping": "adaptive",
            "central-dp.clipping-norm": 0.1, "central-dp.target-quantile": 0.7, "central-dp.clip-norm-lr": 0.1,
            "central-dp.target-delta": 1e-6}
    config = RunConfig.from_flat(flat)
    assert config.central_dp == CentralDPConfig(True, 4.0, "adaptive", 0.1, 0.7, 0.1, 1e-6)
    assert RunConfig.from_flat(config.to_flat()) == config
    import tomllib

    from fedllm.config import flatten
    assert RunConfig.from_flat(flatten(tomllib.loads(to_toml(config)))) == config


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("central-dp.clipping", "adaptiv", "must be one of fixed, adaptive (did you mean 'adaptive'?)"),
        ("central-dp.noise-multiplier", 0.0, "must be > 0"),
        ("central-dp.clipping-norm", -1.0, "must be > 0"),
        ("central-dp.target-quantile", 1.5, "must be >= 0 and <= 1"),
        ("central-dp.clip-norm-lr", 0.0, "must be > 0"),
        ("central-dp.target-delta", 0.0, "must be > 0"),
        ("central-dp.enabled", "yes", "expected bool"),
    ],
)
def test_bad_central_dp_values_name_the_key(key, value, expected):
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flat({key: value})
    lines = [line.strip()[2:] for line in str(exc.value).splitlines() if line.strip().startswith("- ")]
    assert len(lines) == 1 and lines[0].startswith(f"{key} = {value!r}") and expected in lines[0]


def test_central_dp_typo_and_fedadam_are_refused():
    with pytest.raises(ConfigError, match=r"did you mean 'central-dp.noise-multiplier'"):
        RunConfig.from_flat({"central-dp.noise-multiplyer": 2.0})
    with pytest.raises(ConfigError, match="use fedavg or fedprox"):
        RunConfig.from_flat({"central-dp.enabled": True, "strategy.name": "fedadam"})
    RunConfig.from_flat({"central-dp.enabled": False, "strategy.name": "fedadam"})  # off: no conflict


def test_every_central_dp_key_is_documented_with_its_default():
    from fedllm.config import toml_value

    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    for key, value in defaults_flat().items():
        if key.startswith("central-dp."):
            assert f"| `{key}` |" in doc, key
            row = next(line for line in doc.splitlines() if line.startswith(f"| `{key}` |"))
            assert f"`{toml_value(value)}`" in row, (key, row)


# ---------------------------------------------------------------------------- golden warning


def test_site_level_warning_golden():
    assert site_level_warning(epsilon=28.384, rounds=20, total_sites=5, noise_multiplier=1.0) == (
        "site-level ε would be 28.4 after 20 rounds with 5 sites at noise 1: too large to mean anything; "
        "central DP only protects a site when hundreds of sites take part per round. Raise "
        "central-dp.noise-multiplier (at a heavy cost in accuracy), run fewer rounds, or rely on the "
        "record-level guarantee of each site (privacy.*); see docs/privacy.md"
    )
    assert site_level_warning(epsilon=4.99, rounds=20, total_sites=5, noise_multiplier=4.0) is None
    assert site_level_warning(epsilon=math.inf, rounds=3, total_sites=2, noise_multiplier=0.0).startswith(
        "site-level ε would be ∞ after 3 rounds with 2 sites at noise 0:")
