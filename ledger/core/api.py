"""The typed ledger API: ONE interface for every caller (gateway, CLI, console, tests).

    LedgerApi (this class: one typed method per operation, each a line that builds its record)
    ├── LedgerClient    over Ray (`ledger.client.over_ray`): to the shard that owns the package, to the
    │                   coordinator, or to every shard and merged, as the record's routing says
    ├── InProcessLedger the same cores in one process, no Ray (`ledger.client.inprocess`; FakeLedger)
    └── HttpLedger      an admin over the service's HTTP route (`ledger.client.over_http`; the CLI)

Each transport implements `call` (blocking) and `acall` (awaitable) for any `ledger.core.ops.Call`;
`acall(ops.Split(parent, spec))` is the awaitable form of `split(parent, spec)`, typed alike.

Errors: the exception tree of `ledger.core.errors` (`OperationRefused` carries a `Code`,
`LedgerUnavailable` means nothing was changed and a retry may succeed). Admissions and
settlements are the hot path, outside this interface: see `LedgerClient.admit/settle`.
"""

from __future__ import annotations

import abc
from typing import TypeVar

from ledger.core import ops
from ledger.core.codes import Code
from ledger.core.entities import TokenSpec, TokenView
from ledger.core.errors import OperationRefused
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

R = TypeVar("R")


class LedgerApi(abc.ABC):
    """Every ledger operation. A transport made `acting_as(token)` runs each call for that token
    on its own subtree (from a verified credential, never from a caller's argument)."""

    @abc.abstractmethod
    def call(self, op: ops.Call[R]) -> R:
        """Run one operation, blocking. Raises the ledger's exception tree."""

    async def acall(self, op: ops.Call[R]) -> R:
        """Run one operation from an event loop (a transport with real async I/O overrides it)."""
        return self.call(op)

    def acting_as(self, token_id: str, jti: str, root_id: str) -> LedgerApi:
        """This transport for calls a token makes on its own subtree (from its verified credential:
        `jti` is its credential id, `root_id` its package). The serving replicas' transports
        (`LedgerClient`, `InProcessLedger`) have it; an admin's (`HttpLedger`) does not."""
        raise OperationRefused(f"{type(self).__name__} does not act for tokens", Code.FORBIDDEN)

    # ------------------------------------------------------------ tree writes
    def create_package(self, spec: TokenSpec) -> Issued:
        return self.call(ops.CreatePackage(spec))

    def split(self, parent_id: str, spec: TokenSpec) -> Issued:
        return self.call(ops.Split(parent_id, spec))

    def update_limits(
        self,
        token_id: str,
        *,
        expires_at: float | None = None,
        models: list[str] | None = None,
        ips: list[str] | None = None,
        rate: str | None = None,
    ) -> TokenView:
        return self.call(ops.UpdateLimits(token_id=token_id, expires_at=expires_at, models=models, ips=ips, rate=rate))

    def top_up(self, token_id: str, units: int) -> TokenView:
        return self.call(ops.TopUp(token_id, units))

    def revoke(self, token_id: str) -> Returned:
        return self.call(ops.Revoke(token_id))

    def reclaim(self, token_id: str, units: int | None = None) -> Returned:
        return self.call(ops.Reclaim(token_id, units))

    def rotate(self, token_id: str) -> Issued:
        return self.call(ops.Rotate(token_id))

    def sweep(self) -> SweepReport:
        return self.call(ops.Sweep())

    # ------------------------------------------------------------ reads
    def token(self, token_id: str) -> TokenView:
        return self.call(ops.Token(token_id))

    def tokens(self, root_id: str | None = None) -> list[TokenView]:
        return self.call(ops.Tokens(root_id))

    def usage(
        self,
        *,
        token_id: str | None = None,
        model: str | None = None,
        outcome: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
    ) -> list[UsageEvent]:
        return self.call(
            ops.Usage(token_id=token_id, model=model, outcome=outcome, since=since, until=until, limit=limit)
        )

    def consistency(self) -> Consistency:
        return self.call(ops.ConsistencyCheck())

    # ------------------------------------------------------------ coordinator: keys, audit, alerts
    def public_keys(self) -> dict[str, bytes]:
        return self.call(ops.PublicKeys())

    def rotate_keys(self) -> KeyRotation:
        return self.call(ops.RotateKeys())

    def issue_admin(self, name: str, ttl_s: float = 12 * 3600.0) -> str:
        return self.call(ops.IssueAdmin(name, ttl_s))

    def admin_events(self, token_id: str | None = None, limit: int = 1000) -> list[AdminEvent]:
        return self.call(ops.AdminEvents(token_id, limit))

    def alerts(self, limit: int = 1000) -> list[AlertRecord]:
        return self.call(ops.Alerts(limit))

    def deliver_alerts(self) -> dict[str, int]:
        return self.call(ops.DeliverAlerts())

    def prune_audit(self) -> dict[str, int]:
        return self.call(ops.PruneAudit())

    def acknowledge_alert(self, alert_id: int, by: str) -> bool:
        return self.call(ops.AcknowledgeAlert(alert_id, by))


__all__ = ["LedgerApi"]
