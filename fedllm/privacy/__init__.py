"""Differential privacy at a site: pure accounting maths and the persisted per-site ledger.

Importing this package is cheap: Opacus (and torch) are imported only when an ε is computed.
"""

from fedllm.privacy.accounting import (
    ACCOUNTANTS,
    DPEvent,
    PrivacyParameterError,
    epsilon_for,
    max_steps_under_cap,
    noise_multiplier_for,
)
from fedllm.privacy.ledger import (
    LEDGER_FORMAT,
    LEDGER_VERSION,
    LedgerEntry,
    PrivacyLedger,
)

__all__ = [
    "ACCOUNTANTS",
    "LEDGER_FORMAT",
    "LEDGER_VERSION",
    "DPEvent",
    "LedgerEntry",
    "PrivacyLedger",
    "PrivacyParameterError",
    "epsilon_for",
    "max_steps_under_cap",
    "noise_multiplier_for",
]
