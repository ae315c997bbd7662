"""Empirical privacy audit with canaries, its design: the canary sets, the pre-registered verdict and
the command ``fedllm audit --canaries N`` (:func:`main`). The run itself (training with the canaries
planted, scoring, the report) is :mod:`fedllm.audit.canary_run`.

One training run of one site, with synthetic canary records inserted, measures what the trained
adapter gives away about single records:

* **Exposure** (Carlini et al. 2019) of canaries "Access code for NAME: dddd." inserted ×1, ×4
  and ×16 (three of each): each code is ranked against all 10^4 codes (exact, by tree attention in
  one forward pass per canary), so exposure is at most 13.29 bits. A code that left no trace in
  the model is uniform and independent of it, so its rank is uniform: P(exposure >= x) = 2^-x
  exactly, whatever the model. The inserted canaries are tested against this exact null.
  :data:`CONTROLS` never-inserted controls of the same template check the scoring against that
  null; each is ranked among its own code and 99 random others (uniform rank there too, at a
  fifth of the cost of a full enumeration, so 30 of them cost less than six full ones). If the
  controls look exposed, the report says the scoring is broken.
* **One-run ε lower bound** (Steinke, Nasr & Jagielski 2023): N more canaries of the same template
  are each inserted once with probability ½, drawn from fresh OS entropy (the inclusion vector is
  recorded in the output). A canary's score is the log-likelihood of its response under the
  trained adapter minus under the base model; the auditor guesses "in" for the k highest and
  "out" for the k lowest scores, k fixed from N before training (:func:`default_guesses`).
* **Membership inference AUC** of the site's real training records against its held-out records,
  raw (log-likelihood per response token) and calibrated against the base model (the difference
  of the two), with a DeLong 95% interval.

**Verdict, defined before any score is seen.** ``flagged`` is true if any of:

1. the one-run test rejects ε = 0 at level :data:`ALARM_ALPHA` (its lower bound at confidence
   1 - ALARM_ALPHA is > 0);
2. the ×16 canaries' exposures reject the exact null at level :data:`ALARM_ALPHA` (Fisher's method
   on their p-values 2^-exposure);
3. the one-run lower bound at 95% exceeds the theoretical ε of the run (a real violation).

The alarm level is 0.001 per test, not 0.05, so that a sound mechanism raises a false alarm in at
most ~0.2% of audits (at 0.05, one scripted audit in 20 would fail by chance); the 95% bound is
still what the report sets beside the theoretical ε. An exposure alarm on the ×16 canaries is not
by itself a DP violation: 16 copies are protected only by group privacy (16ε). With LoRA on a real
model DP-SGD at ε <= 8 still keeps them at the chance level (docs/notes/dp-lora.md §4), so there an alarm
means a broken mechanism; with a tiny adapter (thousands of parameters) it does not. ``main``
exits 1 when the run claims DP (privacy enabled, no ``--no-noise``) and is flagged, else 0.

What one audit trains, and the privacy it spends, are stated in :mod:`fedllm.audit.canary_run`.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedllm.errors import ConfigError, FedLLMError

CODE_DIGITS = 4
CODE_SPACE = 10**CODE_DIGITS
EXPOSURE_REPEATS = (1, 4, 16)
CANARIES_PER_REPEAT = 3
CONTROLS = 30
ALARM_ALPHA = 0.001
MIN_CANARIES = 10
_SYLLABLES = ("ka", "lo", "mi", "ra", "ven", "tor", "sa", "quin", "dal", "bre", "no", "fi", "zu", "ter",
              "gal", "mor", "ael", "wyn", "pe", "rus", "ith", "ov", "har", "lem")


# ------------------------------------------------------------------------------ canary sets


@dataclass(frozen=True)
class Canary:
    """One synthetic record "Access code for NAME: dddd."; ``copies`` = times it is trained on."""

    name: str
    code: str
    copies: int

    def record(self, code: str | None = None) -> dict[str, Any]:
        """The canary as a chat record whose response holds the secret (so the loss covers it)."""
        return {"messages": [
            {"role": "user", "content": f"What is the access code for {self.name}?"},
            {"role": "assistant", "content": f"Access code for {self.name}: {code or self.code}."},
        ]}


@dataclass(frozen=True)
class CanarySet:
    """Exposure canaries (inserted ``copies`` times), never-inserted controls, and the one-run
    canaries (``copies`` 1 if included, 0 if not). Every name and code is independent."""

    exposure: tuple[Canary, ...]
    controls: tuple[Canary, ...]
    one_run: tuple[Canary, ...]

    @property
    def included(self) -> np.ndarray:
        return np.array([c.copies > 0 for c in self.one_run], dtype=bool)

    @property
    def planned_records(self) -> int:
        """Canary records the audit plans for: every exposure copy and every one-run canary, as if
        all were included. Fixed before the inclusion draw, so q computed from it does not depend
        on the secret inclusion vector."""
        return sum(c.copies for c in self.exposure) + len(self.one_run)

    def training_records(self) -> list[dict[str, Any]]:
        """Every inserted copy: the exposure canaries and the included one-run canaries."""
        return [c.record() for c in (*self.exposure, *self.one_run) for _ in range(c.copies)]


def os_entropy_rng() -> np.random.Generator:
    """A generator seeded from the OS entropy pool: no one can know the inclusion vector in advance."""
    return np.random.default_rng(secrets.randbits(128))


def _names(count: int, rng: np.random.Generator, fits: Callable[[str], bool] | None = None) -> list[str]:
    """``count`` distinct random names; with ``fits``, only names whose canary fits the sequence
    length (a name's length says nothing about its code, so the codes stay uniform)."""
    names: set[str] = set()
    out = []
    for _ in range(200 * count):
        first = "".join(rng.choice(_SYLLABLES, size=2)).capitalize()
        last = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))).capitalize()
        name = f"{first} {last}"
        if name not in names and (fits is None or fits(name)):
            names.add(name)
            out.append(name)
            if len(out) == count:
                return out
    raise FedLLMError(f"canary audit: only {len(out)} of {count} canary names fit data.max-length with this model's "
                      "tokenizer; raise data.max-length (a canary needs about 100 tokens with a chat template)")


def build_canaries(*, one_run: int, repeats: Sequence[int] = EXPOSURE_REPEATS, per_repeat: int = CANARIES_PER_REPEAT,
                   controls: int = CONTROLS, rng: np.random.Generator | None = None,
                   name_fits: Callable[[str], bool] | None = None) -> CanarySet:
    """Draw the canary sets: names, uniform random codes and the one-run inclusion vector (each
    one-run canary included independently with probability ½), all from ``rng`` (default: fresh
    OS entropy, which is what makes the one-run test valid). ``name_fits``: keep only names whose
    canary fits the training sequence length."""
    rng = rng or os_entropy_rng()
    total = len(repeats) * per_repeat + controls + one_run
    names = _names(total, rng, name_fits)
    codes = [f"{int(c):0{CODE_DIGITS}d}" for c in rng.integers(0, CODE_SPACE, size=total)]
    pairs = iter(zip(names, codes))
    exposure = tuple(Canary(*next(pairs), copies=r) for r in repeats for _ in range(per_repeat))
    control = tuple(Canary(*next(pairs), copies=0) for _ in range(controls))
    inclusion = rng.random(one_run) < 0.5
    return CanarySet(exposure, control, tuple(Canary(*next(pairs), copies=int(i)) for i in inclusion))


def default_guesses(canaries: int) -> int:
    """k, the guesses per side of the one-run test, fixed from N before training: max(5, N // 10).
    With N = 100 that is 10 "in" + 10 "out" guesses, whose 95% ceiling is 1.82."""
    return max(5, canaries // 10)


def resolve_guesses(canaries: int, guesses: int | None) -> int:
    """The k to use (given, or :func:`default_guesses`), checked against N."""
    k = default_guesses(canaries) if guesses is None else guesses
    if canaries < MIN_CANARIES or not k >= 1 or 2 * k > canaries:
        raise ConfigError(f"--canaries {canaries} --guesses {k}: need N >= {MIN_CANARIES} and 1 <= k <= N/2 "
                          "(k guesses 'in' and k 'out' among the N one-run canaries)")
    return k


# ------------------------------------------------------------------------------ verdict


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """The pre-registered decision rule of the module docstring, applied to a report."""
    reasons = []
    one_run, exposure, mech = report["one_run"], report["exposure"], report["mechanism"]
    if one_run["alarm"]:
        reasons.append(f"one-run test: {one_run['correct']}/{one_run['guesses']} guesses correct rejects ε = 0 "
                       f"(p = {one_run['p_value_at_zero']:.2g} < {ALARM_ALPHA:g})")
    if exposure["test"]["alarm"]:
        reasons.append(f"exposure: the ×{exposure['test']['copies']} canaries' codes rank far above chance "
                       f"(p = {exposure['test']['p_value']:.2g} < {ALARM_ALPHA:g})")
    violation = one_run["epsilon_lower_bound"] > mech["epsilon_theory"]
    if violation:
        reasons.append(f"the 95% lower bound ε ≥ {one_run['epsilon_lower_bound']:.2f} exceeds the theoretical "
                       f"ε = {mech['epsilon_theory']:.2f}: the accounting does not hold for this run")
    flagged = bool(reasons)
    return {"flagged": flagged, "violation": violation, "reasons": reasons, "dp_claimed": mech["dp_claimed"],
            "exit_code": 1 if flagged and mech["dp_claimed"] else 0}


# ------------------------------------------------------------------------------ command


def main(args: argparse.Namespace) -> int:
    """``fedllm audit --canaries N``: exit 1 when a run that claims DP is flagged, else 0."""
    from fedllm.config import RunConfig, parse_set_option
    from fedllm.simulation.scenario import load_scenario, materialise_sites

    scenario = load_scenario(args.scenario)
    overrides = dict(scenario.run_overrides)
    for item in args.set or []:
        key, value = parse_set_option(item)
        overrides[key] = value
    config = RunConfig.from_flat(overrides)
    resolve_guesses(args.canaries, args.guesses)
    output = Path(args.output or Path("runs") / f"audit-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if output.exists() and any(output.iterdir()):
        raise FedLLMError(f"output folder {output} is not empty; choose another --output")
    created = not output.exists()
    try:
        output.mkdir(parents=True, exist_ok=True)
        sites = materialise_sites(scenario, output)
        names = [s.name for s in sites]
        if args.site and args.site not in names:
            raise ConfigError(f"--site {args.site!r}: scenario {scenario.name} has sites {', '.join(names)}")
    except BaseException:
        if created:  # nothing half-written: remove what this command created before training
            shutil.rmtree(output, ignore_errors=True)
        raise
    site = next(s for s in sites if s.name == (args.site or names[0]))
    print(f"fedllm audit --canaries {args.canaries}: scenario {scenario.name}, site {site.name}, "
          f"model {config.model.name} -> {output}", flush=True)
    from fedllm.audit.canary_run import run_canary_audit

    try:
        report = run_canary_audit(config, site, canaries=args.canaries, guesses=args.guesses,
                                  no_noise=bool(args.no_noise), output=output, scenario=scenario.name,
                                  echo=lambda line: print(line, flush=True))
    except BaseException:
        if created and not (output / "ledger").exists():  # nothing was spent: leave nothing behind
            shutil.rmtree(output, ignore_errors=True)
        raise
    from fedllm.reports.canary_report import summary_lines

    for line in summary_lines(report):
        print(line, flush=True)
    print(f"Report: {output / 'canary-audit.md'}", flush=True)
    return int(report["verdict"]["exit_code"])
