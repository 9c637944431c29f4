"""LedgerActor: the named, detached Ray actor that is the only writer of quota state.

A thin async shell around `LedgerCore`. Every call is queued; one flusher applies all
queued calls to the book in arrival order, then commits them in ONE transaction on a
worker thread while new calls keep queueing (group commit). Callers get their answers
only after that commit, so an "admitted" verdict always has its durable debit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray

from ledger.codes import Code
from ledger.core import LedgerCore
from ledger.entities import Decision
from ledger.errors import LedgerError, LedgerUnavailable, OperationRefused
from ledger.settings import LedgerSettings

# wire result of an admin call: ("ok", value) or ("err", code, message)
Reply = tuple[Any, ...]

# serialized with admissions and committed before the reply
ADMIN_OPS = frozenset(
    {
        "create_package",
        "split",
        "update_limits",
        "top_up",
        "revoke",
        "reclaim",
        "rotate",
        "sweep",
        "rotate_keys",
        "issue_admin",
        "consistency",
    }
)
# in-memory reads, queued like writes so that they never see a book being applied or rebuilt
BOOK_READS = frozenset({"token", "tokens", "public_keys", "check_credential"})
# database reads, answered on a reader thread
DB_READS = frozenset({"usage", "admin_events", "alerts"})
RELOAD_BACKOFF_S = 0.5


def unavailable(request_id: str, message: str) -> Decision:
    """Nothing was charged; the caller may retry after a second."""
    return Decision(Code.LEDGER_UNAVAILABLE, request_id, retry_after=1.0, message=message)


class _Flusher:
    """Queue + group commit over a LedgerCore. Runs on the actor's event loop."""

    def __init__(self, core: LedgerCore) -> None:
        self.core = core
        self.queue: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self.running = False
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-commit")
        self.last_reload = 0.0
        self.commits = 0
        self.ops = 0

    async def run(self, op: Callable[[], Any]) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.append((op, fut))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._flush())
        return await fut

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
        return True

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.queue:
                batch, self.queue = self.queue, []
                if not await self._ensure_ready():
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(LedgerUnavailable("ledger database unavailable"))
                    continue
                results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
                broken: Exception | None = None
                for op, fut in batch:
                    try:
                        results.append((fut, op(), None))
                    except OperationRefused as exc:  # refused before anything changed
                        results.append((fut, None, exc))
                    except Exception as exc:  # a bug may have half-changed the book: this batch is not committed
                        results.append((fut, None, exc))
                        broken = exc
                try:
                    if broken is not None:
                        raise LedgerUnavailable(f"operation failed: {broken!r}")
                    await loop.run_in_executor(self.pool, self.core.commit)
                except Exception as exc:  # LedgerUnavailable, or a bug: nobody is told "done"
                    down = exc if isinstance(exc, LedgerUnavailable) else LedgerUnavailable(f"commit failed: {exc!r}")
                    # the book goes back to what the database holds (or stays unready while it is down)
                    await loop.run_in_executor(self.pool, self.core.discard)
                    for fut, _, err in results:
                        if not fut.done():
                            fut.set_exception(err if isinstance(err, OperationRefused) else down)
                    continue
                self.commits += 1
                self.ops += len(batch)
                for fut, value, err in results:
                    if fut.done():
                        continue
                    if err is not None:
                        fut.set_exception(err)
                    else:
                        fut.set_result(value)
        finally:
            self.running = False


@ray.remote(num_cpus=0)
class LedgerActor:
    """Only writer of the ledger. Create through `LedgerClient.connect`, never directly."""

    def __init__(self, settings: LedgerSettings) -> None:
        self.settings = settings
        self.core = LedgerCore(settings)
        # the database may be down now and come back: every call retries the reload first
        with contextlib.suppress(LedgerUnavailable):
            self.core.start()
        self.flusher = _Flusher(self.core)
        self.sweeper: asyncio.Task[None] | None = None
        self.readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ledger-read")

    def _start_sweeper(self) -> None:
        if self.sweeper is None and self.settings.sweep_interval_s > 0:
            self.sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            with contextlib.suppress(LedgerError):  # retried at the next tick
                await self.flusher.run(self.core.sweep)

    async def admit_batch(self, rows: list[tuple[Any, ...]]) -> list[Decision]:
        """Admissions as tuples (fields of `Admission`); returns decisions, all durable."""
        self._start_sweeper()
        try:
            result: list[Decision] = await self.flusher.run(lambda: self.core.admit_rows(rows))
        except LedgerUnavailable as exc:
            return [unavailable(r[0], exc.message) for r in rows]
        return result

    async def admit_packed(self, blob: bytes) -> bytes:
        """`admit_batch` with both sides pickled as one bytes object.

        Ray's cloudpickle calls back into Python for every tuple of a list result; one plain
        pickle of the whole batch costs a fraction of that on the actor's busy thread.
        """
        return pickle.dumps(await self.admit_batch(pickle.loads(blob)), protocol=pickle.HIGHEST_PROTOCOL)

    async def settle_batch(self, rows: list[tuple[Any, ...]]) -> list[str]:
        """Settlements as tuples (fields of `Settlement`); returns code values, all durable."""
        try:
            result: list[str] = await self.flusher.run(lambda: self.core.settle_rows(rows))
        except LedgerUnavailable:
            return [Code.LEDGER_UNAVAILABLE.value] * len(rows)
        return result

    async def call(self, op: str, kwargs: dict[str, Any]) -> Reply:
        """Admin writes (committed before replying) and reads, by name from a fixed list."""
        self._start_sweeper()
        if op not in ADMIN_OPS and op not in BOOK_READS and op not in DB_READS:
            return ("err", Code.INVALID_REQUEST.value, f"unknown ledger operation {op!r}")
        fn = getattr(self.core, op)
        kwargs = dict(kwargs)
        actor, actor_jti = kwargs.get("actor"), kwargs.pop("actor_jti", None)
        try:
            if op in ADMIN_OPS or op in BOOK_READS:
                value = await self.flusher.run(lambda: self._as(actor, actor_jti, lambda: fn(**kwargs)))
            elif not self.core.ready:
                raise LedgerUnavailable("ledger database unavailable")
            else:
                self.core.authenticate(actor, actor_jti)
                value = await asyncio.get_running_loop().run_in_executor(self.readers, lambda: fn(**kwargs))
        except LedgerError as exc:
            return ("err", exc.code.value, exc.message)
        except TypeError as exc:
            return ("err", Code.INVALID_REQUEST.value, f"bad arguments for {op}: {exc}")
        return ("ok", value)

    def _as(self, actor: str | None, actor_jti: str | None, op: Callable[[], Any]) -> Any:
        """Run `op` for a token actor only while that actor's credential is current and usable."""
        self.core.authenticate(actor, actor_jti)
        return op()

    async def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "ready": self.core.ready,
            "commits": self.flusher.commits,
            "ops": self.flusher.ops,
            "tokens": len(self.core.book.nodes),
            "pending": len(self.core.book.pending),
        }
