"""The store on SQLite and PostgreSQL: migrations match the models, rows round-trip."""

from __future__ import annotations

import time

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from ledger.core.book import QuotaBook
from ledger.core.entities import Admission, Settlement, TokenSpec
from ledger.store.models import Base
from ledger.store.repository import Store, UsageQuery, usage_csv


def test_given_a_fresh_database_when_migrated_then_schema_equals_the_models(db_url: str) -> None:
    store = Store(db_url)
    store.migrate()
    store.migrate()  # idempotent on every start
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        if db_url.startswith("sqlite"):
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    store.close()
    assert diff == []


def test_given_book_changes_when_committed_and_reloaded_then_everything_round_trips(db_url: str) -> None:
    store = Store(db_url)
    store.migrate()
    now = time.time()
    book = QuotaBook(lambda: now)
    spec = TokenSpec.build(
        "acme", 100, expires_at=now + 3600, models=["parts"], ips=["10.0.0.0/8"], rate="pro", team="vision"
    )
    root = book.tree.create_package("pkg1", "j1", spec)
    kid = book.tree.split(root.id, "tok1", "j2", TokenSpec("fe", 10))
    book.admit(Admission("r1", kid.id, "j2", 9, "parts@1", "10.0.0.1", "key", "hash"))
    book.admit(Admission("r2", kid.id, "j2", 1, "parts@1", "10.0.0.1"))
    book.admit(Admission("r3", kid.id, "j2", 1, "parts@1", "10.0.0.1"))  # denied: quota
    book.settle(Settlement("r1", kid.id, success=True, latency_ms=12.5, detections=3, result='{"ok": 1}'))
    store.commit(book.drain())

    again = QuotaBook(lambda: now)
    again.load(*store.load(now, 3600, 300))
    assert {n.id: n.view() for n in again.nodes.values()} == {n.id: n.view() for n in book.nodes.values()}
    assert set(again.pending) == {"r2"}
    assert again.idem[("tok1", "key")].result == '{"ok": 1}'
    assert again.next_row_id == book.next_row_id
    rows = store.usage(UsageQuery(token_id=kid.id))
    assert sorted((r["request_id"], r["state"], r["outcome"], r["units"]) for r in rows) == [
        ("r1", "settled", "ok", 9),
        ("r2", "admitted", "ok", 1),
        ("r3", "denied", "quota_exhausted", 0),
    ]
    assert [a["threshold"] for a in store.alerts()] == [100, 95, 80]
    csv_text = "".join(usage_csv(rows))
    assert csv_text.splitlines()[0].startswith("id,ts,root_id,token_id,request_id")
    assert len(csv_text.splitlines()) == 4
    store.close()
