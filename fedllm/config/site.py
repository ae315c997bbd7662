"""The site schema: one institution's own settings (``SiteConfig``), their key names, the one
site-name rule and the one validator that every reader of site settings uses.

Site settings come from four places, all with the same kebab-case keys (``SITE_KEYS``: the
snake_case field names in kebab-case, except ``site-name`` for the field ``name``, because a
SuperNode's node config is shared with Flower's own keys):

* a site file ``sites/<name>.toml`` (:mod:`fedllm.deploy.site_file` adds the file-level work: paths
  relative to the file, files that must exist, the ``[connection]`` table, messages naming the file);
* a SuperNode's ``--node-config`` (:meth:`SiteConfig.from_node_config`, deployment);
* a scenario's ``[[site]]`` tables (:mod:`fedllm.simulation.scenario`);
* the simulation's sites file ``sites.json`` (:meth:`SiteConfig.to_dict` / :meth:`SiteConfig.from_dict`).

Each key is declared once, as a field of ``SiteConfig`` carrying its key, its default, the rule
shown in messages and its check (``_key(...)``); :func:`site_problems` and ``to_dict`` read those
declarations, so adding a key is adding one field. Every problem is one line: the key, the bad
value, what is allowed; unknown keys get a did-you-mean.

Site names (``SITE_NAME_RE``): 1 to 64 of ``A-Z a-z 0-9 . _ -``, not starting with ``.``. A name
becomes a file name (ledger, resend store, state folder) and crosses the wire, so it can never be a
path (``..``), a hidden file or unbounded.

``require-dp`` defaults to true for every reader: a site refuses every round of a run with
``privacy.enabled = false`` unless its own settings say ``require-dp = false``. The run config is
the coordinator's; this default is the site's protection against a run without DP. A simulated
no-DP baseline sets ``require-dp = false`` in its scenario's ``[[site]]`` tables.

Privacy policy (issue 13): ``max-epsilon`` is required (finite, > 0; there is no fallback to the
run's cap), ``max-delta`` is the largest δ the site accepts (0: automatic, the smaller of 1e-5 and
1/(10·n) for n training records; an explicit value must be in (0, 1e-3]: a larger δ is a guarantee
that fails outright with that probability), ``require-dp`` as above. The site computes, enforces
and records its ε at its own δ (:mod:`fedllm.site.policy`).

``release-metrics`` defaults to "dp" for every reader: no exact metric computed on the site's
records leaves it, and its held-out loss leaves only through the Gaussian mechanism
(``metric-noise-multiplier``, ``metric-loss-bound``), paid for in its ledger
(:mod:`fedllm.site.metric_release`). "exact" (today's unprotected metrics) must be written out; the
shipped simulation scenarios, whose operator holds all the data, do so.

Trust boundary: these settings are the site's own and are never merged into the run config; the
run's ``privacy.max-epsilon`` can only tighten a site's ``max-epsilon``, never loosen it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedllm.data.loading import SOURCES_TEXT, columns_problem
from fedllm.errors import ConfigError

if TYPE_CHECKING:
    from fedllm.config.run import PrivacyConfig

SITE_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
NAME_RULE = ("1 to 64 letters, digits, '.', '_' and '-', not starting with '.' (it names the site's ledger "
             "and state files), e.g. \"cardiology\"")
DEVICE_RE = re.compile(r"cpu|cuda(:[0-9]+)?|mps")
DEVICES_TEXT = '"cpu", "cuda", "cuda:N" or "mps"'

Check = Callable[[Any], "str | None"]  # why a value (already of the field's type) is bad; None: fine
_REQUIRED = dataclasses.MISSING
_KINDS: dict[str, type] = {"str": str, "float": float, "bool": bool, "int": int}


def _key(key: str, *, rule: str, check: Check | None = None, default: Any = _REQUIRED, path: bool = False) -> Any:
    """A ``SiteConfig`` field declared with its on-disk key, its rule (what is allowed, as shown in
    messages) and its check; no default: the key is required (absent or "" is refused). ``path``:
    a file path, which a reader resolves relative to the file it was written in."""
    metadata = {"key": key, "rule": rule, "check": check, "path": path}
    if default is _REQUIRED:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


def _matches(pattern: re.Pattern[str], rule: str) -> Check:
    return lambda value: None if pattern.fullmatch(value) else f"must be {rule}"


def _finite_positive(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else f"must be {_CAP_RULE}"


def _delta_problem(value: float) -> str | None:
    return None if value == 0 or (math.isfinite(value) and 0 < value <= MAX_DELTA_LIMIT) else f"must be {_DELTA_RULE}"

RELEASE_MODES = ("dp", "none", "exact")
_RELEASE_RULE = ('"dp" (metrics computed on the site\'s records leave only noised and accounted, the default), '
                 '"none" (only what aggregation needs) or "exact" (unprotected: the site\'s exact train and '
                 'held-out metrics)')
_METRIC_SIGMA_RULE = ("a finite number > 0 (noise multiplier of the Gaussian mechanism that releases the held-out "
                      "loss under release-metrics = \"dp\"; 20 costs ε ≈ 0.17 per release alone at δ = 1e-5)")
_LOSS_BOUND_RULE = "a finite number > 0 (nats: each held-out record's mean token loss is clipped to [0, this])"


def _eval_fraction_problem(value: float) -> str | None:
    return None if 0.0 <= value <= 0.5 else f"must be {_EVAL_FRACTION_RULE}"


def _count_problem(value: int) -> str | None:
    return None if value >= 0 else f"must be {_MAX_EVAL_RULE}"


_EVAL_FRACTION_RULE = ("a number in [0, 0.5]: the share of the site's records it holds out for evaluation, chosen by "
                       "a keyed hash of each record with the site's split key (0: no held-out evaluation)")
_MAX_EVAL_RULE = "an integer >= 0: at most this many held-out records (0: no cap)"


def _release_mode(value: str) -> str | None:
    return None if value in RELEASE_MODES else f"must be {_RELEASE_RULE}"


def _positive_with_rule(rule: str) -> Check:
    return lambda value: None if math.isfinite(value) and value > 0 else f"must be {rule}"


_CAP_RULE = ("a finite number > 0: the site's own cap on its cumulative ε, at its own δ (max-delta); "
             "e.g. max-epsilon = 8.0")
MAX_DELTA_LIMIT = 1e-3  # an explicit max-delta above this is refused: δ is the chance the guarantee fails outright
AUTO_DELTA = 1e-5  # the automatic δ: min(AUTO_DELTA, 1/(10·n)) for n training records
_DELTA_RULE = (f"0 (automatic: the smaller of {AUTO_DELTA:g} and 1/(10·n), n = the site's training records) or a "
               f"number in (0, {MAX_DELTA_LIMIT:g}]: the largest δ at which the site computes and enforces its ε")
_REQUIRED_HINTS = {  # what to add, for a required key an older site file lacks
    "max-epsilon": "add max-epsilon = 8.0 (your cap on this site's cumulative ε) to the site's settings",
}


def automatic_delta(num_examples: int) -> float:
    """The δ a site with ``max-delta = 0`` uses: the smaller of 1e-5 and 1/(10·n) for n training records."""
    return min(AUTO_DELTA, 1.0 / (10 * max(1, num_examples)))


@dataclass(frozen=True, kw_only=True)  # keyword-only: a required key may follow optional ones
class SiteConfig:
    """One site's own settings (its node config). Never merged into the run config."""

    name: str = _key("site-name", rule=NAME_RULE, check=_matches(SITE_NAME_RE, NAME_RULE))
    data_path: str = _key("data-path", rule=f"the path of the site's data (a {SOURCES_TEXT})", path=True)
    ledger_path: str = _key("ledger-path", default="", path=True,
                            rule='the path of the site\'s privacy ledger, or "" for the default place')
    max_epsilon: float = _key("max-epsilon", rule=_CAP_RULE, check=_finite_positive)
    device: str = _key("device", default="cpu", rule=DEVICES_TEXT, check=_matches(DEVICE_RE, DEVICES_TEXT))
    signing_key: str = _key("signing-key", default="", path=True,  # the Ed25519 key (PEM) that signs its ledger
                            rule="the path of the site's Ed25519 private key (PEM, from 'fedllm ledger keygen') "
                                 "that signs its ledger, or \"\" to leave the ledger unsigned")
    require_dp: bool = _key("require-dp", default=True,  # refuse every round of a run with privacy.enabled = false
                            rule="true (refuse runs without differential privacy, the default) or false")
    data_columns: str = _key("data-columns", default="",  # which column holds which field; "": same names
                             rule='"FIELD=COLUMN, ..." or ""', check=columns_problem)
    max_delta: float = _key("max-delta", default=0.0, rule=_DELTA_RULE, check=_delta_problem)
    # which numbers computed on the site's records may leave it (fedllm.site.metric_release)
    release_metrics: str = _key("release-metrics", default="dp", rule=_RELEASE_RULE, check=_release_mode)
    metric_noise_multiplier: float = _key("metric-noise-multiplier", default=20.0, rule=_METRIC_SIGMA_RULE,
                                          check=_positive_with_rule(_METRIC_SIGMA_RULE))
    metric_loss_bound: float = _key("metric-loss-bound", default=10.0, rule=_LOSS_BOUND_RULE,
                                    check=_positive_with_rule(_LOSS_BOUND_RULE))
    # the held-out split is the site's (fedllm.site.holdout): fixed for its ledger's lifetime
    eval_fraction: float = _key("eval-fraction", default=0.1, rule=_EVAL_FRACTION_RULE, check=_eval_fraction_problem)
    max_eval_examples: int = _key("max-eval-examples", default=64, rule=_MAX_EVAL_RULE, check=_count_problem)

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> SiteConfig:
        """From a mapping with the site keys (a scenario ``[[site]]`` table, an entry of the
        simulation's ``sites.json``); ``ConfigError`` listing every problem."""
        return validate_site(entry)

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any]) -> SiteConfig:
        """From a SuperNode's ``--node-config`` (deployment): as :meth:`from_dict`, and the signing
        key, when set, must be a file (``~`` is expanded)."""
        key = node.get("signing-key", "")
        missing = []
        if isinstance(key, str) and key and not Path(key).expanduser().is_file():
            missing.append(f"signing-key = {key!r}: no such file; create a key with "
                           "'fedllm ledger keygen --out DIR --site NAME'")
        site = validate_site(node, more_problems=missing)
        return dataclasses.replace(site, signing_key=str(Path(key).expanduser())) if key else site

    def to_dict(self) -> dict[str, Any]:
        """Every setting under its key (what :meth:`from_dict` reads back to an equal config)."""
        return {spec.key: getattr(self, spec.field) for spec in _SPECS}

    def effective_max_epsilon(self, run: PrivacyConfig) -> float:
        """The cap this site enforces: its own, which a run's cap can only tighten (never loosen)."""
        if run.max_epsilon > 0 and math.isfinite(run.max_epsilon):
            return min(self.max_epsilon, run.max_epsilon)
        return self.max_epsilon

    def delta(self, num_examples: int) -> float:
        """The δ at which this site computes and enforces its ε: ``max-delta``, or when 0 the automatic
        :func:`automatic_delta` of its ``num_examples`` training records."""
        return self.max_delta if self.max_delta > 0 else automatic_delta(num_examples)


@dataclass(frozen=True)
class _Spec:
    key: str
    field: str
    kind: type
    default: Any
    rule: str
    check: Check | None

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


_SPECS: tuple[_Spec, ...] = tuple(
    _Spec(key=f.metadata["key"], field=f.name, kind=_KINDS[str(f.type)], default=f.default,
          rule=f.metadata["rule"], check=f.metadata["check"])
    for f in dataclasses.fields(SiteConfig))
SITE_KEYS: tuple[str, ...] = tuple(spec.key for spec in _SPECS)
SITE_DEFAULTS: dict[str, Any] = {spec.key: spec.default for spec in _SPECS if not spec.required}
SITE_PATH_KEYS: tuple[str, ...] = tuple(f.metadata["key"] for f in dataclasses.fields(SiteConfig) if f.metadata["path"])


def _typed(value: Any, kind: type) -> tuple[bool, Any]:
    """(True, value as ``kind``) or (False, None); ints count as floats, bools as nothing else."""
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return ok, value if ok else None
    return isinstance(value, kind), value


def _did_you_mean(key: str, allowed: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _checked(entry: Mapping[str, Any], also_allowed: Sequence[str] = (),
             misplaced: Mapping[str, str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """(the typed field values, every problem), in key order after the unknown keys."""
    problems: list[str] = []
    for key in entry:
        if key in SITE_KEYS or key in also_allowed:
            continue
        hint = f" ({misplaced[key]})" if misplaced and key in misplaced else _did_you_mean(
            key, (*SITE_KEYS, *also_allowed))
        problems.append(f"{key}: unknown key{hint}; site keys: {', '.join(SITE_KEYS)}")
    values: dict[str, Any] = {}
    for spec in _SPECS:
        if spec.required and entry.get(spec.key, "") == "":
            problems.append(f"{spec.key}: required; {_REQUIRED_HINTS.get(spec.key, spec.rule)}")
            continue
        raw = entry.get(spec.key, spec.default)
        ok, value = _typed(raw, spec.kind)
        why = (spec.check(value) if spec.check else None) if ok else f"must be {spec.rule}"
        if why:
            problems.append(f"{spec.key} = {raw!r}: {why}")
        else:
            values[spec.field] = value
    return values, problems


def site_problems(entry: Mapping[str, Any], *, also_allowed: Sequence[str] = (),
                  misplaced: Mapping[str, str] | None = None) -> list[str]:
    """Every problem of one site's settings, one line each (key, bad value, what is allowed; a
    did-you-mean for an unknown key). ``also_allowed``: other keys the caller handles itself (a
    site file's ``connection`` table); ``misplaced``: unknown keys with a hint of where they belong
    instead of a did-you-mean. Reads no file: a caller that resolves paths checks their files."""
    return _checked(entry, also_allowed, misplaced)[1]


def validate_site(entry: Mapping[str, Any], *, more_problems: Sequence[str] = ()) -> SiteConfig:
    """The ``SiteConfig`` of ``entry``, or one ``ConfigError`` listing every problem (those of
    :func:`site_problems`, then ``more_problems`` found by the caller)."""
    values, problems = _checked(entry)
    problems += more_problems
    if problems:
        raise ConfigError("Invalid site configuration:\n  - " + "\n  - ".join(problems))
    return SiteConfig(**values)
