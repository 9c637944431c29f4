"""SQLAlchemy 2.0 tables. Times are epoch seconds (UTC) as floats; ids are short strings.

`tokens.used` and `tokens.allocation` are the durable balances; `delegated`/`free` are
derived on load. `usage_events` holds one row per admitted AND per denied request.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ledger.core import columns

BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class TokenRow(Base):
    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(columns.TOKEN_ID), primary_key=True)
    root_id: Mapped[str] = mapped_column(String(columns.TOKEN_ID), index=True)
    # the root's hash slot (ledger.core.shards.slot_of): shard i of n owns the slots with slot % n == i
    slot: Mapped[int] = mapped_column(Integer, index=True, default=0, server_default="0")
    parent_id: Mapped[str | None] = mapped_column(String(columns.TOKEN_ID), index=True)
    name: Mapped[str] = mapped_column(String(columns.NAME))
    team: Mapped[str | None] = mapped_column(String(columns.NAME))
    allocation: Mapped[int] = mapped_column(BigInteger)
    used: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(columns.STATUS))
    expires_at: Mapped[float | None] = mapped_column(Float)
    models: Mapped[list[str] | None] = mapped_column(JSON)
    ips: Mapped[list[str] | None] = mapped_column(JSON)
    rate: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    jti: Mapped[str] = mapped_column(String(columns.JTI))
    created_at: Mapped[float] = mapped_column(Float)
    thresholds: Mapped[list[int]] = mapped_column(JSON)
    fired: Mapped[list[int]] = mapped_column(JSON)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)


class UsageEventRow(Base):
    __tablename__ = "usage_events"
    __table_args__ = (Index("ix_usage_token_ts", "token_id", "ts"), Index("ix_usage_root_ts", "root_id", "ts"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    root_id: Mapped[str] = mapped_column(String(columns.TOKEN_ID))
    token_id: Mapped[str] = mapped_column(String(columns.TOKEN_ID))
    request_id: Mapped[str] = mapped_column(String(columns.REQUEST_ID), index=True)
    model: Mapped[str] = mapped_column(String(columns.MODEL))
    units: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(columns.STATUS))
    outcome: Mapped[str] = mapped_column(String(columns.OUTCOME))
    client_ip: Mapped[str | None] = mapped_column(String(columns.CLIENT_IP))
    image_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    detections: Mapped[int | None] = mapped_column(Integer)
    gpu_ms: Mapped[float | None] = mapped_column(Float)
    settled_at: Mapped[float | None] = mapped_column(Float)
    # admitted rows: the request body's hash ("" without one), so that a redelivery of the request
    # id after a restart must still carry the same body; NULL on denied rows and rows before 0003
    body_hash: Mapped[str | None] = mapped_column(String(columns.BODY_HASH))


class AdminEventRow(Base):
    __tablename__ = "admin_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    actor: Mapped[str] = mapped_column(String(columns.ADMIN))
    action: Mapped[str] = mapped_column(String(columns.ACTION))
    token_id: Mapped[str] = mapped_column(String(columns.TOKEN_ID), index=True)
    root_id: Mapped[str] = mapped_column(String(columns.TOKEN_ID), index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


class AlertRow(Base):
    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    kind: Mapped[str] = mapped_column(String(columns.ALERT_KIND))
    token_id: Mapped[str] = mapped_column(String(columns.TOKEN_ID), index=True)
    root_id: Mapped[str] = mapped_column(String(columns.TOKEN_ID))
    threshold: Mapped[int] = mapped_column(Integer)
    consumed: Mapped[int] = mapped_column(BigInteger)
    allocation: Mapped[int] = mapped_column(BigInteger)
    # pending (channels still to deliver) | delivered | failed (a channel gave up) | no_channel
    status: Mapped[str] = mapped_column(String(columns.STATUS), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[float | None] = mapped_column(Float)
    # {"email:a@b": {"status", "attempts", "error", "at"}, "webhook:https://…": {…}}
    channels: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    next_attempt_at: Mapped[float | None] = mapped_column(Float)
    acknowledged_at: Mapped[float | None] = mapped_column(Float)
    acknowledged_by: Mapped[str | None] = mapped_column(String(columns.ADMIN))


class IdempotencyRow(Base):
    __tablename__ = "idempotency"

    token_id: Mapped[str] = mapped_column(String(columns.TOKEN_ID), primary_key=True)
    key: Mapped[str] = mapped_column(String(columns.IDEMPOTENCY_KEY), primary_key=True)
    body_hash: Mapped[str] = mapped_column(String(columns.BODY_HASH))
    request_id: Mapped[str] = mapped_column(String(columns.REQUEST_ID))
    state: Mapped[str] = mapped_column(String(columns.STATUS))
    result: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, index=True)


class ShardRow(Base):
    """The fencing epoch of each ledger shard: a shard takes the next epoch when it starts and every
    commit checks it, so an old instance (partitioned, not yet dead) can never commit again."""

    __tablename__ = "ledger_shards"

    shard: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    epoch: Mapped[int] = mapped_column(BigInteger)
    holder: Mapped[str | None] = mapped_column(String(columns.HOLDER))
    started_at: Mapped[float | None] = mapped_column(Float)


class RequestCopyRow(Base):
    """A copy of a pending strict admission being served (`Admission.copy`): Ray redelivered the
    request, each replica names its delivery. Kept while the admission is pending, so that a shard
    rebuilt after a restart still refunds the debit only when no copy is left (schema 0006)."""

    __tablename__ = "request_copies"

    row_id: Mapped[int] = mapped_column(BigId, primary_key=True)  # the admission's usage row
    copy: Mapped[str] = mapped_column(String(columns.HOLDER), primary_key=True)


class LeaseRow(Base):
    """A quota lease (DESIGN §3a): `units` of a token escrowed for one holder (an ingress replica).
    A token's `leased` balance is the sum of its leases; `free` excludes it."""

    __tablename__ = "leases"

    id: Mapped[str] = mapped_column(String(columns.TOKEN_ID), primary_key=True)
    token_id: Mapped[str] = mapped_column(String(columns.TOKEN_ID), index=True)
    root_id: Mapped[str] = mapped_column(String(columns.TOKEN_ID), index=True)
    holder: Mapped[str] = mapped_column(String(columns.HOLDER))
    units: Mapped[int] = mapped_column(BigInteger)
    granted_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
