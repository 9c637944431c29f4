"""Every ledger operation as a typed record: its arguments, its route, and what runs it.

    Call[R]                      a record whose answer is an R
    ├── .routing                 where it goes and how it is applied (ROUTES below: one table)
    ├── .on_shard(ShardOps)      what a shard runs (a protocol the shard core implements)
    ├── .on_coordinator(...)     what the coordinator runs (`CoordinatorOps`)
    └── .merge(parts)            the answer of an ALL_SHARDS call from each shard's answer

A transport (`LedgerClient` over Ray, `InProcessLedger`, `HttpLedger`) takes a record, sends it
where `routing` says, and the actor at the other end runs `on_shard`/`on_coordinator` on its core:
no name is looked up anywhere, and mypy checks each record against the core's protocol and each
`LedgerApi` method against its record. Adding an operation: the core method, its protocol line,
its record here (route included), the `LedgerApi` method, the CLI command, a test.

No Ray, no database here.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

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
    Unsigned,
    UsageEvent,
)
from ledger.core.shards import ShardMap

R = TypeVar("R")


class Route(enum.Enum):
    SHARD = "shard"  # the shard owning the token named by `key` (or, unnamed, `fallback`)
    ANY_SHARD = "any_shard"  # a new package: any shard, which mints a root id it owns
    ALL_SHARDS = "all_shards"  # every shard; the results merged by `merge`
    COORDINATOR = "coordinator"  # the key ring, alerts, retention, whole-database reads


class Kind(enum.Enum):
    WRITE = "write"  # changes the book: serialized with admissions, committed before the reply
    BOOK_READ = "book_read"  # reads the book: queued like writes, never sees a book half-applied
    DB_READ = "db_read"  # reads the database on a reader thread
    COMMITTED_READ = "committed_read"  # reads the book and the database together, once both agree
    OUTSIDE_BOOK = "outside_book"  # changes state outside the book (key ring): never applied twice


@dataclass(frozen=True, slots=True)
class Routing:
    route: Route
    kind: Kind
    key: str | None = None  # the field naming the token whose shard owns the call
    fallback: Route | None = None  # where the call goes when that field is None
    scoped: bool = True  # has a `by_token` field: a token may run it on its own subtree


# ------------------------------------------------------------------ what the cores implement
class ShardOps(Protocol):
    """The operations of a shard core (`ledger.shard.core.ShardCore`). A token acting on its subtree
    passes `by_token`; the new-credential operations answer `Unsigned` (signed after the commit)."""

    def create_package(self, spec: TokenSpec, by_token: str | None = None) -> Unsigned: ...
    def split(self, parent_id: str, spec: TokenSpec, by_token: str | None = None) -> Unsigned: ...
    def update_limits(
        self,
        token_id: str,
        *,
        expires_at: float | None = None,
        models: list[str] | None = None,
        ips: list[str] | None = None,
        rate: str | None = None,
        by_token: str | None = None,
    ) -> TokenView: ...
    def top_up(self, token_id: str, units: int, by_token: str | None = None) -> TokenView: ...
    def revoke(self, token_id: str, by_token: str | None = None) -> Returned: ...
    def reclaim(self, token_id: str, units: int | None = None, by_token: str | None = None) -> Returned: ...
    def rotate(self, token_id: str, by_token: str | None = None) -> Unsigned: ...
    def sweep(self) -> SweepReport: ...
    def token(self, token_id: str, by_token: str | None = None) -> TokenView: ...
    def tokens(self, root_id: str | None = None, by_token: str | None = None) -> list[TokenView]: ...
    def usage(
        self,
        *,
        token_id: str | None = None,
        model: str | None = None,
        outcome: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        by_token: str | None = None,
    ) -> list[UsageEvent]: ...
    def consistency(self) -> Consistency: ...


class CoordinatorOps(Protocol):
    """The operations of the coordinator core (`ledger.shard.coordinator.CoordinatorCore`)."""

    def public_keys(self) -> dict[str, bytes]: ...
    def rotate_keys(self) -> KeyRotation: ...
    def issue_admin(self, name: str, ttl_s: float = 12 * 3600.0) -> str: ...
    def admin_events(self, token_id: str | None = None, limit: int = 1000) -> list[AdminEvent]: ...
    def alerts(self, limit: int = 1000) -> list[AlertRecord]: ...
    def deliver_alerts(self, limit: int = 100) -> dict[str, int]: ...
    def prune_audit(self) -> dict[str, int]: ...
    def acknowledge_alert(self, alert_id: int, by: str) -> bool: ...
    def usage(
        self,
        *,
        token_id: str | None = None,
        model: str | None = None,
        outcome: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
    ) -> list[UsageEvent]: ...


# ------------------------------------------------------------------ the record every call is
@dataclass(frozen=True, slots=True)
class Call(Generic[R]):
    """One operation with its arguments. Subclasses set `name` (the wire's name) and `routing`,
    and implement `on_shard` and/or `on_coordinator`."""

    name: ClassVar[str]
    routing: ClassVar[Routing]

    def on_shard(self, core: ShardOps) -> R | Unsigned:
        raise OperationRefused(f"{self.name} is not an operation of a ledger shard", Code.INVALID_REQUEST)

    def on_coordinator(self, core: CoordinatorOps) -> R:
        raise OperationRefused(f"{self.name} is not an operation of the ledger coordinator", Code.INVALID_REQUEST)

    def merge(self, parts: list[R]) -> R:
        """The answer of an ALL_SHARDS call from each shard's (one shard: its answer)."""
        if len(parts) != 1:
            raise TypeError(f"{self.name} has no merge")
        return parts[0]

    def as_token(self, by_token: str) -> Call[R]:
        """This call made by a token on its own subtree (the transport sets it from a verified
        credential; a token cannot run an unscoped operation)."""
        if not self.routing.scoped:
            raise OperationRefused(f"{self.name} is not a token operation", Code.FORBIDDEN)
        return dataclasses.replace(self, by_token=by_token)  # type: ignore[call-arg]

    @property
    def owner(self) -> str | None:
        """The token (or root) whose shard owns this call, when the route names one."""
        key = self.routing.key
        value = getattr(self, key) if key is not None else None  # a field of this record
        return value if isinstance(value, str) else None

    @property
    def acting(self) -> str | None:
        value = getattr(self, "by_token", None)
        return value if isinstance(value, str) else None


# ------------------------------------------------------------------ tree writes
@dataclass(frozen=True, slots=True)
class CreatePackage(Call[Issued]):
    name = "create_package"
    routing = Routing(Route.ANY_SHARD, Kind.WRITE)
    spec: TokenSpec
    by_token: str | None = None

    def on_shard(self, core: ShardOps) -> Issued | Unsigned:
        return core.create_package(self.spec, self.by_token)


@dataclass(frozen=True, slots=True)
class Split(Call[Issued]):
    name = "split"
    routing = Routing(Route.SHARD, Kind.WRITE, key="parent_id")
    parent_id: str
    spec: TokenSpec
    by_token: str | None = None

    def on_shard(self, core: ShardOps) -> Issued | Unsigned:
        return core.split(self.parent_id, self.spec, self.by_token)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateLimits(Call[TokenView]):
    name = "update_limits"
    routing = Routing(Route.SHARD, Kind.WRITE, key="token_id")
    token_id: str
    expires_at: float | None = None
    models: list[str] | None = None
    ips: list[str] | None = None
    rate: str | None = None
    by_token: str | None = None

    def on_shard(self, core: ShardOps) -> TokenView | Unsigned:
        return core.update_limits(
            self.token_id,
            expires_at=self.expires_at,
            models=self.models,
            ips=self.ips,
            rate=self.rate,
            by_token=self.by_token,
        )


@dataclass(frozen=True, slots=True)
class TopUp(Call[TokenView]):
    name = "top_up"
    routing = Routing(Route.SHARD, Kind.WRITE, key="token_id")
    token_id: str
    units: int
    by_token: str | None = None

    def on_shard(self, core: ShardOps) -> TokenView | Unsigned:
        return core.top_up(self.token_id, self.units, self.by_token)


@dataclass(frozen=True, slots=True)
class Revoke(Call[Returned]):
    name = "revoke"
    routing = Routing(Route.SHARD, Kind.WRITE, key="token_id")
    token_id: str
    by_token: str | None = None

    def on_shard(self, core: ShardOps) -> Returned | Unsigned:
        return core.revoke(self.token_id, self.by_token)


@dataclass(frozen=True, slots=True)
class Reclaim(Call[Returned]):
    name = "reclaim"
    routing = Routing(Route.SHARD, Kind.WRITE, key="token_id")
    token_id: str
    units: int | None = None
    by_token: str | None = None

    def on_shard(self, core: ShardOps) -> Returned | Unsigned:
        return core.reclaim(self.token_id, self.units, self.by_token)


@dataclass(frozen=True, slots=True)
class Rotate(Call[Issued]):
    name = "rotate"
    routing = Routing(Route.SHARD, Kind.WRITE, key="token_id")
    token_id: str
    by_token: str | None = None

    def on_shard(self, core: ShardOps) -> Issued | Unsigned:
        return core.rotate(self.token_id, self.by_token)


@dataclass(frozen=True, slots=True)
class Sweep(Call[SweepReport]):
    name = "sweep"
    routing = Routing(Route.ALL_SHARDS, Kind.WRITE, scoped=False)

    def on_shard(self, core: ShardOps) -> SweepReport | Unsigned:
        return core.sweep()

    def merge(self, parts: list[SweepReport]) -> SweepReport:
        return SweepReport.merge(parts)


# ------------------------------------------------------------------ reads
@dataclass(frozen=True, slots=True)
class Token(Call[TokenView]):
    name = "token"
    routing = Routing(Route.SHARD, Kind.BOOK_READ, key="token_id")
    token_id: str
    by_token: str | None = None

    def on_shard(self, core: ShardOps) -> TokenView | Unsigned:
        return core.token(self.token_id, self.by_token)


@dataclass(frozen=True, slots=True)
class Tokens(Call[list[TokenView]]):
    name = "tokens"
    routing = Routing(Route.SHARD, Kind.BOOK_READ, key="root_id", fallback=Route.ALL_SHARDS)
    root_id: str | None = None
    by_token: str | None = None

    def on_shard(self, core: ShardOps) -> list[TokenView] | Unsigned:
        return core.tokens(self.root_id, self.by_token)

    def merge(self, parts: list[list[TokenView]]) -> list[TokenView]:
        return [t for p in parts for t in p]


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage(Call[list[UsageEvent]]):
    """A token's audit rows come from its own shard's reader (`by_token`); an admin's from the
    coordinator's view of the whole database."""

    name = "usage"
    routing = Routing(Route.SHARD, Kind.DB_READ, key="by_token", fallback=Route.COORDINATOR)
    token_id: str | None = None
    model: str | None = None
    outcome: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 1000
    by_token: str | None = None

    def on_shard(self, core: ShardOps) -> list[UsageEvent] | Unsigned:
        return core.usage(
            token_id=self.token_id,
            model=self.model,
            outcome=self.outcome,
            since=self.since,
            until=self.until,
            limit=self.limit,
            by_token=self.by_token,
        )

    def on_coordinator(self, core: CoordinatorOps) -> list[UsageEvent]:
        return core.usage(
            token_id=self.token_id,
            model=self.model,
            outcome=self.outcome,
            since=self.since,
            until=self.until,
            limit=self.limit,
        )


@dataclass(frozen=True, slots=True)
class ConsistencyCheck(Call[Consistency]):
    name = "consistency"
    routing = Routing(Route.ALL_SHARDS, Kind.COMMITTED_READ, scoped=False)

    def on_shard(self, core: ShardOps) -> Consistency | Unsigned:
        return core.consistency()

    def merge(self, parts: list[Consistency]) -> Consistency:
        return Consistency.merge(parts)


# ------------------------------------------------------------------ coordinator: keys, audit, alerts
@dataclass(frozen=True, slots=True)
class PublicKeys(Call[dict[str, bytes]]):
    name = "public_keys"
    routing = Routing(Route.COORDINATOR, Kind.DB_READ, scoped=False)

    def on_coordinator(self, core: CoordinatorOps) -> dict[str, bytes]:
        return core.public_keys()


@dataclass(frozen=True, slots=True)
class RotateKeys(Call[KeyRotation]):
    name = "rotate_keys"
    routing = Routing(Route.COORDINATOR, Kind.OUTSIDE_BOOK, scoped=False)

    def on_coordinator(self, core: CoordinatorOps) -> KeyRotation:
        return core.rotate_keys()


@dataclass(frozen=True, slots=True)
class IssueAdmin(Call[str]):
    name = "issue_admin"
    routing = Routing(Route.COORDINATOR, Kind.OUTSIDE_BOOK, scoped=False)
    admin: str  # the admin's name, as the audit log shows it
    ttl_s: float = 12 * 3600.0

    def on_coordinator(self, core: CoordinatorOps) -> str:
        return core.issue_admin(self.admin, self.ttl_s)


@dataclass(frozen=True, slots=True)
class AdminEvents(Call[list[AdminEvent]]):
    name = "admin_events"
    routing = Routing(Route.COORDINATOR, Kind.DB_READ, scoped=False)
    token_id: str | None = None
    limit: int = 1000

    def on_coordinator(self, core: CoordinatorOps) -> list[AdminEvent]:
        return core.admin_events(self.token_id, self.limit)


@dataclass(frozen=True, slots=True)
class Alerts(Call[list[AlertRecord]]):
    name = "alerts"
    routing = Routing(Route.COORDINATOR, Kind.DB_READ, scoped=False)
    limit: int = 1000

    def on_coordinator(self, core: CoordinatorOps) -> list[AlertRecord]:
        return core.alerts(self.limit)


@dataclass(frozen=True, slots=True)
class DeliverAlerts(Call[dict[str, int]]):
    """Network I/O (SMTP, webhooks): the coordinator runs it on its own thread."""

    name = "deliver_alerts"
    routing = Routing(Route.COORDINATOR, Kind.OUTSIDE_BOOK, scoped=False)

    def on_coordinator(self, core: CoordinatorOps) -> dict[str, int]:
        return core.deliver_alerts()


@dataclass(frozen=True, slots=True)
class PruneAudit(Call[dict[str, int]]):
    name = "prune_audit"
    routing = Routing(Route.COORDINATOR, Kind.OUTSIDE_BOOK, scoped=False)

    def on_coordinator(self, core: CoordinatorOps) -> dict[str, int]:
        return core.prune_audit()


@dataclass(frozen=True, slots=True)
class AcknowledgeAlert(Call[bool]):
    name = "acknowledge_alert"
    routing = Routing(Route.COORDINATOR, Kind.OUTSIDE_BOOK, scoped=False)
    alert_id: int
    by: str

    def on_coordinator(self, core: CoordinatorOps) -> bool:
        return core.acknowledge_alert(self.alert_id, self.by)


# ------------------------------------------------------------------ the table
CALLS: dict[str, type[Call[Any]]] = {
    c.name: c
    for c in (
        CreatePackage,
        Split,
        UpdateLimits,
        TopUp,
        Revoke,
        Reclaim,
        Rotate,
        Sweep,
        Token,
        Tokens,
        Usage,
        ConsistencyCheck,
        PublicKeys,
        RotateKeys,
        IssueAdmin,
        AdminEvents,
        Alerts,
        DeliverAlerts,
        PruneAudit,
        AcknowledgeAlert,
    )
}


def known(op: object) -> Call[Any]:
    """`op` if it is one of the table's records (what an actor checks before running it)."""
    if type(op) not in CALLS.values() or not isinstance(op, Call):
        raise OperationRefused(f"not a ledger operation: {type(op).__name__}", Code.INVALID_REQUEST)
    return op


def targets(
    op: Call[Any], shards: ShardMap, acting_root: str | None, root: str | None, turn: int = 0
) -> list[int | None]:
    """Where a call goes: shard indexes, None for the coordinator. `root` is the package of the
    call's `owner` (looked up by the transport when there are several shards, see `routing_key`);
    a token acting on its subtree goes to its own package's shard."""
    routing = op.routing
    route = routing.route
    if route is Route.SHARD:
        if acting_root is not None:  # a token acts only on its own package
            return [shards.of_root(acting_root)]
        owner = op.owner
        if owner is not None:
            if shards.count == 1:
                return [0]
            if root is None:
                raise OperationRefused(f"no token {owner!r}", Code.NOT_FOUND)
            return [shards.of_root(root)]
        route = routing.fallback or Route.COORDINATOR
    if route is Route.ANY_SHARD:
        return [turn % shards.count]
    if route is Route.ALL_SHARDS:
        return list(range(shards.count))
    return [None]


def routing_key(op: Call[Any], shards: ShardMap, acting: bool) -> str | None:
    """The token whose package a call's route needs looked up, if any."""
    if acting or op.routing.route is not Route.SHARD or shards.count == 1:
        return None
    return op.owner


def answer(op: Call[R], parts: list[R], targets: list[int | None]) -> R:
    """One answer from each target's: an ALL_SHARDS call (or a fallback to it) is merged."""
    if len(targets) == 1 and op.routing.route is not Route.ALL_SHARDS:
        return parts[0]
    return op.merge(parts)


__all__ = [
    "CALLS",
    "AcknowledgeAlert",
    "AdminEvents",
    "Alerts",
    "Call",
    "ConsistencyCheck",
    "CoordinatorOps",
    "CreatePackage",
    "DeliverAlerts",
    "IssueAdmin",
    "Kind",
    "PruneAudit",
    "PublicKeys",
    "Reclaim",
    "Revoke",
    "Rotate",
    "RotateKeys",
    "Route",
    "Routing",
    "ShardOps",
    "Split",
    "Sweep",
    "Token",
    "Tokens",
    "TopUp",
    "UpdateLimits",
    "Usage",
    "answer",
    "known",
    "routing_key",
    "targets",
]
