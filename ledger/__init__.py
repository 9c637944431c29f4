"""yolo-tokens ledger: token packages with atomic, durable quota.

Public API (the gateway, the CLI, the console use only these names, from here):
    the typed API: LedgerApi, its operations as records (`ops`: ops.Split, ops.Tokens, ...)
        and results (Issued, Returned, KeyRotation, SweepReport,
        Consistency, UsageEvent, AdminEvent, AlertRecord);
    values: Admission, Decision, Settlement, TokenSpec, TokenView, Code, Claims, Verifier;
    settings: LedgerSettings, ClientSettings; reports: cost_report, usage_csv, iso_utc;
    the exception tree of `ledger.core.errors`;
    over Ray (imported on first use): launch, attach, stop, LedgerClient, connect;
    without Ray: InProcessLedger, FakeLedger, HttpLedger (the CLI over HTTP) and its AdminFile;
    serving: LeaseHolder (an ingress replica's quota leases), Capability (DESIGN §3d), `wire`.
Pure parts (the quota book, limits, credentials, the shard core) import no Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ledger.client.holder import HolderConfig, LeaseHolder
from ledger.client.over_http import CLI_ADMIN_REFRESH_S, CLI_ADMIN_TTL_S, AdminFile, HttpLedger
from ledger.core import ops, wire
from ledger.core.api import LedgerApi
from ledger.core.capability import Capability
from ledger.core.codes import Code
from ledger.core.columns import IDEMPOTENCY_KEY as MAX_IDEMPOTENCY_KEY
from ledger.core.credentials import Claims, Verifier
from ledger.core.entities import Admission, Decision, Settlement, TokenSpec, TokenView
from ledger.core.errors import ConfigError, CredentialError, LedgerError, LedgerUnavailable, OperationRefused
from ledger.core.reports import cost_report, inherited, iso_utc
from ledger.core.results import (
    AdminEvent,
    AlertRecord,
    Consistency,
    Issued,
    KeyRotation,
    Returned,
    SweepReport,
    UsageEvent,
)
from ledger.core.service import SERVICE_CLASSES, Service, ServiceClass, default_service
from ledger.core.settings import ClientSettings, LedgerSettings

if TYPE_CHECKING:
    from ledger.cli import connect
    from ledger.client.fake import FakeLedger
    from ledger.client.inprocess import InProcessLedger
    from ledger.client.over_ray import LedgerClient
    from ledger.client.service import attach, launch, stop
    from ledger.store.repository import usage_csv

# names whose modules import Ray (or start a database): imported when first asked for
_LAZY = {
    "attach": "ledger.client.service",
    "launch": "ledger.client.service",
    "stop": "ledger.client.service",
    "LedgerClient": "ledger.client.over_ray",
    "connect": "ledger.cli",
    "InProcessLedger": "ledger.client.inprocess",
    "FakeLedger": "ledger.client.fake",
    "usage_csv": "ledger.store.repository",  # SQLAlchemy and Alembic: a second of imports
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ledger' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "CLI_ADMIN_REFRESH_S",
    "CLI_ADMIN_TTL_S",
    "MAX_IDEMPOTENCY_KEY",
    "SERVICE_CLASSES",
    "AdminEvent",
    "AdminFile",
    "Admission",
    "AlertRecord",
    "Capability",
    "Claims",
    "ClientSettings",
    "Code",
    "ConfigError",
    "Consistency",
    "CredentialError",
    "Decision",
    "FakeLedger",
    "HolderConfig",
    "HttpLedger",
    "InProcessLedger",
    "Issued",
    "KeyRotation",
    "LeaseHolder",
    "LedgerApi",
    "LedgerClient",
    "LedgerError",
    "LedgerSettings",
    "LedgerUnavailable",
    "OperationRefused",
    "Returned",
    "Service",
    "ServiceClass",
    "Settlement",
    "SweepReport",
    "TokenSpec",
    "TokenView",
    "UsageEvent",
    "Verifier",
    "attach",
    "connect",
    "cost_report",
    "default_service",
    "inherited",
    "iso_utc",
    "launch",
    "ops",
    "stop",
    "usage_csv",
    "wire",
]
