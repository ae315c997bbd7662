"""Fixtures of the hostile-coordinator suite (the unit suite's Flower task identity, reused)."""

from __future__ import annotations

from tests.unit.conftest import flower_task_identity  # noqa: F401  (a fixture, used by name)
