"""``fedllm audit RUN_DIR``: the privacy report of a run, as JSON, Markdown and a plot.

Inputs, all read from the run folder that ``fedllm simulate`` / the server writes:
``history.json`` (what the coordinator saw: per round, per site, the metrics, refusals,
rejections, and the central-DP block when central DP was on), ``config.toml`` (the run's caps
and settings), ``sites.json`` (simulations only: the sites' own caps and ledger paths) and each
site's privacy ledger (``ledgers/<site>.json`` unless the run put it elsewhere). In a real
deployment the ledgers live at the sites; copy them into ``RUN_DIR/ledgers/`` to audit them.

Per site the report gives the releases, steps, sample rates, noise multipliers and clipping
norms recorded in its ledger; δ against the site's number of records; ε recomputed from the
ledger under the enforced accountant (Opacus PRV upper bound, or RDP if the run enforced RDP),
under RDP, and under Google's ``dp_accounting`` PLD (an independent implementation) with the
relative discrepancy; the cap and the headroom; the rounds it refused; and the ledger's
verification (hash chain, signature, dataset fingerprint, via
:func:`fedllm.privacy.ledger.verify_ledger`). Then the site-level (central DP) guarantee when
central DP was on, and the plain-language statement of what is and is not guaranteed
(:func:`fedllm.reports.privacy_statement.privacy_statement`, shared with the model card).

Checks that fail the audit (exit 1; the report is still written and lists them): a ledger that
is missing or fails verification, a recorded cumulative ε that differs from its recomputation
(relative :data:`RECOMPUTE_TOLERANCE`), an ε the coordinator was told that differs from the
ledger's, a release the coordinator received that the ledger lacks, and an enforced ε that
disagrees with the independent PLD value beyond :data:`CROSSCHECK_TOLERANCE` (relative, plus
the PRV upper bound's own discretisation margin).

The report is a function of the run folder only (no time stamps; paths inside the run folder are
shown relative to it), so its Markdown (:mod:`fedllm.reports.privacy_markdown`) is golden-tested byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm import __version__, wire
from fedllm.errors import FedLLMError, LedgerError, RunFailedError
from fedllm.files import write_text_atomic
from fedllm.reports.epsilon_plot import write_epsilon_plot
from fedllm.reports.numbers import epsilon_from_wire, epsilon_to_json, format_epsilon, format_g, to_float
from fedllm.reports.privacy_markdown import ledger_word, render_markdown
from fedllm.reports.privacy_statement import MEANINGLESS_SITE_EPSILON, metrics_release_by_site

if TYPE_CHECKING:
    from fedllm.config import SiteConfig

REPORT_FORMAT = "fedllm-privacy-report"
REPORT_VERSION = 1
RECOMPUTE_TOLERANCE = 1e-6  # relative: the accountants are deterministic
CROSSCHECK_TOLERANCE = 0.02  # relative, enforced accountant vs dp-accounting PLD
DELTA_N_LIMIT = 0.01  # "δ ≪ 1/n" when δ·n <= this
FILES = ("privacy-report.md", "privacy-report.json", "epsilon.png")

_LEDGER_FIELDS = ("run_id", "server_round", "steps", "sample_rate", "noise_multiplier", "max_grad_norm",
                  "target_delta", "accountant", "epsilon", "num_examples", "site_max_delta", "site_max_epsilon",
                  "release")


# --------------------------------------------------------------------------------------------
# building the report (JSON-ready dict)


def build_privacy_report(run_dir: Path | str, *, public_keys: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The privacy report of the run in ``run_dir`` as a JSON-ready dict (ε = ∞ as ``"inf"``).

    ``public_keys`` maps site names to the public key to check that site's ledger signature
    against (whatever :func:`~fedllm.privacy.ledger.verify_ledger` accepts). Raises
    :class:`FedLLMError` when ``run_dir`` is not a run folder.
    """
    from fedllm.config import SiteConfig, defaults_flat, flatten, read_toml

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FedLLMError(f"{run_dir}: no such folder; give the output folder of a run (fedllm simulate --output)")
    missing = [name for name in ("history.json", "config.toml") if not (run_dir / name).is_file()]
    if missing:
        raise FedLLMError(
            f"{run_dir} is not a run folder: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing. "
            "Give the output folder fedllm simulate or the server wrote (it holds history.json, config.toml "
            "and ledgers/).")
    try:
        history = json.loads((run_dir / "history.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FedLLMError(f"{run_dir / 'history.json'} cannot be read as JSON ({exc})") from None
    if not isinstance(history, dict) or not isinstance(history.get("rounds"), list):
        raise FedLLMError(f"{run_dir / 'history.json'} is not a fedllm run history (no \"rounds\" list)")
    config = {**defaults_flat(), **flatten(read_toml(run_dir / "config.toml"))}
    site_configs: dict[str, SiteConfig] = {}
    sites_file = run_dir / "sites.json"
    if sites_file.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            site_configs = {s.name: s for s in map(SiteConfig.from_dict, json.loads(sites_file.read_text("utf-8")))}
    ledger_dir = Path(config["privacy.ledger-dir"]) if config["privacy.ledger-dir"] else run_dir / "ledgers"

    names = set(site_configs)
    for entry in history["rounds"]:
        for part in ("train", "evaluate"):
            names.update(entry.get(part, {}).get("sites", {}))
        names.update(entry.get("train", {}).get("refused", {}))
        names.update(entry.get("train", {}).get("rejected", {}))
    if ledger_dir.is_dir():
        names.update(p.stem for p in ledger_dir.glob("*.json") if not p.name.startswith("."))
    public_keys = dict(public_keys or {})
    unknown = sorted(set(public_keys) - names)
    if unknown:
        raise FedLLMError(f"--public-key for unknown site(s) {', '.join(unknown)}; sites in this run: "
                          f"{', '.join(sorted(names)) or 'none'}")

    modes = metrics_release_by_site(history, {n: c.release_metrics for n, c in site_configs.items()})
    sites = []
    for name in sorted(names):
        site_cfg = site_configs.get(name)
        ledger_path = Path(site_cfg.ledger_path) if site_cfg and site_cfg.ledger_path else ledger_dir / f"{name}.json"
        sites.append(_site_report(name, run_dir=run_dir, ledger_path=ledger_path, history=history, config=config,
                                  site_cfg=site_cfg,
                                  public_key=public_keys.get(name), metrics_release=modes.get(name, "unknown")))
    central = _central_report(history)
    problems = [f"site {s['site']}: {p}" for s in sites for p in s["problems"]]
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "run-id": str(history.get("run-id", "?")),
        "status": history.get("status", "?"),
        "num-server-rounds": history.get("num-server-rounds"),
        "rounds-trained": len([r for r in history["rounds"] if r.get("round", 0) > 0 and "train" in r]),
        "stopped-early": history.get("stopped-early"),
        "base-model": config["model.name"],
        "privacy-enabled": bool(config["privacy.enabled"]),
        "accountant": config["privacy.accountant"],
        "max-epsilon": config["privacy.max-epsilon"],
        "target-delta": config["privacy.target-delta"],
        "tolerances": {"recompute": RECOMPUTE_TOLERANCE, "cross-check": CROSSCHECK_TOLERANCE,
                       "delta-times-n": DELTA_N_LIMIT},
        "ok": not problems,
        "problems": problems,
        "sites": sites,
        "central-dp": central,
        "versions": _versions(),
    }


def _site_policy(entries: list[dict], trained: Mapping[int, Mapping[str, Any]], site_cfg: SiteConfig | None,
                 run_cap: float, run_delta: float) -> tuple[float, str, float, str]:
    """(δ, where it comes from, cap, where it comes from) of one site: its own settings (simulation), else the
    policy its ledger records, else what it reported in this run; the run's values only for a site that
    stated none (an older fedllm)."""
    n = max((e["num_examples"] for e in entries), default=0) or max(
        (int(m.get(wire.NUM_EXAMPLES, 0)) for m in trained.values()), default=0)
    recorded = next(((e["site_max_delta"], e.get("site_max_epsilon")) for e in reversed(entries)
                     if e.get("site_max_delta") is not None), None)
    reported = [m for _, m in sorted(trained.items()) if wire.EPSILON_CAP in m]
    if site_cfg is not None:
        delta, delta_source = site_cfg.delta(n), "site"
    elif recorded is not None:
        delta, delta_source = float(recorded[0]), "ledger"
    elif reported:
        delta, delta_source = float(reported[-1][wire.DELTA]), "history"
    else:
        delta, delta_source = run_delta, "run"
    tighten = run_cap if math.isfinite(run_cap) and run_cap > 0 else math.inf
    if site_cfg is not None:
        cap, cap_source = min(site_cfg.max_epsilon, tighten), "site"
    elif recorded is not None and recorded[1] is not None:
        cap, cap_source = min(float(recorded[1]), tighten), "ledger"
    elif reported:
        cap, cap_source = float(reported[-1][wire.EPSILON_CAP]), "history"
    else:
        cap, cap_source = run_cap, "run"
    return delta, delta_source, cap, cap_source


def _site_report(name: str, *, run_dir: Path, ledger_path: Path, history: dict, config: dict,
                 site_cfg: SiteConfig | None, public_key: Any, metrics_release: str = "unknown") -> dict[str, Any]:
    from fedllm.privacy.accounting import (
        DPEvent,
        epsilon_for,
        prv_eps_error,
    )
    from fedllm.privacy.pld_crosscheck import epsilon_pld_dp_accounting

    run_id = str(history.get("run-id", ""))
    problems: list[str] = []
    trained = {r["round"]: r["train"]["sites"][name] for r in history["rounds"]
               if name in r.get("train", {}).get("sites", {})}
    refused = [{"round": r["round"], "reason": r["train"]["refused"][name]} for r in history["rounds"]
               if name in r.get("train", {}).get("refused", {})]
    rejected = [{"round": r["round"], "reason": r["train"]["rejected"][name]} for r in history["rounds"]
                if name in r.get("train", {}).get("rejected", {})]
    run_cap = float(config["privacy.max-epsilon"])
    report: dict[str, Any] = {"site": name, "ledger": _ledger_report(ledger_path, site=name, run_dir=run_dir,
                                                             public_key=public_key, problems=problems)}
    entries = report["ledger"].pop("_entries")
    source = "ledger"
    if entries is None:  # no readable ledger: fall back to what the site told the coordinator in this run
        source = "history"
        entries = [{"run_id": run_id, "server_round": rnd, "steps": int(m.get(wire.LOCAL_STEPS, 0)),
                    "sample_rate": float(m.get(wire.SAMPLE_RATE, 0.0)),
                    "noise_multiplier": float(m.get(wire.NOISE_MULTIPLIER, 0.0)),
                    "max_grad_norm": float(m.get(wire.MAX_GRAD_NORM, 0.0)),
                    "target_delta": float(m.get(wire.DELTA, config["privacy.target-delta"])),
                    "accountant": config["privacy.accountant"], "epsilon": epsilon_from_wire(m.get(wire.EPSILON)),
                    "num_examples": int(m.get(wire.NUM_EXAMPLES, 0))} for rnd, m in sorted(trained.items())]
    everything = entries  # the ε composes every release: adapter updates and held-out metric releases
    metric_entries = [e for e in entries if e.get("release", "update") == "metrics"]
    entries = [e for e in entries if e.get("release", "update") == "update"]
    this_run = [e for e in entries if e["run_id"] == run_id]
    # every ε of this report is at the site's own δ, against the site's own cap (issue 13)
    delta, delta_source, cap, cap_source = _site_policy(entries, trained, site_cfg, run_cap,
                                                        float(config["privacy.target-delta"]))
    above = [i for i, e in enumerate(everything, start=1) if e["target_delta"] > delta * (1 + 1e-9)]
    if above:
        problems.append(f"{len(above)} ledger entr{'y was' if len(above) == 1 else 'ies were'} (first: entry "
                        f"{above[0]}) recorded at a δ larger than the site's own δ={delta:g}: their recorded ε "
                        "understates the spend; ε here is recomputed at the site's δ")
    accountant = everything[-1]["accountant"] if everything else config["privacy.accountant"]
    n = max((e["num_examples"] for e in entries), default=0)
    events = [DPEvent(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in everything]
    eps = {"prv": epsilon_for(events, target_delta=delta, accountant="prv"),
           "rdp": epsilon_for(events, target_delta=delta, accountant="rdp"),
           "pld": epsilon_pld_dp_accounting(events, target_delta=delta)}
    enforced = eps[accountant]
    recorded = everything[-1]["epsilon"] if everything else 0.0
    recorded_delta = everything[-1]["target_delta"] if everything else delta
    at_recorded = enforced if recorded_delta == delta else epsilon_for(events, target_delta=recorded_delta,
                                                                       accountant=accountant)
    recompute_ok = source != "ledger" or _close(recorded, at_recorded)
    if not recompute_ok:
        problems.append(f"the ledger records cumulative ε={format_epsilon(recorded)} but its entries give "
                        f"ε={format_epsilon(at_recorded)} ({accountant}, δ={recorded_delta:g}) when recomputed")
    margin = prv_eps_error(events, target_delta=delta)
    discrepancy = (eps["prv"] - eps["pld"]) / eps["pld"] if math.isfinite(eps["pld"]) and eps["pld"] > 0 else None
    agrees = discrepancy is None or (
        eps["pld"] * (1 - CROSSCHECK_TOLERANCE) <= eps["prv"] <= eps["pld"] * (1 + CROSSCHECK_TOLERANCE) + margin)
    if not agrees:
        problems.append(f"PRV ε={format_epsilon(eps['prv'])} disagrees with dp-accounting PLD "
                        f"ε={format_epsilon(eps['pld'])} by "
                        f"{discrepancy:+.1%} (tolerance ±{CROSSCHECK_TOLERANCE:.0%} plus PRV's margin {margin:g})")
    if source == "ledger":
        by_round = {e["server_round"]: e for e in this_run}
        for rnd, metrics in sorted(trained.items()):
            entry, reported = by_round.get(rnd), epsilon_from_wire(metrics.get(wire.EPSILON))
            not_sent = metrics.get(wire.METRICS_RELEASE) == wire.RELEASE_CODES["none"]  # ε -1: not released
            if entry is None:
                problems.append(f"the coordinator received an update for round {rnd} but the ledger has no entry "
                                f"for run {run_id} round {rnd}: that release is not accounted for")
            elif entry["target_delta"] == delta and not not_sent and not _close(reported, entry["epsilon"]):
                problems.append(f"round {rnd}: the site reported ε={format_epsilon(reported)} "
                                f"to the coordinator but its ledger records ε={format_epsilon(entry['epsilon'])}")
    first = next((i for i, e in enumerate(everything) if e["run_id"] == run_id), 0)
    start = everything[first - 1]["epsilon"] if first > 0 else 0.0  # spent by earlier runs
    report.update({
        "source": source,
        "releases": len(entries),
        "metrics-release": metrics_release,
        "metric-releases": len(metric_entries),
        "metric-releases-this-run": len([e for e in metric_entries if e["run_id"] == run_id]),
        "runs": len({e["run_id"] for e in entries}),
        "releases-this-run": len(this_run),
        "rounds-this-run": [e["server_round"] for e in this_run],
        "steps": sum(e["steps"] for e in entries),
        "sample-rates": _distinct(e["sample_rate"] for e in entries),
        "noise-multipliers": _distinct(e["noise_multiplier"] for e in entries),
        "max-grad-norms": _distinct(e["max_grad_norm"] for e in entries),
        "target-delta": delta,
        "delta-source": delta_source,
        "entries-above-site-delta": above,
        "num-examples": n,
        "delta-times-n": delta * n,
        "delta-ok": delta * n <= DELTA_N_LIMIT,
        "accountant": accountant,
        "epsilon": {"enforced": epsilon_to_json(enforced), "recorded": epsilon_to_json(recorded),
                    **{k: epsilon_to_json(v) for k, v in eps.items()}},
        "recompute-ok": recompute_ok,
        "prv-margin": margin,
        "discrepancy-prv-pld": discrepancy,
        "cross-check-ok": agrees,
        "no-dp": math.isinf(enforced),
        "cap": cap,
        "cap-source": cap_source,
        "headroom": epsilon_to_json(cap - enforced) if math.isfinite(enforced) else None,
        "over-cap": bool(enforced > cap),
        "refused-rounds": refused,
        "rejected-rounds": rejected,
        "epsilon-per-round": [{"round": e["server_round"], "epsilon": epsilon_to_json(e["epsilon"])} for e in this_run],
        "epsilon-before-run": epsilon_to_json(start),
        "problems": problems,
    })
    return report


def _ledger_report(path: Path, *, site: str, run_dir: Path, public_key: Any, problems: list[str]) -> dict[str, Any]:
    """Verification of one ledger, and its entries as plain dicts (``_entries``; None if unreadable)."""
    from fedllm.privacy.ledger import PrivacyLedger, verify_ledger

    shown = _shown_path(path, run_dir)
    out: dict[str, Any] = {"path": shown, "found": path.is_file(), "ok": False, "problems": [], "first-bad-entry": None,
                           "entries": 0, "signed": False, "signature-checked": False, "dataset-fingerprint": None,
                           "_entries": None}
    if not path.is_file():
        problems.append(f"no ledger at {shown}: nothing can be verified (ε below is recomputed from the metrics the "
                        f"site sent in this run only). Copy the site's ledger to {shown} and audit again")
        return out
    try:
        check = verify_ledger(path, public_key=public_key)
    except (FedLLMError, OSError, ValueError) as exc:
        out["problems"] = [str(exc)]
        problems.append(f"ledger {shown} cannot be verified: {exc}")
    else:
        out.update({"ok": bool(check.ok), "problems": list(check.problems), "first-bad-entry": check.first_bad_entry,
                    "entries": int(check.entries), "signed": bool(check.signed),
                    "signature-checked": bool(check.signature_checked),
                    "dataset-fingerprint": check.dataset_fingerprint or None})
        if not check.ok:
            where = f" (first bad entry: {check.first_bad_entry}, 1-based)" if check.first_bad_entry else ""
            problems.append(f"ledger {shown} fails verification{where}: " + "; ".join(check.problems))
        elif public_key is not None and not check.signature_checked:
            problems.append(f"ledger {shown}: a public key was given but the signature was not checked "
                            "(the ledger is not signed)")
    try:  # site=name: a ledger of another site in this site's place is an error
        out["_entries"] = [{k: v for k, v in asdict(e).items() if k in _LEDGER_FIELDS}
                           for e in PrivacyLedger.open(path, site=site).entries]
    except (LedgerError, OSError, ValueError) as exc:
        if out["ok"] or not out["problems"]:  # else verification has already said what is wrong
            problems.append(f"ledger {shown} cannot be read ({exc})")
    return out


def _central_report(history: Mapping[str, Any]) -> dict[str, Any] | None:
    """History's top-level ``central-dp`` block with the per-round values; None if absent."""
    central = history.get("central-dp")
    if not isinstance(central, dict):
        return None
    if not central.get("enabled"):
        return {"enabled": False}
    eps = to_float(central.get("epsilon"))
    per_round = [{"round": r["round"], **r["central-dp"]} for r in history["rounds"]
                 if isinstance(r.get("central-dp"), dict)]
    return {**central, "epsilon": epsilon_to_json(eps), "meaningless": eps > MEANINGLESS_SITE_EPSILON,
            "per-round": per_round}


def _versions() -> dict[str, str]:
    out = {"fedllm": __version__}
    for package in ("opacus", "dp-accounting"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


# --------------------------------------------------------------------------------------------
# CLI


def main(args: argparse.Namespace) -> int:
    """``fedllm audit RUN_DIR [--output DIR] [--public-key SITE=PEM ...] [--json]``.

    0: the report is written and every check passed; raises :class:`RunFailedError` (exit 1)
    after writing it when a check failed; :class:`FedLLMError` (exit 2) on a bad folder or key.
    """
    run_dir = Path(args.run_dir)
    public_keys = _parse_public_keys(getattr(args, "public_key", None) or [])
    report = build_privacy_report(run_dir, public_keys=public_keys)
    output = Path(args.output) if getattr(args, "output", None) else run_dir / "audit"
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output / FILES[0], render_markdown(report))
    text = json.dumps(report, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    write_text_atomic(output / FILES[1], text)
    write_epsilon_plot(report, output / FILES[2])
    if getattr(args, "json", False):
        print(text, end="", flush=True)
    else:
        for s in report["sites"]:
            e = s["epsilon"]
            print(f"{s['site']}: ε {format_epsilon(e['enforced'])} ({s['accountant']}; "
                  f"RDP {format_epsilon(e['rdp'])}, PLD {format_epsilon(e['pld'])}), δ={format_g(s['target-delta'])}, "
                  f"cap {format_g(s['cap'])}, ledger {ledger_word(s['ledger']).strip('*')}",
                  flush=True)
        print(f"Privacy report: {output / FILES[0]} (also {FILES[1]}, {FILES[2]})", flush=True)
    if not report["ok"]:
        raise RunFailedError(f"privacy audit of {run_dir} FAILED ({len(report['problems'])} problem(s); the report "
                             f"in {output} lists them): " + " | ".join(report["problems"]))
    return 0


def _parse_public_keys(items: Sequence[str]) -> dict[str, Any]:
    from fedllm.privacy.signing import load_public_key

    keys_by_site: dict[str, Any] = {}
    for item in items:
        site, sep, pem = item.partition("=")
        if not sep or not site or not pem:
            raise FedLLMError(f"--public-key {item!r}: expected SITE=PEM, e.g. --public-key cardiology=keys/cardiology.pub")
        keys_by_site[site] = load_public_key(pem)
    return keys_by_site


# --------------------------------------------------------------------------------------------
# small helpers


def _close(a: Any, b: Any) -> bool:
    a, b = to_float(a), to_float(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= RECOMPUTE_TOLERANCE * max(1.0, abs(b))


def _distinct(values: Any) -> list[float]:
    return sorted(set(values))


def _shown_path(path: Path, run_dir: Path) -> str:
    try:
        return str(path.resolve().relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)

