"""The typed ledger API: ONE protocol for every caller (gateway, CLI, console, tests).

    LedgerApi (this protocol)
    ├── implemented in-process by `ledger.inprocess.InProcessLedger` (shard cores + coordinator core,
    │   no Ray) — what `ledger.fake.FakeLedger` is, for unit tests of the gate, ingress and console
    ├── implemented over Ray by `ledger.client.LedgerClient` (routes each call to the shard that
    │   owns the package, or to the coordinator, or to every shard and merges)
    └── each operation declared once, below, with its route: adding an admin operation touches
        its core method, this protocol and its caller — the actors forward generically.

Errors: the exception tree of `ledger.errors` (`OperationRefused` carries a `Code`,
`LedgerUnavailable` means nothing was changed and a retry may succeed). Callers never see
reply tuples. Admissions and settlements are the hot path: see `LedgerClient.admit/settle`.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict, TypeVar

from ledger.codes import Code
from ledger.entities import TokenSpec, TokenView
from ledger.errors import OperationRefused
from ledger.shards import ShardMap

F = TypeVar("F", bound=Callable[..., Any])


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
class OpSpec:
    name: str
    route: Route
    kind: Kind
    key: str | None = None  # the argument naming the token whose shard owns the call
    fallback: Route | None = None  # where the call goes when `key` is None
    scoped: bool = True  # takes `actor`: a token may run it on its own subtree


def operation(
    route: Route, kind: Kind, *, key: str | None = None, fallback: Route | None = None, scoped: bool = True
) -> Callable[[F], F]:
    """Declares a protocol method as a ledger operation with its route."""

    def mark(fn: F) -> F:
        fn.__ledger_op__ = OpSpec(fn.__name__, route, kind, key, fallback, scoped)  # type: ignore[attr-defined]
        return fn

    return mark


# ---------------------------------------------------------------- results
@dataclass(frozen=True, slots=True)
class Issued:
    """A new or rotated token and its credential (shown once, never stored)."""

    token: TokenView
    credential: str


@dataclass(frozen=True, slots=True)
class Returned:
    """Units that went back to the parent (revoke, reclaim), and the token after it."""

    returned: int
    token: TokenView


@dataclass(frozen=True, slots=True)
class KeyRotation:
    active_kid: str
    pruned: list[str]


@dataclass(frozen=True, slots=True)
class SweepReport:
    expired: list[str] = field(default_factory=list)
    expiry_warned: list[str] = field(default_factory=list)
    idem_refunded: list[str] = field(default_factory=list)
    lost_leases: list[str] = field(default_factory=list)

    @staticmethod
    def merge(parts: Iterable[SweepReport]) -> SweepReport:
        out = SweepReport()
        for p in parts:
            out.expired.extend(p.expired)
            out.expiry_warned.extend(p.expiry_warned)
            out.idem_refunded.extend(p.idem_refunded)
            out.lost_leases.extend(p.lost_leases)
        return out


@dataclass(frozen=True, slots=True)
class Consistency:
    """The book against the database, and the conservation invariant (tests, `doctor`)."""

    book: dict[str, tuple[int, int, str]]
    db: dict[str, tuple[int, int, str]]
    violations: list[str]

    @staticmethod
    def merge(parts: Iterable[Consistency]) -> Consistency:
        out = Consistency({}, {}, [])
        for p in parts:
            out.book.update(p.book)
            out.db.update(p.db)
            out.violations.extend(p.violations)
        return out

    @property
    def mismatched(self) -> list[str]:
        return sorted(k for k in set(self.book) | set(self.db) if self.book.get(k) != self.db.get(k))


class UsageEvent(TypedDict):
    """One audit row: an admitted or denied request (DESIGN §3 Audit)."""

    id: int
    ts: float
    root_id: str
    token_id: str
    request_id: str
    model: str
    units: int
    state: str
    outcome: str
    client_ip: str | None
    image_bytes: int
    latency_ms: float | None
    detections: int | None
    gpu_ms: float | None
    settled_at: float | None


class AdminEvent(TypedDict):
    id: int
    ts: float
    actor: str
    action: str
    token_id: str
    root_id: str
    detail: dict[str, Any]


class AlertRecord(TypedDict, total=False):
    id: int
    ts: float
    kind: str
    token_id: str
    root_id: str
    threshold: int
    consumed: int
    allocation: int
    status: str
    attempts: int
    last_error: str | None
    delivered_at: float | None
    channels: dict[str, Any] | None
    next_attempt_at: float | None
    acknowledged_at: float | None
    acknowledged_by: str | None


# ---------------------------------------------------------------- the protocol
class LedgerApi(Protocol):
    """Every ledger operation. `actor` (a token id) scopes a call to that token's subtree; over
    the client it comes from a verified credential (`LedgerClient.acting_as`), never from a caller."""

    # ------------------------------------------------------------ tree writes
    @operation(Route.ANY_SHARD, Kind.WRITE)
    def create_package(self, spec: TokenSpec, actor: str | None = None) -> Issued: ...

    @operation(Route.SHARD, Kind.WRITE, key="parent_id")
    def split(self, parent_id: str, spec: TokenSpec, actor: str | None = None) -> Issued: ...

    @operation(Route.SHARD, Kind.WRITE, key="token_id")
    def update_limits(
        self,
        token_id: str,
        *,
        expires_at: float | None = None,
        models: list[str] | None = None,
        ips: list[str] | None = None,
        rate: str | None = None,
        actor: str | None = None,
    ) -> TokenView: ...

    @operation(Route.SHARD, Kind.WRITE, key="token_id")
    def top_up(self, token_id: str, units: int, actor: str | None = None) -> TokenView: ...

    @operation(Route.SHARD, Kind.WRITE, key="token_id")
    def revoke(self, token_id: str, actor: str | None = None) -> Returned: ...

    @operation(Route.SHARD, Kind.WRITE, key="token_id")
    def reclaim(self, token_id: str, units: int | None = None, actor: str | None = None) -> Returned: ...

    @operation(Route.SHARD, Kind.WRITE, key="token_id")
    def rotate(self, token_id: str, actor: str | None = None) -> Issued: ...

    @operation(Route.ALL_SHARDS, Kind.WRITE, scoped=False)
    def sweep(self) -> SweepReport: ...

    # ------------------------------------------------------------ reads
    @operation(Route.SHARD, Kind.BOOK_READ, key="token_id")
    def token(self, token_id: str, actor: str | None = None) -> TokenView: ...

    @operation(Route.SHARD, Kind.BOOK_READ, key="root_id", fallback=Route.ALL_SHARDS)
    def tokens(self, root_id: str | None = None, actor: str | None = None) -> list[TokenView]: ...

    @operation(Route.SHARD, Kind.DB_READ, key="actor", fallback=Route.COORDINATOR)
    def usage(
        self,
        *,
        token_id: str | None = None,
        model: str | None = None,
        outcome: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        actor: str | None = None,
    ) -> list[UsageEvent]: ...

    @operation(Route.ALL_SHARDS, Kind.COMMITTED_READ, scoped=False)
    def consistency(self) -> Consistency: ...

    # ------------------------------------------------------------ coordinator: keys, audit, alerts
    @operation(Route.COORDINATOR, Kind.DB_READ, scoped=False)
    def public_keys(self) -> dict[str, bytes]: ...

    @operation(Route.COORDINATOR, Kind.OUTSIDE_BOOK, scoped=False)
    def rotate_keys(self) -> KeyRotation: ...

    @operation(Route.COORDINATOR, Kind.OUTSIDE_BOOK, scoped=False)
    def issue_admin(self, name: str, ttl_s: float = 12 * 3600.0) -> str: ...

    @operation(Route.COORDINATOR, Kind.DB_READ, scoped=False)
    def admin_events(self, token_id: str | None = None, limit: int = 1000) -> list[AdminEvent]: ...

    @operation(Route.COORDINATOR, Kind.DB_READ, scoped=False)
    def alerts(self, limit: int = 1000) -> list[AlertRecord]: ...

    @operation(Route.COORDINATOR, Kind.OUTSIDE_BOOK, scoped=False)
    def deliver_alerts(self) -> dict[str, int]: ...

    @operation(Route.COORDINATOR, Kind.OUTSIDE_BOOK, scoped=False)
    def prune_audit(self) -> dict[str, int]: ...

    @operation(Route.COORDINATOR, Kind.OUTSIDE_BOOK, scoped=False)
    def acknowledge_alert(self, alert_id: int, by: str) -> bool: ...


OPS: dict[str, OpSpec] = {
    name: spec for name in dir(LedgerApi) if (spec := getattr(getattr(LedgerApi, name), "__ledger_op__", None))
}
_SIGNATURES = {op: inspect.signature(getattr(LedgerApi, op)) for op in OPS}
SHARD_ROUTES = frozenset({Route.SHARD, Route.ANY_SHARD, Route.ALL_SHARDS})


def prepare(op: str, args: tuple[Any, ...], kwargs: dict[str, Any], actor: str | None) -> tuple[OpSpec, dict[str, Any]]:
    """The operation's spec and its arguments by name (bound to the protocol's signature). `actor`
    is the verified token a call is made for: it replaces whatever the caller passed."""
    spec = OPS.get(op)
    if spec is None:
        raise OperationRefused(f"unknown ledger operation {op!r}", Code.INVALID_REQUEST)
    if actor is not None:
        if not spec.scoped:
            raise OperationRefused(f"{op} is not a token operation", Code.FORBIDDEN)
        kwargs = {**kwargs, "actor": actor}
    try:
        bound = _SIGNATURES[op].bind(None, *args, **kwargs)
    except TypeError as exc:
        raise OperationRefused(f"bad arguments for {op}: {exc}", Code.INVALID_REQUEST) from None
    del bound.arguments["self"]
    return spec, dict(bound.arguments)


def targets(
    spec: OpSpec,
    kwargs: dict[str, Any],
    shards: ShardMap,
    acting_root: str | None,
    root_of: Callable[[str], str | None],
    turn: int = 0,
) -> list[int | None]:
    """Where a call goes: shard indexes, None for the coordinator. `root_of` finds a token's root
    (it is only asked when there are several shards and the caller does not act as a token)."""
    route = spec.route
    if route is Route.SHARD:
        token = kwargs.get(spec.key or "")
        if acting_root is not None:  # a token acts only on its own package
            return [shards.of_root(acting_root)]
        if token is not None:
            if shards.count == 1:
                return [0]
            root = root_of(token) if isinstance(token, str) else None
            if root is None:
                raise OperationRefused(f"no token {token!r}", Code.NOT_FOUND)
            return [shards.of_root(root)]
        route = spec.fallback or Route.COORDINATOR
    if route is Route.ANY_SHARD:
        return [turn % shards.count]
    if route is Route.ALL_SHARDS:
        return list(range(shards.count))
    return [None]


def routing_key(spec: OpSpec, kwargs: dict[str, Any], shards: ShardMap, acting: bool) -> str | None:
    """The token whose root a call's route needs looked up, if any."""
    if acting or spec.route is not Route.SHARD or shards.count == 1:
        return None
    token = kwargs.get(spec.key or "")
    return token if isinstance(token, str) else None


def merge(op: str, parts: list[Any]) -> Any:
    """The answer of an ALL_SHARDS call from each shard's answer."""
    if op == "sweep":
        return SweepReport.merge(parts)
    if op == "consistency":
        return Consistency.merge(parts)
    return [x for p in parts for x in p]  # lists (tokens)
