"""Repository: the only code that talks SQL. One engine, SQLite (WAL) or PostgreSQL, same code.

`commit(changes)` writes one drained outbox in ONE transaction (group commit); the
caller may only answer its callers after it returns.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine, Table, and_, bindparam, create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, InterfaceError, InternalError, OperationalError, SQLAlchemyError

from ledger.core import columns
from ledger.core.changes import SETTLE_COLUMNS, USAGE_COLUMNS, USAGE_DONE_COLUMNS, Changes, IdemRecord, Lease, Pending
from ledger.core.entities import Node, Status
from ledger.core.errors import ConfigError, Fenced, LedgerUnavailable, WriteRejected
from ledger.core.limits import RateLimit, normalize_ips
from ledger.core.reports import iso_utc
from ledger.core.shards import ShardScope, slot_of
from ledger.store.migrate import upgrade
from ledger.store.models import (
    AdminEventRow,
    AlertRow,
    Base,
    IdempotencyRow,
    LeaseRow,
    RequestCopyRow,
    ShardRow,
    TokenRow,
    UsageEventRow,
)

TOKENS = cast(Table, TokenRow.__table__)
USAGE = cast(Table, UsageEventRow.__table__)
ADMIN = cast(Table, AdminEventRow.__table__)
ALERTS = cast(Table, AlertRow.__table__)
IDEM = cast(Table, IdempotencyRow.__table__)
SHARDS = cast(Table, ShardRow.__table__)
LEASES = cast(Table, LeaseRow.__table__)
COPIES = cast(Table, RequestCopyRow.__table__)
AUDIT_COLUMNS = tuple(c for c in USAGE.columns if c.name != "body_hash")


_UPDATE_TOKEN = (
    update(TOKENS)
    .where(TOKENS.c.id == bindparam("b_id"))
    .values(
        allocation=bindparam("allocation"),
        used=bindparam("used"),
        status=bindparam("status"),
        expires_at=bindparam("expires_at"),
        models=bindparam("models"),
        ips=bindparam("ips"),
        rate=bindparam("rate"),
        jti=bindparam("jti"),
        fired=bindparam("fired"),
        meta=bindparam("meta"),
    )
)


@dataclass(frozen=True, slots=True)
class UsageQuery:
    """Filters for audit reads. All optional; `root_ids` restricts to packages a caller may see."""

    token_id: str | None = None
    root_ids: Sequence[str] | None = None
    model: str | None = None
    outcome: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 1000


def make_engine(url: str) -> Engine:
    """SQLite gets WAL, FULL sync and a busy timeout; PostgreSQL gets pre-ping."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if url.startswith("postgresql"):
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    raise ConfigError(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql+psycopg://...")


class Store:
    """Reads and writes ledger rows. Raises `LedgerUnavailable` when the database cannot answer.

    `scope` is the shard this store serves: `load` reads only its packages' rows, and once
    `fence()` took an epoch every commit first checks that epoch is still the shard's, in the
    same transaction, so a superseded instance's commit is refused (`Fenced`) and writes nothing.
    """

    def __init__(self, url: str, scope: ShardScope | None = None) -> None:
        self.url = url
        self.scope = scope or ShardScope()
        self.epoch: int | None = None
        self.engine = make_engine(url)
        # the hot inserts go straight to the driver's executemany with positional rows:
        # SQLAlchemy's per-row parameter processing would cost more than the insert itself
        mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        self._insert_usage = (
            f"INSERT INTO usage_events ({', '.join(USAGE_COLUMNS)}) VALUES ({', '.join([mark] * len(USAGE_COLUMNS))})"
        )
        self._insert_usage_done = (
            f"INSERT INTO usage_events ({', '.join(USAGE_DONE_COLUMNS)}) "
            f"VALUES ({', '.join([mark] * len(USAGE_DONE_COLUMNS))})"
        )
        self._settle_usage = (
            f"UPDATE usage_events SET {', '.join(f'{c} = {mark}' for c in SETTLE_COLUMNS)} WHERE id = {mark}"
        )
        # leases change in most commits: plain SQL too
        self._delete_lease = f"DELETE FROM leases WHERE id = {mark}"
        self._insert_lease = (
            f"INSERT INTO leases ({', '.join(LEASE_COLUMNS)}) VALUES ({', '.join([mark] * len(LEASE_COLUMNS))})"
        )
        self._insert_copy = f"INSERT INTO request_copies (row_id, copy) VALUES ({mark}, {mark})"
        self._delete_copy = f"DELETE FROM request_copies WHERE row_id = {mark} AND copy = {mark}"
        self._clear_copies = f"DELETE FROM request_copies WHERE row_id = {mark}"
        # every commit's fence check: plain SQL, no statement to build and look up per commit
        self._fence = f"UPDATE ledger_shards SET epoch = epoch WHERE shard = {mark} AND epoch = {mark}"

    def close(self) -> None:
        self.engine.dispose()

    def migrate(self) -> None:
        try:
            upgrade(self.engine)
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"database migration failed: {type(exc).__name__}") from exc

    def create_all(self) -> None:
        """Create tables without Alembic (fast path for unit tests)."""
        Base.metadata.create_all(self.engine)

    # ---------------------------------------------------------------- writes
    def fence(self, owner: str, now: float) -> int:
        """Take the next epoch of this store's shard: from now on only this instance commits for it."""
        shard = self.scope.index
        try:
            with self.engine.begin() as conn:
                row = conn.execute(
                    update(SHARDS)
                    .where(SHARDS.c.shard == shard)
                    .values(epoch=SHARDS.c.epoch + 1, holder=owner[: columns.HOLDER], started_at=now)
                    .returning(SHARDS.c.epoch)
                ).first()
                if row is None:
                    conn.execute(
                        insert(SHARDS).values(shard=shard, epoch=1, holder=owner[: columns.HOLDER], started_at=now)
                    )
                    epoch = 1
                else:
                    epoch = int(row[0])
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"could not take the shard's epoch: {type(exc).__name__}") from exc
        self.epoch = epoch
        return epoch

    def _check_fence(self, conn: Connection) -> None:
        """In the commit's transaction: the row lock (PostgreSQL) or the write lock (SQLite) taken
        here orders this commit against a successor's `fence`, so a commit after it never lands."""
        if self.epoch is None:
            return
        held = conn.exec_driver_sql(self._fence, (self.scope.index, self.epoch)).rowcount
        if held != 1:
            raise Fenced(f"shard {self.scope.index} epoch {self.epoch} was superseded: this instance may not commit")

    def commit(self, ch: Changes) -> None:
        """Raises WriteRejected when the database refused the data (nothing was written: one
        transaction), Fenced when a newer instance of this shard started, LedgerUnavailable when
        the database could not be reached or failed otherwise."""
        try:
            with self.engine.begin() as conn:
                self._check_fence(conn)
                self._write(conn, ch)
        except Fenced:
            raise
        except SQLAlchemyError as exc:
            if _refused_data(exc):
                raise WriteRejected(f"database refused the write: {type(exc).__name__}") from exc
            raise LedgerUnavailable(f"database write failed: {type(exc).__name__}") from exc
        except (TypeError, ValueError, OverflowError) as exc:  # a value no column type could bind
            raise WriteRejected(f"database refused the write: {type(exc).__name__}") from exc

    def _write(self, conn: Connection, ch: Changes) -> None:
        if ch.new_nodes:
            conn.execute(insert(TOKENS), [_node_row(n) for n in ch.new_nodes])
        if ch.dirty:
            conn.execute(_UPDATE_TOKEN, [_node_update(n) for n in ch.dirty.values()])
        if ch.usage:
            conn.exec_driver_sql(self._insert_usage, ch.usage)
        if ch.settles:
            conn.exec_driver_sql(self._settle_usage, ch.settles)
        if ch.usage_done:
            conn.exec_driver_sql(self._insert_usage_done, ch.usage_done)
        if ch.copies_new:  # in the order of the batch: named, then given up, then settled
            conn.exec_driver_sql(self._insert_copy, ch.copies_new)
        if ch.copies_gone:
            conn.exec_driver_sql(self._delete_copy, ch.copies_gone)
        if ch.copies_cleared:
            conn.exec_driver_sql(self._clear_copies, [(r,) for r in ch.copies_cleared])
        gone = [*ch.lease_put, *ch.lease_deleted]
        if gone:
            conn.exec_driver_sql(self._delete_lease, [(x,) for x in gone])
        if ch.lease_put:
            conn.exec_driver_sql(self._insert_lease, [_lease_row(x) for x in ch.lease_put.values()])
        if ch.idem_deleted:
            conn.execute(
                delete(IDEM).where(and_(IDEM.c.token_id == bindparam("b_tid"), IDEM.c.key == bindparam("b_key"))),
                [{"b_tid": t, "b_key": k} for t, k in ch.idem_deleted],
            )
        if ch.idem_new:
            conn.execute(
                insert(IDEM),
                [
                    {
                        "token_id": r.token_id,
                        "key": r.key,
                        "body_hash": r.body_hash,
                        "request_id": r.request_id,
                        "state": r.state,
                        "result": r.result,
                        "created_at": r.created_at,
                    }
                    for r in ch.idem_new
                ],
            )
        if ch.idem_done:
            conn.execute(
                update(IDEM)
                .where(and_(IDEM.c.token_id == bindparam("b_tid"), IDEM.c.key == bindparam("b_key")))
                .values(state=bindparam("state"), result=bindparam("result")),
                [{"b_tid": r.token_id, "b_key": r.key, "state": r.state, "result": r.result} for r in ch.idem_done],
            )
        if ch.admin_events:
            conn.execute(insert(ADMIN), ch.admin_events)
        if ch.alerts:
            conn.execute(insert(ALERTS), ch.alerts)

    # ---------------------------------------------------------------- loading
    def load(
        self, now: float, settle_window_s: float, recent_window_s: float
    ) -> tuple[list[Node], list[Pending], list[tuple[str, str, str, float]], list[IdemRecord], int, list[Lease]]:
        """Everything the quota book needs to rebuild itself."""
        try:
            owned = TOKENS.c.slot % self.scope.count == self.scope.index
            # usage and idempotency rows of this shard's packages: joined to their token's slot
            usage_of_shard = USAGE.join(TOKENS, USAGE.c.root_id == TOKENS.c.id)
            idem_of_shard = IDEM.join(TOKENS, IDEM.c.token_id == TOKENS.c.id)
            with self.engine.connect() as conn:
                if self.epoch is not None:
                    current = conn.execute(select(SHARDS.c.epoch).where(SHARDS.c.shard == self.scope.index)).scalar()
                    if current != self.epoch:
                        raise Fenced(f"shard {self.scope.index} epoch {self.epoch} was superseded by epoch {current}")
                nodes = [_row_node(r) for r in conn.execute(select(TOKENS).where(owned)).mappings()]
                last_id = int(conn.execute(select(func.coalesce(func.max(USAGE.c.id), 0))).scalar_one())
                # admissions not settled yet, within the settle window: the book's `pending`
                unsettled = and_(owned, USAGE.c.ts >= now - settle_window_s, USAGE.c.state == "admitted")
                pending = [
                    Pending(r.request_id, r.token_id, r.units, r.ts, None, r.id, r.model, r.body_hash)
                    for r in conn.execute(
                        select(
                            USAGE.c.request_id,
                            USAGE.c.token_id,
                            USAGE.c.units,
                            USAGE.c.ts,
                            USAGE.c.id,
                            USAGE.c.model,
                            USAGE.c.body_hash,
                        )
                        .select_from(usage_of_shard)
                        .where(unsettled)
                    )
                ]
                copies: dict[int, set[str]] = {}
                if pending:  # the named copies of the pending admissions (schema 0006)
                    admitted = select(USAGE.c.id).select_from(usage_of_shard).where(unsettled)
                    for row_id, copy in conn.execute(
                        select(COPIES.c.row_id, COPIES.c.copy).where(COPIES.c.row_id.in_(admitted))
                    ):
                        copies.setdefault(int(row_id), set()).add(copy)
                recent = [
                    (r.request_id, r.token_id, r.state, r.settled_at)
                    for r in conn.execute(
                        select(USAGE.c.request_id, USAGE.c.token_id, USAGE.c.state, USAGE.c.settled_at)
                        .select_from(usage_of_shard)
                        .where(
                            and_(
                                owned,
                                USAGE.c.settled_at >= now - recent_window_s,
                                USAGE.c.state.in_(("settled", "refunded")),
                            )
                        )
                        .order_by(USAGE.c.settled_at, USAGE.c.id)  # a request id's latest outcome wins
                    )
                ]
                idem = [
                    IdemRecord(r.token_id, r.key, r.body_hash, r.request_id, r.created_at, r.state, r.result)
                    for r in conn.execute(select(IDEM).select_from(idem_of_shard).where(owned)).mappings()
                ]
                leases = [
                    Lease(r.id, r.token_id, r.root_id, r.holder, int(r.units), r.granted_at, r.expires_at, int(r.seq))
                    for r in conn.execute(
                        select(LEASES).select_from(LEASES.join(TOKENS, LEASES.c.token_id == TOKENS.c.id)).where(owned)
                    )
                ]
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"database read failed: {type(exc).__name__}") from exc
        by_req = {(i.token_id, i.request_id): i.key for i in idem}
        for p in pending:
            p.idem_key = by_req.get((p.token_id, p.request_id))
            p.copies = copies.get(p.row_id)
        return nodes, pending, recent, idem, last_id, leases

    def recent_denials(self, since: float, limit: int) -> list[str]:
        """Request ids of this shard's denied requests since `since` (newest `limit`, oldest first):
        a restarted lease desk remembers them, so a holder's resent report records no second row."""
        owned = TOKENS.c.slot % self.scope.count == self.scope.index
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(USAGE.c.request_id)
                    .select_from(USAGE.join(TOKENS, USAGE.c.root_id == TOKENS.c.id))
                    .where(and_(owned, USAGE.c.ts >= since, USAGE.c.state == "denied"))
                    .order_by(USAGE.c.id.desc())
                    .limit(limit)
                ).all()
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"database read failed: {type(exc).__name__}") from exc
        return [r[0] for r in reversed(rows)]

    # ---------------------------------------------------------------- reads
    def balances(self, *, whole: bool = False) -> dict[str, tuple[int, int, str]]:
        """token id -> (allocation, used, status), straight from the database: this shard's
        packages, or every package with `whole`."""
        stmt = select(TOKENS.c.id, TOKENS.c.allocation, TOKENS.c.used, TOKENS.c.status)
        if not whole:
            stmt = stmt.where(TOKENS.c.slot % self.scope.count == self.scope.index)
        with self.engine.connect() as conn:
            return {r.id: (r.allocation, r.used, r.status) for r in conn.execute(stmt)}

    def root_of(self, token_id: str) -> str | None:
        """The package root of a token (any shard's), or None if there is no such token."""
        with self.engine.connect() as conn:
            root: str | None = conn.execute(select(TOKENS.c.root_id).where(TOKENS.c.id == token_id)).scalar()
        return root

    def usage_counts(self, token_id: str | None = None) -> dict[str, tuple[int, int]]:
        """state -> (rows, units), optionally for one token."""
        q = select(USAGE.c.state, func.count(), func.coalesce(func.sum(USAGE.c.units), 0)).group_by(USAGE.c.state)
        if token_id is not None:
            q = q.where(USAGE.c.token_id == token_id)
        with self.engine.connect() as conn:
            return {r[0]: (int(r[1]), int(r[2])) for r in conn.execute(q)}

    def charged_request_ids(self) -> set[str]:
        """Request ids whose debit is durable (admitted or settled with units kept)."""
        with self.engine.connect() as conn:
            return {
                r[0]
                for r in conn.execute(
                    select(USAGE.c.request_id).where(
                        and_(USAGE.c.state.in_(("admitted", "settled")), USAGE.c.units > 0)
                    )
                )
            }

    def usage(self, q: UsageQuery) -> list[dict[str, Any]]:
        """Audit rows, newest first: every column but the internal body hash."""
        stmt = select(*AUDIT_COLUMNS).order_by(USAGE.c.ts.desc(), USAGE.c.id.desc())
        stmt = stmt.limit(max(1, min(q.limit, 100_000)))
        if q.token_id is not None:
            stmt = stmt.where(USAGE.c.token_id == q.token_id)
        if q.root_ids is not None:
            stmt = stmt.where(USAGE.c.root_id.in_(list(q.root_ids)))
        if q.model is not None:
            stmt = stmt.where(USAGE.c.model == q.model)
        if q.outcome is not None:
            stmt = stmt.where(USAGE.c.outcome == q.outcome)
        if q.since is not None:
            stmt = stmt.where(USAGE.c.ts >= q.since)
        if q.until is not None:
            stmt = stmt.where(USAGE.c.ts < q.until)
        try:
            with self.engine.connect() as conn:
                return [dict(r) for r in conn.execute(stmt).mappings()]
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"database read failed: {type(exc).__name__}") from exc

    def admin_events(self, token_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        stmt = select(ADMIN).order_by(ADMIN.c.ts.desc(), ADMIN.c.id.desc()).limit(limit)
        if token_id is not None:
            stmt = stmt.where(ADMIN.c.token_id == token_id)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def alerts(self, limit: int = 1000) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [
                dict(r)
                for r in conn.execute(
                    select(ALERTS).order_by(ALERTS.c.ts.desc(), ALERTS.c.id.desc()).limit(limit)
                ).mappings()
            ]

    # ---------------------------------------------------------------- alert delivery (actor only)
    def due_alerts(self, now: float, limit: int = 100) -> list[dict[str, Any]]:
        """Alerts with channels still to deliver whose next attempt is due, oldest first."""
        stmt = (
            select(ALERTS)
            .where(ALERTS.c.status == "pending")
            .where((ALERTS.c.next_attempt_at.is_(None)) | (ALERTS.c.next_attempt_at <= now))
            .order_by(ALERTS.c.id)
            .limit(limit)
        )
        try:
            with self.engine.connect() as conn:
                return [dict(r) for r in conn.execute(stmt).mappings()]
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"database read failed: {type(exc).__name__}") from exc

    def record_delivery(self, alert_id: int, **fields: Any) -> None:
        """Store one delivery pass of an alert: channels, status, attempts, last_error, ... ."""
        allowed = {"channels", "status", "attempts", "last_error", "delivered_at", "next_attempt_at"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"record_delivery takes {sorted(allowed)}")
        try:
            with self.engine.begin() as conn:
                conn.execute(update(ALERTS).where(ALERTS.c.id == alert_id).values(**fields))
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"database write failed: {type(exc).__name__}") from exc

    def acknowledge_alert(self, alert_id: int, by: str, now: float) -> bool:
        """Mark an alert acknowledged (once); False when there is no such alert or it already was."""
        try:
            with self.engine.begin() as conn:
                n = conn.execute(
                    update(ALERTS)
                    .where(ALERTS.c.id == alert_id, ALERTS.c.acknowledged_at.is_(None))
                    .values(acknowledged_at=now, acknowledged_by=by)
                ).rowcount
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"database write failed: {type(exc).__name__}") from exc
        return bool(n)

    def prune_audit(self, before: float) -> dict[str, int]:
        """Delete settled/denied usage events and admin events older than `before` (epoch s).
        Unsettled admissions are kept whatever their age: a restart still needs them."""
        try:
            with self.engine.begin() as conn:
                usage = conn.execute(delete(USAGE).where(USAGE.c.ts < before, USAGE.c.state != "admitted")).rowcount
                admin = conn.execute(delete(ADMIN).where(ADMIN.c.ts < before)).rowcount
                alerts = conn.execute(delete(ALERTS).where(ALERTS.c.ts < before, ALERTS.c.status != "pending")).rowcount
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"database write failed: {type(exc).__name__}") from exc
        return {"usage_events": usage, "admin_events": admin, "alerts": alerts}


TIME_COLUMNS = frozenset({"ts", "settled_at"})


def usage_csv(rows: Sequence[Mapping[str, object]]) -> Iterator[str]:
    """CSV lines (header first) for audit export; times as ISO-8601 UTC (`iso_utc`)."""
    cols = [c.name for c in AUDIT_COLUMNS]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    yield buf.getvalue()
    for r in rows:
        buf.seek(0)
        buf.truncate()
        w.writerow([iso_utc(_time(r.get(c))) if c in TIME_COLUMNS else r.get(c) for c in cols])
        yield buf.getvalue()


def _time(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _refused_data(exc: SQLAlchemyError) -> bool:
    """The database answered and refused the data, as opposed to not answering (down, locked,
    connection lost), which is OperationalError, InterfaceError or InternalError."""
    if isinstance(exc, DBAPIError):
        return not exc.connection_invalidated and not isinstance(exc, OperationalError | InterfaceError | InternalError)
    # a StatementError wrapping a value the driver could not bind (e.g. an int too large for SQLite)
    return isinstance(getattr(exc, "orig", None), TypeError | ValueError | OverflowError)


LEASE_COLUMNS = ("id", "token_id", "root_id", "holder", "units", "granted_at", "expires_at", "seq")


def _lease_row(x: Lease) -> tuple[Any, ...]:
    return (x.id, x.token_id, x.root_id, x.holder_id, x.units, x.granted_at, x.expires_at, x.seq)


def _node_row(n: Node) -> dict[str, Any]:
    return {
        "id": n.id,
        "root_id": n.root_id,
        "slot": slot_of(n.root_id),
        "parent_id": n.parent_id,
        "name": n.name,
        "team": n.team,
        "created_at": n.created_at,
        "thresholds": list(n.thresholds),
        **_node_update(n, key="id"),
    }


def _node_update(n: Node, key: str = "b_id") -> dict[str, Any]:
    return {
        key: n.id,
        "allocation": n.allocation,
        "used": n.used,
        "status": n.status.value,
        "expires_at": n.expires_at,
        "models": sorted(n.models) if n.models is not None else None,
        "ips": [str(i) for i in n.ips] if n.ips is not None else None,
        "rate": n.rate.to_json() if n.rate else None,
        "jti": n.jti,
        "fired": sorted(n.fired),
        "meta": n.meta,
    }


def _row_node(r: Any) -> Node:
    return Node(
        id=r["id"],
        root_id=r["root_id"],
        parent_id=r["parent_id"],
        name=r["name"],
        team=r["team"],
        allocation=int(r["allocation"]),
        used=int(r["used"]),
        status=Status(r["status"]),
        expires_at=r["expires_at"],
        models=frozenset(r["models"]) if r["models"] is not None else None,
        ips=normalize_ips(r["ips"]),
        rate=RateLimit.from_json(r["rate"]),
        jti=r["jti"],
        created_at=r["created_at"],
        thresholds=tuple(r["thresholds"]),
        fired=set(r["fired"]),
        meta=dict(r["meta"] or {}),
    )
