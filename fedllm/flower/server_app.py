"""Flower ServerApp: glue between Flower's ``Grid``/``Context`` and the round loop
(``fedllm.coordinator.rounds``), which sees the Grid as a ``Federation`` (``flower/grid.py``) and
builds Flower's strategies through ``flower/coordinator_strategy.py``."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedllm.config import RunConfig
from fedllm.coordinator.rounds import run_federation
from fedllm.errors import ConfigError
from fedllm.flower.coordinator_strategy import make_strategy
from fedllm.flower.grid import FlowerFederation
from fedllm.logs import configure_app_logging

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_app_logging()
    config = RunConfig.from_flat(context.run_config)
    if not config.output_dir:
        raise ConfigError("output-dir is not set: run through `fedllm simulate`, or pass "
                          "--run-config \"output-dir='/abs/path'\" to flwr run")
    run_federation(FlowerFederation(grid), make_strategy, config, run_id=str(context.run_id))
