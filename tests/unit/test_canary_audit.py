"""The canary audit end to end on a tiny model: a mechanism without noise is flagged, DP-SGD is not.

The tiny model is built from a config here (seconds, no files beyond tmp). It is not
``tiny-random-llama``: that model ties its embeddings at init std 0.02, so with LoRA (embeddings
frozen) no logit can move by more than about ±1.3 and it memorizes nothing in a few steps. This
one unties the output layer and uses init std 0.3: without noise it memorizes the ×16 canaries to
the maximum exposure in 20 steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedllm.audit import canaries as audit
from fedllm.audit.scoring import (
    all_codes,
    check_enumeration,
    code_log_likelihoods,
    direct_code_log_likelihood,
    locate_secret,
)
from fedllm.cli.main import main
from fedllm.config import ModelConfig
from fedllm.data.formatting import tokenize_record
from fedllm.errors import FedLLMError
from fedllm.model.loading import load_model_and_tokenizer
from fedllm.privacy.ledger import PrivacyLedger
from fedllm.reports.canary_report import (
    can_and_cannot,
    render_markdown,
    summary_lines,
    verdict_line,
)
from tests.helpers import SMOKE_DATA, save_random_llama

CANARIES = 40  # k = 5 guesses per side; the one-run alarm needs all 10 right


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_random_llama(tmp_path_factory.mktemp("tiny-untied"), pad_token_id=257, hidden_size=64,
                             intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.3)


@pytest.fixture(scope="module")
def scenario(tiny_model_dir, tmp_path_factory) -> Path:
    """One site (the smoke data, about 72 train / 18 held-out records: its keyed split), one round of 20 steps."""
    folder = tmp_path_factory.mktemp("audit-scenario")
    (folder / "run.toml").write_text(f"""
num-server-rounds = 1
[model]
name = "{tiny_model_dir}"
[lora]
r = 8
alpha = 16
[data]
max-length = 128
[train]
local-steps = 20
batch-size = 16
learning-rate = 0.02
eval-batch-size = 32
[privacy]
target-epsilon = 1.0
max-epsilon = 8.0
""")
    (folder / "sites.toml").write_text(f'[[site]]\nsite-name = "smoke"\ndata-path = "{SMOKE_DATA}"\nmax-epsilon = 8.0\n'
                                        'eval-fraction = 0.2\n')
    return folder


def _audit(scenario: Path, output: Path, *extra: str) -> tuple[int, dict]:
    code = main(["audit", "--canaries", str(CANARIES), "--scenario", str(scenario), "--output", str(output), *extra])
    return code, json.loads((output / "canary-audit.json").read_text())


@pytest.mark.usefixtures("seeded_randomness")  # the verdicts are tests at α = 0.001: fixed draws, same answer
def test_no_noise_is_flagged_and_dp_is_not(scenario, tmp_path, capsys):
    code, broken = _audit(scenario, tmp_path / "no-noise", "--no-noise")
    assert code == 0  # flagged, but the run claimed no DP: a demonstration, not a failure
    assert broken["mechanism"]["kind"] == "clipping-only" and broken["mechanism"]["noise_multiplier"] == 0
    assert broken["mechanism"]["epsilon_theory"] == "inf"
    assert broken["verdict"]["flagged"] and broken["exposure"]["test"]["alarm"]
    assert broken["exposure"]["groups"][-1]["mean"] > broken["exposure"]["controls"]["p95"]

    code, private = _audit(scenario, tmp_path / "dp")
    assert code == 0
    mech = private["mechanism"]
    assert mech["kind"] == "dp-sgd" and mech["noise_multiplier"] > 1 and 0.9 <= mech["epsilon_theory"] <= 1.0
    assert not private["verdict"]["flagged"], private["verdict"]["reasons"]
    assert private["exposure"]["controls"]["null_p_value"] > 1e-6  # never-inserted controls follow the null

    # what the report records: the inclusion vector, k fixed from N, the audit's own ledger
    one = private["one_run"]
    assert len(one["items"]) == CANARIES and one["guesses_per_side"] == audit.default_guesses(CANARIES) == 5
    assert one["included_count"] == sum(item["included"] for item in one["items"])
    assert one["ceiling"] == pytest.approx(1.05, abs=0.01)
    ledger = PrivacyLedger.open(Path(private["ledger"]), site="smoke")
    assert Path(private["ledger"]).parent == tmp_path / "dp" / "ledger"
    assert [e.noise_multiplier for e in ledger.entries] == [mech["noise_multiplier"]]
    assert mech["num_examples"] == mech["real_examples"] + mech["canary_examples"]  # what was trained on
    # q and the ledger use the planned total (every canary as if included), not the secret draw's
    assert ledger.entries[0].num_examples == mech["planned_examples"] == mech["real_examples"] + 63 + CANARIES
    assert mech["sample_rate"] == pytest.approx(16 / mech["planned_examples"])
    report = (tmp_path / "dp" / "canary-audit.md").read_text()
    assert "the largest lower bound reachable is ε = 1.05" in report and "is a release" in report
    out = capsys.readouterr().out
    assert "Not flagged" in out and "FLAGGED, as expected for a mechanism without noise" in out


@pytest.mark.usefixtures("seeded_randomness")
def test_privacy_disabled_claims_nothing_and_exits_0(scenario, tmp_path):
    code, report = _audit(scenario, tmp_path / "off", "--set", "privacy.enabled=false")
    assert code == 0 and report["mechanism"]["kind"] == "no-dp" and not report["mechanism"]["clipping"]
    assert report["mechanism"]["epsilon_theory"] == "inf" and report["mechanism"]["claimed_epsilon"] == "inf"
    assert report["verdict"]["flagged"] and not report["verdict"]["dp_claimed"]  # plain training memorizes
    ledger = PrivacyLedger.open(Path(report["ledger"]), site="smoke")
    assert [e.noise_multiplier for e in ledger.entries] == [0.0] and math.isinf(ledger.entries[0].epsilon)


def test_enumeration_matches_plain_forward_passes():
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name="tiny-random-llama"))
    canary = audit.Canary("Kalo Venmi", "4821", copies=0)
    span = locate_secret(canary, tokenizer, max_length=128)
    scores = code_log_likelihoods(model, span, all_codes(4))
    assert scores.shape == (10_000,)
    for code in ("0000", "4821", "9999", "0907"):
        assert scores[int(code)] == pytest.approx(direct_code_log_likelihood(model, span, code), abs=1e-4)
    assert np.exp(scores).sum() < 1.0  # a distribution over the codes among all continuations
    subset = ["4821", "4822", "0907", "5555"]  # a trie over some codes gives the same values
    assert code_log_likelihoods(model, span, subset) == pytest.approx(scores[[int(c) for c in subset]], abs=1e-4)
    check_enumeration(model, span, "4821", float(scores[4821]))  # agrees: no error
    with pytest.raises(FedLLMError, match="4-D attention masks"):
        check_enumeration(model, span, "4821", float(scores[4821]) + 0.5)


def test_a_canary_cut_off_by_max_length_is_a_clear_error():
    _, tokenizer = load_model_and_tokenizer(ModelConfig(name="tiny-random-llama"))
    with pytest.raises(FedLLMError, match="data.max-length"):
        locate_secret(audit.Canary("Kalo Venmi", "4821", copies=0), tokenizer, max_length=30)


def test_canary_sets():
    a, b = audit.build_canaries(one_run=200, rng=np.random.default_rng(0)), audit.build_canaries(one_run=200)
    names = [c.name for c in (*a.exposure, *a.controls, *a.one_run)]
    assert len(set(names)) == len(names) == 9 + audit.CONTROLS + 200
    assert [c.copies for c in a.exposure] == [1, 1, 1, 4, 4, 4, 16, 16, 16]
    assert all(c.copies == 0 for c in a.controls) and all(len(c.code) == 4 and c.code.isdigit() for c in a.one_run)
    assert 70 <= a.included.sum() <= 130  # each included with probability ½ (seeded: a fixed draw)
    assert not np.array_equal(a.included, b.included)  # b from fresh entropy (P = 2^-200 of a clash)
    assert len(a.training_records()) == 63 + a.included.sum()
    assert audit.default_guesses(100) == 10 and audit.default_guesses(40) == 5


def test_canary_names_are_drawn_to_fit_the_sequence_length():
    """Names vary in length; with a tight data.max-length only names whose canary fits are drawn
    (CI once failed at random on a 65-token canary with max-length 64), and when none can fit the
    error says to raise data.max-length."""
    _, tokenizer = load_model_and_tokenizer(ModelConfig(name="tiny-random-llama"))
    lengths = {n: len(tokenize_record(audit.Canary(n, "9999", 1).record(), tokenizer, max_length=1 << 30).input_ids)
               for n in audit._names(300, np.random.default_rng(0))}
    limit = sorted(lengths.values())[len(lengths) // 2]  # about half the names are too long
    assert min(lengths.values()) < limit < max(lengths.values())

    def fits(name):
        return len(tokenize_record(audit.Canary(name, "9999", 1).record(), tokenizer, max_length=1 << 30).input_ids) <= limit

    cset = audit.build_canaries(one_run=40, name_fits=fits)
    for canary in (*cset.exposure, *cset.controls, *cset.one_run):
        locate_secret(canary, tokenizer, max_length=limit)  # no error: every canary fits
    with pytest.raises(FedLLMError, match="canary names fit data.max-length"):
        audit.build_canaries(one_run=40, name_fits=lambda name: False)


def test_bad_canary_counts_are_refused(scenario, tmp_path, capsys):
    assert main(["audit", "--canaries", "20", "--guesses", "11", "--scenario", str(scenario),
                 "--output", str(tmp_path / "x")]) == 2
    assert "k <= N/2" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------ verdict and report text


def _report(*, kind="dp-sgd", correct=5, alarm=False, exposure_alarm=False, eps=0.99, bound=0.0) -> dict:
    """A report as run_canary_audit builds it, with fixed numbers."""
    dp = kind == "dp-sgd"
    report = {
        "site": "smoke", "scenario": "audit-scenario", "model": "tiny", "ledger": "OUT/ledger/smoke.json",
        "mechanism": {"kind": kind, "dp_claimed": dp, "noise_multiplier": 2.1 if dp else 0.0, "claimed_epsilon": 1.0,
                      "clipping": True, "max_grad_norm": 1.0, "target_delta": 1e-5, "cap": 8.0, "sample_rate": 0.1,
                      "steps": 20, "batch_size": 16, "learning_rate": 0.02, "optimizer": "adamw", "num_examples": 160,
                      "real_examples": 72, "canary_examples": 88, "epsilon_theory": eps if dp else math.inf},
        "one_run": {"canaries": 40, "included_count": 25, "guesses_per_side": 5, "guesses": 10, "correct": correct,
                    "confidence": 0.95, "delta": 1e-5, "epsilon_lower_bound": bound, "ceiling": 1.05,
                    "p_value_at_zero": 0.62, "alarm": alarm, "alarm_confidence": 0.999, "alarm_needs_correct": None,
                    "canary_auc": None},
        "exposure": {"space_size": 10000, "max_bits": 13.29,
                     "groups": [{"copies": 1, "mean": 1.0, "canaries": [{"exposure": 1.0}] * 3},
                                {"copies": 16, "mean": 2.0, "canaries": [{"exposure": 2.0}] * 3}],
                     "controls": {"count": 30, "candidates": 100, "max_bits": 6.64, "mean": 1.5, "median": 1.2,
                                  "p95": 4.0, "max": 5.0, "null_p_value": 0.4,
                                  "consistent_with_null": True},
                     "test": {"copies": 16, "p_value": 1e-6 if exposure_alarm else 0.3, "alpha": 0.001,
                              "alarm": exposure_alarm, "mann_whitney_vs_controls": 0.2}},
        "membership_inference": {"skipped": "the site holds out no records (its eval-fraction = 0)"},
        "ceiling_table": {"40": {"10": 1.05, "20": 1.82}},
    }
    report["verdict"] = audit.verdict(report)
    return report


def test_verdict_rule_and_exit_code():
    assert audit.verdict(_report())["flagged"] is False
    dp_flagged = audit.verdict(_report(exposure_alarm=True))
    assert dp_flagged["flagged"] and dp_flagged["exit_code"] == 1  # a run claiming DP leaks: exit 1
    broken = audit.verdict(_report(kind="clipping-only", correct=10, alarm=True, bound=1.05))
    assert broken["flagged"] and broken["exit_code"] == 0 and not broken["violation"]  # nothing claimed
    violation = audit.verdict(_report(eps=0.5, correct=10, bound=1.05))
    assert violation["flagged"] and violation["violation"] and violation["exit_code"] == 1


def test_report_statements_golden():
    report = _report()
    assert verdict_line(report) == ("Not flagged: no leakage above chance was detected. This is consistent with the "
                                    "claimed ε; it does not prove it (see below).")
    assert can_and_cannot(report)[0] == (
        "With m = 40 one-run canaries and r = 10 guesses, the largest lower bound reachable is ε = 1.05 (every guess "
        "correct, 95% confidence). The audit can catch gross failures (noise off, clipping off, a wrong sampling "
        "rate, noise off by 10×) and a claimed ε below that ceiling that does not hold. It cannot certify that a "
        "larger ε is tight, or that the mechanism is private: a lower bound of 0 means nothing was detected, not "
        "that nothing leaks.")
    assert verdict_line(_report(exposure_alarm=True)) == (
        "FLAGGED: single records leak measurably although the run claims ε = 0.99. DP-SGD at this ε keeps canaries "
        "at the chance level; check that noise, clipping and sampling really are applied.")
    assert verdict_line(_report(eps=0.5, correct=10, bound=1.05)).startswith(
        "FLAGGED: the empirical lower bound exceeds the theoretical ε")
    text = render_markdown(report)
    assert "| theoretical (PRV, δ = 1e-05) | 0.99 |\n| one-run lower bound, 95% confidence | 0.00 |" in text
    assert "| largest lower bound this audit can reach (m = 40, r = 10) | 1.05 |" in text
    assert "| 40 | 1.05 | 1.82 |" in text
    assert ("With only 10 guesses even all correct cannot reach the alarm level (0.001): here only the exposure "
            "test can raise the alarm; use more canaries.") in text
    assert summary_lines(report)[1] == "One-run: 5/10 guesses correct -> ε ≥ 0.00 (95%; ceiling 1.05) vs theoretical ε = 0.99"
    assert "no DP guarantee (ε = ∞)" in render_markdown(_report(kind="clipping-only"))
