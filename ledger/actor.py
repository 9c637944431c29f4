"""LedgerActor: the named, detached Ray actor that is the only writer of quota state.

A thin async shell around `LedgerCore`. Every call is queued; one flusher applies all
queued calls to the book in arrival order, then commits them in ONE transaction on a
worker thread while new calls keep queueing (group commit). Callers get their answers
only after that commit, so an "admitted" verdict always has its durable debit.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import pickle
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import ray

from ledger.codes import Code
from ledger.core import LedgerCore
from ledger.entities import Decision
from ledger.errors import LedgerError, LedgerUnavailable, OperationRefused, WriteRejected
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
# admin operations whose effect is outside the book (the key ring): a batch applied again after
# another call failed keeps their first result instead of running them twice
OUTSIDE_BOOK = frozenset({"rotate_keys", "issue_admin"})
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
    done: bool = False
    durable: bool = False  # its changes were committed: its answer stands
    value: Any = None
    error: BaseException | None = None

    def reply(self, value: Any = None, error: BaseException | None = None) -> None:
        self.done, self.value, self.error = True, value, error


def _internal_error(exc: BaseException) -> LedgerUnavailable:
    return LedgerUnavailable(f"internal error in the ledger ({type(exc).__name__}); nothing was changed")


class _Flusher:
    """Queue + group commit over a LedgerCore. Runs on the actor's event loop.

    Contract: every queued call gets exactly one answer, and only after the commit that made
    it durable. One call cannot fail another's: an operation that raises anything but
    `OperationRefused` fails alone (LedgerUnavailable, "internal error"; logged with its
    traceback), the book (which it may have half-changed) is rebuilt from the database with
    every rate bucket carried over, and the other calls of the batch are applied again and
    committed (at most MAX_REAPPLY rounds). A commit the database refuses for its data is
    retried call by call, so only the call at fault fails. Only when the database cannot be
    reached does a whole batch get `ledger_unavailable`.
    """

    def __init__(self, core: LedgerCore) -> None:
        self.core = core
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
                    await self._commit_batch(batch)
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


@ray.remote(num_cpus=0)
class LedgerActor:
    """Only writer of the ledger. Create through `LedgerClient.connect`, never directly."""

    def __init__(self, settings: LedgerSettings) -> None:
        self.settings = settings
        self.core = LedgerCore(settings)
        # the database may be down now, or hold rows the book cannot load: the actor starts
        # anyway, answers ledger_unavailable, and every batch retries the reload first
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
            for job in (self._sweep_once, self.deliver_alerts, self._prune_when_due):
                try:
                    await job()
                except LedgerError:  # retried at the next tick
                    pass
                except Exception:  # a bug in one job must not end the periodic loop
                    log.exception("periodic ledger job %s failed", job.__name__)

    async def _sweep_once(self) -> None:
        await self.flusher.run(self.core.sweep)

    async def _prune_when_due(self) -> None:
        if time.time() - self.pruned_at >= self.settings.prune_interval_s:
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
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            return ("err", Code.INVALID_REQUEST.value, f"bad arguments for {op}")
        kwargs = dict(kwargs)
        actor, actor_jti = kwargs.get("actor"), kwargs.pop("actor_jti", None)
        try:
            inspect.signature(fn).bind(**kwargs)  # refused here, not as a failure inside a batch
        except TypeError as exc:
            return ("err", Code.INVALID_REQUEST.value, f"bad arguments for {op}: {exc}")
        if not (actor is None or isinstance(actor, str)) or not (actor_jti is None or isinstance(actor_jti, str)):
            return ("err", Code.INVALID_REQUEST.value, "actor and actor_jti must be strings")
        try:
            if op in ADMIN_OPS or op in BOOK_READS:
                value = await self.flusher.run(
                    lambda: self._as(actor, actor_jti, lambda: fn(**kwargs)), in_book=op not in OUTSIDE_BOOK
                )
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
            "failed_ops": self.flusher.failed_ops,
            "tokens": len(self.core.book.nodes),
            "pending": len(self.core.book.pending),
        }
