"""The store keeps quota leases (DESIGN §3a) on SQLite and PostgreSQL: lease rows are written,
renewed, deleted and loaded back, and the finished usage rows of lease reports (`usage_done`)
are written with every column and read back as settled requests."""

from __future__ import annotations

from ledger.core.book import QuotaBook
from ledger.core.changes import Lease
from ledger.core.entities import TokenSpec
from ledger.core.leases import LeaseAsk, LeaseDesk, LeaseRules, LeaseUse, WatchLog
from ledger.store.repository import Store, UsageQuery
from tests.ledger.book_helpers import Clock

WINDOWS = (3600.0, 300.0)  # settle window, recent window


def loaded(store: Store, clock: Clock) -> QuotaBook:
    book = QuotaBook(clock)
    book.load(*store.load(clock(), *WINDOWS))
    return book


def test_given_leases_and_reports_when_committed_and_reloaded_then_both_round_trip(db_url: str) -> None:
    store = Store(db_url)
    store.migrate()
    clock = Clock()
    book = QuotaBook(clock)
    desk = LeaseDesk(book, LeaseRules(ttl_s=10.0), clock, WatchLog())
    root = book.tree.create_package("pkg1", "j1", TokenSpec("acme", 1000))
    kid = book.tree.split(root.id, "tok1", "j2", TokenSpec("fe", 100))
    one, two = desk.answer(
        [LeaseAsk(root.id, "j1", root.id, "replica-a", want=1000), LeaseAsk(kid.id, "j2", root.id, "replica-b", want=8)]
    )
    store.commit(book.drain())

    again = loaded(store, clock)
    assert again.leases == book.leases
    assert again.leases[one.lease_id] == Lease(one.lease_id, root.id, root.id, "replica-a", 225, clock(), clock() + 10)
    assert (again.nodes[root.id].leased, again.nodes[kid.id].leased) == (225, 8)
    assert {n.id: n.view() for n in again.nodes.values()} == {n.id: n.view() for n in book.nodes.values()}

    clock.advance(2)
    uses = (
        LeaseUse("r1", clock() - 1, "parts@1", 3, 2, "settled", "ok", "10.0.0.1", 4096, 12.5, 3, 4.0),
        LeaseUse("r2", clock() - 1, "parts@1", 1, 0, "refunded", "ok", None, 10, 30.0, 0, 0.0),
        LeaseUse("r3", clock() - 1, "other@1", 0, 0, "denied", "model_not_allowed", "10.0.0.2", 99),
    )
    desk.answer([LeaseAsk(root.id, "j1", root.id, "replica-a", one.lease_id, 1, uses)])
    desk.answer([LeaseAsk(kid.id, "j2", root.id, "replica-b", two.lease_id, release=True)])
    store.commit(book.drain())

    again = loaded(store, clock)
    assert again.leases == book.leases
    lease = again.leases[one.lease_id]
    assert (lease.units, lease.seq, lease.expires_at) == (223, 1, clock() + 10), "renewed by the report"
    assert two.lease_id not in again.leases and again.nodes[kid.id].leased == 0
    assert (again.nodes[root.id].used, again.nodes[root.id].leased) == (2, 223)
    assert again.pending == {}, "finished rows are never pending"
    assert {rid: state for rid, (_, state, _) in again.recent.items()} == {"r1": "settled", "r2": "refunded"}
    assert again.next_row_id == book.next_row_id
    rows = {r["request_id"]: r for r in store.usage(UsageQuery(token_id=root.id))}
    assert {rid: (r["state"], r["outcome"], r["units"], r["model"]) for rid, r in rows.items()} == {
        "r1": ("settled", "ok", 2, "parts@1"),
        "r2": ("refunded", "ok", 0, "parts@1"),
        "r3": ("denied", "model_not_allowed", 0, "other@1"),
    }
    r1 = rows["r1"]
    assert (r1["ts"], r1["client_ip"], r1["image_bytes"], r1["latency_ms"], r1["detections"], r1["gpu_ms"]) == (
        clock() - 1,
        "10.0.0.1",
        4096,
        12.5,
        3,
        4.0,
    )
    assert r1["settled_at"] == clock()
    r3 = rows["r3"]
    assert (r3["latency_ms"], r3["detections"], r3["gpu_ms"], r3["settled_at"]) == (None, None, None, None)

    desk.answer([LeaseAsk(root.id, "j1", root.id, "replica-a", one.lease_id, release=True)])
    store.commit(book.drain())
    again = loaded(store, clock)
    assert again.leases == {} and again.nodes[root.id].leased == 0 and again.nodes[root.id].free == 898
    assert again.tree.invariant_violations() == []
    store.close()
