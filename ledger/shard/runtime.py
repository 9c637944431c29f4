"""What the ledger's Ray actors run: one `ShardRuntime` per shard, one `CoordinatorRuntime`.

    CoordinatorRuntime  (actor `<name>`)           key ring, whole-database reads, periodic jobs:
                                                    each shard's sweep, alert delivery, retention
    ShardRuntime, N     (actors `<name>-shard-<i>`) the only writers of quota state; each owns the
                                                    packages whose root maps to it (ledger.core.shards)

These are plain objects held by the actor classes of `ledger.shard.actors`, which check every caller's
capability first and expose nothing else: Ray makes every method of an actor class callable by
name, private helpers included, so the helpers live here. Operations arrive as records of
`ledger.core.ops` (checked to be one of its table's): each runs its own `on_shard`/`on_coordinator` on
the core, so nothing outside the table runs and no method is looked up by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import ray

from ledger.core import ops, wire
from ledger.core.capability import Capability
from ledger.core.codes import Code
from ledger.core.entities import Decision
from ledger.core.errors import CredentialNotIssued, LedgerError, LedgerUnavailable, OperationRefused
from ledger.core.leases import LeaseGrant, Version, WatchReply
from ledger.core.ops import Kind, Route
from ledger.core.results import Issued, Unsigned
from ledger.core.settings import LedgerSettings
from ledger.core.shards import ShardMap, ShardScope
from ledger.shard.coordinator import AlertContext, CoordinatorCore, no_context
from ledger.shard.core import ShardCore
from ledger.shard.flusher import Flusher, unavailable
from ledger.shard.metrics import ShardMetrics

log = logging.getLogger(__name__)
SIGN_RETRY_S = (0.1, 0.25, 0.5, 1.0, 2.0, 2.0, 3.0)
SHARD_CALL_TIMEOUT_S = 30.0  # the coordinator's periodic jobs never wait longer on one shard


def shard_name(settings: LedgerSettings, index: int) -> str:
    return f"{settings.actor_name}-shard-{index}"


def _checked(op: object, token_jti: object) -> ops.Call[Any]:
    """A record of the ops table with a well-typed `by_token`; `OperationRefused(INVALID_REQUEST)` otherwise
    (refused here, not as a failure inside a batch)."""
    call = ops.known(op)
    if call.acting is None and getattr(call, "by_token", None) is not None:
        raise OperationRefused("by_token must be a token id", Code.INVALID_REQUEST)
    if token_jti is not None and not isinstance(token_jti, str):
        raise OperationRefused("token_jti must be a string", Code.INVALID_REQUEST)
    return call


class ShardRuntime:
    """What one ledger shard actor runs (`ledger.shard.actors.ShardActor` checks its callers first)."""

    def __init__(self, settings: LedgerSettings, index: int, count: int, capability: Capability) -> None:
        self.settings = settings
        self.capability = capability
        owner = f"{ray.get_runtime_context().get_node_id()[:16]}:{os.getpid()}"
        self.core = ShardCore(settings, scope=ShardScope(index, count), fence_owner=owner)
        # the database may be down now, or hold rows the book cannot load: the shard starts
        # anyway, answers ledger_unavailable, and every batch retries the start (fence + load) first
        with contextlib.suppress(LedgerUnavailable):
            self.core.start()
        self.metrics = ShardMetrics(index)
        self.lost_reported = 0
        self.flusher = Flusher(self.core, on_commit=self._committed)
        self.changed = asyncio.Event()  # set (and replaced) when the watch log publishes a version
        self.published = self.core.watch.version
        self.lease_task: asyncio.Task[None] | None = None
        self.readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ledger-read")
        # launch() creates the coordinator first; the handle stays valid across its restarts
        self.coordinator: Any = ray.get_actor(settings.actor_name, namespace=settings.namespace)

    # ------------------------------------------------------------ hot path
    async def admit_packed(self, blob: bytes) -> bytes:
        """Admissions (`Admission.row`), both sides pickled as one bytes object: Ray's cloudpickle
        calls back into Python for every tuple of a list; one plain pickle costs a fraction."""
        return wire.pack(await self.admit_batch(wire.unpack(blob)))

    async def admit_batch(self, rows: list[Any]) -> list[Decision]:
        """Decisions, all durable when returned."""
        self._start_leases()
        try:
            result: list[Decision] = await self.flusher.run(lambda: self.core.admit_rows(rows))
        except LedgerUnavailable as exc:
            return [unavailable(r[0] if isinstance(r, tuple | list) and r else "", exc.message) for r in rows]
        finally:
            self._exit_if_fenced()
        return result

    async def settle_batch(self, rows: list[Any]) -> list[str]:
        """Settlements (`Settlement.row`); code values, all durable when returned."""
        try:
            result: list[str] = await self.flusher.run(lambda: self.core.settle_rows(rows))
        except LedgerUnavailable:
            return [Code.LEDGER_UNAVAILABLE.value] * len(rows)
        finally:
            self._exit_if_fenced()
        return result

    # ------------------------------------------------------------ leases (DESIGN §3a)
    async def lease_sync(self, blob: bytes) -> bytes:
        """Holders' `LeaseAsk`s → `LeaseGrant`s, pickled like `admit_packed`. The holders are marked
        alive before anything else: a lease whose reports cannot be committed now is not lost."""
        self._start_leases()
        asks = wire.unpack(blob)
        self.core.leases.heard(asks)
        try:
            grants: list[LeaseGrant] = await self.flusher.run(lambda: self.core.lease_sync(asks))
        except LedgerUnavailable as exc:
            down = LeaseGrant(Code.LEDGER_UNAVAILABLE, ttl_s=self.settings.lease_ttl_s, message=exc.message)
            grants = [down] * len(asks)
        finally:
            self._exit_if_fenced()
        return wire.pack(grants)

    async def lease_watch(self, since: Version, tokens: list[str], timeout_s: float) -> WatchReply:
        """Long poll: answers as soon as a narrowing change after `since` is committed (or at once if
        `since` is stale), else after `timeout_s` (at most 30 s) with nothing changed."""
        self._start_leases()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, min(float(timeout_s), 30.0))
        while True:
            event = self.changed
            reply: WatchReply = await self.flusher.run(partial(self.core.lease_watch, since, tokens))
            if reply.version != since or reply.policies:
                return reply
            remaining = deadline - loop.time()
            if remaining <= 0:
                return reply
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    def _committed(self, seconds: float, ops: int) -> None:
        self.metrics.commit(seconds, ops)
        version = self.core.watch.version
        if version != self.published:
            self.published = version
            self.changed.set()
            self.changed = asyncio.Event()

    def _start_leases(self) -> None:
        if self.lease_task is None:
            self.lease_task = asyncio.get_running_loop().create_task(self._lost_leases())

    async def _lost_leases(self) -> None:
        """Settle leases whose holder went silent past the TTL (DESIGN §3a), every second; and keep
        this shard's gauges (leases, quota remaining per package) current."""
        while True:
            await asyncio.sleep(min(1.0, self.settings.lease_ttl_s / 4))
            if self.core.book.leases:
                try:
                    await self.flusher.run(self.core.settle_lost_leases)
                except LedgerError:
                    pass  # the database is down: retried at the next tick
                except Exception:
                    log.exception("settling lost leases failed")
                finally:
                    self._exit_if_fenced()
            self._gauges()

    def _gauges(self) -> None:
        lost = self.core.leases.lost_units
        if lost > self.lost_reported:
            self.metrics.lost_lease(lost - self.lost_reported, self.settings.lost_lease_policy)
            self.lost_reported = lost
        self.metrics.leases(*self.core.leases.outstanding())
        for root in list(self.core.book.roots.values()):
            self.metrics.quota_remaining(root.id, max(root.allocation - root.consumed, 0) if root.live else 0)
        self.metrics.refresh()

    # ------------------------------------------------------------ the typed API, forwarded
    async def call(self, op: ops.Call[Any], token_jti: str | None = None) -> Any:
        """Run one operation on this shard; raises the ledger's errors. The caller (checked by the
        actor) is an admin, or acts for a token (`op.by_token`) whose credential it verified (the
        serving replicas); the shard still checks that `token_jti` is that token's current
        credential on a live path."""
        call = _checked(op, token_jti)
        if call.routing.route is Route.COORDINATOR:
            raise OperationRefused(f"{call.name} is not an operation of a ledger shard", Code.INVALID_REQUEST)
        by_token, core = call.acting, self.core
        if call.routing.kind is Kind.DB_READ:
            if not core.ready:
                raise LedgerUnavailable("ledger database unavailable")
            core.authenticate(by_token, token_jti)
            return await asyncio.get_running_loop().run_in_executor(self.readers, lambda: call.on_shard(core))

        def run() -> Any:
            core.authenticate(by_token, token_jti)
            return call.on_shard(core)

        try:
            value = await (
                self.flusher.run_committed(run) if call.routing.kind is Kind.COMMITTED_READ else self.flusher.run(run)
            )
        finally:
            self._exit_if_fenced()
        if isinstance(value, Unsigned):  # committed: now the coordinator signs its credential
            value = Issued(value.token, await self._sign(value))
        return value

    async def _sign(self, unsigned: Unsigned) -> str:
        for delay in (*SIGN_RETRY_S, None):
            try:
                credential: str = await self.coordinator.sign.remote(unsigned.claims, self.capability)
                return credential
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if delay is None:
                    break
                await asyncio.sleep(delay)
        # the token exists (committed); only its credential could not be made: `rotate` makes one
        raise CredentialNotIssued(
            f"token {unsigned.token.id} was committed, but the ledger coordinator could not sign its credential: "
            "do not repeat the operation; rotate the token to get a credential",
            unsigned.token.id,
        )

    def _exit_if_fenced(self) -> None:
        """A superseded instance ends its process: Ray restarts the shard with a fresh epoch if it
        is still the named one (a zombie's successor is already running)."""
        if self.core.fenced:
            log.error("ledger shard %d superseded: exiting", self.core.scope.index)
            asyncio.get_running_loop().call_later(0.5, os._exit, 1)

    # ------------------------------------------------------------ for the coordinator and tools
    async def alert_context(self, token_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        result: tuple[list[dict[str, Any]], dict[str, Any]] = await self.flusher.run(
            partial(self.core.alert_context, token_id)
        )
        return result

    async def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "shard": self.core.scope.index,
            "count": self.core.scope.count,
            "epoch": self.core.store.epoch,
            "ready": self.core.ready,
            "fenced": self.core.fenced,
            "commits": self.flusher.commits,
            "ops": self.flusher.ops,
            "failed_ops": self.flusher.failed_ops,
            "tokens": len(self.core.book.nodes),
            "pending": len(self.core.book.pending),
            "leases": self.core.leases.outstanding()[0],
            "leased_units": self.core.leases.outstanding()[1],
            "version": self.core.watch.version,
        }


class CoordinatorRuntime:
    """What the ledger coordinator actor runs (`ledger.shard.actors.CoordinatorActor` checks its callers first)."""

    def __init__(self, settings: LedgerSettings, shards: int, capability: Capability) -> None:
        self.settings = settings
        self.shards = shards
        self.capability = capability
        self.core = CoordinatorCore(settings, context_of=self._context)
        self.started = False
        with contextlib.suppress(LedgerUnavailable):
            self.core.start()
            self.started = True
        self.shard_handles: dict[int, Any] = {}
        # database work and signing (the ring writes its index) never run on the event loop
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ledger-coord")
        self.senders = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-notify")
        self.pruned_at = 0.0
        self.periodic: asyncio.Task[None] | None = None

    def describe(self, with_settings: bool) -> dict[str, Any]:
        """What attaching clients need: the shard count; and, for the capability's holder, the
        settings the ledger runs with (they may name the database's password)."""
        self._start_periodic()
        if not with_settings:
            return {"shards": self.shards}
        return {"shards": self.shards, "settings": self.settings}

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        if not self.started:  # the database was down when this instance started: migrate now
            await loop.run_in_executor(self.pool, self.core.start)
            self.started = True
        return await loop.run_in_executor(self.pool, partial(fn, *args))

    # ------------------------------------------------------------ the typed API, forwarded
    async def call(self, op: ops.Call[Any], token_jti: str | None = None) -> Any:
        self._start_periodic()
        call = _checked(op, token_jti)
        if Route.COORDINATOR not in (call.routing.route, call.routing.fallback) or call.acting is not None:
            raise OperationRefused(f"{call.name} is not an operation of the ledger coordinator", Code.INVALID_REQUEST)
        if isinstance(call, ops.DeliverAlerts):  # network I/O on its own thread
            return await self.deliver_alerts()
        core = self.core
        return await self._run(lambda: call.on_coordinator(core))

    async def sign(self, claims: dict[str, Any]) -> str:
        credential: str = await self._run(self.core.sign, claims)
        return credential

    async def root_of(self, token_id: str) -> str | None:
        root: str | None = await self._run(self.core.root_of, token_id)
        return root

    # ------------------------------------------------------------ periodic jobs
    def _start_periodic(self) -> None:
        if self.periodic is None and self.settings.sweep_interval_s > 0:
            self.periodic = asyncio.get_running_loop().create_task(self._periodic())

    def _shard(self, index: int) -> Any:
        """A shard's handle (looked up once: it stays valid across the shard's restarts)."""
        if index not in self.shard_handles:
            self.shard_handles[index] = ray.get_actor(
                shard_name(self.settings, index), namespace=self.settings.namespace
            )
        return self.shard_handles[index]

    async def _periodic(self) -> None:
        """Inside the cluster: each shard's expiry sweep, alert delivery, audit retention."""
        while True:
            await asyncio.sleep(self.settings.sweep_interval_s)
            for job in (self._sweep_shards, self.deliver_alerts, self._prune_when_due):
                try:
                    await job()
                except (LedgerError, ray.exceptions.RayError, ValueError):  # retried at the next tick
                    pass
                except Exception:  # a bug in one job must not end the periodic loop
                    log.exception("periodic ledger job %s failed", job.__name__)

    async def _sweep_shards(self) -> None:
        for i in range(self.shards):
            with contextlib.suppress(LedgerError, ray.exceptions.RayError, ValueError, TimeoutError):
                await asyncio.wait_for(
                    self._shard(i).call.remote(ops.Sweep(), None, self.capability), SHARD_CALL_TIMEOUT_S
                )

    async def _prune_when_due(self) -> None:
        if time.time() - self.pruned_at >= self.settings.prune_interval_s:
            await self._run(self.core.prune_audit)
            self.pruned_at = time.time()

    def _context(self, token_id: str) -> AlertContext:
        """The alert contacts along the token's path, from the shard that owns it (on a pool
        thread of this actor, never its event loop)."""
        root = self.core.root_of(token_id)
        if root is None:
            return no_context(token_id)
        shard = self._shard(ShardMap(self.shards).of_root(root))
        context: AlertContext = ray.get(
            shard.alert_context.remote(token_id, self.capability), timeout=SHARD_CALL_TIMEOUT_S
        )
        return context

    async def deliver_alerts(self) -> dict[str, int]:
        counts: dict[str, int] = await asyncio.get_running_loop().run_in_executor(
            self.senders, self.core.deliver_alerts
        )
        return counts
