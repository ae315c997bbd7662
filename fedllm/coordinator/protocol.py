"""The small protocol between the round loop and whatever carries its messages and aggregates.

The round loop (``rounds.py``) speaks only these plain types; ``fedllm.flower`` implements them on
Flower (``flower/grid.py``: the Federation over a Flower ``Grid``; ``flower/strategies.py``: the
Strategy over Flower's own strategies and DP wrappers), and unit tests implement them with plain
Python objects. Nothing here imports Flower.

* :class:`Task`: what one site is asked to do in a round (``"train"`` or ``"evaluate"``), with
  the global adapter (``Arrays``: tensor name → numpy array, in the adapter's key order) and a
  config of scalars (``wire.SERVER_ROUND``, ``wire.RUN_ID``, ``wire.PROXIMAL_MU``, ...).
* :class:`Reply`: what came back from one node, unvalidated: the site's claimed name, its arrays
  and metrics, or an error (code and reason; ``wire.BUDGET_REFUSED`` is a privacy-budget
  refusal). ``screening.triage_replies`` decides what is accepted.
* :class:`Federation`: the connected nodes, and send-and-wait. A task that gets no reply within
  the timeout comes back as an error reply charged to the node it was sent to, so every task
  has exactly one reply.
* :class:`Strategy`: sampling (which nodes get a task), aggregation of accepted train replies
  into the next global adapter, the central-DP numbers of the last round, and the state carried
  from round to round (saved by ``checkpoint.py`` for ``--resume``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedllm.config import RunConfig

Arrays = dict[str, np.ndarray]  # an adapter's tensors by PEFT key name, in the adapter's key order
TASK_KINDS = ("train", "evaluate")


@dataclass
class Task:
    """One node's work in a round. Tasks of one round share the same ``arrays`` object."""

    node_id: int
    kind: str  # "train" or "evaluate"
    arrays: Arrays
    config: dict[str, Any] = field(default_factory=dict)  # bool/int/float/str values


@dataclass
class Reply:
    """One node's answer to a task, as received (not yet validated).

    ``site`` is the name the reply claims, exactly as sent (None: it sent none; "" when the name
    could not be read at all); ``malformed`` says why the reply does not hold what a site sends,
    as the transport sees it (unexpected or missing records, wrong record types), else None. An
    error reply has ``error_code`` set (``wire.BUDGET_REFUSED``: the site refused for its privacy
    budget) and no arrays or metrics."""

    node_id: int
    site: str | None = None
    arrays: Arrays | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error_code: int | None = None
    error_reason: str = ""
    malformed: str | None = None

    @property
    def has_error(self) -> bool:
        return self.error_code is not None


class Federation(Protocol):
    """The connected sites and the transport to them."""

    def node_ids(self) -> list[int]:
        """The nodes connected now."""
        ...

    def send_and_receive(self, tasks: Sequence[Task], *, timeout: float) -> list[Reply]:
        """Send the tasks and wait at most ``timeout`` seconds; one reply per task, a missing one
        replaced by an error reply charged to the task's node."""
        ...


class Strategy(Protocol):
    """What the round loop needs from aggregation (see the module docstring)."""

    label: str  # the strategy's classes, e.g. "FedAdam" or "SiteLevelFixedClipping(FedProx)"

    def configure_train(self, server_round: int, arrays: Arrays, config: dict[str, Any],
                        federation: Federation) -> list[Task]:
        """Sample the nodes that train this round; one task each (``arrays``: the global adapter)."""
        ...

    def configure_evaluate(self, server_round: int, arrays: Arrays, federation: Federation) -> list[Task]:
        """Sample the nodes that evaluate ``arrays`` on their held-out data; one task each."""
        ...

    def aggregate_train(self, server_round: int, replies: list[Reply]) -> Arrays | None:
        """The next global adapter from the accepted train replies (None: nothing released). A
        central-DP strategy divides by the sites its last ``configure_train`` asked, and releases
        (noise on the global adapter) even for an empty ``replies``."""
        ...

    def central_dp_round(self, *, released: bool) -> tuple[float, int]:
        """Central DP only: (S_t, m_t), the clipping norm the last round's updates were clipped to
        and m_t, the number of sites the round asked (the fixed denominator: missing updates count
        as zero); when nothing was released, the current norm and 0."""
        ...

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The state carried from round to round: a JSON-serialisable description with ``"class"``
        (= ``label``), and named tensors. ``ValueError`` for a state that cannot be saved."""
        ...

    def restore(self, description: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        """Put a saved ``state()`` back into this freshly built strategy. ``ValueError`` saying why
        it does not fit (other classes, other hyperparameters, missing tensors) and what to do."""
        ...


class StrategyFactory(Protocol):
    """Builds the run's strategy; ``sites_per_round`` (m) is given when central DP is on."""

    def __call__(self, config: RunConfig, *, sites_per_round: int | None) -> Strategy: ...
