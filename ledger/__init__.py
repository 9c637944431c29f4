"""yolo-tokens ledger: token packages with atomic, durable quota.

Public API (the gateway, CLI and console use only these names):
    LedgerClient, LedgerSettings, Admission, Decision, Settlement, TokenView, Code,
    Verifier, Claims, and the exception tree in `ledger.errors`.
Pure parts (`QuotaBook`, limits, credentials) import no Ray.
"""

from __future__ import annotations

from ledger.codes import Code
from ledger.credentials import Claims, Verifier
from ledger.entities import Admission, Decision, Settlement, TokenView
from ledger.errors import ConfigError, CredentialError, LedgerError, LedgerUnavailable, OperationRefused
from ledger.settings import LedgerSettings

__all__ = [
    "Admission",
    "Claims",
    "Code",
    "ConfigError",
    "CredentialError",
    "Decision",
    "LedgerError",
    "LedgerSettings",
    "LedgerUnavailable",
    "OperationRefused",
    "Settlement",
    "TokenView",
    "Verifier",
]
