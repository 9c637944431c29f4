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
from functools import partial
from typing import Any

import ray

from ledger.codes import Code
from ledger.core import LedgerCore
from ledger.entities import Decision
from ledger.errors import LedgerError, LedgerUnavailable, OperationRefused
from ledger.notify import DELIVERED, FAILED, PENDING, Notifier, channels_for, next_attempt_delay
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
        # network I/O of alert delivery never runs on the commit or reader threads
        self.senders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ledger-notify")
        self.notifier = Notifier(settings)
        self.delivering = asyncio.Lock()
        self.pruned_at = 0.0

    def _start_sweeper(self) -> None:
        if self.sweeper is None and self.settings.sweep_interval_s > 0:
            self.sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        """The periodic jobs, inside the cluster: expiry sweep, alert delivery, audit retention."""
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            with contextlib.suppress(LedgerError):  # retried at the next tick
                await self.flusher.run(self.core.sweep)
            with contextlib.suppress(LedgerError):
                await self.deliver_alerts()
            if time.time() - self.pruned_at >= self.settings.prune_interval_s:
                with contextlib.suppress(LedgerError):
                    await self.prune_audit()

    # ---------------------------------------------------------------- periodic jobs
    async def deliver_alerts(self, limit: int = 100) -> dict[str, int]:
        """One delivery pass over the due alerts; returns counts by outcome of this pass.

        Each channel of an alert is sent until it is delivered (then never again) or has
        failed `alert_max_attempts` times; passes never overlap."""
        self._start_sweeper()
        if not self.core.ready:
            raise LedgerUnavailable("ledger database unavailable")
        loop = asyncio.get_running_loop()
        counts = {"alerts": 0, "sent": 0, "failed_attempts": 0}
        async with self.delivering:
            now = time.time()
            due = await loop.run_in_executor(self.readers, lambda: self.core.store.due_alerts(now, limit))
            for alert in due:
                counts["alerts"] += 1
                token_id: str = alert["token_id"]
                chain, token = await self.flusher.run(partial(self.core.alert_context, token_id))
                channels: dict[str, dict[str, Any]] = alert["channels"] or {
                    c: {"status": PENDING, "attempts": 0, "error": None, "at": None}
                    for c in channels_for(chain, self.settings)
                }
                for channel, st in channels.items():
                    if st["status"] != PENDING:
                        continue
                    err = await loop.run_in_executor(self.senders, self.notifier.send, channel, alert, token)
                    st["attempts"] += 1
                    st["at"] = time.time()
                    st["error"] = err
                    if err is None:
                        st["status"] = DELIVERED
                        counts["sent"] += 1
                    else:
                        counts["failed_attempts"] += 1
                        if st["attempts"] >= self.settings.alert_max_attempts:
                            st["status"] = FAILED
                await self._record(alert["id"], channels)
        return counts

    async def _record(self, alert_id: int, channels: dict[str, dict[str, Any]]) -> None:
        states = {st["status"] for st in channels.values()}
        attempts = max((st["attempts"] for st in channels.values()), default=0)
        errors = [f"{c}: {st['error']}" for c, st in channels.items() if st["error"]]
        if not channels:
            status = "no_channel"
        elif PENDING in states:
            status = PENDING
        else:
            status = FAILED if FAILED in states else DELIVERED
        fields: dict[str, Any] = {
            "channels": channels,
            "status": status,
            "attempts": attempts,
            "last_error": "; ".join(errors)[:2000] or None,
            "next_attempt_at": (
                time.time() + next_attempt_delay(attempts, self.settings.alert_backoff_s) if status == PENDING else None
            ),
        }
        if status == DELIVERED:
            fields["delivered_at"] = time.time()
        # on the commit thread: the actor stays the only writer, one write at a time
        await self.flusher.run_raw(lambda: self.core.store.record_delivery(alert_id, **fields))

    async def prune_audit(self) -> dict[str, int]:
        """Delete audit rows older than the retention window (DESIGN §3: 90 days by default)."""
        self._start_sweeper()
        if not self.core.ready:
            raise LedgerUnavailable("ledger database unavailable")
        before = time.time() - self.settings.audit_retention_days * 86400
        out: dict[str, int] = await self.flusher.run_raw(lambda: self.core.store.prune_audit(before))
        self.pruned_at = time.time()
        return out

    async def acknowledge_alert(self, alert_id: int, by: str) -> bool:
        if not self.core.ready:
            raise LedgerUnavailable("ledger database unavailable")
        ok: bool = await self.flusher.run_raw(lambda: self.core.store.acknowledge_alert(alert_id, by, time.time()))
        return ok

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
