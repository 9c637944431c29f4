"""Group commit in the actor shell, without Ray: durable before answering, rebuilt after a failed write."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ledger.core.changes import Changes
from ledger.core.codes import Code
from ledger.core.entities import Admission, TokenSpec
from ledger.core.errors import LedgerUnavailable
from ledger.core.settings import LedgerSettings
from ledger.shard.core import ShardCore
from ledger.shard.flusher import Flusher


@pytest.fixture
def core(tmp_path: Path) -> ShardCore:
    c = ShardCore(LedgerSettings(database_url=f"sqlite:///{tmp_path / 'l.db'}", data_dir=tmp_path))
    c.start()
    return c


def _rows(token_id: str, jti: str, n: int, prefix: str) -> list[tuple[object, ...]]:
    return [Admission(f"{prefix}{i}", token_id, jti, 1, "parts@1").row() for i in range(n)]


async def test_given_concurrent_calls_then_they_share_one_commit_and_answers_come_after_it(core: ShardCore) -> None:
    pkg = core.create_package(TokenSpec("p", 100))
    core.commit()
    tid, jti = pkg.token.id, core.book.nodes[pkg.token.id].jti
    flusher = Flusher(core)
    commits: list[int] = []
    real = core.store.commit

    def counting(ch: Changes) -> None:
        real(ch)
        commits.append(len(ch.usage))

    core.store.commit = counting  # type: ignore[method-assign]
    results = await asyncio.gather(
        *[flusher.run(lambda i=i: core.admit_rows(_rows(tid, jti, 5, f"b{i}-"))) for i in range(10)]
    )
    assert sum(d.code is Code.OK for r in results for d in r) == 50
    assert len(commits) <= 2  # the first call commits alone, the other nine queue behind it
    assert sum(commits) == 50
    assert core.store.balances()[tid][1] == 50


async def test_given_a_failed_write_then_callers_get_unavailable_and_the_book_is_rebuilt(core: ShardCore) -> None:
    pkg = core.create_package(TokenSpec("p", 10))
    core.commit()
    tid, jti = pkg.token.id, core.book.nodes[pkg.token.id].jti
    flusher = Flusher(core)
    real = core.store.commit

    def failing(_ch: Changes) -> None:
        raise LedgerUnavailable("database write failed: OperationalError")

    core.store.commit = failing  # type: ignore[method-assign]
    with pytest.raises(LedgerUnavailable):
        await flusher.run(lambda: core.admit_rows(_rows(tid, jti, 4, "x")))
    assert core.book.nodes[tid].used == 0, "the book must not keep a debit the database lacks"
    assert core.ready
    core.store.commit = real  # type: ignore[method-assign]
    decisions = await flusher.run(lambda: core.admit_rows(_rows(tid, jti, 4, "y")))
    assert [d.code for d in decisions] == [Code.OK] * 4
    assert core.consistency().book == core.consistency().db


async def test_given_malformed_rows_in_a_batch_then_only_they_are_refused_and_the_rest_commit(core: ShardCore) -> None:
    pkg = core.create_package(TokenSpec("p", 10))
    core.commit()
    tid, jti = pkg.token.id, core.book.nodes[pkg.token.id].jti
    flusher = Flusher(core)
    rows = [*_rows(tid, jti, 2, "ok"), ("bad", tid, jti, 1, None, None, None, None, 0), ("short",), (1, 2, 3)]
    decisions = await flusher.run(lambda: core.admit_rows(rows))
    assert [d.code for d in decisions] == [Code.OK, Code.OK] + [Code.INVALID_REQUEST] * 3
    assert core.store.balances()[tid][1] == 2


async def test_given_a_bug_in_an_operation_then_it_fails_alone_and_the_rest_of_its_batch_commits(
    core: ShardCore,
) -> None:
    pkg = core.create_package(TokenSpec("p", 10))
    core.commit()
    tid, jti = pkg.token.id, core.book.nodes[pkg.token.id].jti
    flusher = Flusher(core)

    def half_done() -> None:
        core.admit_rows(_rows(tid, jti, 3, "h"))
        raise RuntimeError("boom after the debit")

    results = await asyncio.gather(
        flusher.run(half_done), flusher.run(lambda: core.admit_rows(_rows(tid, jti, 1, "z"))), return_exceptions=True
    )
    assert isinstance(results[0], LedgerUnavailable) and "internal error" in results[0].message
    assert [d.code for d in results[1]] == [Code.OK]  # type: ignore[union-attr]
    assert core.book.nodes[tid].used == 1 == core.store.balances()[tid][1], "the half-done debit is gone"
    assert core.consistency().book == core.consistency().db


def test_given_the_database_down_at_start_then_unavailable_not_a_driver_error(tmp_path: Path) -> None:
    settings = LedgerSettings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/none", data_dir=tmp_path)
    c = ShardCore(settings)
    with pytest.raises(LedgerUnavailable):
        c.start()
    assert not c.ready


async def test_given_a_consistency_read_queued_with_writes_then_it_sees_the_book_equal_the_database(
    core: ShardCore,
) -> None:
    """A read of the book and the database together (`consistency`) runs once its batch is committed:
    queued as a plain call, it saw writes of its own batch in the book and not yet on disk (the
    test_ledger_kill_under_http flake: book used 60, database 58)."""
    pkg = core.create_package(TokenSpec("p", 100))
    core.commit()
    tid, jti = pkg.token.id, core.book.nodes[pkg.token.id].jti
    flusher = Flusher(core)
    first = asyncio.ensure_future(flusher.run(lambda: core.admit_rows(_rows(tid, jti, 2, "a"))))
    await asyncio.sleep(0)  # the first batch is being committed: the next calls queue as one batch
    writes = [flusher.run(lambda i=i: core.admit_rows(_rows(tid, jti, 3, f"w{i}-"))) for i in range(3)]
    plain, committed = flusher.run(core.consistency), flusher.run_committed(core.consistency)
    *_, seen_plain, seen_committed = await asyncio.gather(first, *writes, plain, committed)
    assert seen_plain.mismatched == [tid]  # what a read inside the batch sees: 11 in the book, 2 on disk
    assert seen_committed.mismatched == [] and seen_committed.book[tid][1] == 11
