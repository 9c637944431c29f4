"""The outbox: everything the quota book changed since the last drain.

The actor hands a drained `Changes` to the store, which writes it in ONE
transaction (group commit). Rows are plain tuples/dicts so the write path stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ledger.core.entities import Node


@dataclass(slots=True)
class IdemRecord:
    """An idempotency key of one token: same key + same body → charged once."""

    token_id: str
    key: str
    body_hash: str
    request_id: str
    created_at: float
    state: str = "pending"  # pending | done
    result: str | None = None


@dataclass(slots=True)
class Pending:
    """An admitted request that has not been settled yet."""

    request_id: str
    token_id: str
    units: int
    ts: float
    idem_key: str | None
    row_id: int  # primary key of its usage row, so settling touches it by key
    model: str = ""  # a redelivery of the request must ask for the same model and units
    # ... and carry the same body: "" = admitted without a body hash; None = unknown (a row written
    # before schema 0003 stored body hashes), which no redelivery can be compared with
    body_hash: str | None = ""
    # the copies of the request being served (`Admission.copy`, stored in `request_copies`): a
    # copy's refund refunds the debit only once no other copy is left. None = not known (a caller
    # that names no copies, or a row admitted before schema 0006): the first settlement decides
    copies: set[str] | None = None


@dataclass(slots=True)
class Lease:
    """Units escrowed at a shard for one holder and token (a row of the `leases` table, DESIGN §3a)."""

    id: str
    token_id: str
    root_id: str
    holder_id: str  # the LeaseHolder it is escrowed for (column `holder`)
    units: int
    granted_at: float
    expires_at: float
    seq: int = 0  # the last report applied: reports are idempotent by their number


class UsageRow(NamedTuple):
    """One new `usage_events` row (an admission or a denial), in column order: a typed record that is
    a tuple, so the store inserts a batch of them with one executemany."""

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
    body_hash: str | None


USAGE_COLUMNS = UsageRow._fields
# settle tuples: (state, units, latency_ms, detections, gpu_ms, settled_at, id)
SETTLE_COLUMNS = ("state", "units", "latency_ms", "detections", "gpu_ms", "settled_at")
SettleRow = tuple[str, int, float, int, float, float, int]
# finished rows (lease reports): the usage columns, then latency_ms, detections, gpu_ms, settled_at
USAGE_DONE_COLUMNS = (*USAGE_COLUMNS, "latency_ms", "detections", "gpu_ms", "settled_at")
UsageDoneRow = tuple[
    int, float, str, str, str, str, int, str, str, str | None, int, str | None,
    float | None, int | None, float | None, float | None,
]  # fmt: skip


@dataclass(slots=True)
class Changes:
    new_nodes: list[Node] = field(default_factory=list)
    dirty: dict[str, Node] = field(default_factory=dict)
    usage: list[UsageRow] = field(default_factory=list)
    settles: list[SettleRow] = field(default_factory=list)
    idem_new: list[IdemRecord] = field(default_factory=list)
    idem_done: list[IdemRecord] = field(default_factory=list)
    idem_deleted: list[tuple[str, str]] = field(default_factory=list)
    admin_events: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    usage_done: list[UsageDoneRow] = field(default_factory=list)
    lease_put: dict[str, Lease] = field(default_factory=dict)
    lease_deleted: list[str] = field(default_factory=list)
    # the named copies of pending admissions (`request_copies`): added, one given up, all gone
    copies_new: list[tuple[int, str]] = field(default_factory=list)
    copies_gone: list[tuple[int, str]] = field(default_factory=list)
    copies_cleared: list[int] = field(default_factory=list)
    # memory only (not written): the copies of each request settled in this batch, by usage row id,
    # so that a failed batch's rebuilt book still knows which copies of them are being served
    copies: dict[int, set[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(
            self.new_nodes
            or self.dirty
            or self.usage
            or self.settles
            or self.idem_new
            or self.idem_done
            or self.idem_deleted
            or self.admin_events
            or self.alerts
            or self.usage_done
            or self.lease_put
            or self.lease_deleted
            or self.copies_new
            or self.copies_gone
            or self.copies_cleared
        )
