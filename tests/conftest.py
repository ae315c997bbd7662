"""Fixtures shared by the unit and integration tests."""

from __future__ import annotations

import itertools

import pytest


@pytest.fixture
def seeded_randomness(monkeypatch):
    """Every draw fedllm makes from OS entropy (Poisson sampling, DP noise, the canary audit's canaries,
    inclusion vector, controls and membership sample, the server's central-DP noise, a new site's
    split key) taken from fixed seeds instead, so a test whose assertion is a statistical decision
    (the audit's alarms at α = 0.001, a noise mean within 4 standard errors) gives the same answer on
    every run. The
    mechanism is unchanged: only where its randomness comes from."""
    import numpy as np
    import torch

    from fedllm.audit import canaries
    from fedllm.flower import strategies as strategy
    from fedllm.site import holdout
    from fedllm.site import training as train

    seeds = itertools.count(1)
    monkeypatch.setattr(canaries, "os_entropy_rng", lambda: np.random.default_rng(next(seeds)))
    monkeypatch.setattr(train, "fresh_generator", lambda device="cpu": torch.Generator(device=device).manual_seed(next(seeds)))
    monkeypatch.setattr(strategy, "os_entropy_seed", lambda: next(seeds))
    monkeypatch.setattr(holdout, "fresh_split_key", lambda: bytes(range(32)))  # the same held-out split


@pytest.fixture
def flower_task_identity():
    """Flower messages built outside a Flower process need a run id (Flower sets it at run time); used by the unit and security tests."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 0
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None
