"""The books survive upgrades: databases written by the versions with schema 0002, 0003, 0004 and
0005 (the last landed one) are migrated to the head (0006) by the current code, and every balance,
usage row, admin event and alert is intact, every token has its package's shard slot, the leases
and request-copies tables are there and empty, and the ledger keeps working: old requests settle
and replay, new ones are admitted, and a quota lease is granted, reported and released.

Fixtures in `data/`, made by `data/make_ledger_fixture.py` with the code of the version that wrote
the schema (0002: 55df6a3, 0003: 469b93a, 0004: 53a94d2, 0005: e7d8e27). That script drives `ledger.core.LedgerCore`,
which 53a94d2 no longer has: ledger_v0004 was written in a worktree of 53a94d2 with an untracked
`ledger/core.py` defining `LedgerCore(ShardCore)` whose `create_package`/`split` return
`{"token": unsigned.token}`, plus `QuotaBook.invariant_violations = lambda b: b.tree.invariant_violations()`;
ledger_v0005 with the same shim in a worktree of e7d8e27 (its `create_package` returns `Issued`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import select, text

from ledger.core.codes import Code
from ledger.core.entities import Admission, Settlement
from ledger.core.leases import LeaseAsk, LeaseUse
from ledger.core.settings import LedgerSettings
from ledger.core.shards import slot_of
from ledger.shard.core import ShardCore
from ledger.store.repository import ADMIN, ALERTS, COPIES, IDEM, LEASES, TOKENS, USAGE
from tests.ledger.book_helpers import Clock

DATA = Path(__file__).parent / "data"
VERSIONS = ("0002", "0003", "0004", "0005")
HEAD = "0006"
EXPECTED: dict[str, dict[str, Any]] = {
    v: json.loads((DATA / f"ledger_v{v}.expected.json").read_text()) for v in VERSIONS
}
TABLES = {"tokens": TOKENS, "usage_events": USAGE, "admin_events": ADMIN, "alerts": ALERTS, "idempotency": IDEM}
KEYS = {"idempotency": "key"}


def restore(db_url: str, version: str) -> str:
    """Put the fixture of `version` into the fresh database `db_url`; returns which fixture it was."""
    if db_url.startswith("sqlite"):
        shutil.copyfile(DATA / f"ledger_v{version}.db", db_url.split("///", 1)[1])
        return "sqlite"
    # a plain pg_dump: psql's own meta-commands (\restrict) are for psql, the rest is SQL
    dump = "\n".join(
        line for line in (DATA / f"ledger_v{version}.pg.sql").read_text().splitlines() if not line.startswith("\\")
    )
    with psycopg.connect(db_url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(dump)  # type: ignore[call-overload]
    return "postgres"


def plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def table_rows(core: ShardCore) -> dict[str, list[dict[str, Any]]]:  # every shard reads the whole table
    out = {}
    with core.store.engine.connect() as conn:
        for name, table in TABLES.items():
            key = table.c[KEYS.get(name, "id")]
            out[name] = [dict(r) for r in conn.execute(select(table).order_by(key)).mappings()]
    return out


@pytest.fixture(params=VERSIONS)
def upgraded(
    db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[ShardCore, Clock, dict[str, Any]]]:
    expected = EXPECTED[request.param][restore(db_url, request.param)]
    clock = Clock(expected["t0"] + 60)  # a minute later: unsettled rows are still in their windows
    core = ShardCore(LedgerSettings(database_url=db_url, data_dir=tmp_path / "data", sweep_interval_s=0), clock)
    core.start()  # the current migrations, then the book from the upgraded rows
    yield core, clock, expected
    core.close()


def test_given_an_older_database_when_upgraded_then_every_row_is_intact(
    upgraded: tuple[ShardCore, Clock, dict[str, Any]],
) -> None:
    core, _, expected = upgraded
    with core.store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == HEAD
        assert conn.execute(select(LEASES)).all() == [], "nothing was leased in the fixtures"
        assert conn.execute(select(COPIES)).all() == [], "no copies were stored before 0006"
    rows = table_rows(core)
    assert [r["slot"] for r in rows["tokens"]] == [slot_of(r["root_id"]) for r in rows["tokens"]]
    if "slot" not in expected["rows"]["tokens"][0]:  # written before 0004
        for r in rows["tokens"]:
            del r["slot"]
    if "body_hash" not in expected["rows"]["usage_events"][0]:  # written before 0003
        assert [r.pop("body_hash") for r in rows["usage_events"]] == [None] * len(rows["usage_events"])
    for name, before in expected["rows"].items():
        assert plain(rows[name]) == before, name
    assert len(rows["usage_events"]) == 17 and len(rows["admin_events"]) == 9
    assert rows["alerts"][0]["acknowledged_by"] == "pm" and rows["alerts"][0]["status"] == "delivered"


def test_given_an_older_database_when_upgraded_then_the_book_has_every_balance_and_conservation_holds(
    upgraded: tuple[ShardCore, Clock, dict[str, Any]],
) -> None:
    core, _, expected = upgraded
    views = {n.id: plain(asdict(n.view())) for n in core.book.nodes.values()}
    if "returned" not in next(iter(expected["views"].values())):  # written before 0005's views
        assert [v.pop("leased") for v in views.values()] == [0] * len(views), "no leases before 0005"
        for v in views.values():  # units given back are counted from 0005 on: none recorded before
            assert (v.pop("returned"), v.pop("written_off"), v.pop("granted")) == (0, 0, v["allocation"])
    assert views == expected["views"]
    report = core.consistency()
    assert report.violations == []
    assert report.book == report.db
    pending = {"a-3", "a-4", "a-5", "b-0", "b-1", "idem-pending", "plain-pending"}
    assert set(core.book.pending) == pending
    if "body_hash" in expected["rows"]["usage_events"][0]:
        hashes = {p.request_id: p.body_hash for p in core.book.pending.values()}
        assert hashes == {rid: ("h-pending" if rid == "idem-pending" else "") for rid in pending}
    else:
        assert all(p.body_hash is None for p in core.book.pending.values()), "bodies before 0003 are unknown"


def test_given_an_older_database_when_upgraded_then_old_requests_settle_replay_and_new_ones_are_admitted(
    upgraded: tuple[ShardCore, Clock, dict[str, Any]],
) -> None:
    core, clock, expected = upgraded
    t, jti = expected["tokens"], expected["jti"]
    root, a = t["root"], t["a"]
    used_before = core.book.nodes[a].used

    def one(rid: str, tid: str, units: int = 1, key: str | None = None, body: str | None = None) -> Any:
        row = Admission(rid, tid, jti[_name(t, tid)], units, "parts@1", "10.0.0.1", key, body).row()
        return core.admit_rows([row])[0]

    replay = one("again-1", root, key="key-done", body="h-done")
    assert (replay.code, replay.replay) == (Code.REPLAY, '{"images": [], "stored": true}')
    assert one("again-2", root, key="key-pending", body="h-pending").code is Code.IDEMPOTENCY_IN_PROGRESS
    # before 0003 a stored admission's body is unknown (any body redelivers); from 0003 it must match
    body = "any" if "body_hash" not in expected["rows"]["usage_events"][0] else None
    assert one("a-4", a, units=2, body=body).replayed, "a redelivery of an old pending request: no new debit"
    if body is None:
        assert one("a-4", a, units=2, body="other").code is Code.INVALID_REQUEST, "a different body is refused"
    assert core.settle_rows([Settlement("a-3", a, True).row(), Settlement("a-5", a, False).row()]) == ["ok", "ok"]
    assert one("early", a).code is Code.RATE_LIMITED, "a cold start begins with empty rate buckets"
    clock.advance(1.0)  # the root's `pro` bucket refills ten a second
    fresh = one("fresh-1", a, units=3, body="h-fresh")
    assert fresh.code is Code.OK
    core.commit()
    assert core.book.nodes[a].used == used_before - 2 + 3
    clock.advance(200)  # the idempotent request pending since before the upgrade was never answered
    assert core.sweep().idem_refunded == ["idem-pending"]
    core.commit()
    assert one("again-3", root, key="key-pending", body="h-pending").code is Code.OK
    core.commit()
    states = {r["request_id"]: (r["state"], r["units"]) for r in core.usage(limit=100)}
    assert states["fresh-1"] == ("admitted", 3) and states["a-5"] == ("refunded", 0)
    assert states["idem-pending"] == ("refunded", 0) and states["again-3"] == ("admitted", 1)
    with core.store.engine.connect() as conn:
        stored = conn.execute(select(USAGE.c.body_hash).where(USAGE.c.request_id == "fresh-1")).scalar_one()
    assert stored == "h-fresh"
    report = core.consistency()
    assert report.violations == [] and report.book == report.db
    core.reload()
    assert core.consistency().book == report.book


def test_given_an_older_database_when_upgraded_then_a_lease_is_granted_reported_and_released(
    upgraded: tuple[ShardCore, Clock, dict[str, Any]],
) -> None:
    core, clock, expected = upgraded
    a = core.book.nodes[expected["tokens"]["a"]]
    used, free = a.used, a.free
    clock.advance(2.0)  # a cold start begins with empty buckets: the root's `pro` one refills to its burst, 20
    grant = core.lease_sync([LeaseAsk(a.id, expected["jti"]["a"], a.root_id, "replica-1", want=1000)])[0]
    core.commit()
    assert (grant.code, grant.granted, grant.strict) == (Code.OK, min(free // 4, 20), False)
    assert (a.leased, a.free) == (grant.granted, free - grant.granted)
    uses = (
        LeaseUse("leased-1", clock(), "parts@1", 2, 2, "settled", "ok", "10.0.0.1", 100, 5.0, 1, 1.0),
        LeaseUse("leased-2", clock(), "cars@1", 0, 0, "denied", "model_not_allowed", "10.0.0.1"),
    )
    ask = LeaseAsk(a.id, expected["jti"]["a"], a.root_id, "replica-1", grant.lease_id, 1, uses, release=True)
    done = core.lease_sync([ask])[0]
    core.commit()
    assert (done.code, done.applied_seq) == (Code.OK, 1)
    assert (a.used, a.leased, a.free) == (used + 2, 0, free - 2)
    states = {r["request_id"]: (r["state"], r["units"], r["outcome"]) for r in core.usage(token_id=a.id, limit=100)}
    assert states["leased-1"] == ("settled", 2, "ok")
    assert states["leased-2"] == ("denied", 0, "model_not_allowed")
    with core.store.engine.connect() as conn:
        assert conn.execute(select(LEASES)).all() == []
    report = core.consistency()
    assert report.violations == [] and report.book == report.db
    core.reload()
    assert core.consistency().book == report.book


def _name(tokens: dict[str, str], token_id: str) -> str:
    return next(k for k, v in tokens.items() if v == token_id)
