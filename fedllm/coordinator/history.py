"""The run's history: per round, per site, what was trained, refused, rejected and evaluated.

Written to ``history.json`` in the run's output folder after every round (atomically), so a run
that stops half-way still leaves a readable record, and a resumed run (``RunHistory.load``) goes
on in the same file. Pure: stdlib only.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedllm import wire
from fedllm.errors import ConfigError
from fedllm.files import write_json_atomic


def _weighted(sites: Mapping[str, Mapping[str, float]], key: str, weight: str) -> float | None:
    pairs = [(m[key], m[weight]) for m in sites.values() if m.get(key, -1) >= 0 and m.get(weight, 0) > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


class RunHistory:
    """Accumulates rounds and saves them; ``data`` is exactly what ``history.json`` holds."""

    def __init__(self, path: Path, *, run_id: str, num_rounds: int) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {
            "run-id": run_id,
            "status": "running",
            "num-server-rounds": num_rounds,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "central-dp": {"enabled": False},
            "rounds": [],
        }

    @classmethod
    def load(cls, path: Path, *, keep_rounds: int, run_id: str) -> RunHistory:
        """Reopen ``history.json`` to resume a run after round ``keep_rounds``.

        Keeps the rounds numbered <= ``keep_rounds`` (round 0, the initial evaluation, included)
        and drops later ones (a round the coordinator recorded but did not checkpoint is run
        again), sets ``"status"`` back to ``"running"``, drops how the previous run ended
        (``"finished"``, ``"error"``, ``"stopped-early"``), and appends
        ``{"run-id": run_id, "from-round": keep_rounds + 1, "at": <UTC time>}`` to ``"resumed"``.
        The original ``"run-id"`` and ``"started"`` stay. Nothing is written until ``save``.
        A missing or unreadable file raises ``ConfigError``.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the run history ({exc}); cannot resume") from None
        if not isinstance(data, dict) or not isinstance(data.get("rounds"), list) or not all(
                isinstance(r, dict) and isinstance(r.get("round"), int) for r in data["rounds"]):
            raise ConfigError(f"{path}: not a fedllm run history (no list of numbered rounds); cannot resume")
        if keep_rounds < 0:
            raise ValueError(f"keep_rounds must be >= 0, not {keep_rounds}")
        history = cls.__new__(cls)
        history.path = path
        data["rounds"] = [r for r in data["rounds"] if r["round"] <= keep_rounds]
        data["status"] = "running"
        for key in ("finished", "error", "stopped-early"):
            data.pop(key, None)
        if not isinstance(data.setdefault("resumed", []), list):
            raise ConfigError(f"{path}: \"resumed\" is not a list; cannot resume")
        data["resumed"].append(
            {"run-id": run_id, "from-round": keep_rounds + 1, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        history.data = data
        return history

    def _round(self, server_round: int) -> dict[str, Any]:
        for entry in self.data["rounds"]:
            if entry["round"] == server_round:
                return entry
        entry = {"round": server_round}
        self.data["rounds"].append(entry)
        return entry

    def record_train(self, server_round: int, *, sites: dict[str, dict], refused: dict[str, str],
                     rejected: dict[str, str], failed: list[dict], seconds: float) -> dict[str, Any]:
        """One round's training replies and their aggregate (returned)."""
        epsilons = [m[wire.EPSILON] for m in sites.values() if m.get(wire.EPSILON, -1) >= 0]
        aggregate = {
            "sites-trained": len(sites),
            wire.NUM_EXAMPLES: sum(int(m[wire.NUM_EXAMPLES]) for m in sites.values()),
            wire.TRAIN_LOSS: _weighted(sites, wire.TRAIN_LOSS, wire.NUM_EXAMPLES),
            wire.TOKENS: sum(int(m[wire.TOKENS]) for m in sites.values() if m[wire.TOKENS] >= 0),  # -1: not released
            "max-epsilon": max(epsilons) if epsilons else None,
        }
        self._round(server_round)["train"] = {
            "sites": sites, "refused": refused, "rejected": rejected, "failed": failed, "aggregate": aggregate,
        }
        self._round(server_round)["train-seconds"] = seconds
        return aggregate

    def record_evaluate(self, server_round: int, *, sites: dict[str, dict], failed: list[dict],
                        rejected: dict[str, str] | None = None) -> dict[str, Any]:
        """One round's held-out evaluation per site and aggregated (loss token-weighted, task metrics
        weighted by the records each site scored, ``task-examples``); ``rejected``:
        site → reason for evaluate replies that failed validation (``screening.triage_replies``)."""
        # token-weighted where every site released its token count; else (release-metrics = "dp") by examples
        by_tokens = all(m.get(wire.EVAL_TOKENS, -1) >= 0 for m in sites.values() if m.get(wire.EVAL_LOSS, -1) >= 0)
        loss = _weighted(sites, wire.EVAL_LOSS, wire.EVAL_TOKENS if by_tokens else wire.NUM_EXAMPLES)
        aggregate = {wire.EVAL_LOSS: loss, wire.PERPLEXITY: math.exp(loss) if loss is not None else None,
                     wire.NUM_EXAMPLES: sum(int(m[wire.NUM_EXAMPLES]) for m in sites.values())}
        for key in wire.TASK_METRIC_KEYS:  # task metrics: weighted by the records each site scored
            if any(key in m for m in sites.values()):
                aggregate[key] = _weighted(sites, key, wire.TASK_EXAMPLES)
        self._round(server_round)["evaluate"] = {"sites": sites, "rejected": dict(rejected or {}), "failed": failed,
                                                 "aggregate": aggregate}
        return aggregate

    def set_central_dp(self, block: Mapping[str, Any]) -> None:
        """The run's site-level guarantee (top-level ``"central-dp"``), replaced as rounds complete:
        ``enabled``, ``clipping``, ``noise-multiplier``, ``clipping-norm`` (initial),
        ``sites-per-round``, ``total-sites``, ``rounds`` (noisy aggregates released), ``sampling``,
        ``epsilon``, ``delta``, ``accountant``. ``{"enabled": false}`` when central DP is off."""
        self.data["central-dp"] = dict(block)

    def record_central_dp(self, server_round: int, *, clipping_norm: float, epsilon: float, sites: int,
                          cumulative_epsilon: float | None = None) -> None:
        """One round's central DP: the clipping norm S_t its updates were clipped to, the
        site-level ε of this run so far, m_t, the number of sites asked (the fixed denominator; 0:
        nothing released), and the cumulative site-level ε of the coordinator's ledger (every
        run that used it), when the run keeps one."""
        entry: dict[str, Any] = {"clipping-norm": clipping_norm, "epsilon": epsilon, "sites": sites}
        if cumulative_epsilon is not None:
            entry["cumulative-epsilon"] = cumulative_epsilon
        self._round(server_round)["central-dp"] = entry

    def finish(self, status: str, error: str = "") -> None:
        self.data["status"] = status
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if error:
            self.data["error"] = error
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)
