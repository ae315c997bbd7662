"""Shared unit-test fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def flower_task_identity():
    """Flower messages built outside a Flower process need a run id (Flower sets it at run time)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 0
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None
