"""One site's side of a round, without Flower: check the budget, train, record the spend, evaluate.

A ``SiteRuntime`` holds one site's tokenized train/held-out data and its privacy ledger. The base
model with its LoRA adapter is loaded once per process (``fedllm.model.lora.shared_model``) and reused by
every site and round that process serves; only adapter tensors are swapped in and out. With
``train.fast-path`` (default) the model runs the fast path (``fedllm.fastpath.enable``: faster
layers with the same values, and the attention kernel for the site's device); off, the plain
reference.

Order of a training round (``train_round``):
0. the site's privacy policy (``fedllm.site.policy``): a run asking for a larger δ than the site's,
   DP off while the site requires it, or a cap the site cannot honour is refused
   (``SitePolicyError``) before the ledger is written or any training step is taken; every ε the
   site checks, records and reports is at its own δ, and its cap is its own ``max-epsilon``
   (tightened by the run's ``privacy.max-epsilon`` when smaller). The records are read once at
   start-up, before any round: the automatic δ depends on the number of training records;
1. noise multiplier: given (``privacy.noise-multiplier``) or calibrated once per run so that the
   site's whole planned run (all remaining rounds) lands on min(target ε, the site's cap);
2. budget check against the ledger: a round that would cross the cap raises
   ``BudgetExceededError`` before any training;
3. local DP-SGD steps;
4. the release is written to the ledger (atomically), and only then is the update returned (and
   kept in the site's release cache).

What leaves besides the update is the site's ``release-metrics`` (``fedllm.site.metric_release``):
under "dp" (default) no exact data-dependent train metric, and a held-out loss released with the
Gaussian mechanism and recorded in the ledger like a round; evaluation is answered at most once per
server round of a run.

A round asked again with the same run, round and global adapter (the coordinator died before the
round completed and resumed, ``fedllm run --resume``) re-sends the cached update instead of
training again: it was already released and recorded, so re-sending it costs no privacy.

The held-out split is the site's own (``fedllm.site.holdout``: a keyed hash of each record with the
split key kept beside the ledger, the site's ``eval-fraction`` and ``max-eval-examples``); no run
key moves a record. The ledger is bound to the site's training subset: its fingerprint
(``fedllm.data.fingerprint``) is computed once, and a ledger written for other data or under
another split makes the site refuse to train (``LedgerError``, naming what differs), as does a
ledger whose hash chain is broken. A site with a ``signing-key`` signs every entry it records.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedllm import fastpath, wire
from fedllm.config import RunConfig, SiteConfig
from fedllm.data.fingerprint import dataset_fingerprint
from fedllm.data.formatting import TokenizedExample, tokenize_records
from fedllm.data.loading import Record, load_records
from fedllm.errors import BudgetExceededError
from fedllm.model.loading import is_quantized
from fedllm.model.lora import get_adapter_state, set_adapter_state, shared_model
from fedllm.privacy.accounting import noise_multiplier_for
from fedllm.privacy.ledger import PrivacyLedger
from fedllm.privacy.signing import load_private_key
from fedllm.site import metric_release
from fedllm.site.holdout import policy_for, site_split_key, split_records
from fedllm.site.policy import SitePolicy
from fedllm.site.resend_store import ReleaseCache, adapter_digest
from fedllm.site.training import DPSettings, StepInfo, evaluate_loss, train_local

if TYPE_CHECKING:
    from fedllm.evaluation.task import TaskScores

log = logging.getLogger(__name__)

def load_site_examples(config: RunConfig, site: SiteConfig, tokenizer: Any, *, split_key: bytes,
                       records: list[Record] | None = None,
                       ) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """A site's (train, held-out) tokenized examples, split by the site's own held-out policy and
    ``split_key`` (``fedllm.site.holdout``); bad data raises ``DataError``."""
    if records is None:
        records = load_records(site.data_path, format=config.data.format, columns=site.data_columns)
    examples = tokenize_records(records, tokenizer, max_length=config.data.max_length, source=site.data_path)
    split = split_records(records, key=split_key, eval_fraction=site.eval_fraction, max_eval=site.max_eval_examples)
    return [examples[i] for i in split.train], [examples[i] for i in split.held_out]


def training_fingerprint(site: SiteConfig, records: list[Record], split_key: bytes) -> str:
    """The fingerprint of the records the site trains on (what its ledger is bound to)."""
    split = split_records(records, key=split_key, eval_fraction=site.eval_fraction, max_eval=site.max_eval_examples)
    return dataset_fingerprint([records[i] for i in split.train])


@dataclass
class RoundOutcome:
    """A trained round: the adapter to send and the agreed numeric metrics."""

    adapter: dict[str, torch.Tensor]
    metrics: dict[str, float | int]


class SiteRuntime:
    """One site in this process: its data, ledger and cached noise calibration."""

    def __init__(self, config: RunConfig, site: SiteConfig, *, ledger_path: Path, simulated: bool = True) -> None:
        self.config, self.site = config, site
        self.model, self.tokenizer = shared_model(config, device=site.device)
        if not is_quantized(self.model):  # a quantized base was loaded onto its device
            self.model.to(site.device)
        if config.train.fast_path:  # the attention kernel for this device and sequence length, with the fast layers
            fastpath.enable(self.model, device=site.device, max_length=config.data.max_length)
        records = load_records(site.data_path, format=config.data.format, columns=site.data_columns)
        split_key = site_split_key(ledger_path, site.name)  # the site's own; beside its ledger
        self.holdout_policy = policy_for(site, split_key)
        self.dataset_fingerprint = training_fingerprint(site, records, split_key)
        self.train_examples, self.eval_examples = load_site_examples(config, site, self.tokenizer, records=records,
                                                                     split_key=split_key)
        self.ledger_path = ledger_path
        self.release_cache = ReleaseCache(ledger_path.parent, site=site.name)  # the last update sent, kept at the site
        self.evaluations = metric_release.EvaluationLog(ledger_path.parent, site=site.name)  # once per round
        self.signing_key = load_private_key(site.signing_key) if site.signing_key else None
        self.open_ledger().require_writable()  # refuse now, before any round: other data, broken chain, wrong key
        # the site's own privacy policy (cap, δ, require-dp); its automatic δ needs the number of training records
        self.policy = SitePolicy.of(site, num_examples=len(self.train_examples))
        self.cap = self.policy.cap(config.privacy)
        self._sigma: dict[str, float] = {}
        if config.train.threads or simulated:  # a real site uses all its cores unless train.threads says otherwise
            torch.set_num_threads(max(1, config.train.threads or config.simulation.client_cpus))

    @property
    def name(self) -> str:
        return self.site.name

    def open_ledger(self) -> PrivacyLedger:
        """This site's ledger, checked: bound to this site's data, chain intact, signed by this site's key."""
        return PrivacyLedger.open(self.ledger_path, site=self.name, dataset_fingerprint=self.dataset_fingerprint,
                                  signing_key=self.signing_key, held_out_split=self.holdout_policy.to_json())

    def noise_multiplier(self, ledger: PrivacyLedger, *, run_id: str, server_round: int, sample_rate: float) -> float:
        """σ for this run: given, reused from this run's ledger entries, or calibrated."""
        p = self.config.privacy
        if p.noise_multiplier > 0:
            return p.noise_multiplier
        for entry in ledger.entries:
            if entry.run_id == run_id and entry.noise_multiplier > 0 and entry.release == "update":
                return entry.noise_multiplier
        if run_id not in self._sigma:
            remaining = (self.config.num_server_rounds - server_round + 1) * self.config.train.local_steps
            target = min(p.target_epsilon, self.cap)
            self._sigma[run_id] = noise_multiplier_for(
                target_epsilon=target, target_delta=self.policy.calibration_delta(p), sample_rate=sample_rate,
                steps=remaining, accountant=p.accountant, spent=ledger.events())
        return self._sigma[run_id]

    def train_round(self, *, run_id: str, server_round: int, adapter: dict[str, torch.Tensor],
                    proximal_mu: float = 0.0) -> RoundOutcome:
        """Policy check, budget check, local training, ledger record; raises ``SitePolicyError`` (a run outside
        the site's policy) or ``BudgetExceededError`` (the round would cross the site's cap) to refuse."""
        cfg, p = self.config, self.config.privacy
        self.policy.check_run(p)  # before the ledger is touched and before any training step
        delta = self.policy.delta  # every ε this site checks, records and reports is at its own δ
        ledger = self.open_ledger()
        prefix = f"[round {server_round}/{cfg.num_server_rounds}] site {self.name}"
        digest = adapter_digest(adapter)
        cached = self.release_cache.lookup(run_id=run_id, server_round=server_round, input_digest=digest)
        if cached is not None and len(ledger.entries) >= cached.ledger_entries and any(
                e.run_id == run_id and e.server_round == server_round and e.release == "update"
                for e in ledger.entries):
            log.info("%s | re-sending the update this site already released for this round and global adapter "
                     "(recorded in its ledger; no new privacy spend)", prefix)
            return RoundOutcome(adapter=cached.adapter, metrics=cached.metrics)
        steps = cfg.train.local_steps
        sample_rate = min(1.0, cfg.train.batch_size / len(self.train_examples))
        dp = None
        spent = ledger.epsilon(target_delta=delta, accountant=p.accountant)
        if p.enabled:
            try:
                sigma = self.noise_multiplier(ledger, run_id=run_id, server_round=server_round, sample_rate=sample_rate)
            except BudgetExceededError as exc:
                raise BudgetExceededError(f"Site '{self.name}': {exc}") from None
            after = ledger.check(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps,
                                 target_delta=delta, max_epsilon=self.cap, accountant=p.accountant)
            dp = DPSettings(noise_multiplier=sigma, max_grad_norm=p.max_grad_norm)
        else:
            sigma, after = 0.0, math.inf
        set_adapter_state(self.model, adapter)
        eps_text = f"ε {spent:.2f}→{after:.2f} (cap {self.cap:g})" if dp else "no DP"

        def show(info: StepInfo) -> None:
            loss = "   -  " if math.isnan(info.loss) else f"{info.loss:.3f}"
            log.info("%s | step %d/%d | batch %d | loss %s | %s", prefix, info.step, info.steps, info.batch_size, loss, eps_text)

        result = train_local(self.model, self.train_examples, steps=steps, batch_size=cfg.train.batch_size,
                             learning_rate=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
                             optimizer=cfg.train.optimizer, physical_batch_size=cfg.train.physical_batch_size,
                             pass_tokens=cfg.train.pass_tokens,
                             gradient_checkpointing=cfg.train.gradient_checkpointing,
                             pad_id=self.tokenizer.pad_token_id, dp=dp, proximal_mu=proximal_mu,
                             device=self.site.device, on_step=show, fast_path=cfg.train.fast_path)
        entry = ledger.record(run_id=run_id, server_round=server_round, steps=steps, sample_rate=sample_rate,
                              noise_multiplier=sigma, max_grad_norm=p.max_grad_norm, target_delta=delta,
                              num_examples=len(self.train_examples), accountant=p.accountant,
                              site_max_delta=delta, site_max_epsilon=self.policy.max_epsilon)
        log.info("%s | trained %d steps in %.1fs | loss %.3f | ε spent %.3f (δ=%g)", prefix, steps,
                 result.seconds, result.train_loss, entry.epsilon, delta)
        outcome = RoundOutcome(
            adapter=get_adapter_state(self.model, trainable_only=True),
            metrics=metric_release.train_metrics(self.site.release_metrics, {  # what leaves: the site's setting
                wire.NUM_EXAMPLES: len(self.train_examples),
                wire.TRAIN_LOSS: _finite(result.train_loss),
                wire.LOCAL_STEPS: steps,
                wire.EXAMPLES_SEEN: result.examples_seen,
                wire.TOKENS: result.tokens,
                wire.TRAIN_SECONDS: result.seconds,
                wire.EPSILON: _finite(entry.epsilon),
                wire.DELTA: delta,
                wire.EPSILON_CAP: self.cap,
                wire.NOISE_MULTIPLIER: sigma,
                wire.SAMPLE_RATE: sample_rate,
                wire.MAX_GRAD_NORM: p.max_grad_norm,
            }),
        )
        # only after the spend is recorded: a re-sent update must never be one whose spend is not in the ledger
        self.release_cache.store(run_id=run_id, server_round=server_round, input_digest=digest,
                                 adapter=outcome.adapter, metrics=outcome.metrics, ledger_entries=len(ledger.entries))
        return outcome

    def evaluate(self, adapter: dict[str, torch.Tensor], *, run_id: str, server_round: int) -> dict[str, float | int]:
        """Held-out loss and perplexity of ``adapter`` as the site's ``release-metrics`` allows
        (``fedllm.site.metric_release``), at most once per (run, server round): asked again with the
        same adapter, the answer already sent; with another, ``BudgetExceededError``. Under "dp" the
        release is recorded in the ledger before it leaves, and refused past the site's cap."""
        self.policy.check_run(self.config.privacy)  # a run outside the site's policy gets no answer at all
        mode, digest = self.site.release_metrics, adapter_digest(adapter)
        answered = self.evaluations.lookup(run_id=run_id, server_round=server_round)
        if answered is not None:
            if answered.input_digest != digest:
                raise metric_release.refuse_second_evaluation(self.name, run_id=run_id, server_round=server_round)
            log.info("[round %d] site %s | re-sending the evaluation already answered for this round (no new spend)",
                     server_round, self.name)
            return answered.metrics
        tasks = self.config.evaluate.metric_names  # the run's task metrics on the held-out records
        if mode == "none":
            metrics = metric_release.no_evaluate_metrics(tasks)
        else:
            ledger = self.open_ledger()
            if metric_release.metric_release_recorded(ledger, run_id=run_id, server_round=server_round):
                raise metric_release.refuse_second_evaluation(self.name, run_id=run_id, server_round=server_round)
            p, s = self.config.privacy, self.site
            if mode == "dp":  # refused before evaluating when the release would cross the cap
                metric_release.check_metric_release(
                    ledger, run_id=run_id, server_round=server_round, noise_multiplier=s.metric_noise_multiplier,
                    target_delta=self.policy.delta, max_epsilon=self.cap, accountant=p.accountant)
            set_adapter_state(self.model, adapter)
            res = evaluate_loss(self.model, self.eval_examples, batch_size=self.config.train.eval_batch_size,
                                pad_id=self.tokenizer.pad_token_id, device=self.site.device,
                                fast_path=self.config.train.fast_path)
            scores = self.score_tasks() if tasks else None
            if mode == "exact":
                means = scores.means() if scores is not None else {}
                metrics = metric_release.exact_evaluate_metrics(
                    num_examples=res.num_examples, loss=res.loss, perplexity=res.perplexity, tokens=res.tokens,
                    task={name: means.get(name, metric_release.NOT_RELEASED) for name in tasks},
                    task_examples=scores.num_scored if scores is not None else 0)
            else:
                release = metric_release.release_held_out_loss(
                    res.record_losses, noise_multiplier=s.metric_noise_multiplier, loss_bound=s.metric_loss_bound,
                    rng=metric_release.os_entropy_rng(),
                    task_scores=scores.per_record if scores is not None else None,
                    max_scored=self.config.evaluate.max_examples)
                metric_release.record_metric_release(  # recorded before the answer leaves
                    ledger, run_id=run_id, server_round=server_round, noise_multiplier=s.metric_noise_multiplier,
                    loss_bound=s.metric_loss_bound, num_examples=res.num_examples, target_delta=self.policy.delta,
                    max_epsilon=self.cap, accountant=p.accountant, site_max_epsilon=self.policy.max_epsilon)
                metrics = metric_release.dp_evaluate_metrics(release)
        self.evaluations.store(run_id=run_id, server_round=server_round, input_digest=digest, metrics=metrics)
        return metrics

    def score_tasks(self) -> TaskScores:
        """The run's task metrics (``[evaluate]``) of the model as it is now, per scored held-out record."""
        from fedllm.evaluation.task import score_task

        scores = score_task(self.model, self.tokenizer, self.eval_examples, self.config.evaluate,
                            device=self.site.device)
        log.info("site %s | task metrics on %d held-out records in %.1fs", self.name, scores.num_scored,
                 scores.seconds)
        return scores


def _finite(value: float) -> float:
    """Metrics must be finite numbers on the wire: inf/nan become -1 (documented: 'not defined')."""
    return float(value) if math.isfinite(value) else -1.0
