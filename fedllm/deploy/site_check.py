"""``fedllm site check sites/x.toml``: check a site's file, data, ledger and keys before it joins a run.

Nothing is trained and nothing goes over the network: every check reads local files only. The
checks, in order:

* **site file**: :func:`fedllm.deploy.site_file.load_site_file` (a bad file is a ``ConfigError``);
* **device**: the configured device exists on this machine;
* **data**: every record loads (:func:`fedllm.data.loading.load_records`; a bad record is a
  ``DataError`` naming file, record and field), and their number;
* **split**: the train / held-out sizes under the site's own held-out policy (``eval-fraction``,
  ``max-eval-examples``) and its split key beside the ledger (:mod:`fedllm.site.holdout`; when the
  key does not exist yet, a preview with a throwaway key: the site creates its key when it first
  trains); a warning when there are fewer training records than ``train.batch-size`` (the sample
  rate q would be 1: no amplification by subsampling);
* **tokens**: token lengths of an evenly spaced sample of records with ``--model``'s tokenizer:
  min / median / p95 / max, how many ``--max-length`` truncates, and a failure for any record
  that would keep no response token (the site would refuse its data);
* **signing key**: loads as an Ed25519 private key when set;
* **ledger**: absent (a new one will be created), or verified completely
  (:func:`fedllm.privacy.ledger.verify_ledger`) against the fingerprint of this data's training
  subset, its recorded held-out split against the site's, and, when the site has a signing key,
  its public key, and against the site's privacy policy: its cumulative ε at the site's own δ
  against the site's own cap; an entry recorded at a larger δ fails the check;
* **privacy policy**: the site's cap (``max-epsilon``, required) and δ (``max-delta``, or the
  automatic min(1e-5, 1/(10·n)) for its n training records), and ``require-dp``;
* **root certificates**, **auth key**: the CA certificate parses (PEM X.509) and is valid now; the
  SuperNode key parses as Flower loads it (unencrypted OpenSSH private key on a NIST EC curve).
  Unset is a warning, not a failure.

The report's JSON (``--json``) has one object per check with its status and numbers.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import stat
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedllm.config import RunConfig
from fedllm.deploy.site_file import SiteFile, load_site_file
from fedllm.errors import ConfigError, LedgerError, ModelError

OK, WARNING, FAILED = "ok", "warning", "failed"
DEFAULT_SAMPLE = 200
NIST_CURVES = ("secp192r1", "secp224r1", "secp256r1", "secp384r1", "secp521r1")  # as Flower accepts
_UNTRUNCATED = 10**9


@dataclass(frozen=True)
class Check:
    """One line of the report: ``status`` is "ok", "warning" or "failed"; ``values`` the numbers."""

    name: str
    status: str
    detail: str
    values: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        label = "FAILED" if self.status == FAILED else self.status
        return f"{label:<8} {self.name:<18} {self.detail}"


@dataclass
class SiteCheckReport:
    """Every check of one site; ``ok`` is True when none failed (warnings allowed)."""

    path: str
    site: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.status != FAILED for check in self.checks)

    def add(self, name: str, status: str, detail: str, **values: Any) -> None:
        self.checks.append(Check(name, status, detail, values))

    def to_dict(self) -> dict[str, Any]:
        return {"site-file": self.path, "site": self.site, "ok": self.ok,
                "checks": [{"check": c.name, "status": c.status, "detail": c.detail, **c.values}
                           for c in self.checks]}

    def lines(self) -> list[str]:
        head = f"Site '{self.site}' ({self.path}): checked locally, nothing trained, nothing sent"
        failed = sum(c.status == FAILED for c in self.checks)
        warned = sum(c.status == WARNING for c in self.checks)
        tail = ("OK: the site is ready" if self.ok else f"FAILED: {failed} check{'s' if failed != 1 else ''} failed")
        return [head, *(c.line() for c in self.checks), tail + (f" ({warned} warning{'s' if warned != 1 else ''})"
                                                                if warned else "")]


def _json_number(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


def _fmt_eps(value: float) -> str:
    return "inf (no DP guarantee)" if math.isinf(value) else f"{value:.2f}"


def load_tokenizer(name: str) -> Any:
    """Only the tokenizer of model ``name`` (offline; the model's weights are not loaded)."""
    from fedllm.config import ModelConfig
    from fedllm.model.loading import TINY_PREFIX, build_byte_tokenizer, ensure_model_available

    source = ensure_model_available(ModelConfig(name=name))
    if source.startswith(TINY_PREFIX):
        return build_byte_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except OSError as exc:
        raise ModelError(f"the tokenizer of model {name!r} is not available offline ({exc.__class__.__name__}); "
                         "fedllm never downloads: pass --model with a local model folder") from None


def sample_indices(count: int, sample: int) -> list[int]:
    """Up to ``sample`` evenly spaced indices in ``range(count)``, always the same ones."""
    if sample <= 0 or count <= 0:
        return []
    if sample >= count:
        return list(range(count))
    return [i * count // sample for i in range(sample)]


def check_site(site_file: SiteFile, *, model: str, max_length: int, data_format: str = "auto",
               sample: int = DEFAULT_SAMPLE) -> SiteCheckReport:
    """Every check of the module docstring; ``DataError`` (bad data) and ``ModelError`` propagate."""
    from fedllm.data.fingerprint import dataset_fingerprint
    from fedllm.data.loading import load_records

    site, conn = site_file.site, site_file.connection
    report = SiteCheckReport(path=str(site_file.path), site=site.name)
    cap = site.max_epsilon  # the site's own: a run's privacy.max-epsilon can only tighten it
    delta_text = f"δ {site.max_delta:g} (max-delta)" if site.max_delta > 0 else "δ automatic (max-delta = 0)"
    report.add("site file", OK, f"data {site.data_path}; ledger {site.ledger_path}; cap ε {cap:g} (the site's own); "
               f"{delta_text}; server {conn.server or '(not set: give --server)'}", server=conn.server)
    _check_device(report, site.device)

    records = load_records(site.data_path, format=data_format, columns=site.data_columns)
    kinds = {"prompt/response": sum("messages" in r for r in records), "text": sum("text" in r for r in records)}
    kind_text = ", ".join(f"{n} {kind}" for kind, n in kinds.items() if n)
    fingerprint = dataset_fingerprint(records)
    report.add("data", OK, f"{len(records)} records ({kind_text}); fingerprint {fingerprint[:19]}…",
               records=len(records), fingerprint=fingerprint)
    split_key = _check_split(report, site, records)
    if split_key is not None:  # the ledger is bound to the training subset
        from fedllm.site.runtime import training_fingerprint

        fingerprint = training_fingerprint(site, records, split_key)
    trained = next((c.values.get("train") for c in report.checks if c.name == "split"), None)
    delta = site.delta(int(trained) if trained is not None else len(records))  # the site's own δ
    report.add("privacy policy", OK, f"cap ε {cap:g} at δ {delta:.3g} ("
               + ("max-delta" if site.max_delta > 0 else f"automatic: min(1e-5, 1/(10·n)), n = {trained} training "
                  "records") + f"); require-dp = {str(site.require_dp).lower()}: runs asking for a larger δ"
               + (" or no DP" if site.require_dp else "") + " are refused", cap=cap, delta=delta,
               **{"require-dp": site.require_dp})
    _check_tokens(report, records, load_tokenizer(model), model=model, max_length=max_length, sample=sample)
    public_key = _check_signing_key(report, site.signing_key)
    _check_ledger(report, Path(site.ledger_path), site.name, fingerprint, public_key, cap, delta,
                  held_out_split=_site_split_policy(site, split_key))
    _check_root_certificates(report, conn.root_certificates)
    _check_auth_key(report, conn.auth_key)
    return report


def _check_device(report: SiteCheckReport, device: str) -> None:
    if device == "cpu":
        report.add("device", OK, "cpu", device=device)
        return
    import torch

    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            report.add("device", FAILED, f"{device}: this machine has {count} CUDA device{'s' if count != 1 else ''}; "
                       "set device = \"cpu\" or a device that exists", device=device)
            return
        report.add("device", OK, f"{device} ({torch.cuda.get_device_name(index)})", device=device)
    elif not torch.backends.mps.is_available():
        report.add("device", FAILED, "mps: not available on this machine; set device = \"cpu\"", device=device)
    else:
        report.add("device", OK, device, device=device)


def _check_split(report: SiteCheckReport, site: Any, records: list) -> bytes | None:
    """The split under the site's own policy and key; returns the key (None: no key file yet)."""
    import os

    from fedllm.site.holdout import read_split_key, split_key_path, split_records

    key_path = split_key_path(site.ledger_path, site.name)
    key: bytes | None = None
    if key_path.exists():
        try:
            key = read_split_key(key_path)
        except LedgerError as exc:
            report.add("split", FAILED, str(exc))
            return None
    split = split_records(records, key=key or os.urandom(32), eval_fraction=site.eval_fraction,
                          max_eval=site.max_eval_examples)
    train, held = split.train, split.held_out
    run = RunConfig()
    batch = run.train.batch_size
    values = {"train": len(train), "held-out": len(held), "batch-size": batch}
    text = (f"{len(train)} train / {len(held)} held out (eval-fraction {site.eval_fraction:g}, "
            f"max-eval-examples {site.max_eval_examples}, "
            + (f"split key {key_path})" if key else f"a preview: the split key {key_path} is created when the site "
               "first trains, and the counts may differ by a few records)"))
    if not held:
        text += "; no held-out record: the site reports no evaluation loss (it needs at least 2 records)"
    if len(train) < batch:
        report.add("split", WARNING, f"{text}; fewer training records than train.batch-size {batch}: the sample "
                   "rate q would be 1, every step sees every record and DP loses its amplification by "
                   "subsampling (ε grows much faster); add data or lower train.batch-size", **values)
    elif not held:
        report.add("split", WARNING, text, **values)
    else:
        report.add("split", OK, f"{text}; q = {batch}/{len(train)} = {batch / len(train):.3g} at train.batch-size "
                   f"{batch}", **values)
    return key


def _site_split_policy(site: Any, key: bytes | None) -> dict[str, Any] | None:
    from fedllm.site.holdout import policy_for

    return policy_for(site, key).to_json() if key is not None else None


def _check_tokens(report: SiteCheckReport, records: list, tokenizer: Any, *, model: str, max_length: int,
                  sample: int) -> None:
    from fedllm.data.formatting import tokenize_record

    indices = sample_indices(len(records), sample)
    if not indices:
        report.add("tokens", WARNING, "--sample 0: token lengths not checked")
        return
    lengths, truncated, empty = [], 0, []
    for i in indices:
        full = tokenize_record(records[i], tokenizer, max_length=_UNTRUNCATED)
        lengths.append(len(full.input_ids))
        kept = full
        if len(full.input_ids) > max_length:
            truncated += 1
            kept = tokenize_record(records[i], tokenizer, max_length=max_length)
        if kept.num_label_tokens == 0:
            empty.append(i + 1)
    ordered = sorted(lengths)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    values = {"model": model, "max-length": max_length, "sampled": len(indices), "min": ordered[0],
              "median": statistics.median(ordered), "p95": p95, "max": ordered[-1], "truncated": truncated,
              "no-response-tokens": empty}
    scope = "every record" if len(indices) == len(records) else f"a sample of {len(indices)} of {len(records)} records"
    text = (f"{scope} with the tokenizer of {model}: min {ordered[0]} / median {values['median']:g} / "
            f"p95 {p95} / max {ordered[-1]} tokens; {truncated} of {len(indices)} longer than max-length "
            f"{max_length}")
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (", …" if len(empty) > 10 else "")
        report.add("tokens", FAILED, f"{text}; record(s) {shown} keep no response token after truncation: the "
                   "site would refuse its data; shorten their prompts or raise data.max-length", **values)
    elif truncated:
        report.add("tokens", WARNING, f"{text} (they are cut, prompt first); raise data.max-length if the "
                   "responses matter", **values)
    else:
        report.add("tokens", OK, text, **values)


def _check_signing_key(report: SiteCheckReport, path: str) -> Any:
    """The signing key's public key (None: unset or unreadable)."""
    if not path:
        report.add("signing key", OK, "not set: the site's ledger entries are not signed")
        return None
    from fedllm.privacy.signing import key_id, load_private_key

    try:
        key = load_private_key(path)
    except ConfigError as exc:
        report.add("signing key", FAILED, str(exc))
        return None
    report.add("signing key", OK, f"{path}: Ed25519 key {key_id(key)}", key_id=key_id(key))
    return key.public_key()


def _check_ledger(report: SiteCheckReport, path: Path, site_name: str, fingerprint: str, public_key: Any,
                  cap: float, delta: float, *, held_out_split: dict[str, Any] | None = None) -> None:
    from fedllm.privacy.ledger import verify_ledger

    if not path.exists():
        report.add("ledger", OK, f"none yet: a new ledger will be created at {path}", entries=0, epsilon=0.0,
                   cap=cap, delta=delta)
        return
    try:  # at the site's own δ: an entry at a larger δ fails the check (a spent budget is a warning below)
        result = verify_ledger(path, public_key=public_key, dataset_fingerprint=fingerprint, max_delta=delta)
    except (LedgerError, ConfigError) as exc:
        report.add("ledger", FAILED, str(exc), cap=cap)
        return
    values = {"entries": result.entries, "epsilon": _json_number(result.final_epsilon), "cap": cap, "delta": delta}
    if result.entries and (result.held_out_split is None or result.held_out_split != held_out_split):
        if held_out_split is None and result.held_out_split is not None:
            text = (f"{path} was written under the split key {split_key_path_text(path, site_name)}, which is "
                    "missing: restore it from a backup (the site refuses to train without it)")
        else:
            from fedllm.privacy.ledger import PrivacyLedger

            try:  # the site's own refusal, with its message (what changed; what to do)
                PrivacyLedger.open(path, site=result.site, held_out_split=held_out_split or {"split-key-id": None})
                text = f"{path}: its held-out split differs from the site's"
            except LedgerError as exc:
                text = str(exc)
        report.add("ledger", FAILED, text, **values)
        return
    if result.site != site_name:
        report.add("ledger", FAILED, f"{path} belongs to site {result.site!r}, not '{site_name}': give this site its "
                   "own ledger-path", **values)
        return
    if not result.ok:
        more = f" (and {len(result.problems) - 1} more; run 'fedllm ledger verify {path}')" if len(result.problems) > 1 else ""
        report.add("ledger", FAILED, f"{path} does not verify: {result.problems[0]}{more}", **values)
        return
    spent = (f"{path}: {result.entries} entries, cumulative ε {_fmt_eps(result.final_epsilon)}"
             + (f" at the site's own δ={delta:.3g} ({result.accountant})" if result.entries else "")
             + f" of cap {cap:g}; chain and dataset fingerprint verified")
    if result.final_epsilon >= cap:
        report.add("ledger", WARNING, f"{spent}; the budget is spent: the site will refuse to train", **values)
    else:
        report.add("ledger", OK, spent, **values)


def split_key_path_text(ledger_path: Path, site_name: str) -> str:
    from fedllm.site.holdout import split_key_path

    return str(split_key_path(ledger_path, site_name))


def _check_root_certificates(report: SiteCheckReport, path: str) -> None:
    name = "root certificates"
    if not path:
        report.add(name, WARNING, "not set: only --insecure connections possible (trials on a private network), "
                   "unless fedllm site start is given --root-certificates PEM")
        return
    from cryptography import x509

    try:
        certificates = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        report.add(name, FAILED, f"{path}: not a PEM X.509 certificate ({exc}); give the CA certificate (ca.crt)")
        return
    now = datetime.now(UTC)
    cert = certificates[0]
    subject = cert.subject.rfc4514_string()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        report.add(name, FAILED, f"{path}: '{subject}' is valid only from {cert.not_valid_before_utc:%Y-%m-%d} to "
                   f"{cert.not_valid_after_utc:%Y-%m-%d}; get a current CA certificate")
        return
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    text = f"{path}: '{subject}', valid until {cert.not_valid_after_utc:%Y-%m-%d}"
    if len(certificates) > 1:
        text += f" (+{len(certificates) - 1} more certificate{'s' if len(certificates) > 2 else ''})"
    if not is_ca:
        report.add(name, WARNING, f"{text}; it is not a CA certificate: give the CA that signed the coordinator's "
                   "certificate, not the coordinator's certificate itself")
    else:
        report.add(name, OK, text)


def _check_auth_key(report: SiteCheckReport, path: str) -> None:
    name = "auth key"
    if not path:
        report.add(name, WARNING, "not set: only a coordinator without SuperNode authentication will accept this site")
        return
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    make = "make one with: ssh-keygen -t ecdsa -b 384 -N \"\" -f KEY (OpenSSH format, no passphrase)"
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        report.add(name, FAILED, f"{path}: not an unencrypted OpenSSH private key as Flower loads it ({exc}); {make}")
        return
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in NIST_CURVES:
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePrivateKey) else type(key).__name__
        report.add(name, FAILED, f"{path}: a {kind} key; Flower needs an EC key on a NIST curve; {make}")
        return
    blob = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    digest = base64.b64encode(hashlib.sha256(base64.b64decode(blob.split()[1])).digest()).decode().rstrip("=")
    text = f"{path}: EC {key.curve.name}, public key SHA256:{digest} (register its .pub at the coordinator)"
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if os.name == "posix" and mode & 0o077:
        report.add(name, WARNING, f"{text}; readable by other users (mode {mode:o}): chmod 600 {path}",
                   fingerprint=f"SHA256:{digest}")
    else:
        report.add(name, OK, text, fingerprint=f"SHA256:{digest}")


def add_site_check_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``fedllm site check``; sets ``func`` to :func:`cmd_site_check`."""
    defaults = RunConfig()
    parser.add_argument("file", help="the site file, e.g. sites/cardiology.toml")
    parser.add_argument("--model", default=defaults.model.name,
                        help=f"whose tokenizer counts the tokens (model.name; default {defaults.model.name})")
    parser.add_argument("--max-length", type=int, default=defaults.data.max_length,
                        help=f"the run's data.max-length (default {defaults.data.max_length})")
    parser.add_argument("--data-format", default=defaults.data.format, choices=("auto", "instruction", "chat", "sharegpt", "text"),
                        help=f"the run's data.format (default {defaults.data.format})")
    parser.add_argument("--sample", type=int, default=DEFAULT_SAMPLE,
                        help=f"records whose tokens are counted, evenly spaced (default {DEFAULT_SAMPLE}; 0: none)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_site_check(args: argparse.Namespace) -> int:
    """Exit 0: every check passed (warnings allowed); 1: a check failed. A bad site file or bad data
    raises (``ConfigError``, ``DataError``): the CLI exits 2."""
    if args.max_length < 8:
        raise ConfigError(f"--max-length {args.max_length}: must be >= 8 (like data.max-length)")
    if args.sample < 0:
        raise ConfigError(f"--sample {args.sample}: must be >= 0")
    site_file = load_site_file(args.file)
    report = check_site(site_file, model=args.model, max_length=args.max_length, data_format=args.data_format,
                        sample=args.sample)
    if args.json:
        print(json.dumps(report.to_dict(), allow_nan=False), flush=True)
    else:
        for line in report.lines():
            print(line, flush=True)
    return 0 if report.ok else 1
