"""The group commit of one ledger shard: a queue, a flusher, one transaction per batch. No Ray.

Every call is queued; one flusher applies all queued calls to the book in arrival order, then
commits them in ONE transaction on a worker thread while new calls keep queueing. Callers get
their answers only after that commit, so an "admitted" verdict always has its durable debit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ledger.core.codes import Code
from ledger.core.entities import Decision
from ledger.core.errors import LedgerError, LedgerUnavailable, OperationRefused, WriteRejected
from ledger.shard.core import ShardCore

RELOAD_BACKOFF_S = 0.5
MAX_REAPPLY = 3  # rounds of "drop the failed calls, rebuild, apply the rest again" per batch
log = logging.getLogger(__name__)


def unavailable(request_id: str, message: str) -> Decision:
    """Nothing was charged; the caller may retry after a second."""
    return Decision(Code.LEDGER_UNAVAILABLE, request_id, retry_after=1.0, message=message)


@dataclass(slots=True, eq=False)
class _Call:
    op: Callable[[], Any]
    fut: asyncio.Future[Any]
    in_book: bool  # False: the op changes nothing in the book (key ring): never applied twice
    after_commit: bool = False  # runs once its batch is committed: the book then equals the database
    done: bool = False
    durable: bool = False  # its changes were committed: its answer stands
    value: Any = None
    error: BaseException | None = None

    def reply(self, value: Any = None, error: BaseException | None = None) -> None:
        self.done, self.value, self.error = True, value, error


def _internal_error(exc: BaseException) -> LedgerUnavailable:
    return LedgerUnavailable(f"internal error in the ledger ({type(exc).__name__}); nothing was changed")


class Flusher:
    """Queue + group commit over a ShardCore. Runs on the actor's event loop.

    Contract: every queued call gets exactly one answer, and only after the commit that made
    it durable. One call cannot fail another's: an operation that raises anything but
    `OperationRefused` fails alone (LedgerUnavailable, "internal error"; logged with its
    traceback), the book (which it may have half-changed) is rebuilt from the database with
    every rate bucket carried over, and the other calls of the batch are applied again and
    committed (at most MAX_REAPPLY rounds). A commit the database refuses for its data is
    retried call by call, so only the call at fault fails. Only when the database cannot be
    reached does a whole batch get `ledger_unavailable`.
    """

    def __init__(self, core: ShardCore, on_commit: Callable[[float, int], None] | None = None) -> None:
        self.core = core
        self.on_commit = on_commit  # (seconds, ops) on the loop after every successful commit
        self.queue: list[_Call] = []
        self.running = False
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-commit")
        self.last_reload = 0.0
        self.commits = 0
        self.ops = 0
        self.failed_ops = 0  # calls that failed alone with an internal error

    async def run(self, op: Callable[[], Any], *, in_book: bool = True) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.append(_Call(op, fut, in_book))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._flush())
        return await fut

    async def run_committed(self, op: Callable[[], Any]) -> Any:
        """`op` on the commit thread once every call queued before it is committed and before the next
        batch is applied: the book then equals the database (a read of both, `consistency`, sees no
        change half-way to the disk)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.append(_Call(op, fut, in_book=False, after_commit=True))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._flush())
        return await fut

    async def run_raw(self, fn: Callable[[], Any]) -> Any:
        """A database write outside the book (alert delivery, retention) on the commit thread,
        so that it never interleaves with a group commit."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn)

    async def _ensure_ready(self) -> bool:
        """Rebuild the book if a failed write or a cold start left it unready. Only the flush
        loop calls this, between batches, so no batch is ever applied to a book being reloaded."""
        if self.core.ready:
            return True
        now = time.monotonic()
        if now - self.last_reload < RELOAD_BACKOFF_S:
            return False
        self.last_reload = now
        try:
            await asyncio.get_running_loop().run_in_executor(self.pool, self.core.start)
        except LedgerUnavailable:
            return False
        return self.core.ready

    async def _flush(self) -> None:
        try:
            while self.queue:
                batch, self.queue = self.queue, []
                try:
                    await self._commit_batch([c for c in batch if not c.after_commit])
                    await self._after_commit([c for c in batch if c.after_commit])
                except BaseException as exc:  # a bug here must not leave a caller waiting forever
                    if not isinstance(exc, asyncio.CancelledError):
                        log.exception("ledger group commit failed")
                    self._invalidate()
                    for c in batch:  # an answer not backed by a commit is withdrawn
                        if not c.done or (c.in_book and not c.durable and not isinstance(c.error, OperationRefused)):
                            c.reply(error=_internal_error(exc))
                    if not isinstance(exc, Exception):
                        raise
                finally:
                    self._answer(batch)
        finally:
            self.running = False
            left, self.queue = self.queue, []  # only when cancelled: the loop drains the queue
            for c in left:
                c.reply(error=LedgerUnavailable("ledger shutting down"))
            self._answer(left)

    async def _after_commit(self, calls: list[_Call]) -> None:
        loop = asyncio.get_running_loop()
        for c in calls:
            if c.done:
                continue
            if not self.core.ready:
                c.reply(error=LedgerUnavailable("ledger database unavailable"))
                continue
            try:
                c.reply(await loop.run_in_executor(self.pool, c.op))
            except LedgerError as exc:
                c.reply(error=exc)
            except Exception as exc:
                log.error("ledger read failed", exc_info=exc)
                c.reply(error=_internal_error(exc))

    def _invalidate(self) -> None:
        """Forget every unwritten change; the next batch rebuilds the book first."""
        with contextlib.suppress(Exception):
            self.core.book.give_back_rate(self.core.book.drain())
        self.core.ready = False

    @staticmethod
    def _answer(batch: list[_Call]) -> None:
        for c in batch:
            if c.fut.done():
                continue
            if not c.done:
                c.fut.set_exception(LedgerUnavailable("internal error in the ledger: no answer"))
            elif c.error is not None:
                c.fut.set_exception(c.error)
            else:
                c.fut.set_result(c.value)

    def _apply(self, calls: list[_Call]) -> list[_Call]:
        """Apply calls to the book in order; returns the ones that raised unexpectedly."""
        broken: list[_Call] = []
        for c in calls:
            if not c.in_book and c.done:  # already ran once; its effect is outside the book
                continue
            try:
                c.reply(c.op())
            except OperationRefused as exc:  # refused before anything changed
                c.reply(error=exc)
            except Exception as exc:  # may have half-changed the book
                log.error("ledger operation failed; it fails alone, its batch is applied again", exc_info=exc)
                c.reply(error=_internal_error(exc))
                broken.append(c)
        self.failed_ops += len(broken)
        return broken

    async def _rebuild(self) -> bool:
        """Drop the book's unwritten changes and rebuild it from the database (buckets carried)."""
        await asyncio.get_running_loop().run_in_executor(self.pool, self.core.discard)
        return self.core.ready

    async def _commit_batch(self, batch: list[_Call]) -> None:
        loop = asyncio.get_running_loop()
        if not await self._ensure_ready():
            for c in batch:
                c.reply(error=LedgerUnavailable("ledger database unavailable"))
            return
        live = batch
        for attempt in range(MAX_REAPPLY + 1):
            broken = self._apply(live)
            if broken:
                live = [c for c in live if c not in broken]
                # the rebuilt book holds none of this round's changes: apply the rest again
                if not await self._rebuild() or attempt == MAX_REAPPLY:
                    for c in live:
                        if c.in_book:
                            c.reply(error=LedgerUnavailable("ledger could not apply this batch; retry"))
                    return
                continue
            t0 = time.perf_counter()
            try:
                await loop.run_in_executor(self.pool, self.core.commit)
            except WriteRejected:
                log.exception("the database refused a group commit; retrying its calls one by one")
                await self._one_by_one(live)
                return
            except Exception as exc:  # LedgerUnavailable, or a bug: nobody is told "done"
                down = exc if isinstance(exc, LedgerUnavailable) else LedgerUnavailable(f"commit failed: {exc!r}")
                # the book goes back to what the database holds (or stays unready while it is down)
                await loop.run_in_executor(self.pool, self.core.discard)
                for c in live:
                    if c.in_book and not isinstance(c.error, OperationRefused):
                        c.reply(error=down)
                return
            self.commits += 1
            self.ops += len(live)
            for c in live:
                c.durable = True
            if self.on_commit is not None:
                self.on_commit(time.perf_counter() - t0, len(live))
            return

    async def _one_by_one(self, calls: list[_Call]) -> None:
        """After a refused commit: each call applied and committed on its own, on a rebuilt book."""
        loop = asyncio.get_running_loop()
        ready = await self._rebuild()
        for i, c in enumerate(calls):
            if not c.in_book:
                continue
            if not ready:
                for rest in calls[i:]:
                    if rest.in_book:
                        rest.reply(error=LedgerUnavailable("ledger database unavailable"))
                return
            if self._apply([c]):
                ready = await self._rebuild()
                continue
            try:
                await loop.run_in_executor(self.pool, self.core.commit)
            except WriteRejected as exc:
                log.error("the database refused the data of one ledger operation", exc_info=exc)
                self.failed_ops += 1
                c.reply(error=_internal_error(exc))
                ready = await self._rebuild()
            except Exception as exc:
                await loop.run_in_executor(self.pool, self.core.discard)
                down = exc if isinstance(exc, LedgerUnavailable) else LedgerUnavailable(f"commit failed: {exc!r}")
                for rest in calls[i:]:
                    if rest.in_book and not isinstance(rest.error, OperationRefused):
                        rest.reply(error=down)
                return
            else:
                self.commits += 1
                self.ops += 1
                c.durable = True
                if self.on_commit is not None:
                    self.on_commit(0.0, 1)
