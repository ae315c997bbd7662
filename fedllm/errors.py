"""Errors fedllm raises on purpose. Each message says what is wrong and what to do."""

from __future__ import annotations


class FedLLMError(Exception):
    """Base class: a problem the user can fix. The CLI prints it and exits non-zero."""


class ConfigError(FedLLMError):
    """A configuration key, value or file is wrong."""


class DataError(FedLLMError):
    """A site's data file is missing or malformed (names file, record, field)."""


class ModelError(FedLLMError):
    """The base model cannot be loaded (not available offline, unsupported, ...)."""


class BudgetExceededError(FedLLMError):
    """A site's next release would cross its privacy budget cap."""


class LedgerError(FedLLMError):
    """A privacy ledger file is unreadable, corrupt or inconsistent."""


class InvalidUpdateError(FedLLMError):
    """An adapter update from a site has wrong keys, shapes, dtypes or values."""


class RunFailedError(FedLLMError):
    """A federated run failed (a site raised, the server raised, the engine stopped)."""
