"""LeaseHolder: admission from quota leases inside one ingress replica (DESIGN §3a). No Ray here.

    admit(a) ── idempotency key, strict package, small balance ──────────────► shard (synchronous)
       │ otherwise: every check of DESIGN §3 against the cached policy of the token and its
       │ ancestors, then units from this replica's lease — no I/O (a refill is awaited only
       │ when the lease is empty; it is normally topped up in the background)
    settle(s) ─ local: units kept → a usage row for the next report; refund → back to the lease
    every `report_interval_s`: reports (idempotent by sequence number), refills, renewals,
                               releases of idle leases — one call per shard for all tokens
    a watch per shard (long poll): narrowing changes replace cached policies at once; a token
                               whose policy may have changed admits nothing until it re-synced

Never overspends: a request is served only from units the shard escrowed for this holder, and
the holder stops using a lease `ttl - margin` after the send time of its last answered ask, before
the shard may settle it as lost. Never charges without an answer: a refund returns the units.

`transport` is the ledger (`LedgerClient` over Ray, `InProcessLedger` in tests): see `LeaseTransport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from ledger.batcher import Batcher
from ledger.codes import Code
from ledger.entities import Admission, Decision, Settlement, UsageState
from ledger.errors import LedgerError
from ledger.leases import (
    LeaseAsk,
    LeaseGrant,
    LeaseUse,
    TokenPolicy,
    Version,
    WatchReply,
    access_refusal,
    status_refusal,
)
from ledger.tree import MAX_UNITS

log = logging.getLogger(__name__)
MAX_DONE = 100_000  # request ids settled here, remembered so a retry to this replica is charged once
WATCH_TIMEOUT_S = 10.0
MAX_ASKS = 8
RECALL_POLL_S = 0.05  # while other replicas give units back, a waiting admission asks again this often
RECALL_WAIT_S = 0.3  # ... for at most this long


class LeaseTransport(Protocol):
    """What the holder needs of the ledger."""

    def shard_of(self, root_id: str) -> int: ...

    @property
    def shard_count(self) -> int: ...

    async def lease_sync(self, shard: int, asks: list[LeaseAsk]) -> list[LeaseGrant]: ...

    async def lease_watch(self, shard: int, since: Version, tokens: list[str], timeout_s: float) -> WatchReply: ...

    async def admit(self, a: Admission) -> Decision: ...

    async def settle(self, s: Settlement) -> Code: ...


@dataclass(frozen=True, slots=True)
class HolderConfig:
    report_interval_s: float = 0.1
    ttl_margin_s: float = 1.0  # stop using a lease this long before the shard may call it lost
    target_s: float = 1.0  # a refill asks for about this many seconds of the token's recent rate
    min_want: int = 8
    max_want: int = 10_000
    idle_release_s: float = 10.0
    deny_cache_s: float = 0.5  # a quota_exhausted answer is reused locally this long
    strict_recheck_s: float = 1.0


@dataclass(slots=True, eq=False)
class _Inflight:
    units: int
    gen: int
    model: str
    client_ip: str | None
    image_bytes: int
    ts: float


@dataclass(slots=True, eq=False)
class _Held:
    """One token as this holder knows it."""

    token_id: str
    root_id: str
    shard: int
    policy: TokenPolicy | None = None
    # the watch said the policy changed at this version: a cached one older than it is not used
    need: Version = (-1, -1)
    ttl_s: float = 10.0
    lease_id: str = ""
    gen: int = 0  # bumped whenever the lease ends: settlements of an older lease are not reported
    avail: int = 0
    valid_until: float = 0.0
    inflight: dict[str, _Inflight] = field(default_factory=dict)
    buffer: list[LeaseUse] = field(default_factory=list)
    report: tuple[int, tuple[LeaseUse, ...], str] | None = None  # (seq, rows, lease) sent, not yet acked
    buffer_since: float = 0.0  # when the oldest row of `buffer` was queued
    report_since: float = 0.0  # ... and of `report`
    seq: int = 0  # the last report of the current lease the shard applied
    strict_until: float = 0.0
    deny: tuple[Code, str, float, float | None] | None = None  # (code, message, until, retry_after)
    busy: asyncio.Future[None] | None = None
    waiting: int = 0  # units of admissions waiting for an ask to come back
    releasing: bool = False  # a release is in flight: admissions go to the shard meanwhile
    recall: bool = False  # the shard asked for the unused units of this lease (another replica needs them)
    recall_until: float = 0.0  # units are on their way back from other replicas: ask again until then
    rate: float = 0.0  # admissions per second (EWMA)
    count: int = 0
    count_since: float = 0.0
    last_used: float = 0.0

    @property
    def stale(self) -> bool:
        return self.policy is None or self.policy.version < self.need

    def take(self, p: TokenPolicy | None) -> None:
        """A policy from the shard, if it is not older than the one held."""
        if p is not None and (self.policy is None or p.version >= self.policy.version):
            self.policy = p


@dataclass(slots=True)
class HolderStats:
    local: int = 0  # admitted from the lease without waiting
    waited: int = 0  # admitted from the lease after waiting for a refill
    strict: int = 0  # sent to the shard synchronously
    denied_local: int = 0
    reports: int = 0
    report_failures: int = 0
    lost_leases: int = 0


class LeaseHolder:
    """One per ingress replica; all methods run on its event loop."""

    def __init__(
        self,
        transport: LeaseTransport,
        holder_id: str,
        config: HolderConfig | None = None,
        clock: Callable[[], float] = time.time,
        on_admit: Callable[[Decision, str, str, bool], None] | None = None,
    ) -> None:
        self.transport = transport
        self.holder_id = holder_id
        self.config = config or HolderConfig()
        self.clock = clock
        self.on_admit = on_admit  # (decision, model, package, local) for metrics
        self.held: dict[str, _Held] = {}
        self.done: dict[str, str] = {}  # request id -> state, settled here
        self.stats = HolderStats()
        self.batchers = [Batcher(self._sender(i), 4096, 2) for i in range(transport.shard_count)]
        self.tasks: list[asyncio.Task[None]] = []
        self.jobs: set[asyncio.Future[None]] = set()  # asks started outside the report loop
        self.closed = False

    # ------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        if self.tasks or self.closed:
            return
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self._report_loop()))
        self.tasks.extend(loop.create_task(self._watch_loop(i)) for i in range(self.transport.shard_count))

    async def close(self, timeout_s: float = 2.0) -> None:
        """Report what is unreported and release every lease (best effort within `timeout_s`)."""
        self.closed = True
        for t in self.tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*[self._exchange(h, 0, release=True) for h in list(self.held.values())]), timeout_s
            )

    # ------------------------------------------------------------ admission
    async def admit(self, a: Admission) -> Decision:
        """The verdict for one request; OK means its units are held for it until `settle`."""
        self._start()
        if a.idem_key is not None:  # the key is global: only the shard can dedupe it
            return await self._strict(a)
        h = self.held.get(a.token_id)
        now = self.clock()
        if h is None or h.root_id != a.root_id:
            h = self.held[a.token_id] = _Held(a.token_id, a.root_id, self.transport.shard_of(a.root_id))
            h.count_since = now  # the first second of traffic counts towards the rate estimate
        h.last_used = now
        h.count += 1
        prior = h.inflight.get(a.request_id)
        if prior is not None:  # a retry of a request this replica is serving: no second debit
            if prior.units != a.units or prior.model != a.model:
                return self._denied(h, a, Code.INVALID_REQUEST, "request id already in use for another request", now)
            return self._ok(h, a, replayed=True)
        if self.done.get(a.request_id) == UsageState.SETTLED.value:
            return Decision(Code.REPLAY, a.request_id, a.token_id, message="request already settled")
        waited = False
        # concurrent arrivals share one ask, then ask again for all who still wait; while units are
        # being asked back from other replicas' leases, ask again shortly (bounded)
        for _ in range(MAX_ASKS):
            if now < h.strict_until or h.releasing or not self._needs_sync(h, a.units, now):
                break
            h.waiting += a.units
            try:
                await self._exchange(h, self._want(h, a.units), jti=a.jti)
            finally:
                h.waiting -= a.units
            waited = True
            now = self.clock()
            if h.avail < a.units and now < h.recall_until:
                await asyncio.sleep(RECALL_POLL_S)
                now = self.clock()
        if now < h.strict_until or h.releasing:
            return await self._strict(a)
        return await self._local(h, a, now, waited)

    def _needs_sync(self, h: _Held, units: int, now: float) -> bool:
        if h.stale:
            return True
        if h.deny is not None and now < h.deny[2]:
            return False
        return h.avail < units or now >= h.valid_until

    async def _local(self, h: _Held, a: Admission, now: float, waited: bool) -> Decision:
        p = h.policy
        if p is None or h.stale:  # no current policy (the ledger could not be asked): the shard decides
            return await self._strict(a)
        if a.jti != p.jti:
            return self._denied(h, a, Code.REVOKED_TOKEN, "credential was rotated or revoked", now)
        refusal = status_refusal(p.path, now)
        if refusal is None and (type(a.units) is not int or not 0 < a.units <= MAX_UNITS):
            refusal = (Code.INVALID_REQUEST, f"units must be an integer in 1..{MAX_UNITS}")
        refusal = refusal or access_refusal(p.path, a.model, a.client_ip)
        if refusal is not None:
            return self._denied(h, a, refusal[0], refusal[1], now)
        if h.avail >= a.units and now < h.valid_until:
            h.avail -= a.units
            h.inflight[a.request_id] = _Inflight(a.units, h.gen, a.model, a.client_ip, a.image_bytes, now)
            if waited:
                self.stats.waited += 1
            else:
                self.stats.local += 1
            return self._ok(h, a)
        if h.deny is not None and now < h.deny[2]:
            code, message, until, retry = h.deny
            return self._denied(h, a, code, message, now, retry_after=(until - now) if retry else None)
        return await self._strict(a)  # not enough in the lease (or it lapsed): the shard decides, exactly

    def _ok(self, h: _Held, a: Admission, replayed: bool = False) -> Decision:
        p = h.policy
        assert p is not None
        d = Decision(
            Code.OK,
            a.request_id,
            a.token_id,
            0 if replayed else a.units,
            p.used + self._unreported(h),
            p.allocation,
            max(0, p.free + h.avail),
            p.rate_limit,
            h.avail if p.rate_limit is not None else None,
            replayed=replayed,
        )
        if self.on_admit is not None:
            self.on_admit(d, a.model, a.root_id, True)
        return d

    @staticmethod
    def _unreported(h: _Held) -> int:
        """Units this holder admitted that the policy's `used` does not count yet (in flight, or
        answered and not yet acknowledged by the shard)."""
        rows = h.buffer + list(h.report[1] if h.report else ())
        return sum(f.units for f in h.inflight.values()) + sum(u.kept for u in rows)

    def _denied(
        self, h: _Held, a: Admission, code: Code, message: str, now: float, retry_after: float | None = None
    ) -> Decision:
        self.stats.denied_local += 1
        if not h.buffer:
            h.buffer_since = now
        h.buffer.append(
            LeaseUse(a.request_id, now, a.model, 0, 0, UsageState.DENIED.value, code.value, a.client_ip, a.image_bytes)
        )
        p = h.policy
        d = Decision(
            code,
            a.request_id,
            a.token_id,
            0,
            p.used if p else 0,
            p.allocation if p else 0,
            max(0, p.free + h.avail) if p else 0,
            p.rate_limit if p else None,
            0 if p and p.rate_limit is not None else None,
            math.ceil(retry_after) if retry_after else None,
            message,
        )
        if self.on_admit is not None:
            self.on_admit(d, a.model, a.root_id, True)
        return d

    async def _strict(self, a: Admission) -> Decision:
        self.stats.strict += 1
        d = await self.transport.admit(a)
        if self.on_admit is not None:
            self.on_admit(d, a.model, a.root_id, False)
        return d

    # ------------------------------------------------------------ settlement
    async def settle(self, s: Settlement) -> Code:
        """Local admissions: recorded for the next report (a refund goes back to the lease at
        once). Others: settled at the shard (one attempt; the caller retries LEDGER_UNAVAILABLE)."""
        h = self.held.get(s.token_id)
        f = h.inflight.pop(s.request_id, None) if h is not None else None
        if h is None or f is None:
            return await self.transport.settle(s)
        state = UsageState.SETTLED.value if s.success else UsageState.REFUNDED.value
        self.done.pop(s.request_id, None)
        self.done[s.request_id] = state
        if len(self.done) > MAX_DONE:
            del self.done[next(iter(self.done))]
        if f.gen != h.gen:  # its lease was settled as lost meanwhile: that row holds these units
            return Code.OK
        charged = s.charged if type(s.charged) is int else None
        kept = (f.units if charged is None else max(0, min(charged, f.units))) if s.success else 0
        h.avail += f.units - kept
        if not h.buffer:
            h.buffer_since = self.clock()
        h.buffer.append(
            LeaseUse(
                s.request_id,
                f.ts,
                f.model,
                f.units,
                kept,
                state,
                Code.OK.value,
                f.client_ip,
                f.image_bytes,
                float(s.latency_ms),
                int(s.detections),
                float(s.gpu_ms),
            )
        )
        return Code.OK

    # ------------------------------------------------------------ talking to the shard
    def _want(self, h: _Held, units: int = 0) -> int:
        c = self.config
        return max(c.min_want, units, min(c.max_want, max(h.waiting, math.ceil(h.rate * c.target_s))))

    async def _exchange(
        self, h: _Held, want: int, release: bool = False, jti: str | None = None, give_back: bool = False
    ) -> None:
        """One ask for this token (coalesced: a caller arriving meanwhile waits for the same one; a
        release waits for it and then asks itself)."""
        while h.busy is not None:
            await asyncio.shield(h.busy)
            if not release:
                return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        h.busy = fut
        try:
            if release:  # nothing more is admitted from a lease being given back
                h.avail, h.valid_until, h.releasing = 0, 0.0, True
            back = 0
            if give_back and not release:  # recalled: the units no request holds go back to `free`
                back, h.avail, h.recall = h.avail, 0, False
            ask = self._ask(h, max(want, h.waiting) if want else 0, release, jti, back)
            sent = self.clock()
            try:
                grant: LeaseGrant | None = await self.batchers[h.shard].submit(ask)
            except (LedgerError, OSError, RuntimeError) as exc:
                log.warning("lease ask for %s failed: %r", h.token_id, exc)
                grant = None
            self._apply(h, ask, grant, sent)
        finally:
            h.busy, h.releasing = None, False
            fut.set_result(None)

    def _ask(self, h: _Held, want: int, release: bool, jti: str | None, give_back: int = 0) -> LeaseAsk:
        """`jti`: the credential of the request that needs units (the shard grants only to a current
        one); background asks use the current credential id from the policy."""
        if h.report is None and h.buffer:
            rows, h.buffer = tuple(h.buffer), []
            h.report = (h.seq + 1 if h.lease_id else 0, rows, h.lease_id)
            h.report_since = h.buffer_since
        seq, rows = (h.report[0], h.report[1]) if h.report else (0, ())
        if jti is None:
            jti = h.policy.jti if h.policy else ""
        return LeaseAsk(h.token_id, jti, h.root_id, self.holder_id, h.lease_id, seq, rows, want, release, give_back)

    def _apply(self, h: _Held, ask: LeaseAsk, grant: LeaseGrant | None, sent: float) -> None:
        now = self.clock()
        c = self.config
        if grant is None or not isinstance(grant, LeaseGrant):
            self.stats.report_failures += 1
            return  # unreachable: the report is sent again, the lease lapses on its own clock
        if grant.code is Code.LEDGER_UNAVAILABLE:  # heard, nothing committed: the lease lives on
            self.stats.report_failures += 1
            if h.lease_id and grant.alive:
                h.valid_until = max(h.valid_until, sent + grant.ttl_s - c.ttl_margin_s)
            return
        self.stats.reports += 1
        if grant.lost:
            self.stats.lost_leases += 1
            self._end_lease(h)
        else:
            if h.report is not None and (h.report[2] == "" or grant.applied_seq >= h.report[0]):
                if h.report[2]:
                    h.seq = h.report[0]
                h.report = None
            if ask.release:
                self._end_lease(h)
            elif grant.lease_id:
                if grant.lease_id != h.lease_id:
                    h.lease_id, h.seq = grant.lease_id, grant.applied_seq if ask.lease_id == grant.lease_id else 0
                h.valid_until = sent + grant.ttl_s - c.ttl_margin_s
                h.avail += grant.granted
        h.take(grant.policy)
        h.ttl_s = grant.ttl_s or h.ttl_s
        if grant.code is Code.QUOTA_EXHAUSTED and grant.recalled:
            h.deny = None  # other replicas are giving units back: ask again shortly, never cache this
            h.recall_until = max(h.recall_until, now) if h.recall_until > now else now + RECALL_WAIT_S
        elif grant.code in (Code.QUOTA_EXHAUSTED, Code.RATE_LIMITED):
            hold = grant.retry_after if grant.retry_after else c.deny_cache_s
            h.deny = (grant.code, grant.message, now + hold, grant.retry_after)
        elif grant.granted:
            h.deny = None
        h.strict_until = now + c.strict_recheck_s if grant.strict and not grant.recalled else 0.0

    def _end_lease(self, h: _Held) -> None:
        h.lease_id, h.avail, h.valid_until, h.seq = "", 0, 0.0, 0
        h.gen += 1
        if h.report is not None and h.report[2]:
            h.report = None  # its rows went with the lease (released after them, or lost)
        h.buffer = [u for u in h.buffer if u.state == UsageState.DENIED.value]

    def _sender(self, shard: int) -> Callable[[list[LeaseAsk]], Any]:
        async def send(asks: list[LeaseAsk]) -> list[LeaseGrant]:
            return await self.transport.lease_sync(shard, asks)

        return send

    # ------------------------------------------------------------ background
    async def _report_loop(self) -> None:
        c = self.config
        while not self.closed:
            await asyncio.sleep(c.report_interval_s)
            try:
                await self.tick()
            except Exception:  # a bug here must not end reporting
                log.exception("lease report tick failed")

    async def tick(self) -> None:
        """One round: reports, refills, renewals and releases of every token, concurrently."""
        now = self.clock()
        c = self.config
        jobs = []
        for h in list(self.held.values()):
            if now - h.count_since >= 1.0:
                h.rate = 0.5 * h.rate + 0.5 * h.count / max(now - h.count_since, 1e-3)
                h.count, h.count_since = 0, now
            if h.busy is not None:
                continue
            idle = now - h.last_used > c.idle_release_s and not h.inflight
            # a revoked or expired token (seen through the watch): its lease goes back at once,
            # after the requests admitted before the change are answered and reported
            dead = h.policy is not None and not h.inflight and status_refusal(h.policy.path, now) is not None
            if idle and not h.lease_id and not h.buffer and h.report is None:
                del self.held[h.token_id]
                continue
            usable = not h.stale and now >= h.strict_until
            denied = h.deny is not None and now < h.deny[2]
            want = self._want(h)
            refill = usable and not idle and not dead and not denied and h.avail < max(1, want // 2)
            renew = bool(h.lease_id) and h.valid_until - now < h.ttl_s / 2
            release = (idle or dead) and bool(h.lease_id)
            give_back = h.recall and h.avail > 0 and bool(h.lease_id)
            if give_back:
                refill = False
            if h.buffer or h.report or refill or renew or release or give_back:
                jobs.append(
                    self._exchange(h, want if refill and not release else 0, release=release, give_back=give_back)
                )
        if jobs:
            await asyncio.gather(*jobs)

    async def _watch_loop(self, shard: int) -> None:
        since: Version = (-1, -1)
        while not self.closed:
            tokens = [t for t, h in self.held.items() if h.shard == shard]
            try:
                reply = await self.transport.lease_watch(shard, since, tokens, WATCH_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("lease watch of shard %d failed: %r", shard, exc)
                await asyncio.sleep(0.2)
                continue
            if isinstance(reply, WatchReply):
                self.on_watch(shard, reply)
                since = reply.version

    def on_watch(self, shard: int, reply: WatchReply) -> None:
        """Fresh policies replace cached ones; a token whose path changed but whose policy did not
        come along (it was not watched yet) re-syncs before admitting again."""
        changed = reply.changed
        for t, h in self.held.items():
            if h.shard != shard:
                continue
            if t in reply.recalls and h.lease_id:
                h.recall = True
                if h.avail > 0 and h.busy is None:  # at once: another replica is waiting for them
                    self._spawn(self._exchange(h, 0, give_back=True))
            if t in reply.policies:
                p = reply.policies[t]
                h.need = max(h.need, reply.version)
                h.take(p)
                if p is not None and p.free > 0:
                    h.deny = None  # a top-up or a reclaim into it: ask again
            elif h.policy is not None and (changed is None or any(r.id in changed for r in h.policy.path)):
                h.need = max(h.need, reply.version)

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(job)
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)

    # ------------------------------------------------------------ introspection
    def outstanding(self) -> tuple[int, int]:
        """Leases held and their units not yet used."""
        held = [h for h in self.held.values() if h.lease_id]
        return len(held), sum(h.avail + sum(f.units for f in h.inflight.values()) for h in held)

    def report_lag(self) -> float:
        """Age of the oldest usage row not yet acknowledged by its shard (0 when all are)."""
        now = self.clock()
        since = [h.report_since for h in self.held.values() if h.report is not None and h.report[1]]
        since += [h.buffer_since for h in self.held.values() if h.buffer]
        return now - min(since) if since else 0.0
