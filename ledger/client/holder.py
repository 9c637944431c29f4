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

Exactly once (DESIGN §3b): the holder names each lease itself and numbers its messages; a message
not acknowledged goes again unchanged, and the shard applies each number once. After every answer
the lease's units come from the shard (`LeaseGrant.units`), less what this holder holds for requests.

Rates (DESIGN §3b): a token with a rate on its path spends rate tokens the shard drew for it, each
for one `report_interval_s` after the ask was sent; unused ones go back with the next message. So
the requests admitted in any window W are at most `burst + rate * (W + report_interval_s)`. A
refund returns its units, never its rate token. Tokens below `STRICT_RATE` admit at the shard.

After `close()` nothing is admitted locally (the shard decides each request), and every lease is
released once the requests in flight are answered (or, at `timeout_s`, with their units in doubt,
settled by `lost_lease_policy`).

`transport` is the ledger (`LedgerClient` over Ray, `InProcessLedger` in tests): see `LeaseTransport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from ledger.client.batcher import Batcher
from ledger.core.codes import Code
from ledger.core.credentials import new_id
from ledger.core.entities import Admission, Decision, Settlement, UsageState
from ledger.core.errors import ConfigError, LedgerError
from ledger.core.leases import (
    RATE_SPEND_S,
    LeaseAsk,
    LeaseGrant,
    LeaseUse,
    TokenPolicy,
    Version,
    WatchReply,
)
from ledger.core.rules import access_refusal, field_refusal, status_refusal
from ledger.core.tree import MAX_UNITS

log = logging.getLogger(__name__)
MAX_DONE = 100_000  # request ids settled here, remembered so a retry to this replica is charged once
WATCH_TIMEOUT_S = 10.0
MAX_ASKS = 8
RECALL_POLL_S = 0.05  # while other replicas give units back, a waiting admission asks again this often
RECALL_WAIT_S = 0.3  # ... for at most this long
RECALL_ASKS = math.ceil(RECALL_WAIT_S / RECALL_POLL_S)  # a strict admission asks again at most this often
CLOSE_POLL_S = 0.01  # close() looks this often whether the requests in flight were answered


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
    """How an ingress replica's lease holder behaves: `ledger.lease_holder` of ray_config.yaml
    (serve_app.config.LedgerArgs takes this class as it is: its fields and checks are the one source)."""

    report_interval_s: float = 0.1  # reports (and refills) are sent this often
    ttl_margin_s: float = 1.0  # stop using a lease this long before the shard may call it lost
    target_s: float = 1.0  # a refill asks for about this many seconds of the token's recent rate
    min_want: int = 8
    max_want: int = 10_000
    idle_release_s: float = 10.0  # a lease unused this long goes back to the shard
    deny_cache_s: float = 0.5  # a quota_exhausted answer is reused locally this long
    strict_recheck_s: float = 1.0

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be {rule}"
            for name, ok, rule in (
                ("report_interval_s", 0 < self.report_interval_s <= 3600, "in (0, 3600] s"),
                ("ttl_margin_s", self.ttl_margin_s >= 0, ">= 0 s"),
                ("target_s", self.target_s > 0, "> 0 s"),
                ("min_want", 1 <= self.min_want <= self.max_want, "1 to max_want"),
                ("idle_release_s", self.idle_release_s > 0, "> 0 s"),
                ("deny_cache_s", self.deny_cache_s >= 0, ">= 0 s"),
                ("strict_recheck_s", self.strict_recheck_s > 0, "> 0 s"),
            )
            if not ok
        ]
        if problems:
            raise ConfigError("lease holder: " + "; ".join(problems))


@dataclass(slots=True, eq=False)
class _Inflight:
    units: int
    gen: int
    model: str
    client_ip: str | None
    image_bytes: int
    ts: float
    copies: int = 1  # Ray redelivered it to this replica while it was served: settled once all are
    answered: bool = False  # one of those copies was answered


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
    lease_id: str = ""  # named here; `creating` until the shard has it
    creating: bool = False
    acked: int = 0  # the number of the last message of this lease the shard acknowledged
    gen: int = 0  # bumped whenever the lease ends: settlements of an older lease are not reported
    avail: int = 0
    valid_until: float = 0.0
    rate_avail: int = 0  # rate tokens drawn for this holder, spendable until `rate_until`
    rate_until: float = 0.0
    rate_expired: int = 0  # rate tokens never used: given back with the next message
    inflight: dict[str, _Inflight] = field(default_factory=dict)
    buffer: list[LeaseUse] = field(default_factory=list)
    sent: LeaseAsk | None = None  # sent, not acknowledged: sent again unchanged
    sent_at: float = 0.0  # when `sent` was first sent
    buffer_since: float = 0.0  # when the oldest row of `buffer` was queued
    report_since: float = 0.0  # ... and of `sent`
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

    @property
    def rated(self) -> bool:
        """A rate on the token's path, admitted here (not strict): local admission needs rate tokens."""
        p = self.policy
        return p is not None and p.rate_limit is not None and not p.strict

    @property
    def held_units(self) -> int:
        """Units of the current lease this holder holds for requests: in flight, or kept and not
        reported yet. The rest of what the shard escrows is `avail`."""
        gen = self.gen
        return sum(f.units for f in self.inflight.values() if f.gen == gen) + sum(u.kept for u in self.buffer)

    def take(self, p: TokenPolicy | None) -> None:
        """A policy from the shard, if it is not older than the one held. A newer one may have
        narrowed the rate: rate tokens drawn under the old one are not spent (they go back)."""
        if p is not None and (self.policy is None or p.version >= self.policy.version):
            if self.policy is not None and p.version > self.policy.version:
                self.rate_expired += self.rate_avail
                self.rate_avail = 0
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
    in_doubt: int = 0  # units released unanswered by close() (settled by lost_lease_policy)


class LeaseHolder:
    """One per ingress replica; all methods run on its event loop."""

    def __init__(
        self,
        transport: LeaseTransport,
        holder_id: str,
        config: HolderConfig | None = None,
        clock: Callable[[], float] = time.time,
        on_admit: Callable[[Decision, str, str, bool], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        background: bool = True,
    ) -> None:
        """`sleep` and `clock` are the simulator's in `tests/sim`; `background=False` starts no
        report or watch loop (the owner calls `tick` and `on_watch`)."""
        self.transport = transport
        self.sleep = sleep
        self.background = background
        self.holder_id = holder_id
        self.config = config or HolderConfig()
        self.clock = clock
        self.on_admit = on_admit  # (decision, model, package, local) for metrics
        self.held: dict[str, _Held] = {}
        self.done: dict[str, str] = {}  # request id -> state, settled here
        # request id -> the copies of it admitted at the shard by this holder and not settled yet
        # (`Admission.copy`: one per admit call, so the shard can tell a copy from a resend)
        self.strict_copies: dict[str, list[str]] = {}
        self.copy_numbers = itertools.count(1)
        self.stats = HolderStats()
        self.batchers = [Batcher(self._sender(i), 4096, 2) for i in range(transport.shard_count)]
        self.tasks: list[asyncio.Task[None]] = []
        self.jobs: set[asyncio.Future[None]] = set()  # asks started outside the report loop
        self.closed = False

    # ------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        if self.tasks or self.closed or not self.background:
            return
        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self._report_loop()))
        self.tasks.extend(loop.create_task(self._watch_loop(i)) for i in range(self.transport.shard_count))

    async def close(self, timeout_s: float = 2.0) -> None:
        """Admit nothing more locally; wait (up to `timeout_s`) for the requests in flight to be
        answered; then report what is unreported and release every lease. Units of requests still
        unanswered then are released as in doubt: the shard settles them by `lost_lease_policy`,
        so they are never granted again (DESIGN §3b)."""
        self.closed = True
        for t in self.tasks:
            t.cancel()
        deadline = self.clock() + timeout_s
        for _ in range(math.ceil(timeout_s / CLOSE_POLL_S)):  # bounded in steps too: a clock may stand still
            if not any(h.inflight for h in self.held.values()) or self.clock() >= deadline:
                break
            await self.sleep(CLOSE_POLL_S)
        leased = [h for h in self.held.values() if h.lease_id or h.buffer or h.sent]
        done: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*[self._release(h) for h in leased]))
        timer: asyncio.Future[Any] = asyncio.ensure_future(self.sleep(max(0.0, deadline - self.clock()) + timeout_s))
        await asyncio.wait({done, timer}, return_when=asyncio.FIRST_COMPLETED)
        timer.cancel()
        if not done.done():
            done.cancel()
        with contextlib.suppress(BaseException):
            await done

    async def _release(self, h: _Held) -> None:
        """Release the lease (after any message not acknowledged yet, which goes first)."""
        for _ in range(3):
            await self._exchange(h, 0, release=True)
            if not h.lease_id and not h.buffer and h.sent is None:
                return

    # ------------------------------------------------------------ admission
    async def admit(self, a: Admission) -> Decision:
        """The verdict for one request; OK means its units are held for it until `settle`."""
        self._start()
        if a.idem_key is not None or self.closed:  # the key is global: only the shard can dedupe it
            return await self._strict(a)
        bad_field = field_refusal(a.model, a.client_ip)
        if bad_field is not None:  # as the shard: refused before anything is recorded
            return Decision(Code.INVALID_REQUEST, a.request_id, a.token_id, message=bad_field)
        h = self.held.get(a.token_id)
        now = self.clock()
        if h is None or h.root_id != a.root_id:
            h = self.held[a.token_id] = _Held(a.token_id, a.root_id, self.transport.shard_of(a.root_id))
            h.count_since = now  # the first second of traffic counts towards the rate estimate
        h.last_used = now
        h.count += 1
        prior = h.inflight.get(a.request_id)
        if prior is not None:  # a retry of a request this replica is serving: no second debit
            return self._copy(h, prior, a, now)
        if self._strict_copy_pending(a.request_id):
            return await self._strict(a)
        if self.done.get(a.request_id) == UsageState.SETTLED.value:
            return Decision(Code.REPLAY, a.request_id, a.token_id, message="request already settled")
        waited = False
        # concurrent arrivals share one ask, then ask again for all who still wait; while units are
        # being asked back from other replicas' leases, ask again shortly (bounded)
        for _ in range(MAX_ASKS):
            if (now < h.strict_until and not self._covers(h, a.units, now)) or h.releasing:
                break
            if not self._needs_sync(h, a.units, now):
                break
            h.waiting += a.units
            try:
                await self._exchange(h, self._want(h, a.units), jti=a.jti, rate=h.rated)
            finally:
                h.waiting -= a.units
            waited = True
            now = self.clock()
            if h.avail < a.units and now < h.recall_until:
                await self.sleep(RECALL_POLL_S)
                now = self.clock()
        if (now < h.strict_until and not self._covers(h, a.units, now)) or h.releasing or self.closed:
            return await self._strict(a)  # closed meanwhile: nothing more locally
        if waited:
            copy = self._admitted_meanwhile(h, a, now)
            if copy is not None:
                return copy
        return await self._local(h, a, now, waited)

    def _strict_copy_pending(self, request_id: str) -> bool:
        """A copy of this request was admitted at the shard by this replica and is not settled:
        the shard holds its debit, so only the shard can serve another copy without a second one,
        with the checks of now. (A lease debit here would charge it twice, and the lease's policy
        may not have seen a rotation the shard has: simulator seed 6110.)"""
        return bool(self.strict_copies.get(request_id))

    def _admitted_meanwhile(self, h: _Held, a: Admission, now: float) -> Decision | None:
        """Another copy of this request waited for the same ask and was admitted first: this one is
        its copy, not a second debit that would replace it in `inflight` (seed 6746)."""
        prior = h.inflight.get(a.request_id)
        return None if prior is None else self._copy(h, prior, a, now)

    def _copy(self, h: _Held, prior: _Inflight, a: Admission, now: float) -> Decision:
        """Ray redelivered a request this replica is serving: no second debit; settled with the last copy."""
        if prior.units != a.units or prior.model != a.model:
            return self._denied(h, a, Code.INVALID_REQUEST, "request id already in use for another request", now)
        p = h.policy
        # as the shard: a credential refused now gets its 401, never the earlier OK, and a copy
        # passes the model and IP checks of the policy seen now (a narrowing applies to it too)
        refusal = None if p is None else status_refusal(p.path, now) or access_refusal(p.path, a.model, a.client_ip)
        if p is not None and a.jti != p.jti:
            refusal = (Code.REVOKED_TOKEN, "credential was rotated or revoked")
        if refusal is not None:
            return self._denied(h, a, refusal[0], refusal[1], now)
        prior.copies += 1
        return self._ok(h, a, replayed=True)

    @staticmethod
    def _covers(h: _Held, units: int, now: float) -> bool:
        """The token's last units are admitted at the shard, but those already in this replica's
        lease are served from it (they are escrowed: exact), not sent to the shard as exhausted."""
        return bool(h.lease_id) and h.avail >= units and now < h.valid_until and not h.stale

    def _needs_sync(self, h: _Held, units: int, now: float) -> bool:
        if h.stale:
            return True
        if h.deny is not None and now < h.deny[2]:
            return False
        if h.rated and (h.rate_avail < 1 or now >= h.rate_until):
            return True
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
        if p.strict or p.reclaimed:  # a strict (or low-rate) token, or one reclaimed whole: the shard decides
            return await self._strict(a)
        if h.rated and (h.rate_avail < 1 or now >= h.rate_until):
            if h.deny is not None and now < h.deny[2] and h.deny[0] is Code.RATE_LIMITED:
                code, message, until, retry = h.deny
                return self._denied(h, a, code, message, now, retry_after=(until - now) if retry else None)
            return await self._strict(a)  # no rate token here: the shard's bucket decides, exactly
        if h.avail >= a.units and now < h.valid_until:
            h.avail -= a.units
            if h.rated:
                h.rate_avail -= 1
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
        used = p.used + self._unreported(h)
        d = Decision(
            Code.OK,
            a.request_id,
            a.token_id,
            0 if replayed else a.units,
            used,
            p.allocation,
            _remaining(p, used),
            p.rate_limit,
            h.avail if p.rate_limit is not None else None,
            replayed=replayed,
            service=p.service,
        )
        if self.on_admit is not None:
            self.on_admit(d, a.model, a.root_id, True)
        return d

    @staticmethod
    def _unreported(h: _Held) -> int:
        """Units this holder admitted that the policy's `used` does not count yet (in flight, or
        answered and not yet acknowledged by the shard)."""
        rows = h.buffer + list(h.sent.uses if h.sent else ())
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
        used = p.used + self._unreported(h) if p else 0
        d = Decision(
            code,
            a.request_id,
            a.token_id,
            0,
            used,
            p.allocation if p else 0,
            _remaining(p, used) if p else 0,
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
        if not a.copy:
            a = dataclasses.replace(a, copy=f"{self.holder_id[-40:]}#{next(self.copy_numbers)}")
        copies = self.strict_copies.setdefault(a.request_id, [])
        copies.append(a.copy)  # before the call: a refund of an admission whose verdict was lost names it
        if len(self.strict_copies) > MAX_DONE:
            del self.strict_copies[next(iter(self.strict_copies))]
        # the last units of a token may sit in other replicas' leases: the shard asks them back and
        # answers "recalled" without recording anything; ask again until RECALL_WAIT_S, then a last
        # time for a final (recorded) answer
        give_up = self.clock() + RECALL_WAIT_S
        for attempt in range(RECALL_ASKS + 1):
            patient = attempt < RECALL_ASKS and not self.closed and self.clock() < give_up
            try:
                d = await self.transport.admit(dataclasses.replace(a, wait=True) if patient else a)
            except LedgerError as exc:  # no verdict: answered, so that the refund names this copy
                if exc.code is not Code.LEDGER_UNAVAILABLE:
                    raise
                d = Decision(Code.LEDGER_UNAVAILABLE, a.request_id, a.token_id, message=exc.message)
                break
            if not (patient and d.code is Code.QUOTA_EXHAUSTED and d.recalled):
                break
            h = self.held.get(a.token_id)
            if h is not None and h.lease_id and (h.buffer or h.avail > 0):
                # some of them are this replica's: what it spent is reported, what it keeps given back
                await self._exchange(h, 0, jti=a.jti, give_back=h.avail > 0)
                continue
            await self.sleep(RECALL_POLL_S)
        # refused: this copy holds nothing to settle; without a verdict (LEDGER_UNAVAILABLE) an earlier
        # delivery of it may hold a debit, so the copy stays named for the refund that follows
        if d.code is not Code.OK and d.code is not Code.LEDGER_UNAVAILABLE:
            self._forget_copy(a.request_id, a.copy)
        if self.on_admit is not None:
            self.on_admit(d, a.model, a.root_id, False)
        # the settlement of this delivery names its copy: another delivery of the same request may be
        # in service meanwhile, and a refund of this one must not settle that one (seed 10352)
        return d._replace(copy=a.copy)

    def _forget_copy(self, request_id: str, copy: str) -> None:
        copies = self.strict_copies.get(request_id)
        if copies is not None and copy in copies:
            copies.remove(copy)
            if not copies:
                del self.strict_copies[request_id]

    # ------------------------------------------------------------ settlement
    async def settle(self, s: Settlement) -> Code:
        """Local admissions: recorded for the next report (a refund goes back to the lease at
        once). Others: settled at the shard (one attempt; the caller retries LEDGER_UNAVAILABLE)."""
        if s.copy:  # the caller names a strict delivery (`Decision.copy`), and retries with that name;
            # a copy of it served locally meanwhile is not this one (seed 23834: a closed holder's copy)
            self._forget_copy(s.request_id, s.copy)
            return await self.transport.settle(s)
        h = self.held.get(s.token_id)
        f = h.inflight.get(s.request_id) if h is not None else None
        if h is None or f is None:
            copies = self.strict_copies.get(s.request_id)
            if not copies:
                return await self.transport.settle(s)
            copy = copies.pop(0)
            if not copies:
                del self.strict_copies[s.request_id]
            code = Code.LEDGER_UNAVAILABLE
            try:
                code = await self.transport.settle(dataclasses.replace(s, copy=copy))
            finally:
                if code is Code.LEDGER_UNAVAILABLE:  # not recorded: the caller retries, with the same copy
                    self.strict_copies.setdefault(s.request_id, []).insert(0, copy)
            return code
        if f.copies > 1:  # another copy is still being served: the request is settled with the last one
            f.copies -= 1
            f.answered = f.answered or s.success
            return Code.OK
        del h.inflight[s.request_id]
        if f.answered and not s.success:  # one copy was answered: charged once, never refunded
            s = dataclasses.replace(s, success=True, charged=None)
        state = UsageState.SETTLED.value if s.success else UsageState.REFUNDED.value
        if self.done.get(s.request_id) != UsageState.SETTLED.value:  # charged once stays charged
            self.done.pop(s.request_id, None)
            self.done[s.request_id] = state
        if len(self.done) > MAX_DONE:
            del self.done[next(iter(self.done))]
        if f.gen != h.gen:  # its lease was settled as lost meanwhile: that row holds these units
            return Code.OK
        charged = s.charged if type(s.charged) is int else None
        kept = (f.units if charged is None else max(0, min(charged, f.units))) if s.success else 0
        h.avail += f.units - kept  # a refund's units go back; its rate token does not (DESIGN §3b)
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
        self,
        h: _Held,
        want: int,
        release: bool = False,
        jti: str | None = None,
        give_back: bool = False,
        rate: bool = False,
    ) -> None:
        """One message for this token (coalesced: a caller arriving meanwhile waits for the same one;
        a release waits for it and then asks itself). A message not acknowledged before goes first,
        unchanged."""
        while h.busy is not None:
            await asyncio.shield(h.busy)
            if not release:
                return
        if release and self._release_waits(h):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        h.busy = fut
        try:
            if h.sent is None:
                h.sent = self._ask(h, max(want, h.waiting) if want else 0, release, jti, give_back, rate)
                h.sent_at = self.clock()
            ask = h.sent
            now = self.clock()  # this delivery: a shard that hears it keeps the lease alive from now
            if ask.release:  # nothing more is admitted from a lease being given back
                h.avail, h.valid_until, h.releasing = 0, 0.0, True
            try:
                grant: LeaseGrant | None = await self.batchers[h.shard].submit(ask)
            except (LedgerError, OSError, RuntimeError) as exc:
                log.warning("lease ask for %s failed: %r", h.token_id, exc)
                grant = None
            self._apply(h, ask, grant, now, h.sent_at)
        finally:
            h.busy = None
            h.releasing = h.sent is not None and h.sent.release
            fut.set_result(None)

    def _release_waits(self, h: _Held) -> bool:
        """Requests were admitted locally since the round chose to release this idle (or dead) lease:
        their units are not in doubt; a later round releases it once they are answered (only
        `close()` releases units in doubt)."""
        return h.sent is None and bool(h.inflight) and not self.closed

    def _ask(
        self, h: _Held, want: int, release: bool, jti: str | None, give_back: bool = False, rate: bool = False
    ) -> LeaseAsk:
        """The next message of this token's lease. `jti`: the credential of the request that needs
        units (the shard grants only to a current one); background asks use the policy's."""
        now = self.clock()
        rows, h.buffer = tuple(h.buffer), []
        h.report_since = h.buffer_since
        if jti is None:
            jti = h.policy.jti if h.policy else ""
        if h.rate_avail and now >= h.rate_until:  # expired unused
            h.rate_expired, h.rate_avail = h.rate_expired + h.rate_avail, 0
        rate_want = 0
        if rate and not release and h.policy is not None and h.policy.rate_limit is not None:
            # fresh rate tokens for the next interval; those held now go back in the same message
            rate_want = max(1, h.waiting, math.ceil(h.rate * self.config.report_interval_s * 1.5))
            h.rate_expired, h.rate_avail = h.rate_expired + h.rate_avail, 0
        if not h.lease_id and not release and (want > 0 or rate_want > 0):
            h.lease_id, h.creating, h.acked = new_id("lse"), True, 0
        back = 0
        if give_back and not release and h.lease_id and not h.creating:
            back, h.avail, h.recall = h.avail, 0, False
        live = bool(h.lease_id) and not h.creating
        rate_back, h.rate_expired = (h.rate_expired, 0) if live else (0, h.rate_expired)
        in_doubt = sum(f.units for f in h.inflight.values() if f.gen == h.gen) if release and live else 0
        self.stats.in_doubt += in_doubt
        lease_id = h.lease_id if live or not release else ""  # a lease the shard never made is not released
        return LeaseAsk(
            h.token_id,
            jti,
            h.root_id,
            self.holder_id,
            lease_id,
            h.acked + 1 if lease_id else 0,
            rows,
            want if not release else 0,
            release and live,
            back,
            rate_want,
            rate_back,
            in_doubt,
        )

    def _apply(self, h: _Held, ask: LeaseAsk, grant: LeaseGrant | None, sent: float, first_sent: float) -> None:
        """`sent`: when this delivery of `ask` was sent; `first_sent`: when it was first sent (rate
        tokens it drew are spendable from then on for one interval, whichever delivery drew them)."""
        now = self.clock()
        c = self.config
        if grant is None or not isinstance(grant, LeaseGrant):
            self.stats.report_failures += 1
            return  # unreachable: the message goes again, the lease lapses on its own clock
        if grant.code is Code.LEDGER_UNAVAILABLE:  # heard, nothing committed: the lease lives on
            self.stats.report_failures += 1
            if h.lease_id and not h.creating and grant.alive:
                h.valid_until = max(h.valid_until, sent + grant.ttl_s - c.ttl_margin_s)
            return
        self.stats.reports += 1
        h.sent = None  # acknowledged
        h.take(grant.policy)
        h.ttl_s = grant.ttl_s or h.ttl_s
        if grant.lost or ask.release:
            if grant.lost:
                self.stats.lost_leases += 1
            self._end_lease(h)
        elif ask.lease_id and grant.lease_id == ask.lease_id:
            h.creating = False
            h.acked = max(h.acked, ask.seq)
            h.valid_until = sent + grant.ttl_s - c.ttl_margin_s
            h.avail = max(0, grant.units - h.held_units)
            if grant.rate_granted:
                h.rate_avail += grant.rate_granted
                h.rate_until = first_sent + min(c.report_interval_s, RATE_SPEND_S)
        if grant.code is Code.QUOTA_EXHAUSTED and grant.recalled:
            h.deny = None  # other replicas are giving units back: ask again shortly, never cache this
            h.recall_until = max(h.recall_until, now) if h.recall_until > now else now + RECALL_WAIT_S
        elif grant.code in (Code.QUOTA_EXHAUSTED, Code.RATE_LIMITED):
            hold = grant.retry_after if grant.retry_after else c.deny_cache_s
            h.deny = (grant.code, grant.message, now + hold, grant.retry_after)
        elif grant.granted or grant.rate_granted:
            h.deny = None
        h.strict_until = now + c.strict_recheck_s if grant.strict and not grant.recalled else 0.0

    def _end_lease(self, h: _Held) -> None:
        h.lease_id, h.creating, h.avail, h.valid_until, h.acked = "", False, 0, 0.0, 0
        h.rate_avail = h.rate_expired = 0
        h.gen += 1
        h.buffer = [u for u in h.buffer if u.state == UsageState.DENIED.value]

    def _sender(self, shard: int) -> Callable[[list[LeaseAsk]], Any]:
        async def send(asks: list[LeaseAsk]) -> list[LeaseGrant]:
            return await self.transport.lease_sync(shard, asks)

        return send

    # ------------------------------------------------------------ background
    async def _report_loop(self) -> None:
        c = self.config
        while not self.closed:
            await self.sleep(c.report_interval_s)
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
            p = h.policy
            # a revoked or expired token (seen through the watch), or one reclaimed whole or turned
            # strict: its lease goes back at once, after the requests admitted before are answered
            dead = (
                p is not None
                and not h.inflight
                and (p.strict or p.reclaimed or status_refusal(p.path, now) is not None)
            )
            if idle and not h.lease_id and not h.buffer and h.sent is None:
                del self.held[h.token_id]
                continue
            usable = not h.stale and now >= h.strict_until
            denied = h.deny is not None and now < h.deny[2]
            want = self._want(h)
            live = bool(h.lease_id) and not h.creating
            refill = usable and not idle and not dead and not denied and h.avail < max(1, want // 2)
            busy_rate = now - h.last_used <= 2 * c.report_interval_s
            rate = (
                h.rated
                and usable
                and not dead
                and not denied
                and busy_rate
                and (h.rate_avail < 1 or now >= h.rate_until)
            )
            expired = live and (h.rate_expired > 0 or (h.rate_avail > 0 and now >= h.rate_until))
            renew = live and h.valid_until - now < h.ttl_s / 2
            release = (idle or dead) and live
            give_back = (h.recall or (p is not None and p.reclaimed)) and h.avail > 0 and live
            if give_back:
                refill = False
            if h.buffer or h.sent or refill or rate or expired or renew or release or give_back:
                jobs.append(
                    self._exchange(
                        h, want if refill and not release else 0, release=release, give_back=give_back, rate=rate
                    )
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
                await self.sleep(0.2)
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
                if p is not None and p.reclaimed and h.lease_id and not h.creating:
                    h.recall = True  # reclaimed whole: the unused units go back at once
                    if h.avail > 0 and h.busy is None:
                        self._spawn(self._exchange(h, 0, give_back=True))
            elif h.policy is not None and (changed is None or any(r.id in changed for r in h.policy.path)):
                h.need = max(h.need, reply.version)

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(job)
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)

    # ------------------------------------------------------------ introspection
    def refusal(self, token_id: str, jti: str) -> tuple[Code, str] | None:
        """What the cached policy of a token says of it now, asking no one: the refusal an admission
        would get for its credential (rotated or revoked) or its path (revoked, suspended, expired),
        or None. The watch keeps the policy current within DESIGN §3a's bound; a token whose policy
        is not cached here gets None. A frame stream re-checks an answer with it before sending it,
        so that nothing is served past that bound after a revocation, even an answer computed before."""
        h = self.held.get(token_id)
        p = h.policy if h is not None else None
        if p is None:
            return None
        if jti != p.jti:
            return Code.REVOKED_TOKEN, "credential was rotated or revoked"
        return status_refusal(p.path, self.clock())

    def outstanding(self) -> tuple[int, int]:
        """Leases held and their units not yet used."""
        held = [h for h in self.held.values() if h.lease_id]
        return len(held), sum(h.avail + sum(f.units for f in h.inflight.values()) for h in held)

    def report_lag(self) -> float:
        """Age of the oldest usage row not yet acknowledged by its shard (0 when all are)."""
        now = self.clock()
        since = [h.report_since for h in self.held.values() if h.sent is not None and h.sent.uses]
        since += [h.buffer_since for h in self.held.values() if h.buffer]
        return now - min(since) if since else 0.0


def _remaining(p: TokenPolicy, used: int) -> int:
    """Units the token has not spent, as the shard counts them (leased ones included)."""
    if p.path and p.path[0].status != "active":
        return 0
    return max(0, p.allocation - p.delegated - used)
