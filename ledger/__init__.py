"""yolo-tokens ledger: token packages with atomic, durable quota.

Public API (the gateway, the CLI, the console use only these names, from here):
    the typed API: LedgerApi, its operations as records (`ops`: ops.Split, ops.Tokens, ...)
        and results (Issued, Returned, KeyRotation, SweepReport,
        Consistency, UsageEvent, AdminEvent, AlertRecord);
    values: Admission, Decision, Settlement, TokenSpec, TokenView, Code, Claims, Verifier;
    settings: LedgerSettings, ClientSettings; reports: cost_report, usage_csv, iso_utc;
    the exception tree of `ledger.errors`;
    over Ray (imported on first use): launch, attach, stop, LedgerClient, connect;
    without Ray: InProcessLedger, FakeLedger.
Pure parts (the quota book, limits, credentials, the shard core) import no Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ledger import ops
from ledger.api import LedgerApi
from ledger.codes import Code
from ledger.credentials import Claims, Verifier
from ledger.entities import Admission, Decision, Settlement, TokenSpec, TokenView
from ledger.errors import ConfigError, CredentialError, LedgerError, LedgerUnavailable, OperationRefused
from ledger.reports import cost_report, inherited, iso_utc
from ledger.results import (
    AdminEvent,
    AlertRecord,
    Consistency,
    Issued,
    KeyRotation,
    Returned,
    SweepReport,
    UsageEvent,
)
from ledger.settings import ClientSettings, LedgerSettings

if TYPE_CHECKING:
    from ledger.cli import connect
    from ledger.client import LedgerClient
    from ledger.fake import FakeLedger
    from ledger.inprocess import InProcessLedger
    from ledger.service import attach, launch, stop
    from ledger.store.repository import usage_csv

# names whose modules import Ray (or start a database): imported when first asked for
_LAZY = {
    "attach": "ledger.service",
    "launch": "ledger.service",
    "stop": "ledger.service",
    "LedgerClient": "ledger.client",
    "connect": "ledger.cli",
    "InProcessLedger": "ledger.inprocess",
    "FakeLedger": "ledger.fake",
    "usage_csv": "ledger.store.repository",  # SQLAlchemy and Alembic: a second of imports
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ledger' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "AdminEvent",
    "Admission",
    "AlertRecord",
    "Claims",
    "ClientSettings",
    "Code",
    "ConfigError",
    "Consistency",
    "CredentialError",
    "Decision",
    "FakeLedger",
    "InProcessLedger",
    "Issued",
    "KeyRotation",
    "LedgerApi",
    "LedgerClient",
    "LedgerError",
    "LedgerSettings",
    "LedgerUnavailable",
    "OperationRefused",
    "Returned",
    "Settlement",
    "SweepReport",
    "TokenSpec",
    "TokenView",
    "UsageEvent",
    "Verifier",
    "attach",
    "connect",
    "cost_report",
    "inherited",
    "iso_utc",
    "launch",
    "ops",
    "stop",
    "usage_csv",
]
