"""One canary audit run: train one site's whole run with the canaries of
:mod:`fedllm.audit.canaries` planted, score it (exposure, one-run test, membership inference),
apply the verdict and write the report (``canary-audit.json``, ``canary-audit.md``).

**What is audited.** Exactly one site's whole federated run: ``num-server-rounds ×
train.local-steps`` steps of :func:`fedllm.site.training.train_local` at the run's batch size (q
from the *planned* dataset: the real training records plus every canary as if included,
:func:`planned_examples`, so q, σ and the steps do not depend on the secret inclusion draw), learning
rate, optimizer and clipping norm, with σ as the site sets it (the configured
``privacy.noise-multiplier``, or ``noise_multiplier_for`` from min(target ε, the site's cap) over
all those steps). A site's record-level guarantee is a property of its own sequence of noisy
steps: between rounds the server only aggregates releases (post-processing, plus other sites'
data, which is independent of this site's records), so the audit runs the same steps as one
continuous local run without other sites' updates mixed in (they would only dilute the signal).
``--no-noise`` keeps clipping and sets σ = 0: a deliberately broken mechanism, to show that the
audit catches one.

**The audit spends privacy.** Its training run is a DP release of the site's training data,
recorded in a ledger inside the output folder (never the site's real ledger), and the MIA AUC
reads the real records directly. Run it on the shipped demo data or a public dataset.

Every draw from OS entropy goes through ``fedllm.audit.canaries.os_entropy_rng``, looked up on
that module at call time, so that replacing it there (the tests' fixed seeds) reaches every draw.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import fedllm.audit.canaries
from fedllm.audit import empirical
from fedllm.audit.canaries import (
    ALARM_ALPHA,
    CODE_DIGITS,
    CODE_SPACE,
    Canary,
    CanarySet,
    build_canaries,
    resolve_guesses,
    verdict,
)
from fedllm.audit.scoring import (
    SecretSpan,
    all_codes,
    base_and_trained,
    check_enumeration,
    code_log_likelihoods,
    locate_secret,
    response_log_likelihoods,
)
from fedllm.files import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

REPORT_FORMAT = "fedllm-canary-audit"
REPORT_VERSION = 1
CONTROL_CANDIDATES = 100  # a control is ranked among its own code and 99 random others
CONFIDENCE = 0.95
MIA_MIN_MEMBERS, MIA_MAX_MEMBERS = 32, 64


def _mechanism(config: Any, site: Any, *, sample_rate: float, steps: int, no_noise: bool) -> dict[str, Any]:
    """The DP settings used: σ as ``SiteRuntime`` calibrates it (the configured σ, or the smallest
    σ that reaches min(target ε, cap) over all the steps), σ = 0 with ``--no-noise``, no clipping
    with privacy disabled; and the ε the configuration claims."""
    from fedllm.privacy.accounting import DPEvent, epsilon_for, noise_multiplier_for

    p = config.privacy
    cap = site.effective_max_epsilon(p)
    target = min(p.target_epsilon, cap)
    sigma = 0.0
    if p.enabled and not no_noise:
        sigma = p.noise_multiplier or noise_multiplier_for(
            target_epsilon=target, target_delta=p.target_delta, sample_rate=sample_rate, steps=steps,
            accountant=p.accountant)
    claimed = math.inf
    if p.enabled:  # with a configured σ the claim is its ε, else the calibration target
        claimed = (epsilon_for([DPEvent(p.noise_multiplier, sample_rate, steps)], target_delta=p.target_delta,
                               accountant=p.accountant) if p.noise_multiplier else target)
    kind = "clipping-only" if no_noise else "dp-sgd" if p.enabled else "no-dp"
    return {"kind": kind, "dp_claimed": p.enabled and not no_noise, "noise_multiplier": sigma,
            "claimed_epsilon": claimed, "clipping": p.enabled or no_noise, "max_grad_norm": p.max_grad_norm,
            "target_delta": p.target_delta, "cap": cap}


def planned_examples(real_examples: int, cset: CanarySet) -> int:
    """The dataset size q is planned for: the real training records plus every canary as if it were
    included (:attr:`CanarySet.planned_records`). The mechanism (q, steps, σ calibrated from them)
    is then the same whichever one-run canaries the secret draw included: a mechanism that depended
    on the inclusion vector would leak it, and the one-run test assumes it does not."""
    return real_examples + cset.planned_records


def _exposure_section(model: Any, spans: dict[str, SecretSpan], cset: CanarySet, device: Any) -> dict[str, Any]:
    """Exposure of every inserted canary (ranked among all codes) and of the controls (each ranked
    among its own code and CONTROL_CANDIDATES - 1 other random codes; under the null its rank is
    uniform there too, at a fifth of the cost of a full enumeration)."""
    everything = all_codes(CODE_DIGITS)
    rng = fedllm.audit.canaries.os_entropy_rng()  # which codes a control is ranked against need not be secret, just fresh
    checked: list[str] = []

    def score(canary: Canary, candidates: list[str]) -> dict[str, Any]:
        lls = code_log_likelihoods(model, spans[canary.name], candidates, device=device)
        own = float(lls[candidates.index(canary.code)])
        if not checked:  # once per run: tree attention must agree with a plain forward pass
            check_enumeration(model, spans[canary.name], canary.code, own, device=device)
            checked.append(canary.name)
        rank = empirical.rank_of(own, lls)
        return {"name": canary.name, "code": canary.code, "copies": canary.copies, "rank": rank,
                "candidates": len(candidates), "exposure": empirical.exposure(rank, len(candidates))}

    def control_candidates(code: str) -> list[str]:
        others = rng.choice(CODE_SPACE - 1, size=CONTROL_CANDIDATES - 1, replace=False)
        return [code, *(everything[i + (i >= int(code))] for i in others)]

    groups: list[dict[str, Any]] = []
    for repeats in sorted({c.copies for c in cset.exposure}):
        rows = [score(c, everything) for c in cset.exposure if c.copies == repeats]
        groups.append({"copies": repeats, "mean": float(np.mean([r["exposure"] for r in rows])), "canaries": rows})
    controls = [score(c, control_candidates(c.code)) for c in cset.controls]
    values = np.array([r["exposure"] for r in controls])
    top = groups[-1]
    top_values = [r["exposure"] for r in top["canaries"]]
    p_value = empirical.exposure_null_p_value(top_values)
    controls_p = empirical.exposure_null_p_value(values)
    return {
        "space_size": CODE_SPACE, "max_bits": math.log2(CODE_SPACE), "groups": groups,
        "controls": {"count": len(controls), "candidates": CONTROL_CANDIDATES, "max_bits": math.log2(CONTROL_CANDIDATES),
                     "mean": float(values.mean()), "median": float(np.median(values)),
                     "p95": float(np.percentile(values, 95)), "max": float(values.max()),
                     "null_p_value": controls_p, "consistent_with_null": controls_p >= ALARM_ALPHA,
                     "canaries": controls},
        "test": {"copies": top["copies"], "p_value": p_value, "alpha": ALARM_ALPHA, "alarm": p_value < ALARM_ALPHA,
                 "statistic": f"Fisher's method on the ×{top['copies']} canaries' exact null p-values 2^-exposure",
                 "mann_whitney_vs_controls": empirical.mann_whitney_greater(top_values, values)},
    }


def _one_run_section(cset: CanarySet, scores: np.ndarray, *, k: int, delta: float) -> dict[str, Any]:
    included = cset.included
    order = np.argsort(-scores, kind="stable")
    guess_in, guess_out = order[:k], order[len(order) - k:]
    correct = int(included[guess_in].sum() + (~included[guess_out]).sum())
    ins, outs = set(guess_in.tolist()), set(guess_out.tolist())
    m, r = len(scores), 2 * k
    bound = empirical.one_run_epsilon_lower_bound(correct=correct, guesses=r, canaries=m, delta=delta, confidence=CONFIDENCE)
    alarm_bound = empirical.one_run_epsilon_lower_bound(correct=correct, guesses=r, canaries=m, delta=delta,
                                                        confidence=1 - ALARM_ALPHA)
    ceiling = empirical.one_run_epsilon_lower_bound(correct=r, guesses=r, canaries=m, delta=delta, confidence=CONFIDENCE)
    canary_auc = (empirical.auc(scores[included], scores[~included])
                  if included.any() and (~included).any() else None)
    return {
        "canaries": m, "included_count": int(included.sum()), "guesses_per_side": k, "guesses": r,
        "correct": correct, "confidence": CONFIDENCE, "delta": delta, "epsilon_lower_bound": bound,
        "ceiling": ceiling, "p_value_at_zero": empirical.one_run_p_value(correct=correct, guesses=r, canaries=m,
                                                                         epsilon=0.0, delta=delta),
        "alarm_confidence": 1 - ALARM_ALPHA, "epsilon_lower_bound_at_alarm_confidence": alarm_bound,
        "alarm": alarm_bound > 0, "alarm_needs_correct": _alarm_threshold(r, m, delta),
        "canary_auc": None if canary_auc is None else canary_auc.__dict__,
        "score": "log p_trained(response) - log p_base(response)",
        "items": [{"name": c.name, "code": c.code, "included": bool(included[i]), "score": float(scores[i]),
                   "guess": "in" if i in ins else "out" if i in outs else None}
                  for i, c in enumerate(cset.one_run)],
    }


def _alarm_threshold(guesses: int, canaries: int, delta: float) -> int | None:
    """The fewest correct guesses that reject ε = 0 at ALARM_ALPHA (None: not even all of them)."""
    for correct in range(guesses // 2, guesses + 1):
        if empirical.one_run_p_value(correct=correct, guesses=guesses, canaries=canaries, epsilon=0.0,
                                     delta=delta) < ALARM_ALPHA:
            return correct
    return None


def run_canary_audit(config: Any, site: Any, *, canaries: int, guesses: int | None = None, no_noise: bool = False,
                     output: Path, scenario: str = "", echo: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Train one site's run with canaries inserted, score it, write ``canary-audit.json`` and
    ``canary-audit.md`` into ``output`` (atomically) and return the report. Runs on
    ``train.threads`` (else ``simulation.client-cpus``) torch threads, as a site does."""
    import torch

    k = resolve_guesses(canaries, guesses)  # fixed here, before any score exists
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, config.train.threads or config.simulation.client_cpus))  # as SiteRuntime does
    try:
        return _run(config, site, canaries=canaries, k=k, no_noise=no_noise, output=output, scenario=scenario,
                    echo=echo)
    finally:
        torch.set_num_threads(threads)


def _run(config: Any, site: Any, *, canaries: int, k: int, no_noise: bool, output: Path, scenario: str,
         echo: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from fedllm.data.formatting import tokenize_record, tokenize_records
    from fedllm.data.loading import load_records
    from fedllm.model.loading import is_quantized, load_model_and_tokenizer
    from fedllm.model.lora import apply_lora
    from fedllm.privacy.accounting import DPEvent, epsilon_for
    from fedllm.privacy.ledger import PrivacyLedger
    from fedllm.site.holdout import policy_for, site_split_key
    from fedllm.site.runtime import load_site_examples, training_fingerprint
    from fedllm.site.training import DPSettings, train_local

    start_time = time.perf_counter()
    timings: dict[str, float] = {}
    lap = [start_time]

    def done(phase: str) -> None:
        now = time.perf_counter()
        timings[phase], lap[0] = now - lap[0], now

    device = site.device
    base, tokenizer = load_model_and_tokenizer(config.model, device=device)
    for p in base.parameters():
        p.requires_grad_(False)
    model = apply_lora(base, config.lora, fast_path=config.train.fast_path)
    if not is_quantized(model):
        model.to(device)
    records = load_records(site.data_path, format=config.data.format, columns=site.data_columns)
    ledger_path = output / "ledger" / f"{site.name}.json"
    split_key = site_split_key(ledger_path, site.name)  # the site's own split, keyed beside the audit's ledger
    real_train, held_out = load_site_examples(config, site, tokenizer, records=records, split_key=split_key)
    done("load")
    max_length = config.data.max_length

    def fits(name: str) -> bool:  # the longest code has the same number of digit tokens as any other
        record = Canary(name, "9" * CODE_DIGITS, 1).record()
        return len(tokenize_record(record, tokenizer, max_length=1 << 30).input_ids) <= max_length

    cset = build_canaries(one_run=canaries, name_fits=fits)
    spans = {c.name: locate_secret(c, tokenizer, max_length=max_length) for c in (*cset.exposure, *cset.controls)}
    inserted = tokenize_records(cset.training_records(), tokenizer, max_length=max_length, source="canaries")
    one_run_examples = tokenize_records([c.record() for c in cset.one_run], tokenizer, max_length=max_length,
                                        source="canaries")
    train = [*real_train, *inserted]
    steps = config.num_server_rounds * config.train.local_steps
    planned = planned_examples(len(real_train), cset)
    sample_rate = min(1.0, config.train.batch_size / planned)  # from the plan, not from the secret draw
    mech = _mechanism(config, site, sample_rate=sample_rate, steps=steps, no_noise=no_noise)
    sigma, delta = mech["noise_multiplier"], config.privacy.target_delta
    theory = epsilon_for([DPEvent(sigma, sample_rate, steps)], target_delta=delta, accountant="prv")
    mech.update(sample_rate=sample_rate, steps=steps, batch_size=config.train.batch_size,
                learning_rate=config.train.learning_rate, optimizer=config.train.optimizer,
                num_examples=len(train), planned_examples=planned, real_examples=len(real_train),
                canary_examples=len(inserted), epsilon_theory=theory)

    done("setup")
    ledger = PrivacyLedger.open(ledger_path, site=site.name,  # what the spend was on: the training subset
                                dataset_fingerprint=training_fingerprint(site, records, split_key),
                                held_out_split=policy_for(site, split_key).to_json())
    run_id = f"canary-audit-{secrets.token_hex(4)}"
    ledger.check(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, target_delta=delta,
                 max_epsilon=mech["cap"] if mech["dp_claimed"] else 0.0, accountant=config.privacy.accountant)
    echo(f"Training {site.name}: {len(real_train)} records + {len(inserted)} canary copies, {steps} steps, "
         f"q={sample_rate:.4f}, {mech['kind']} (σ={sigma:.4g}, C={config.privacy.max_grad_norm:g}), "
         f"theoretical ε={_fmt(theory)} (δ={delta:g}, PRV)")
    dp = DPSettings(noise_multiplier=sigma, max_grad_norm=config.privacy.max_grad_norm) if mech["clipping"] else None
    result = train_local(model, train, steps=steps, batch_size=config.train.batch_size,
                         learning_rate=config.train.learning_rate, weight_decay=config.train.weight_decay,
                         optimizer=config.train.optimizer, pad_id=tokenizer.pad_token_id, dp=dp, device=device,
                         physical_batch_size=config.train.physical_batch_size, pass_tokens=config.train.pass_tokens,
                         gradient_checkpointing=config.train.gradient_checkpointing, fast_path=config.train.fast_path,
                         planned_examples=planned)
    ledger.record(run_id=run_id, server_round=1, steps=steps, sample_rate=sample_rate, noise_multiplier=sigma,
                  max_grad_norm=config.privacy.max_grad_norm, target_delta=delta, num_examples=planned,
                  accountant=config.privacy.accountant)
    done("train")
    echo(f"Trained in {result.seconds:.0f}s (mean loss {result.train_loss:.3f}).")

    if not is_quantized(model) and any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()):
        # score in fp32: the trained function exactly (16-bit weights are exact in fp32), without
        # letting 16-bit rounding decide the ranks of 10^4 codes or the tree-attention check
        model.to(torch.float32)
    batch = config.train.eval_batch_size
    pad = tokenizer.pad_token_id

    def loglik(examples):
        return lambda: response_log_likelihoods(model, examples, batch_size=batch, pad_id=pad, device=device)

    echo(f"Exposure: ranking {len(cset.exposure)} inserted codes among all {CODE_SPACE:,} and {len(cset.controls)} "
         f"controls among {CONTROL_CANDIDATES} ...")
    exposure = _exposure_section(model, spans, cset, device)
    done("exposure")
    echo(f"One-run test: scoring {canaries} canaries under the base model and the adapter ...")
    (base_ll, _), (trained_ll, _) = base_and_trained(model, loglik(one_run_examples))
    one_run = _one_run_section(cset, trained_ll - base_ll, k=k, delta=delta)
    done("one_run")
    echo("Membership inference: scoring training and held-out records ...")
    mia = _mia_section(model, real_train, held_out, loglik)
    done("mia")
    report = {
        "format": REPORT_FORMAT, "version": REPORT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "scenario": scenario, "site": site.name, "model": config.model.name,
        "mechanism": mech, "training": {"train_loss": result.train_loss, "seconds": result.seconds},
        "exposure": exposure, "one_run": one_run, "membership_inference": mia,
        "ceiling_table": {str(m): {str(r): v for r, v in row.items()}
                          for m, row in empirical.ceiling_table((canaries,), sorted({10, 20, 50, 100, 2 * k}),
                                                                delta=delta).items()},
        "ledger": str(ledger.path), "seconds": time.perf_counter() - start_time, "timings": timings,
    }
    report["verdict"] = verdict(report)
    from fedllm.reports.canary_report import render_markdown

    write_json_atomic(output / "canary-audit.json", _jsonable(report))
    write_text_atomic(output / "canary-audit.md", render_markdown(report))
    return report


def _mia_section(model: Any, members: Sequence[Any], nonmembers: Sequence[Any], loglik) -> dict[str, Any]:
    if not nonmembers:
        return {"skipped": "the site holds out no records (its eval-fraction = 0)"}
    rng = fedllm.audit.canaries.os_entropy_rng()
    size = min(len(members), max(MIA_MIN_MEMBERS, len(nonmembers)), MIA_MAX_MEMBERS)  # balanced: AUC's CI is
    chosen = sorted(rng.choice(len(members), size=size, replace=False).tolist())  # set by the smaller group
    examples = [members[i] for i in chosen] + list(nonmembers)
    (base, counts), (trained, _) = base_and_trained(model, loglik(examples))
    raw, calibrated = trained / counts, (trained - base) / counts
    n = len(chosen)
    return {"members": n, "nonmembers": len(nonmembers), "score": "log-likelihood per response token",
            "auc_raw": empirical.auc(raw[:n], raw[n:]).__dict__,
            "auc_calibrated": empirical.auc(calibrated[:n], calibrated[n:]).__dict__}


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def _jsonable(value: Any) -> Any:
    """ε = ∞ becomes the string "inf" (as in the ledger); JSON has no infinity."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
