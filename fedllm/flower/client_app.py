"""Flower ClientApp: glue between Flower messages and ``SiteRuntime`` (one site's round)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TypeVar

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedllm import wire
from fedllm.config import RunConfig, SiteConfig
from fedllm.errors import BudgetExceededError
from fedllm.logs import configure_app_logging
from fedllm.site.policy import SitePolicyError
from fedllm.site.runtime import SiteRuntime

log = logging.getLogger(__name__)
app = ClientApp()
_SITES: dict[tuple, SiteRuntime] = {}
_Record = TypeVar("_Record", ArrayRecord, ConfigRecord)


def site_runtime(context: Context) -> SiteRuntime:
    """The cached runtime for the site this node serves in this run."""
    config = RunConfig.from_flat(context.run_config)
    simulated = "partition-id" in context.node_config
    if simulated:  # simulation: partition-id -> scenario site; ledgers under the run's ledger dir
        sites = json.loads(Path(config.simulation.sites_file).read_text(encoding="utf-8"))
        site = SiteConfig.from_dict(sites[int(context.node_config["partition-id"])])
        ledger_dir = Path(config.privacy.ledger_dir or Path(config.output_dir) / "ledgers")
        if config.privacy.signing_key_dir and not site.signing_key:  # each simulated site signs with DIR/<site>.key
            site = dataclasses.replace(site, signing_key=str(Path(config.privacy.signing_key_dir) / f"{site.name}.key"))
    else:  # a real site: its ledger location is its own, never the coordinator's
        site = SiteConfig.from_node_config(context.node_config)
        ledger_dir = Path.home() / ".local" / "share" / "fedllm" / "ledgers"
    key = (context.run_id, site.name)
    if key not in _SITES:
        configure_app_logging()
        ledger = Path(site.ledger_path) if site.ledger_path else ledger_dir / f"{site.name}.json"
        _SITES[key] = SiteRuntime(config, site, ledger_path=ledger, simulated=simulated)
    return _SITES[key]


def _reply(msg: Message, site: SiteRuntime, metrics: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({wire.METRICS: MetricRecord(metrics), wire.SITE: ConfigRecord({wire.SITE_NAME: site.name})})
    if arrays is not None:
        content[wire.ARRAYS] = arrays
    return Message(content, reply_to=msg)


def _announce(context: Context, server_round: int) -> None:
    """A real site says that a round's work arrived before it loads the model and data (each Flower
    message starts a fresh ClientApp process there: seconds). Simulated sites keep their model loaded."""
    if "partition-id" in context.node_config:
        return
    configure_app_logging()
    log.info("[round %d/%s] site %s | received the global adapter; loading the model and data", server_round,
             context.run_config.get("num-server-rounds", "?"), context.node_config.get("site-name", "?"))


def _record(msg: Message, name: str, kind: type[_Record]) -> _Record:
    """The message's record ``name``, which the coordinator sends as a ``kind``."""
    record = msg.content[name]
    if not isinstance(record, kind):
        raise TypeError(f"record {name!r} is a {type(record).__name__}, expected a {kind.__name__}")
    return record


def _scalar(value: object) -> int | float | str:
    """A config value the coordinator sends as a number or a string."""
    if not isinstance(value, (int, float, str)):
        raise TypeError(f"config value {value!r} is a {type(value).__name__}, expected a number or a string")
    return value


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = _record(msg, wire.CONFIG, ConfigRecord)
    _announce(context, int(_scalar(config[wire.SERVER_ROUND])))
    site = site_runtime(context)
    try:
        outcome = site.train_round(
            run_id=str(config.get(wire.RUN_ID, "") or context.run_id),  # stable across fedllm run --resume
            server_round=int(_scalar(config[wire.SERVER_ROUND])),
            adapter=_record(msg, wire.ARRAYS, ArrayRecord).to_torch_state_dict(),
            proximal_mu=float(_scalar(config.get(wire.PROXIMAL_MU, 0.0))),
        )
    except SitePolicyError as exc:  # the run is outside this site's privacy policy: nothing trained or recorded
        log.warning("%s", exc)
        return Message(Error(code=wire.POLICY_REFUSED, reason=str(exc)), reply_to=msg)
    except BudgetExceededError as exc:
        return Message(Error(code=wire.BUDGET_REFUSED, reason=str(exc)), reply_to=msg)
    return _reply(msg, site, outcome.metrics, ArrayRecord(outcome.adapter))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config = msg.content.get(wire.CONFIG)
    if not isinstance(config, ConfigRecord) or wire.SERVER_ROUND not in config:  # at most once per server round
        return Message(Error(code=wire.BUDGET_REFUSED, reason=(
            f"the evaluate message carries no {wire.SERVER_ROUND!r}: a site evaluates at most once per server round "
            "and refuses an evaluation it cannot place in one")), reply_to=msg)
    site = site_runtime(context)
    try:
        metrics = site.evaluate(_record(msg, wire.ARRAYS, ArrayRecord).to_torch_state_dict(),
                                run_id=str(config.get(wire.RUN_ID, "") or context.run_id),
                                server_round=int(_scalar(config[wire.SERVER_ROUND])))
    except SitePolicyError as exc:  # the run is outside this site's privacy policy: nothing evaluated or recorded
        log.warning("%s", exc)
        return Message(Error(code=wire.POLICY_REFUSED, reason=str(exc)), reply_to=msg)
    except BudgetExceededError as exc:  # over the cap, or a second evaluation in one round
        return Message(Error(code=wire.BUDGET_REFUSED, reason=str(exc)), reply_to=msg)
    return _reply(msg, site, metrics)
