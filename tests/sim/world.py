"""A deterministic simulation of the quota-lease protocol (DESIGN §3b).

The real `LeaseHolder`s, the real `ShardCore` (book, lease desk, fencing) and the real store on
SQLite run over a simulated network and a simulated clock, on one asyncio loop with no timers, no
threads and no sleeps: one seed gives one run, bit for bit. Each step the seeded RNG picks one
action:

    request     a client asks a holder (a new request id, or a redelivery of an earlier one to
                another holder), with hostile field values now and then
    finish      an admitted request ends: answered (success), server failure or hang-up (refund)
    deliver     one message in flight reaches the shard, in any order: applied and committed, then
                answered; or the commit fails (the book is rebuilt); or the shard crashes between
                the commit and the reply (the message is resent to the new instance, as
                `LedgerClient` does); or the call fails for good; or it is duplicated
    watch       a holder gets its watch answer (narrowing changes, recalls)
    tick        a holder's report round
    admin       create, split, top-up, reclaim (all or some), revoke, rotate, expiry, limits
                (rate, models, IPs) on trees up to 4 deep
    crash       the shard restarts: the book is rebuilt from the database under a new epoch
    kill        a holder dies without closing; `close` closes one with requests in flight
    time        the clock advances (now and then past the lease TTL); holder clocks jump
    sweep       the shard settles lost leases (its actor does this every second)

After every step the oracle (`tests/sim/oracle.py`) checks what must hold at any instant; at the
end every request is finished, every message delivered, every holder closed or timed out, and the
books are checked exactly.
"""

from __future__ import annotations

import asyncio
import base64
import heapq
import itertools
import random
import secrets
import shutil
import sqlite3
import tempfile
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import event, select

from ledger.client.holder import HolderConfig, LeaseHolder
from ledger.core.codes import Code
from ledger.core.entities import Admission, Decision, Settlement, TokenSpec, make_token_limits
from ledger.core.errors import LedgerUnavailable, OperationRefused
from ledger.core.leases import LeaseAsk, LeaseGrant, Version, WatchReply
from ledger.core.settings import LedgerSettings
from ledger.shard.core import ShardCore
from ledger.store.repository import ADMIN, USAGE
from tests.sim.oracle import JUMP_S, MAX_SKEW_S, Oracle, OToken, Violation

INTERVAL = 0.1
TTL = 10.0
MODELS = ("parts@1", "parts@2", "yolo@1")
# one seed in BURSTY_EVERY also sends bursts (`a_burst`); the others keep the traffic they always had,
# so the seeds recorded for the mutation runs replay as they did
BURSTY_EVERY = 8
# one seed class of the 8 (RACY) also sends a request to a replica in the same instant as its report
# round, between the round's choice of what to send and the message (an idle release, for one)
RACY = 6
IPS = ("10.0.0.1", "10.0.0.2", "10.0.0.3")
RATES: tuple[tuple[str, float, int] | None, ...] = (None, None, ("20/s:5", 20.0, 5), ("50/s:10", 50.0, 10),
                                                    ("200/s:40", 200.0, 40), ("2/s:2", 2.0, 2))  # fmt: skip
HOSTILE_MODELS = ("m" * 200 + "@1", "x" * 201, "", "parts@1\x00")
HOSTILE_IPS = ("1" * 64, "9" * 65, "not-an-ip", "::1")
_TEMPLATE: dict[str, Any] = {}


def template_db() -> Path:
    """A migrated, empty ledger database, made once per process and copied for every seed."""
    if "db" not in _TEMPLATE:
        d = Path(tempfile.mkdtemp(prefix="yt-sim-template-"))
        path = d / "ledger.db"
        core = ShardCore(LedgerSettings(database_url=f"sqlite:///{path}", data_dir=d), clock=lambda: 1000.0)
        core.start()
        core.close()
        with sqlite3.connect(path) as c:
            c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        _TEMPLATE["db"] = path
    return _TEMPLATE["db"]


@dataclass(eq=False)
class Message:
    kind: str  # lease | admit | settle
    holder: int
    payload: Any
    fut: asyncio.Future[Any]
    applied: bool = False  # committed at least once (a resend of it is a duplicate)


@dataclass(eq=False)
class SimHolder:
    index: int
    holder: LeaseHolder
    skew: float = 0.0
    alive: bool = True
    closing: bool = False
    seen: int = 0  # the oracle's change counter when its last watch answer was computed
    since: Version = (-1, -1)
    tokens_lost: set[str] = field(default_factory=set)


@dataclass(eq=False)
class Open:
    admission: Admission
    holder: int
    decision: Decision
    strict: bool


class SimTransport:
    """`LeaseTransport` of one holder: every call is a message the world delivers when it chooses."""

    def __init__(self, world: World, index: int) -> None:
        self.world = world
        self.index = index

    @property
    def shard_count(self) -> int:
        return 1

    def shard_of(self, root_id: str) -> int:
        return 0

    def _send(self, kind: str, payload: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.world.net.append(Message(kind, self.index, payload, fut))
        return fut

    async def lease_sync(self, shard: int, asks: list[LeaseAsk]) -> list[LeaseGrant]:
        result: list[LeaseGrant] = await self._send("lease", list(asks))
        return result

    async def lease_watch(self, shard: int, since: Version, tokens: list[str], timeout_s: float) -> WatchReply:
        raise AssertionError("the world delivers watch answers itself")

    async def admit(self, a: Admission) -> Decision:
        self.world.strict_ids.add((self.index, a.request_id))
        result: Decision = await self._send("admit", a)
        return result

    async def settle(self, s: Settlement) -> Code:
        result: Code = await self._send("settle", s)
        return result


class World:
    def __init__(self, seed: int, steps: int, policy: str = "refund", trace_len: int = 100000) -> None:
        self.seed = seed
        self.steps = steps
        self.policy = policy
        self.rng = random.Random(seed)
        self.now = 1000.0
        self.dir = Path(tempfile.mkdtemp(prefix=f"yt-sim-{seed}-", dir=_tmp_root()))
        shutil.copyfile(template_db(), self.dir / "ledger.db")
        self.settings = LedgerSettings(
            database_url=f"sqlite:///{self.dir / 'ledger.db'}",
            data_dir=self.dir,
            lease_ttl_s=TTL,
            lost_lease_policy=policy,
        )
        self.core = self._new_core()
        self.oracle = Oracle(INTERVAL)
        self.holders: list[SimHolder] = []
        self.net: list[Message] = []
        self.open: list[Open] = []
        self.settling: list[Open] = []
        # token -> units of strict admissions whose holder died before settling them: they stay
        # charged (the shard cannot know they were never answered; see docs/RELIABILITY.md)
        self.dead_strict: dict[str, int] = {}
        self.sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.strict_ids: set[tuple[int, str]] = set()
        self.rids = itertools.count()
        self.ticket = itertools.count()
        self.trace: deque[str] = deque(maxlen=trace_len)
        self.step_no = 0
        self.fail_commit = False
        self.stats = {"admitted": 0, "denied": 0, "answered": 0, "crashes": 0, "lost": 0}
        self.attempts: dict[str, int] = {}  # request id -> attempts that should each leave a usage row
        self.rowless: set[str] = set()
        self.strict_orphans: set[str] = set()  # ids whose shard debit a dead replica holds (in dead_strict)
        self.extra: dict[str, int] = {}  # request id -> deliveries of a message applied before

    # ---------------------------------------------------------------- plumbing
    def _new_core(self) -> ShardCore:
        core = ShardCore(self.settings, clock=lambda: self.now)
        real_commit = core.store.commit

        def commit(changes: Any) -> None:
            if self.fail_commit:
                self.fail_commit = False
                raise LedgerUnavailable("injected commit failure")
            real_commit(changes)

        core.store.commit = commit  # type: ignore[method-assign]
        # the database is the template's, at the head revision: the migration check is not simulated,
        # and durability against power loss is not either (each commit is still one real transaction)
        core.store.migrate = lambda: None  # type: ignore[method-assign]
        # one process, one dialect, the same statements: compiled once for every seed and restart
        engine = core.store.engine
        # (a compiled statement is cached per dialect object: the engines of all seeds share one)
        _TEMPLATE.setdefault("cache", engine._compiled_cache)  # type: ignore[assignment]
        _TEMPLATE.setdefault("dialect", engine.dialect)  # type: ignore[assignment]
        engine._compiled_cache = _TEMPLATE["cache"]
        engine.dialect = engine.pool._dialect = _TEMPLATE["dialect"]  # type: ignore[assignment]
        event.listen(core.store.engine, "connect", _fast_sqlite)
        core.start()
        return core

    def log(self, line: str) -> None:
        self.trace.append(f"[{self.step_no} t={self.now - 1000:.3f}] {line}")

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.failure = task.exception()

    def sleep_for(self, index: int) -> Callable[[float], Coroutine[Any, Any, None]]:
        async def sleep(dt: float) -> None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self.sleepers, (self.now + max(dt, 0.0), next(self.ticket), fut))
            await fut

        return sleep

    async def quiesce(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(200):
            await asyncio.sleep(0)
            if not loop._ready:  # type: ignore[attr-defined]  # nothing else can run: the world is still
                break
        if getattr(self, "failure", None) is not None:
            raise self.failure  # type: ignore[misc]

    def advance(self, dt: float) -> None:
        self.now += dt
        while self.sleepers and self.sleepers[0][0] <= self.now:
            _, _, fut = heapq.heappop(self.sleepers)
            if not fut.done():
                fut.set_result(None)

    def commit(self) -> bool:
        """Commit what the book changed; a failure rebuilds the book from the database."""
        try:
            self.core.commit()
            return True
        except LedgerUnavailable:
            self.core.discard()
            self.check_book("after a failed commit")
            return False

    def check_book(self, when: str) -> None:
        report = self.core.consistency()
        if report.violations or report.mismatched:
            raise Violation(f"book vs database {when}: {report.violations[:3]} {report.mismatched[:3]}")

    # ---------------------------------------------------------------- the run
    def run(self) -> dict[str, int]:
        loop = asyncio.new_event_loop()
        ids = random.Random(self.seed ^ 0x5EED)
        real = secrets.token_urlsafe
        # ids and credential ids from the seed: the same seed orders every dict the same way
        secrets.token_urlsafe = lambda n=None: base64.urlsafe_b64encode(ids.randbytes(n or 32)).rstrip(b"=").decode()
        try:
            loop.run_until_complete(self._main())
        finally:
            for t in list(self.tasks):
                t.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()
            secrets.token_urlsafe = real
            self.core.close()
            shutil.rmtree(self.dir, ignore_errors=True)
        return self.stats

    async def _main(self) -> None:
        for _ in range(3):
            self.add_holder()
        self.create_package()
        self.create_package()
        actions: list[tuple[Callable[[], None], int]] = [
            (self.a_request, 30),
            (self.a_finish, 18),
            (self.a_deliver, 30),
            (self.a_watch, 6),
            (self.a_tick, 8),
            (self.a_admin, 5),
            (self.a_time, 8),
            (self.a_sweep, 2),
            (self.a_crash, 1),
            (self.a_holder_fault, 1),
        ]
        if self.seed % BURSTY_EVERY == BURSTY_EVERY - 1:  # this seed's traffic comes in bursts too
            actions.append((self.a_burst, 4))
        fns = [a for a, _ in actions]
        weights = [w for _, w in actions]
        for step in range(self.steps):
            self.step_no = step
            self.rng.choices(fns, weights)[0]()
            await self.quiesce()
            self.check_step()
        await self.finish()

    # ---------------------------------------------------------------- actions
    def add_holder(self) -> None:
        i = len(self.holders)
        h = SimHolder(i, None)  # type: ignore[arg-type]
        h.holder = LeaseHolder(
            SimTransport(self, i),
            f"replica-{i}",
            HolderConfig(report_interval_s=INTERVAL, ttl_margin_s=1.0),
            clock=lambda: self.now + h.skew,
            sleep=self.sleep_for(i),
            background=False,
        )
        h.skew = self.rng.uniform(-MAX_SKEW_S + JUMP_S, MAX_SKEW_S - JUMP_S)
        self.holders.append(h)

    def live_holders(self) -> list[SimHolder]:
        return [h for h in self.holders if h.alive]

    def _limits(self, parent: OToken | None) -> tuple[Any, dict[str, Any]]:
        r = self.rng
        models = ips = rate = expires = None
        if r.random() < 0.3:
            models = frozenset(r.sample(MODELS, r.randint(1, 3)))
            if parent is not None and parent.models is not None:
                models = models & parent.models or parent.models
        if r.random() < 0.2:
            ips = frozenset(r.sample(IPS, r.randint(1, 3)))
            if parent is not None and parent.ips is not None:
                ips = ips & parent.ips or parent.ips
        spec = r.choice(RATES)
        if spec is not None:
            rate = spec
        if r.random() < 0.1:
            expires = self.now + r.uniform(1, 30)
        return make_token_limits(
            expires, models, [f"{ip}/32" for ip in ips] if ips else None, rate[0] if rate else None
        ), {
            "models": models,
            "ips": ips,
            "rate": (rate[1], rate[2]) if rate else None,
            "expires_at": expires,
        }

    def create_package(self) -> None:
        units = self.rng.choice((40, 200, 1000))
        limits, o = self._limits(None)
        try:
            made = self.core.create_package(TokenSpec(f"p{self.step_no}", units, limits))
        except OperationRefused:
            return
        if not self.commit():
            return
        n = self.core.book.node(made.token.id)
        self.oracle.created(OToken(n.id, None, n.id, n.jti, **o), units, self.now)
        self.log(f"create package {n.id[:10]} units={units} {o}")

    def a_request(self, at: SimHolder | None = None) -> None:
        live = self.live_holders()
        if not live or not self.oracle.tokens:
            return
        r = self.rng
        h = at or r.choice(live)
        if self.open and r.random() < 0.05:  # Ray redelivers a request to another replica
            prior = r.choice(self.open).admission
            a = replace(prior)
        else:
            t = self.oracle.tokens[r.choice(sorted(self.oracle.tokens))]
            n = self.core.book.nodes.get(t.id)
            jti = n.jti if n is not None and r.random() < 0.95 else "stale-jti"
            model = r.choice(MODELS) if r.random() < 0.97 else r.choice(HOSTILE_MODELS)
            ip = r.choice(IPS) if r.random() < 0.97 else r.choice(HOSTILE_IPS)
            units = 1 if r.random() < 0.9 else r.randint(2, 5)
            rid = f"r{next(self.rids)}"
            a = Admission(rid, t.id, jti, units, model, ip, image_bytes=r.choice((10, 2**40)), root_id=t.root)
        self.spawn(self._request(h, a))

    def a_burst(self) -> None:
        """Idle, then a burst: 5-40 requests of one token (a rated one when there is one) reach
        one replica at the same instant, so that rate limits and the last units bind."""
        live = self.live_holders()
        if not live or not self.oracle.tokens:
            return
        r = self.rng
        h = r.choice(live)
        rated = sorted(t.id for t in self.oracle.tokens.values() if t.rate is not None)
        t = self.oracle.tokens[r.choice(rated or sorted(self.oracle.tokens))]
        n = self.core.book.nodes.get(t.id)
        jti = n.jti if n is not None else "stale-jti"
        self.log(f"burst of requests for {t.id[:10]} at h{h.index}")
        for _ in range(r.randint(5, 40)):
            a = Admission(f"r{next(self.rids)}", t.id, jti, 1, r.choice(MODELS), r.choice(IPS), root_id=t.root)
            self.spawn(self._request(h, a))

    async def _request(self, h: SimHolder, a: Admission) -> None:
        now = self.now
        seen = h.seen
        try:
            d = await h.holder.admit(a)
        except LedgerUnavailable:  # as the Meter: no verdict, so refunded (the shard may have debited)
            d = Decision(Code.LEDGER_UNAVAILABLE, a.request_id)
        if d.code is Code.LEDGER_UNAVAILABLE:  # raised or answered: the same, refunded (seed 1537)
            self.spawn(self._finish(h, Open(a, h.index, d, True), "no_verdict"))
        strict = (h.index, a.request_id) in self.strict_ids
        now, seen = self.now, h.seen  # decided now, with what the holder has seen by now
        if not h.alive:  # the replica died meanwhile: nobody is answered; a shard debit stays (see RELIABILITY)
            if d.code is Code.OK and strict:
                self._orphan(Open(a, h.index, d, strict))
            # its row is there (a strict one) or may still come (a denial in a message under way)
            self.extra[a.request_id] = self.extra.get(a.request_id, 0) + 1
            return
        o = self.oracle
        self.log(
            f"h{h.index} admit {a.request_id} {a.token_id[:10]} u={a.units} -> {d.code.value}"
            f" {'strict' if strict else 'local'}"
        )
        hostile = len(a.model) > 200 or not a.model or (a.client_ip is not None and len(a.client_ip) > 64)
        if d.code is Code.OK:
            if hostile:
                raise Violation(f"{a.request_id}: admitted with field values beyond their columns")
            why = o.refusal(a.token_id, a.jti, a.model, a.client_ip, now)
            if why == "reclaimed whole" and d.replayed:
                why = None  # debited before the reclaim (reclaim returns what is unspent): it may be answered
            if why is not None and (strict or o.last_change(a.token_id) <= seen):
                raise Violation(f"{a.request_id} admitted ({'strict' if strict else 'local'}) after the change: {why}")
            o.admitted(a.request_id, a.token_id, a.units, now, d.replayed, o.change if strict else seen)
            self.stats["admitted"] += 1
            self.open.append(Open(a, h.index, d, strict))
            if not h.alive:
                self._orphan(self.open.pop())
        else:
            self.stats["denied"] += 1
        if d.code is not Code.LEDGER_UNAVAILABLE and not hostile and not d.replayed and d.code is not Code.REPLAY:
            self.attempts[a.request_id] = self.attempts.get(a.request_id, 0) + 1

    def _orphan(self, op: Open) -> None:
        """An admitted request whose replica died before settling it: never answered."""
        rid = op.admission.request_id
        self.rowless.add(rid)
        # debited at the shard once (a resend or copy does not debit again), never settled; a copy
        # served from a lease before is not that debit (seed 4826: local at one replica, then strict)
        first = rid not in self.strict_orphans
        if op.strict and first:
            self.strict_orphans.add(rid)
            t = op.admission.token_id
            self.dead_strict[t] = self.dead_strict.get(t, 0) + op.admission.units

    def a_finish(self) -> None:
        if not self.open:
            return
        r = self.rng
        op = self.open.pop(r.randrange(len(self.open)))
        h = self.holders[op.holder]
        if not h.alive:
            self._orphan(op)
            return
        outcome = r.choices(("answered", "failed", "hung_up"), (80, 10, 10))[0]
        self.spawn(self._finish(h, op, outcome))

    async def _finish(self, h: SimHolder, op: Open, outcome: str) -> None:
        a = op.admission
        if outcome == "answered":
            self.oracle.answered(a.request_id)  # answered before it is settled: the client has it
            self.stats["answered"] += 1
        self.settling.append(op)  # open until its settlement is durable
        try:
            s = Settlement(a.request_id, a.token_id, outcome == "answered", root_id=a.root_id, copy=op.decision.copy)
            await self._settle(h, s)
        finally:
            self.settling.remove(op)
        if not h.alive and outcome != "answered":  # died before its refund was durable
            self._orphan(op)
        self.log(f"h{h.index} settle {a.request_id} {outcome}")

    async def _settle(self, h: SimHolder, s: Settlement) -> None:
        """As the Meter: retried until durable (while the holder lives)."""
        while h.alive:
            try:
                code = await h.holder.settle(s)
            except LedgerUnavailable:
                code = Code.LEDGER_UNAVAILABLE
            if code is not Code.LEDGER_UNAVAILABLE:
                return
            await self.sleep_for(h.index)(0.1)

    def a_deliver(self) -> None:
        if not self.net:
            return
        r = self.rng
        m = self.net.pop(r.randrange(len(self.net)))
        fault = r.choices(("ok", "commit_fails", "crash_before_reply", "call_fails", "duplicate"),
                          (90, 3, 1, 2, 4))[0]  # fmt: skip
        self.deliver(m, fault)

    def deliver(self, m: Message, fault: str = "ok") -> None:
        if m.fut.done():
            return
        if fault == "call_fails":  # the client gave up (its retries ran out); maybe it was applied before
            self.log(f"h{m.holder} {m.kind} call fails {_asks(m.payload) if m.kind == 'lease' else ''}")
            if m.applied and m.kind == "admit":  # committed before: its row stays, refunded (seed 23376)
                rid = m.payload.request_id
                self.extra[rid] = self.extra.get(rid, 0) + 1
            m.fut.set_exception(LedgerUnavailable("the call failed"))
            return
        self.fail_commit = fault == "commit_fails"
        value = self.apply(m)
        if fault == "crash_before_reply" and m.applied:
            self.log(f"h{m.holder} {m.kind}: committed, then the shard crashed before the reply")
            self.crash()
            self.net.append(m)  # LedgerClient resends to the restarted shard
            return
        if fault == "duplicate" and m.applied:  # the reply is lost and the client resends it
            self.log(f"h{m.holder} {m.kind}: applied, the reply lost; it will be sent again")
            self.net.append(m)
            return
        m.fut.set_result(value)

    def apply(self, m: Message) -> Any:
        core = self.core
        if m.applied:  # delivered again: a denial recorded before may be recorded again (see RELIABILITY)
            ids: list[str] = []
            if m.kind == "admit":
                ids = [m.payload.request_id]
            elif m.kind == "lease":
                ids = [u.request_id for a in m.payload for u in a.uses]
            for rid in ids:
                self.extra[rid] = self.extra.get(rid, 0) + 1
        if m.kind == "lease":
            core.leases.heard(m.payload)
            grants = core.lease_sync(m.payload)
            if not self.commit():
                return [LeaseGrant(Code.LEDGER_UNAVAILABLE, ttl_s=TTL, message="commit failed")] * len(m.payload)
            m.applied = True
            self.log(f"h{m.holder} lease {_asks(m.payload)} -> {_grants(grants)}")
            return grants
        if m.kind == "admit":
            d = core.admit_rows([m.payload.row()])[0]
            if not self.commit():
                return Decision(Code.LEDGER_UNAVAILABLE, m.payload.request_id, message="commit failed")
            self.log(f"h{m.holder} admit-msg {m.payload.request_id} -> {d.code.value}{' again' if m.applied else ''}")
            m.applied = True
            return d
        code = Code(core.settle_rows([m.payload.row()])[0])
        if not self.commit():
            return Code.LEDGER_UNAVAILABLE
        m.applied = True
        return code

    def a_watch(self) -> None:
        live = self.live_holders()
        if not live:
            return
        h = self.rng.choice(live)
        reply = self.core.lease_watch(h.since, list(h.holder.held))
        h.since = reply.version
        h.seen = self.oracle.change
        h.holder.on_watch(0, reply)
        self.log(f"h{h.index} watch {reply.version} {len(reply.policies)} policies, recalls {len(reply.recalls)}")

    def a_tick(self) -> None:
        live = [h for h in self.live_holders() if not h.holder.closed]
        if live:
            h = self.rng.choice(live)
            self.spawn(h.holder.tick())
            if self.seed % BURSTY_EVERY == RACY and self.rng.random() < 0.5:
                self.log(f"a request reaches h{h.index} as its report round runs")
                self.a_request(h)  # it runs after the round has chosen what to send, before the message

    def a_time(self) -> None:
        r = self.rng
        dt = r.choice((0.001, 0.01, 0.05, 0.1, 0.3)) if r.random() < 0.97 else r.uniform(TTL - 2, TTL + 2)
        self.advance(dt)
        if r.random() < 0.1:
            h = r.choice(self.holders)
            h.skew = min(MAX_SKEW_S, max(-MAX_SKEW_S, h.skew + r.uniform(-JUMP_S, JUMP_S)))

    def a_sweep(self) -> None:
        before = len(self.core.book.leases)
        lost = self.core.settle_lost_leases()
        if self.commit() and lost:
            self.stats["lost"] += len(lost)
            self.log(f"sweep: {len(lost)} leases lost (of {before})")

    def a_crash(self) -> None:
        self.crash()

    def crash(self) -> None:
        self.stats["crashes"] += 1
        self.core.close()
        self.core = self._new_core()
        self.check_book("after a restart")
        self.log("shard restarted")

    def a_holder_fault(self) -> None:
        live = [h for h in self.live_holders() if not h.closing]
        r = self.rng
        if not live:
            self.add_holder()
            return
        h = r.choice(live)
        if r.random() < 0.5:
            h.alive = False  # dies: its messages in flight may still arrive; nothing more from it
            for op in [op for op in self.open if op.holder == h.index]:
                self.open.remove(op)
                self._orphan(op)
            self.log(f"h{h.index} dies")
        else:
            h.closing = True
            self.spawn(h.holder.close(timeout_s=r.choice((0.05, 2.0))))
            self.log(f"h{h.index} closes with {sum(len(x.inflight) for x in h.holder.held.values())} in flight")
        self.add_holder()

    def a_admin(self) -> None:
        r = self.rng
        toks = sorted(self.oracle.tokens)
        op = r.choices(("create", "split", "top_up", "reclaim", "revoke", "rotate", "limits"),
                       (1, 6, 2, 3, 1, 1, 3))[0]  # fmt: skip
        if op == "create" or not toks:
            self.create_package()
            return
        t = self.oracle.tokens[r.choice(toks)]
        core, o = self.core, self.oracle
        try:
            if op == "split":
                if len(o.path(t.id)) >= 4:
                    return
                limits, lo = self._limits(t)
                n = core.book.node(t.id)
                units = r.randint(1, max(1, n.free))
                made = core.split(t.id, TokenSpec(f"k{self.step_no}", units, limits))
                kid = core.book.node(made.token.id)
                mine = OToken(kid.id, t.id, t.root, kid.jti, **lo)
                # a child inherits what it does not narrow
                mine.models = kid.models
                mine.ips = None if kid.ips is None else frozenset(str(x.network_address) for x in kid.ips)
                mine.rate = (kid.rate.rate, kid.rate.burst) if kid.rate else None
                mine.expires_at = kid.expires_at
                pending = (o.created, (mine, units, self.now))
            elif op == "top_up":
                units = r.randint(1, 100)
                core.top_up(t.id, units)
                pending = (self._topped, (t, units))
            elif op == "reclaim":
                some = r.random() < 0.4
                n = core.book.node(t.id)
                units = r.randint(1, n.free) if some and n.free > 0 else None
                core.reclaim(t.id, units)
                pending = (self._reclaimed, (t, units))
            elif op == "revoke":
                core.revoke(t.id)
                pending = (self._revoked, (t,))
            elif op == "rotate":
                core.rotate(t.id)
                pending = (self._rotated, (t,))
            else:
                pending = self._change_limits(t)
                if pending is None:
                    return
        except OperationRefused as exc:
            self.log(f"admin {op} {t.id[:10]} refused: {exc.code.value}")
            return
        if not self.commit():
            self.log(f"admin {op} {t.id[:10]}: commit failed")
            return
        fn, args = pending
        fn(*args)  # type: ignore[operator]
        self.log(f"admin {op} {t.id[:10]}")

    def _change_limits(self, t: OToken) -> tuple[Callable[..., None], tuple[Any, ...]] | None:
        r = self.rng
        kind = r.choice(("rate", "models", "ips", "expiry"))
        if kind == "rate":
            spec = r.choice([x for x in RATES if x is not None])
            self.core.update_limits(t.id, rate=spec[0])
            return self._limited, (t, "rate", (spec[1], spec[2]))
        if kind == "models":
            models = frozenset(r.sample(MODELS, r.randint(1, 2)))
            self.core.update_limits(t.id, models=sorted(models))
            return self._limited, (t, "models", models)
        if kind == "ips":
            ips = frozenset(r.sample(IPS, r.randint(1, 2)))
            self.core.update_limits(t.id, ips=[f"{ip}/32" for ip in sorted(ips)])
            return self._limited, (t, "ips", ips)
        at = self.now + r.uniform(0.05, 3.0)
        self.core.update_limits(t.id, expires_at=at)
        return self._limited, (t, "expires_at", at)

    # oracle updates, after the commit
    def _topped(self, t: OToken, units: int) -> None:
        if t.parent is None:
            self.oracle.granted[t.id] += units
        t.reclaimed = False
        self.oracle.narrowed(t.id)

    def _reclaimed(self, t: OToken, units: int | None) -> None:
        n = self.core.book.node(t.id)
        if not n.live:
            for x in self.oracle.subtree(t.id):
                x.active = False
        elif units is None and n.leased > 0:
            t.reclaimed = True
        self.oracle.narrowed(t.id)

    def _revoked(self, t: OToken) -> None:
        for x in self.oracle.subtree(t.id):
            x.active = False
        self.oracle.narrowed(t.id)

    def _rotated(self, t: OToken) -> None:
        t.jti = self.core.book.node(t.id).jti
        self.oracle.narrowed(t.id)

    def _limited(self, t: OToken, kind: str, value: Any) -> None:
        setattr(t, kind, value)
        self.oracle.narrowed(t.id)
        if kind == "rate":
            t.rate_since, t.rate_change = self.now, self.oracle.change

    # ---------------------------------------------------------------- checks
    def check_step(self) -> None:
        violations = self.core.book.tree.invariant_violations()
        if violations:
            raise Violation(f"conservation: {violations[:3]}")
        for root in self.core.book.roots:
            self.oracle.check_granted(root)
        for h in self.holders:  # units in doubt are released only by close() at its timeout
            if h.holder.stats.in_doubt and not h.holder.closed:
                raise Violation(f"h{h.index}: {h.holder.stats.in_doubt} units released in doubt by a holder not closed")
        if self.policy == "refund":  # no charge without an answer (or a request still open)
            open_units: dict[str, int] = {}
            # one debit per request id, whichever of its copies is still open
            inflight = {op.admission.request_id: op.admission for op in self.open + self.settling}
            for m in self.net:
                if m.kind == "admit":  # may be committed, not answered yet
                    inflight[m.payload.request_id] = m.payload
            for a in inflight.values():
                root = self.oracle.tokens[a.token_id].root
                open_units[root] = open_units.get(root, 0) + a.units
            used_by_root: dict[str, int] = {}
            for n in self.core.book.nodes.values():
                used_by_root[n.root_id] = used_by_root.get(n.root_id, 0) + n.used
            for t, u in self.dead_strict.items():
                root = self.oracle.tokens[t].root
                open_units[root] = open_units.get(root, 0) + u
            for root_id in self.core.book.roots:
                used = used_by_root.get(root_id, 0)
                allowed = self.oracle.answered_units(root_id) + open_units.get(root_id, 0)
                if used > allowed:
                    raise Violation(f"{root_id}: {used} units charged, {allowed} answered or open")

    async def finish(self) -> None:
        """Let everything end: open requests answered, messages delivered, holders closed, leases
        of dead holders lost; then the books must be exact."""
        self.log("-- finish")
        await self._drain()
        for h in self.live_holders():
            if not h.holder.closed:
                self.spawn(h.holder.close(timeout_s=2.0))
        await self._drain()
        self.advance(TTL + 2)
        self.a_sweep()
        if self.core.book.leases:
            raise Violation(f"{len(self.core.book.leases)} leases left after every holder closed or died")
        self.check_step()
        self.check_book("at the end")
        self.check_charges()
        self.oracle.check_rates()

    async def _drain(self) -> None:
        for _ in range(2000):
            while self.open:
                op = self.open.pop(0)
                if self.holders[op.holder].alive:
                    self.spawn(self._finish(self.holders[op.holder], op, "answered"))
                else:
                    self._orphan(op)
            while self.net:
                self.deliver(self.net.pop(0))
                await self.quiesce()
            await self.quiesce()
            if not self.open and not self.net and not self.tasks:
                return
            self.advance(0.01)
        raise Violation(f"the world did not come to rest: {len(self.tasks)} tasks, {len(self.net)} messages")

    def check_charges(self) -> None:
        """Every answered request charged exactly once, or within the lost-lease units the audit
        records; one usage row per request attempt; nothing charged twice."""
        store = self.core.store
        with store.engine.connect() as c:
            rows = c.execute(select(USAGE.c.request_id, USAGE.c.token_id, USAGE.c.units, USAGE.c.state)).all()
            events = c.execute(select(ADMIN.c.action, ADMIN.c.token_id, ADMIN.c.detail)).all()
        lost: dict[str, int] = {}
        for action, token_id, detail in events:
            if action == "lease.lost":
                units = (detail if isinstance(detail, dict) else {}).get("units", 0)
                lost[token_id] = lost.get(token_id, 0) + int(units)
        charged: dict[str, int] = {}
        per_id: dict[str, int] = {}
        count: dict[str, int] = {}
        for rid, token_id, units, state in rows:
            count[rid] = count.get(rid, 0) + 1
            if state in ("settled", "admitted") and units:
                per_id[rid] = per_id.get(rid, 0) + 1
                charged[token_id] = charged.get(token_id, 0) + units
        twice = [rid for rid, k in per_id.items() if k > 1]
        if twice:
            raise Violation(f"charged twice: {twice[:5]}")
        expected: dict[str, int] = {}
        for req in self.oracle.requests.values():
            rid = req.request_id
            if req.answered:
                expected[req.token] = expected.get(req.token, 0) + req.units
        for tid in self.oracle.tokens:
            rows_charge, want, doubt = charged.get(tid, 0), expected.get(tid, 0), lost.get(tid, 0)
            got = rows_charge + (doubt if self.policy == "charge" else 0)  # charged lost units have no usage row
            dead = self.dead_strict.get(tid, 0)
            ok = want - doubt <= got <= want + dead if self.policy == "refund" else want <= got <= want + doubt + dead
            if not ok:
                raise Violation(f"{tid}: charged {got}, answered {want}, lost-lease units {doubt} ({self.policy})")
            n = self.core.book.nodes[tid]
            if n.used != got:
                raise Violation(f"{tid}: used {n.used} but its usage rows (and lost leases) charge {got}")
        lost_by = {(d if isinstance(d, dict) else {}).get("holder") for a, _, d in events if a == "lease.lost"}
        lossy = {
            h.index
            for h in self.holders
            if not h.alive or h.holder.stats.lost_leases or h.holder.stats.in_doubt or h.holder.holder_id in lost_by
        }
        for rid, k in self.attempts.items():
            have = count.get(rid, 0)
            if have > k + self.extra.get(rid, 0):
                states = [(st, tid[:8], u) for r, tid, u, st in rows if r == rid]
                raise Violation(f"{rid}: {have} usage rows for {k} attempts: {states}")
            if have == 0 and rid not in self.rowless and not lossy:
                raise Violation(f"{rid}: no usage row")


def _fast_sqlite(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA synchronous=OFF")
    cur.close()


def _tmp_root() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None


def _asks(asks: list[LeaseAsk]) -> str:
    return " ".join(
        f"[{a.token_id[:8]} {a.lease_id[:8]}#{a.seq} rows={len(a.uses)} want={a.want} rate={a.rate_want}"
        f"{' back=' + str(a.give_back) if a.give_back else ''}{' release' if a.release else ''}"
        f"{' doubt=' + str(a.in_doubt) if a.in_doubt else ''}]"
        for a in asks
    )


def _grants(grants: list[LeaseGrant]) -> str:
    return " ".join(
        f"[{g.code.value} +{g.granted}={g.units} r+{g.rate_granted}{' lost' if g.lost else ''}"
        f"{' strict' if g.strict else ''}]"
        for g in grants
    )
