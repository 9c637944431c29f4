"""Group commit in the actor shell, without Ray: durable before answering, rebuilt after a failed write."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ledger.actor import _Flusher
from ledger.changes import Changes
from ledger.codes import Code
from ledger.core import LedgerCore
from ledger.entities import Admission, TokenSpec
from ledger.errors import LedgerUnavailable
from ledger.settings import LedgerSettings


@pytest.fixture
def core(tmp_path: Path) -> LedgerCore:
    c = LedgerCore(LedgerSettings(database_url=f"sqlite:///{tmp_path / 'l.db'}", data_dir=tmp_path))
    c.start()
    return c


def _rows(token_id: str, jti: str, n: int, prefix: str) -> list[tuple[object, ...]]:
    return [Admission(f"{prefix}{i}", token_id, jti, 1, "parts@1").row() for i in range(n)]


async def test_given_concurrent_calls_then_they_share_one_commit_and_answers_come_after_it(core: LedgerCore) -> None:
    pkg = core.create_package(TokenSpec("p", 100))
    core.commit()
    tid, jti = pkg["token"].id, core.book.nodes[pkg["token"].id].jti
    flusher = _Flusher(core)
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


async def test_given_a_failed_write_then_callers_get_unavailable_and_the_book_is_rebuilt(core: LedgerCore) -> None:
    pkg = core.create_package(TokenSpec("p", 10))
    core.commit()
    tid, jti = pkg["token"].id, core.book.nodes[pkg["token"].id].jti
    flusher = _Flusher(core)
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
    assert core.consistency()["book"] == core.consistency()["db"]
