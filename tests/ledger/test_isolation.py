"""One caller cannot disturb another: the group commit of `Flusher` over a real ShardCore, without
Ray, on SQLite and PostgreSQL. A failing operation fails alone, a rebuild refills no rate bucket,
and a book that cannot be rebuilt is `ledger_unavailable`, never a hang or a crash."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from ledger.core.codes import Code
from ledger.core.entities import Admission, Node, TokenSpec
from ledger.core.errors import LedgerUnavailable, OperationRefused
from ledger.core.settings import LedgerSettings
from ledger.shard.core import ShardCore, Unsigned
from ledger.shard.flusher import Flusher
from ledger.store.repository import ALERTS, TOKENS, _node_row
from tests.ledger.book_helpers import Clock


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> LedgerSettings:
    return LedgerSettings(database_url=db_url, data_dir=tmp_path / "data", sweep_interval_s=0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(settings: LedgerSettings, clock: Clock) -> Iterator[ShardCore]:
    c = ShardCore(settings, clock=clock)
    c.start()
    yield c
    c.close()


def rows(token_id: str, jti: str, prefix: str, n: int) -> list[tuple[Any, ...]]:
    return [Admission(f"{prefix}{i}", token_id, jti, 1, "parts@1").row() for i in range(n)]


def token(core: ShardCore, parent: str | None, name: str, units: int, **limits: Any) -> tuple[str, str]:
    spec = TokenSpec.build(name, units, **limits)
    made = core.create_package(spec) if parent is None else core.split(parent, spec)
    core.commit()
    tid = made.token.id
    return tid, core.book.nodes[tid].jti


def credentials_fail_for(core: ShardCore, token_id: str) -> None:
    """What a credential that cannot be signed did inside `ShardCore.rotate`, after `Tree.rotate`
    had already changed the node: raise something that is not an OperationRefused."""
    real = core._unsigned

    def unsigned(n: Node) -> Unsigned:
        if n.id == token_id:
            raise ValueError("exp and iat must be ints with exp > iat")
        return real(n)

    core._unsigned = unsigned  # type: ignore[method-assign]


def book_equals_database(core: ShardCore) -> None:
    report = core.consistency()
    assert report.violations == []
    assert report.book == report.db


async def test_given_a_victim_on_1_per_s_when_another_holder_fails_operations_in_the_same_batches_then_the_victim_stays_limited_and_its_good_admissions_commit(  # noqa: E501
    core: ShardCore, clock: Clock
) -> None:
    root, _ = token(core, None, "shared", 1000)
    victim, vjti = token(core, root, "victim", 100, rate="1/s:1")
    attacker, ajti = token(core, root, "attacker", 100)
    credentials_fail_for(core, attacker)
    flusher = Flusher(core)
    for second in range(4):
        clock.advance(1.0)  # one rate token a second for the victim
        commits = flusher.commits
        first, rotated, second_call = await asyncio.gather(
            flusher.run(partial(core.admit_rows, rows(victim, vjti, f"v{second}a-", 2))),
            flusher.run(partial(core.rotate, attacker)),
            flusher.run(partial(core.admit_rows, rows(victim, vjti, f"v{second}b-", 2))),
            return_exceptions=True,
        )
        assert flusher.commits == commits + 1, "all three calls shared one group commit"
        assert isinstance(rotated, LedgerUnavailable) and "internal error" in rotated.message
        assert [d.code for d in [*first, *second_call]] == [Code.OK] + [Code.RATE_LIMITED] * 3  # type: ignore[misc]
    assert flusher.failed_ops == 4
    assert core.store.balances()[victim][1] == 4 == core.book.nodes[victim].used
    assert core.book.nodes[attacker].jti == ajti, "the failed rotate left nothing behind"
    denied = [r for r in core.store.usage_counts(victim).items() if r[0] == "denied"]
    assert denied == [("denied", (12, 0))]
    # no rebuild refilled the victim's bucket: still empty at this instant
    assert core.admit_rows(rows(victim, vjti, "after-", 1))[0].code is Code.RATE_LIMITED
    book_equals_database(core)


async def test_given_a_failing_operation_then_its_caller_alone_gets_an_internal_error_and_it_is_logged(
    core: ShardCore, caplog: pytest.LogCaptureFixture
) -> None:
    root, rjti = token(core, None, "p", 100)
    flusher = Flusher(core)

    def bug() -> None:
        core.book.nodes[root].used += 7  # half-changed book
        raise KeyError("a bug")

    with caplog.at_level(logging.ERROR, logger="ledger.shard.flusher"):
        results = await asyncio.gather(
            flusher.run(partial(core.admit_rows, rows(root, rjti, "a-", 2))),
            flusher.run(bug),
            flusher.run(partial(core.token, root)),
            return_exceptions=True,
        )
    assert [d.code for d in results[0]] == [Code.OK, Code.OK]  # type: ignore[union-attr]
    err = results[1]
    assert isinstance(err, LedgerUnavailable) and err.code is Code.LEDGER_UNAVAILABLE
    assert "internal error" in err.message and "KeyError" in err.message
    assert results[2].used == 2  # type: ignore[union-attr]
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records), "logged with its traceback"
    assert core.book.nodes[root].used == 2
    book_equals_database(core)


async def test_given_an_operation_that_keeps_failing_then_each_round_drops_it_and_the_others_still_commit(
    core: ShardCore,
) -> None:
    root, rjti = token(core, None, "p", 100)
    flusher = Flusher(core)
    calls = {"n": 0}

    def flaky_bug() -> None:
        calls["n"] += 1
        raise RuntimeError("always")

    results = await asyncio.gather(
        *[flusher.run(flaky_bug) for _ in range(3)],
        flusher.run(partial(core.admit_rows, rows(root, rjti, "k-", 1))),
        return_exceptions=True,
    )
    assert all(isinstance(r, LedgerUnavailable) for r in results[:3])
    assert calls["n"] == 3, "a failed call is not applied again"
    assert [d.code for d in results[3]] == [Code.OK]  # type: ignore[union-attr]
    book_equals_database(core)


async def test_given_the_database_refuses_one_calls_data_then_only_that_call_fails(core: ShardCore) -> None:
    root, rjti = token(core, None, "p", 100)
    flusher = Flusher(core)

    def unwritable() -> str:
        # a value no INTEGER column takes: SQLite and PostgreSQL both refuse the whole transaction
        alert = {"ts": 1.0, "token_id": root, "root_id": root, "threshold": 2**70, "consumed": 0, "allocation": 1}
        core.book.out.alerts.append({**alert, "kind": "usage"})
        return "queued"

    results = await asyncio.gather(
        flusher.run(partial(core.admit_rows, rows(root, rjti, "x-", 2))),
        flusher.run(unwritable),
        flusher.run(partial(core.admit_rows, rows(root, rjti, "y-", 1))),
        return_exceptions=True,
    )
    assert [d.code for d in results[0]] == [Code.OK, Code.OK]  # type: ignore[union-attr]
    assert isinstance(results[1], LedgerUnavailable) and "internal error" in results[1].message
    assert [d.code for d in results[2]] == [Code.OK]  # type: ignore[union-attr]
    assert core.store.balances()[root][1] == 3
    with core.store.engine.connect() as conn:
        assert conn.execute(ALERTS.select()).all() == []
    book_equals_database(core)


async def test_given_a_rotate_in_the_last_second_before_expiry_then_it_is_refused_alone_with_nothing_changed(
    core: ShardCore, clock: Clock
) -> None:
    root, rjti = token(core, None, "p", 100)
    short, sjti = token(core, root, "short", 10, expires_at=clock.t + 1.5)
    events = len(core.store.admin_events(short))
    clock.advance(1.0)  # 0.5 s left: a credential would have exp == iat
    flusher = Flusher(core)
    results = await asyncio.gather(
        flusher.run(partial(core.admit_rows, rows(root, rjti, "r-", 2))),
        flusher.run(partial(core.rotate, short)),
        return_exceptions=True,
    )
    assert [d.code for d in results[0]] == [Code.OK, Code.OK]  # type: ignore[union-attr]
    refused = results[1]
    assert isinstance(refused, OperationRefused) and refused.code is Code.INVALID_REQUEST
    assert flusher.failed_ops == 0, "refused before anything changed: no rebuild"
    assert core.book.nodes[short].jti == sjti
    assert len(core.store.admin_events(short)) == events
    book_equals_database(core)


def test_given_a_drained_bucket_when_the_book_is_rebuilt_then_it_stays_drained_and_a_cold_start_begins_empty(
    core: ShardCore, settings: LedgerSettings, clock: Clock
) -> None:
    tid, jti = token(core, None, "p", 100, rate="1/s:5")
    assert [d.code for d in core.admit_rows(rows(tid, jti, "a-", 6))] == [Code.OK] * 5 + [Code.RATE_LIMITED]
    core.commit()
    core.discard()  # what a failed batch does: rebuild in process
    assert core.ready
    assert core.admit_rows(rows(tid, jti, "b-", 1))[0].code is Code.RATE_LIMITED
    clock.advance(1.0)
    assert [d.code for d in core.admit_rows(rows(tid, jti, "c-", 2))] == [Code.OK, Code.RATE_LIMITED]
    core.commit()
    cold = ShardCore(settings, clock=clock)  # a new actor: nothing in memory to carry over
    cold.start()
    bucket = cold.book.nodes[tid].bucket
    assert bucket is not None and (bucket.level, bucket.stamp) == (0.0, clock.t)
    assert cold.admit_rows(rows(tid, jti, "d-", 1))[0].code is Code.RATE_LIMITED
    clock.advance(1.0)
    assert [d.code for d in cold.admit_rows(rows(tid, jti, "e-", 2))] == [Code.OK, Code.RATE_LIMITED]
    cold.close()


def test_given_a_failed_commit_when_discarded_then_the_rate_tokens_of_its_admissions_come_back(
    core: ShardCore,
) -> None:
    tid, jti = token(core, None, "p", 100, rate="1/s:3")
    real = core.store.commit

    def down(_ch: Any) -> None:
        raise LedgerUnavailable("database write failed: OperationalError")

    core.store.commit = down  # type: ignore[method-assign]
    assert [d.code for d in core.admit_rows(rows(tid, jti, "a-", 3))] == [Code.OK] * 3
    with pytest.raises(LedgerUnavailable):
        core.commit()
    core.store.commit = real  # type: ignore[method-assign]
    core.discard()
    # nobody was told "admitted": the three rate tokens are back, and no more than that
    assert [d.code for d in core.admit_rows(rows(tid, jti, "b-", 4))] == [Code.OK] * 3 + [Code.RATE_LIMITED]


def _orphan_row(settings: LedgerSettings, clock: Clock) -> None:
    ghost = Node(id="tok_orphan", root_id="pkg_gone", parent_id="pkg_gone", name="orphan", allocation=1, jti="j")
    ghost.created_at = clock.t
    core = ShardCore(settings, clock=clock)
    core.store.migrate()
    with core.store.engine.begin() as conn:
        conn.execute(insert(TOKENS), [_node_row(ghost)])
    core.close()


async def test_given_a_stored_row_whose_parent_is_missing_then_start_and_calls_are_unavailable_not_a_crash(
    settings: LedgerSettings, clock: Clock
) -> None:
    _orphan_row(settings, clock)
    core = ShardCore(settings, clock=clock)
    with pytest.raises(LedgerUnavailable) as e:
        core.start()
    assert "parent" in e.value.message or "rebuilt" in e.value.message
    assert not core.ready
    flusher = Flusher(core)
    results = await asyncio.gather(flusher.run(lambda: "never"), flusher.run(lambda: 1), return_exceptions=True)
    assert all(isinstance(r, LedgerUnavailable) for r in results)
    core.close()


async def test_given_a_rebuild_that_raises_anything_then_it_is_unavailable_and_every_future_resolves(
    core: ShardCore,
) -> None:
    root, rjti = token(core, None, "p", 100)

    def deep(*_a: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    real = core.store.load
    core.store.load = deep  # type: ignore[method-assign]
    with pytest.raises(LedgerUnavailable):
        core.reload()
    flusher = Flusher(core)
    results = await asyncio.gather(
        flusher.run(partial(core.admit_rows, rows(root, rjti, "a-", 1))), return_exceptions=True
    )
    assert isinstance(results[0], LedgerUnavailable)
    core.store.load = real  # type: ignore[method-assign]
    flusher.last_reload = 0.0  # past the reload back-off
    assert [d.code for d in await flusher.run(partial(core.admit_rows, rows(root, rjti, "b-", 1)))] == [Code.OK]


async def test_given_a_bug_in_the_flusher_itself_then_every_caller_is_answered_and_the_next_batch_works(
    core: ShardCore,
) -> None:
    root, rjti = token(core, None, "p", 100)
    flusher = Flusher(core)
    real = flusher._apply

    def broken(_calls: Any) -> Any:
        core.admit_rows(rows(root, rjti, "lost-", 1))  # a change that must never be committed
        raise RuntimeError("flusher bug")

    flusher._apply = broken  # type: ignore[method-assign]
    results = await asyncio.wait_for(
        asyncio.gather(flusher.run(lambda: 1), flusher.run(lambda: 2), return_exceptions=True), timeout=10
    )
    assert all(isinstance(r, LedgerUnavailable) for r in results)
    flusher._apply = real  # type: ignore[method-assign]
    assert [d.code for d in await flusher.run(partial(core.admit_rows, rows(root, rjti, "ok-", 1)))] == [Code.OK]
    assert core.store.balances()[root][1] == 1
    book_equals_database(core)
