"""Differential privacy at a site: pure accounting maths and the persisted per-site ledger.

* ``accounting``: record-level ε and σ of DP-SGD (:class:`DPEvent`, :func:`epsilon_for`,
  :func:`noise_multiplier_for`); ``site_level``: the site-level ε of central DP;
  ``pld_crosscheck``: the same ε under an independent implementation (never used for caps).
* ``ledger``: :class:`PrivacyLedger`, a site's releases on disk; ``ledger_file``: its JSON
  format; ``ledger_chain``: entries, hash chain and signatures; ``ledger_verification``: the
  checks (``fedllm ledger verify``); ``signing``: the site's Ed25519 key.

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
