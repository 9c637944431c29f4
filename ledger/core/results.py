"""What ledger operations answer: the records every transport carries (no Ray, no database).

Each is a frozen, slotted dataclass or a TypedDict, so `ledger.core.wire` encodes and decodes it by its
own hints. `Unsigned` never leaves a shard: it is a new credential's claims, signed by the
coordinator once the shard has committed the token (`ledger.shard.runtime`, `ledger.client.inprocess`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypedDict

from ledger.core.entities import TokenView


@dataclass(frozen=True, slots=True)
class Unsigned:
    """A new or rotated token whose credential the owner still has to have signed (`Issued`)."""

    token: TokenView
    claims: dict[str, Any]  # keyword arguments of `ledger.core.credentials.issue`


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
