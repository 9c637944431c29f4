"""LeaseHolder (DESIGN §3a): admission from quota leases inside one ingress replica, without Ray.

The transport is the in-process ledger (`InProcessLedger`, what `FakeLedger` is, here with an
injected clock shared by the shard and the holders) wrapped in `Wire`, which counts the calls a
holder makes and injects faults. The holders never report on their own (`QUIET`): each test says
when they report (`tick`, `close`) and delivers watch answers itself (`on_watch`) unless it runs the
watch loop. After every scenario the whole book is checked: conservation, the book equals the
database, used units, leased units, audit rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ledger.client.holder import HolderConfig, LeaseHolder
from ledger.client.inprocess import InProcessLedger
from ledger.core.codes import Code
from ledger.core.entities import Admission, Decision, Settlement, TokenSpec
from ledger.core.errors import LedgerUnavailable
from ledger.core.leases import LeaseAsk, LeaseGrant, Version, WatchReply
from ledger.core.settings import LedgerSettings
from tests.ledger.book_helpers import Clock

TTL = 10.0
QUIET = HolderConfig(report_interval_s=3600.0)  # no background reports: a test ticks when it wants one
IP = "10.0.0.1"
_rids = itertools.count()


class Wire:
    """The ledger as a holder's transport: counts calls; `down` injects a fault into lease asks,
    admissions and settlements: "raise" (unreachable), "alive" (the shard hears the holder but
    cannot commit: LEDGER_UNAVAILABLE grants with alive=True), "lose_reply" (applied and committed,
    the answer lost); `gate`, when set, holds lease asks until it opens. The watch answers only
    when `watch` is on (otherwise the test calls `on_watch`)."""

    def __init__(self, ledger: InProcessLedger, watch: bool = False) -> None:
        self.ledger = ledger
        self.watch = watch
        self.calls: Counter[str] = Counter()
        self.down: str | None = None
        self.gate: asyncio.Event | None = None

    @property
    def shard_count(self) -> int:
        return self.ledger.shard_count

    def shard_of(self, root_id: str) -> int:
        return self.ledger.shard_of(root_id)

    async def lease_sync(self, shard: int, asks: list[LeaseAsk]) -> list[LeaseGrant]:
        self.calls["lease_sync"] += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down == "raise":
            raise LedgerUnavailable("ledger shard unavailable")
        if self.down == "alive":  # as the shard actor answers when its commit fails
            self.ledger.shards[shard].leases.heard(asks)
            return [LeaseGrant(Code.LEDGER_UNAVAILABLE, ttl_s=TTL, message="database down")] * len(asks)
        grants = await self.ledger.lease_sync(shard, asks)
        if self.down == "lose_reply":
            raise LedgerUnavailable("the answer was lost")
        return grants

    async def lease_watch(self, shard: int, since: Version, tokens: list[str], timeout_s: float) -> WatchReply:
        if not self.watch:
            await asyncio.Event().wait()  # never answers; cancelled by `close`
        return await self.ledger.lease_watch(shard, since, tokens, timeout_s)

    async def admit(self, a: Admission) -> Decision:
        self.calls["admit"] += 1
        if self.down is not None:
            return Decision(Code.LEDGER_UNAVAILABLE, a.request_id, message="ledger unavailable")
        return await self.ledger.admit(a)

    async def settle(self, s: Settlement) -> Code:
        self.calls["settle"] += 1
        if self.down is not None:
            return Code.LEDGER_UNAVAILABLE
        return await self.ledger.settle(s)

    @property
    def asked(self) -> int:
        """Calls that ask the shard something on a request's behalf (the watch is not one)."""
        return self.calls["lease_sync"] + self.calls["admit"] + self.calls["settle"]


@dataclass(frozen=True)
class Token:
    id: str
    root: str
    jti: str

    def admission(self, units: int = 1, model: str = "parts@1", ip: str | None = IP, jti: str = "") -> Admission:
        return Admission(f"req-{next(_rids)}", self.id, jti or self.jti, units, model, ip, root_id=self.root)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path: Path, clock: Clock) -> Iterator[InProcessLedger]:
    settings = LedgerSettings(
        database_url=f"sqlite:///{tmp_path / 'ledger.db'}", data_dir=tmp_path / "data", sweep_interval_s=0
    )
    inproc = InProcessLedger(settings, clock)
    yield inproc
    inproc.close()


def token(ledger: InProcessLedger, issued_id: str) -> Token:
    node = ledger.shards[0].book.nodes[issued_id]
    return Token(node.id, node.root_id, node.jti)


def package(ledger: InProcessLedger, units: int, **limits: Any) -> Token:
    return token(ledger, ledger.create_package(TokenSpec.build("p", units, **limits)).token.id)


def split(ledger: InProcessLedger, parent: Token, units: int, **limits: Any) -> Token:
    return token(ledger, ledger.split(parent.id, TokenSpec.build("kid", units, **limits)).token.id)


def holder(wire: Wire, clock: Clock, name: str = "replica-1", **config: Any) -> LeaseHolder:
    base = {"report_interval_s": 3600.0, **config}
    return LeaseHolder(wire, name, HolderConfig(**base), clock)


def balances(ledger: InProcessLedger, t: Token) -> tuple[int, int]:
    """(used, leased) of a token at its shard, after checking the whole book."""
    report = ledger.consistency()
    assert report.violations == [] and report.mismatched == [], report
    view = ledger.token(t.id)
    return view.used, view.leased


def audit(ledger: InProcessLedger, t: Token) -> Counter[tuple[str, str]]:
    """(state, outcome) -> units summed, with the row count under ("rows", state)."""
    out: Counter[tuple[str, str]] = Counter()
    for r in ledger.usage(token_id=t.id, limit=100_000):
        out[(r["state"], r["outcome"])] += r["units"]
        out[("rows", r["state"])] += 1
    return out


def request_rows(ledger: InProcessLedger, t: Token, request_id: str) -> list[tuple[str, int]]:
    """(state, units) of each usage row of one request."""
    return [(r["state"], r["units"]) for r in ledger.usage(token_id=t.id) if r["request_id"] == request_id]


async def served(h: LeaseHolder, a: Admission) -> Decision:
    """Admit, and on OK settle it as a success."""
    d = await h.admit(a)
    if d.code is Code.OK:
        assert await h.settle(Settlement(a.request_id, a.token_id, True, root_id=a.root_id)) is Code.OK
    return d


async def since_now(ledger: InProcessLedger) -> Version:
    return (await ledger.lease_watch(0, (-1, -1), [], 0.0)).version


async def watched(ledger: InProcessLedger, h: LeaseHolder, since: Version, tokens: list[str]) -> None:
    """One watch answer, delivered to the holder as its watch loop would."""
    h.on_watch(0, await ledger.lease_watch(0, since, tokens, 0.0))


# ---------------------------------------------------------------- local admission
async def test_given_one_refill_when_admitting_then_every_admission_is_local_without_a_ledger_call(
    ledger: InProcessLedger, clock: Clock
) -> None:
    t = package(ledger, 1000)
    wire = Wire(ledger)
    h = holder(wire, clock, min_want=100, max_want=100)
    try:
        assert (await served(h, t.admission())).code is Code.OK
        assert (wire.calls["lease_sync"], h.stats.waited) == (1, 1), "the first one waits for the refill"
        for _ in range(99):
            assert (await served(h, t.admission())).code is Code.OK
        assert wire.asked == 1, "99 admissions and 100 settlements, no ledger call"
        assert h.stats.local == 99
        assert balances(ledger, t) == (0, 100), "nothing reported yet: the units sit in the lease"
        await h.tick()
        used, leased = balances(ledger, t)
        assert used == 100 and leased == h.outstanding()[1]
        assert audit(ledger, t)[("rows", "settled")] == 100
    finally:
        await h.close()
    assert balances(ledger, t) == (100, 0)


async def test_given_a_refund_then_its_units_go_back_to_the_lease(ledger: InProcessLedger, clock: Clock) -> None:
    t = package(ledger, 1000)
    wire = Wire(ledger)
    h = holder(wire, clock, min_want=8, max_want=8)
    try:
        first = [t.admission() for _ in range(8)]
        assert [(await h.admit(a)).code for a in first] == [Code.OK] * 8
        assert wire.calls["lease_sync"] == 1
        for a in first[1:]:
            await h.settle(Settlement(a.request_id, t.id, True, root_id=t.root))
        await h.settle(Settlement(first[0].request_id, t.id, False, root_id=t.root))  # a server-side failure
        assert (await served(h, t.admission())).code is Code.OK
        assert wire.asked == 1, "the refunded unit was admitted again from the lease"
    finally:
        await h.close()
    assert balances(ledger, t) == (8, 0)
    rows = audit(ledger, t)
    assert (rows[("rows", "settled")], rows[("settled", "ok")], rows[("rows", "refunded")]) == (8, 8, 1)
    assert rows[("refunded", "ok")] == 0


async def test_given_a_strict_package_a_small_balance_or_an_idempotency_key_then_the_shard_admits_synchronously(
    ledger: InProcessLedger, clock: Clock
) -> None:
    strict = package(ledger, 1000, meta={"strict": True})
    small = package(ledger, 15)
    plain = package(ledger, 1000)
    wire = Wire(ledger)
    h = holder(wire, clock)
    try:
        for t in (strict, small):
            for _ in range(3):
                assert (await served(h, t.admission())).code is Code.OK
        assert (await served(h, dataclasses.replace(plain.admission(), idem_key="k-1"))).code is Code.OK
        assert (wire.calls["admit"], wire.calls["settle"], h.stats.strict) == (7, 7, 7)
        assert [balances(ledger, t) for t in (strict, small, plain)] == [(3, 0), (3, 0), (1, 0)], "charged at once"
    finally:
        await h.close()


async def test_given_one_strict_request_redelivered_to_two_holders_when_one_fails_then_the_answered_copy_is_charged(
    ledger: InProcessLedger, clock: Clock
) -> None:
    t = package(ledger, 1000, meta={"strict": True})
    one_wire, two_wire = Wire(ledger), Wire(ledger)
    one, two = holder(one_wire, clock, "replica-1"), holder(two_wire, clock, "replica-2")
    try:
        a = t.admission()
        assert (await one.admit(a)).code is Code.OK
        again = await two.admit(a)  # Ray redelivered the request to a second replica
        assert (again.code, again.replayed) == (Code.OK, True)
        failed = Settlement(a.request_id, a.token_id, False, root_id=a.root_id)
        one_wire.down = "raise"  # the first settlement attempt of the failed copy does not get through
        assert await one.settle(failed) is Code.LEDGER_UNAVAILABLE
        one_wire.down = None
        assert await one.settle(failed) is Code.OK  # retried, still naming its own copy
        assert balances(ledger, t) == (1, 0), "the other copy is still being answered: its debit stays"
        assert await two.settle(Settlement(a.request_id, a.token_id, True, root_id=a.root_id)) is Code.OK
        assert balances(ledger, t) == (1, 0)
        assert audit(ledger, t)[("settled", "ok")] == 1
    finally:
        await one.close()
        await two.close()


async def test_given_two_copies_on_one_replica_when_one_gets_no_verdict_then_its_refund_leaves_the_other_charged(
    ledger: InProcessLedger, clock: Clock
) -> None:
    """Found by the simulator (seed 10352): Ray redelivered a strict request to the replica serving
    it; the copy's admit call failed (no verdict) and the caller refunded it, unnamed. The holder
    settled its oldest copy, the one in service, so the answered request was charged 0."""
    t = package(ledger, 1000, meta={"strict": True})
    wire = Wire(ledger)
    h = holder(wire, clock)
    try:
        a = t.admission()
        first = await h.admit(a)
        assert first.code is Code.OK and first.copy
        wire.down = "raise"
        again = await h.admit(a)
        assert again.code is Code.LEDGER_UNAVAILABLE and again.copy not in ("", first.copy)
        wire.down = None
        assert await h.settle(Settlement(a.request_id, a.token_id, False, root_id=a.root_id, copy=again.copy)) in (
            Code.OK,
            Code.NOT_FOUND,
        )
        assert balances(ledger, t) == (1, 0), "the first copy is still being answered: its debit stays"
        answered = Settlement(a.request_id, a.token_id, True, root_id=a.root_id, copy=first.copy)
        assert await h.settle(answered) is Code.OK
        assert balances(ledger, t) == (1, 0)
        assert audit(ledger, t)[("settled", "ok")] == 1
    finally:
        await h.close()


async def test_given_a_closing_holder_serving_a_request_when_its_copy_gets_no_verdict_then_the_answer_is_charged(
    ledger: InProcessLedger, clock: Clock
) -> None:
    """Found by the simulator (seed 23834): a replica closing with a request in flight from its
    lease got Ray's copy of it, which went to the shard (nothing local after `close()`) and got no
    verdict. The copy's refund, though it named its delivery, settled the local admission: the
    answer that followed was charged 0."""
    t = package(ledger, 1000)
    wire = Wire(ledger)
    h = holder(wire, clock)
    a = t.admission()
    first = await h.admit(a)
    assert first.code is Code.OK and not first.copy and wire.calls["admit"] == 0, "served from the lease"
    closing = asyncio.ensure_future(h.close(timeout_s=5.0))
    await asyncio.sleep(0)
    assert h.closed
    wire.down = "raise"
    again = await h.admit(a)
    assert again.code is Code.LEDGER_UNAVAILABLE and again.copy and wire.calls["admit"] == 1
    wire.down = None
    refund = Settlement(a.request_id, a.token_id, False, root_id=a.root_id, copy=again.copy)
    assert await h.settle(refund) in (Code.OK, Code.NOT_FOUND)
    assert await h.settle(Settlement(a.request_id, a.token_id, True, root_id=a.root_id)) is Code.OK
    await closing
    assert balances(ledger, t) == (1, 0)
    assert audit(ledger, t)[("settled", "ok")] == 1


async def test_given_two_copies_waiting_for_one_lease_ask_then_one_debit_settled_by_the_last_copy(
    ledger: InProcessLedger, clock: Clock
) -> None:
    """Found by the simulator (seed 6746): two copies of one request arrived while the replica asked
    for a lease; both were debited, the second replacing the first in flight, and the answered
    copy's settlement found nothing: charged 0 for an answer."""
    t = package(ledger, 1000)
    wire = Wire(ledger)
    wire.gate = asyncio.Event()
    h = holder(wire, clock)
    try:
        a = t.admission()
        both = asyncio.gather(h.admit(a), h.admit(a))
        await asyncio.sleep(0.01)
        wire.gate.set()
        one, two = await both
        assert (one.code, two.code) == (Code.OK, Code.OK)
        assert sorted((one.replayed, two.replayed)) == [False, True], "one debit, one copy of it"
        assert await h.settle(Settlement(a.request_id, a.token_id, False, root_id=a.root_id)) is Code.OK
        assert await h.settle(Settlement(a.request_id, a.token_id, True, root_id=a.root_id)) is Code.OK
        await h.tick()
        used, _ = balances(ledger, t)
        assert used == 1
        assert audit(ledger, t)[("settled", "ok")] == 1
    finally:
        await h.close()


# ---------------------------------------------------------------- the same checks as the shard
async def _expire(ledger: InProcessLedger, h: LeaseHolder, t: Token, clock: Clock) -> Admission:
    clock.advance(6)  # past the token's expiry, well inside the lease's validity
    return t.admission()


async def _revoke_ancestor(ledger: InProcessLedger, h: LeaseHolder, t: Token, clock: Clock) -> Admission:
    since = await since_now(ledger)
    parent = ledger.token(t.id).parent_id
    assert parent is not None
    ledger.revoke(parent)
    await watched(ledger, h, since, [t.id])
    return t.admission()


async def _rotate(ledger: InProcessLedger, h: LeaseHolder, t: Token, clock: Clock) -> Admission:
    since = await since_now(ledger)
    ledger.rotate(t.id)
    await watched(ledger, h, since, [t.id])
    return t.admission()  # with the credential it had


async def _narrow_models(ledger: InProcessLedger, h: LeaseHolder, t: Token, clock: Clock) -> Admission:
    since = await since_now(ledger)
    ledger.update_limits(t.id, models=["parts@2"])
    await watched(ledger, h, since, [t.id])
    return t.admission()


async def _model(ledger: InProcessLedger, h: LeaseHolder, t: Token, clock: Clock) -> Admission:
    return t.admission(model="cars@1")


async def _ip(ledger: InProcessLedger, h: LeaseHolder, t: Token, clock: Clock) -> Admission:
    return t.admission(ip="192.168.0.7")


async def _no_ip(ledger: InProcessLedger, h: LeaseHolder, t: Token, clock: Clock) -> Admission:
    return t.admission(ip=None)


async def _units(ledger: InProcessLedger, h: LeaseHolder, t: Token, clock: Clock) -> Admission:
    return t.admission(units=0)


Case = Callable[[InProcessLedger, LeaseHolder, Token, Clock], Awaitable[Admission]]
CASES: dict[str, tuple[Case, Code]] = {
    "expired": (_expire, Code.EXPIRED_TOKEN),
    "revoked_ancestor": (_revoke_ancestor, Code.REVOKED_TOKEN),
    "rotated": (_rotate, Code.REVOKED_TOKEN),
    "models_narrowed": (_narrow_models, Code.MODEL_NOT_ALLOWED),
    "model_not_allowed": (_model, Code.MODEL_NOT_ALLOWED),
    "ip_not_allowed": (_ip, Code.IP_NOT_ALLOWED),
    "no_ip": (_no_ip, Code.IP_NOT_ALLOWED),
    "bad_units": (_units, Code.INVALID_REQUEST),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_given_a_request_the_shard_would_refuse_then_the_holder_refuses_it_locally_with_the_same_code(
    ledger: InProcessLedger, clock: Clock, case: str
) -> None:
    change, code = CASES[case]
    root = package(ledger, 10_000, models=["parts"], ips=["10.0.0.0/8"])
    t = split(ledger, split(ledger, root, 5000), 1000, expires_at=clock() + 5)
    wire = Wire(ledger)
    h = holder(wire, clock)
    try:
        assert (await served(h, t.admission())).code is Code.OK
        a = await change(ledger, h, t, clock)
        asked = wire.asked
        local = await h.admit(a)
        assert wire.asked == asked, "decided without asking the ledger"
        shard = await ledger.admit(dataclasses.replace(a, request_id=f"{a.request_id}-shard"))
        assert (local.code, shard.code) == (code, code)
        assert (local.units, shard.units) == (0, 0)
        await h.tick()
        denied = [r for r in ledger.usage(token_id=t.id, limit=100) if r["request_id"] == a.request_id]
        assert [(r["state"], r["outcome"], r["units"]) for r in denied] == [("denied", code.value, 0)]
    finally:
        await h.close()
    balances(ledger, t)


@pytest.mark.parametrize(
    ("limits", "code"),
    [({"ips": ["10.0.0.2/32"]}, Code.IP_NOT_ALLOWED), ({"models": ["parts@2"]}, Code.MODEL_NOT_ALLOWED)],
)
async def test_given_a_request_in_flight_when_a_narrowing_is_seen_then_its_copy_is_refused_as_at_the_shard(
    ledger: InProcessLedger, clock: Clock, limits: dict[str, Any], code: Code
) -> None:
    """Seed 2595 of the simulator: Ray redelivered a request to the replica still serving it, after
    the replica had seen its IP narrowed away; the copy was admitted. The shard checks a copy's model
    and IP as a new request's; so does the holder. The first copy, answered, is charged once."""
    t = package(ledger, 1000)
    h = holder(Wire(ledger), clock)
    try:
        first = t.admission()
        assert (await h.admit(first)).code is Code.OK
        since = await since_now(ledger)
        ledger.update_limits(t.id, **limits)
        await watched(ledger, h, since, [t.id])
        copy = await h.admit(first)
        assert (copy.code, copy.units) == (code, 0)
        assert await h.settle(Settlement(first.request_id, t.id, True, root_id=t.root)) is Code.OK
        await h.tick()
    finally:
        await h.close()
    assert balances(ledger, t) == (1, 0)
    rows = audit(ledger, t)
    assert (rows[("rows", "settled")], rows[("settled", "ok")], rows[("rows", "denied")]) == (1, 1, 1)


async def test_given_the_last_units_in_the_replicas_own_lease_when_the_shard_admits_then_every_unit_is_served(
    ledger: InProcessLedger, clock: Clock
) -> None:
    """Issue 18 §1: a 200-unit token answered `quota exhausted: 0 units left` at used 199 with 1
    unit leased, and its 100 % alert never fired. Under the strict threshold the shard admits, but
    the units already in this replica's lease are served from it. Every answer's used + remaining
    adds up to the allocation."""
    t = package(ledger, 20)
    h = holder(Wire(ledger), clock, min_want=8)
    answers: list[Decision] = []
    try:
        answers.append(await served(h, t.admission()))  # a lease of 5 units (1/4 of free): 4 idle
        assert balances(ledger, t)[1] == 5
        clock.advance(TTL)  # the lease is renewed by the next admission: free (15) is under the threshold
        for _ in range(19):
            answers.append(await served(h, t.admission()))
        assert [d.code for d in answers] == [Code.OK] * 20
        last = await h.admit(t.admission())
        assert (last.code, last.remaining) == (Code.QUOTA_EXHAUSTED, 0)
        await h.tick()
    finally:
        await h.close()
    assert balances(ledger, t) == (20, 0)
    off = [d for d in answers if d.used + d.remaining != 20]
    assert off == [], "used + remaining is the allocation in every answer"
    assert 100 in {a["threshold"] for a in ledger.alerts() if a["token_id"] == t.id}, "the 100 % alert fired"
    rows = audit(ledger, t)
    assert (rows[("rows", "settled")], rows[("rows", "denied")]) == (20, 1)


async def test_given_the_last_units_idle_in_another_replicas_lease_then_a_strict_admission_waits_for_them(
    ledger: InProcessLedger, clock: Clock
) -> None:
    """The shard's side of the same rule: a strict admission that finds too few free units while
    leases hold some has them asked back and is answered "recalled" (nothing recorded); the holder
    asks again until they are back. One audit row per request, none per retry."""
    t = package(ledger, 20)
    wire = Wire(ledger)
    one, two = holder(wire, clock, "replica-1", min_want=8), holder(wire, clock, "replica-2", min_want=8)
    try:
        assert (await served(one, t.admission())).code is Code.OK  # replica-1 keeps 4 units idle
        since = await since_now(ledger)
        for _ in range(15):
            assert (await ledger.admit(t.admission())).code is Code.OK  # free is 0 now
        waiting = asyncio.create_task(two._strict(t.admission()))
        await asyncio.sleep(0.01)
        assert not waiting.done(), "waits while the units are asked back"
        await watched(ledger, one, since, [t.id])  # the recall reaches replica-1 ...
        await one.tick()  # ... which gives back what it does not use
        assert (await waiting).code is Code.OK
        gone = await two._strict(t.admission())
        assert gone.code is Code.OK
        await asyncio.gather(one.tick(), two.tick())
    finally:
        await asyncio.gather(one.close(), two.close())
    rows = audit(ledger, t)
    assert rows[("rows", "denied")] == 0


# ---------------------------------------------------------------- many holders, one token
async def test_given_500_concurrent_admissions_on_100_units_across_3_holders_then_exactly_100_are_admitted(
    ledger: InProcessLedger, clock: Clock
) -> None:
    t = package(ledger, 100)
    wire = Wire(ledger)
    holders = [holder(wire, clock, f"replica-{i}") for i in range(3)]
    try:
        asks = [t.admission() for _ in range(500)]
        decisions = await asyncio.gather(*[holders[i % 3].admit(a) for i, a in enumerate(asks)])
        ok = [a for a, d in zip(asks, decisions, strict=True) if d.code is Code.OK]
        assert len(ok) == 100
        assert {d.code for d in decisions} == {Code.OK, Code.QUOTA_EXHAUSTED}
        for i, a in enumerate(asks):
            if a in ok:
                assert await holders[i % 3].settle(Settlement(a.request_id, t.id, True, root_id=t.root)) is Code.OK
        await asyncio.gather(*[h.tick() for h in holders])
    finally:
        await asyncio.gather(*[h.close() for h in holders])
    assert balances(ledger, t) == (100, 0)
    rows = audit(ledger, t)
    assert (rows[("rows", "settled")], rows[("settled", "ok")]) == (100, 100)
    assert rows[("rows", "denied")] == 400, "every denial is in the audit"


async def test_given_a_rate_limit_across_3_holders_then_admissions_never_exceed_rate_times_elapsed_plus_burst(
    ledger: InProcessLedger, clock: Clock
) -> None:
    t = package(ledger, 10_000, rate="5/s:5")
    start = clock()
    wire = Wire(ledger)
    holders = [holder(wire, clock, f"replica-{i}") for i in range(3)]
    admitted = 0
    try:
        for _ in range(40):
            clock.advance(0.1)
            for h in holders:
                for _ in range(3):
                    admitted += (await served(h, t.admission())).code is Code.OK
                await h.tick()
            assert admitted <= 5 * (clock() - start) + 5
        assert admitted > 5, "the bucket refilled and the holders used it"
    finally:
        await asyncio.gather(*[h.close() for h in holders])
    assert balances(ledger, t) == (admitted, 0)


@pytest.mark.parametrize("refunds", [True, False])
async def test_given_one_instant_when_admit_and_refund_repeat_then_the_rate_bound_holds_as_on_the_strict_path(
    ledger: InProcessLedger, clock: Clock, refunds: bool
) -> None:
    """Issue 17 §1.5: admit + refund x 100 in one instant was admitted 100 times on a rated token (a
    refund put its rate token back). A refunded request used its rate slot; rate tokens drawn for a
    lease are spent within one report interval, never banked. Also without refunds: at most the
    burst plus one interval's worth of the rate (the documented slack)."""
    t = package(ledger, 10_000, rate="10/s:2")
    h = holder(Wire(ledger), clock, report_interval_s=0.1)
    admitted = 0
    try:
        for _ in range(100):
            a = t.admission()
            d = await h.admit(a)
            if d.code is Code.OK:
                admitted += 1
                await h.settle(Settlement(a.request_id, t.id, not refunds, root_id=t.root))
        assert admitted <= 2 + 10 * 0.1, admitted
        clock.advance(5.0)  # rate tokens drawn then and never spent are not spendable later
        later = [await h.admit(t.admission()) for _ in range(20)]
        assert sum(d.code is Code.OK for d in later) <= 2 + 10 * 0.1
    finally:
        await h.close()


async def test_given_rate_tokens_drawn_and_not_spent_when_the_bucket_has_refilled_then_they_are_not_spent_on_top(
    ledger: InProcessLedger, clock: Clock
) -> None:
    """Issue 17 §1.5: rate tokens drawn for a lease were banked and spent later, on top of the
    refilled bucket. Drawn tokens are spendable for one report interval only: after an idle second,
    a burst gets at most the burst plus one interval's worth of the rate."""
    t = package(ledger, 10_000, rate="10/s:5")
    h = holder(Wire(ledger), clock, report_interval_s=0.1)
    try:
        assert (await served(h, t.admission())).code is Code.OK  # draws rate tokens, spends one
        clock.advance(1.0)  # idle: the bucket is full again
        burst = [await served(h, t.admission()) for _ in range(20)]
        assert sum(d.code is Code.OK for d in burst) <= 5 + 10 * 0.1
    finally:
        await h.close()


# ---------------------------------------------------------------- narrowing changes
async def test_given_a_revocation_when_the_holder_saw_one_watch_answer_then_it_admits_nothing_more(
    ledger: InProcessLedger, clock: Clock
) -> None:
    t = package(ledger, 1000)
    wire = Wire(ledger)
    h = holder(wire, clock)
    try:
        assert (await served(h, t.admission())).code is Code.OK
        since = await since_now(ledger)
        ledger.revoke(t.id)
        assert (await served(h, t.admission())).code is Code.OK, "not seen yet: the lease still serves"
        await watched(ledger, h, since, [t.id])
        decisions = [await served(h, t.admission()) for _ in range(20)]
        assert {d.code for d in decisions} == {Code.REVOKED_TOKEN}
        await h.tick()  # its lease goes back at once
        assert h.outstanding() == (0, 0)
    finally:
        await h.close()
    view = ledger.token(t.id)
    assert (view.used, view.leased, view.allocation) == (2, 0, 2), "a dead token ends holding what it spent"
    balances(ledger, t)


async def test_given_the_watch_loop_when_a_token_is_revoked_then_the_holder_stops_admitting_it(
    ledger: InProcessLedger, clock: Clock
) -> None:
    t = package(ledger, 1000)
    h = holder(Wire(ledger, watch=True), clock)
    try:
        assert (await served(h, t.admission())).code is Code.OK
        ledger.revoke(t.id)
        for _ in range(1000):  # a bound on waiting for the long poll, not a measured latency
            if (await served(h, t.admission())).code is Code.REVOKED_TOKEN:
                break
            await asyncio.sleep(0.01)
        decisions = [await served(h, t.admission()) for _ in range(20)]
        assert {d.code for d in decisions} == {Code.REVOKED_TOKEN}
    finally:
        await h.close()
    assert ledger.token(t.id).leased == 0
    balances(ledger, t)


# ---------------------------------------------------------------- the ledger unreachable
@pytest.mark.parametrize("fault", ["raise", "alive", "lose_reply"])
async def test_given_the_ledger_unreachable_then_the_lease_keeps_serving_and_the_report_lands_once(
    ledger: InProcessLedger, clock: Clock, fault: str
) -> None:
    t = package(ledger, 1000)
    wire = Wire(ledger)
    h = holder(wire, clock, min_want=50, max_want=50)
    try:
        for _ in range(10):
            assert (await served(h, t.admission())).code is Code.OK
        wire.down = fault
        await h.tick()  # the report does not come back
        clock.advance(1)
        for _ in range(20):
            assert (await served(h, t.admission())).code is Code.OK, "served from the units left"
        await h.tick()
        assert wire.calls["admit"] == 0
        wire.down = None
        await h.tick()
        await h.tick()
        assert h.report_lag() == 0.0
        assert balances(ledger, t)[0] == 30
    finally:
        await h.close()
    assert balances(ledger, t) == (30, 0)
    rows = audit(ledger, t)
    assert (rows[("rows", "settled")], rows[("settled", "ok")]) == (30, 30), "every report applied once"


async def test_given_denials_reported_without_a_lease_when_the_answer_is_lost_then_they_are_recorded_once(
    ledger: InProcessLedger, clock: Clock
) -> None:
    root = package(ledger, 100)
    split(ledger, root, 100)  # nothing left to lease on the root
    wire = Wire(ledger)
    h = holder(wire, clock)
    try:
        codes = {(await h.admit(root.admission())).code for _ in range(5)}
        assert codes == {Code.QUOTA_EXHAUSTED} and wire.calls["admit"] == 0, "denied locally, no lease"
        wire.down = "lose_reply"
        await h.tick()  # recorded, the answer lost
        wire.down = None
        await h.tick()  # sent again
    finally:
        await h.close()
    rows = [r["request_id"] for r in ledger.usage(token_id=root.id)]
    assert len(rows) == len(set(rows)) == 5


async def test_given_no_answer_then_the_holder_stops_using_its_lease_ttl_minus_margin_after_the_last_answered_ask(
    ledger: InProcessLedger, clock: Clock
) -> None:
    t = package(ledger, 1000)
    wire = Wire(ledger)
    h = holder(wire, clock, ttl_margin_s=1.0)
    start = clock()
    try:
        assert (await served(h, t.admission())).code is Code.OK
        wire.down = "raise"
        clock.advance(5.5)
        await h.tick()  # a renewal, unanswered
        clock.t = start + TTL - 1.0 - 0.05
        assert (await h.admit(t.admission())).code is Code.OK
        assert wire.calls["admit"] == 0, "admitted from the lease"
        clock.t = start + TTL - 1.0 + 0.05
        late = await h.admit(t.admission())
        assert (late.code, wire.calls["admit"]) == (Code.LEDGER_UNAVAILABLE, 1), "asked the shard, not the lease"
        assert h.outstanding()[1] > 0, "units were left in the lease"
    finally:
        wire.down = None
        await h.close()
    balances(ledger, t)


async def test_given_a_shard_that_hears_the_holder_but_cannot_commit_then_the_lease_serves_while_it_is_heard(
    ledger: InProcessLedger, clock: Clock
) -> None:
    t = package(ledger, 1000)
    wire = Wire(ledger)
    h = holder(wire, clock, ttl_margin_s=1.0)
    start = clock()
    try:
        assert (await served(h, t.admission())).code is Code.OK
        wire.down = "alive"
        for _ in range(6):  # 30 s, three TTLs, of reports the database never takes
            clock.advance(5.0)
            await h.tick()
            assert (await h.admit(t.admission())).code is Code.OK
            assert ledger.shards[0].settle_lost_leases() == [], "never settled while its holder may use it"
        assert (wire.calls["admit"], clock() - start) == (0, 30.0)
        wire.down = None
    finally:
        await h.close()
    balances(ledger, t)


async def test_given_a_silent_holder_when_its_lease_is_lost_then_it_learns_it_and_nothing_unreported_is_charged(
    ledger: InProcessLedger, clock: Clock
) -> None:
    t = package(ledger, 1000)
    wire = Wire(ledger)
    h = holder(wire, clock, min_want=40, max_want=40)
    try:
        for _ in range(5):
            assert (await served(h, t.admission())).code is Code.OK
        clock.advance(TTL + 1)  # no report for longer than the TTL
        ledger.sweep()
        events = [e for e in ledger.admin_events(token_id=t.id) if e["action"] == "lease.lost"]
        assert [(e["detail"]["holder"], e["detail"]["units"]) for e in events] == [("replica-1", 40)]
        assert balances(ledger, t) == (0, 0), "refund: never charged without an answer"
        await h.tick()
        assert h.stats.lost_leases == 1 and h.outstanding() == (0, 0)
        assert (await served(h, t.admission())).code is Code.OK, "a new lease"
    finally:
        await h.close()
    assert balances(ledger, t) == (1, 0)


# ---------------------------------------------------------------- releases
async def test_given_leases_on_several_tokens_when_the_holder_closes_then_every_lease_is_released(
    ledger: InProcessLedger, clock: Clock
) -> None:
    one = package(ledger, 1000)
    two = package(ledger, 500)
    kid = split(ledger, one, 100)
    h = holder(Wire(ledger), clock)
    for t in (one, two, kid, kid):
        assert (await served(h, t.admission())).code is Code.OK
    assert h.outstanding()[0] == 3
    await h.close()
    assert [balances(ledger, t) for t in (one, two, kid)] == [(1, 0), (1, 0), (2, 0)]
    assert all(v.leased == 0 for v in ledger.tokens())


async def test_given_an_admission_after_the_round_chose_to_release_an_idle_lease_then_it_is_charged(
    ledger: InProcessLedger, clock: Clock
) -> None:
    """Found chasing a flake of test_replica_crash (a 503 with no refund row): a request admitted
    from the lease between the round's choice to release it (idle, nothing in flight) and the
    release itself went out as units in doubt, and its settlement, finding the lease gone, recorded
    nothing: served free under `refund`. The release waits for it instead."""
    t = package(ledger, 1000)
    wire = Wire(ledger)
    h = holder(wire, clock, idle_release_s=5.0)
    try:
        assert (await served(h, t.admission())).code is Code.OK
        clock.advance(6)  # idle: this round releases the lease
        releasing = asyncio.ensure_future(h.tick())
        await asyncio.sleep(0)  # the round has chosen; its message is not built yet
        a = t.admission()
        racing = await h.admit(a)
        assert racing.code is Code.OK and wire.calls["admit"] == 0, "admitted from the lease"
        await releasing
        assert await h.settle(Settlement(a.request_id, a.token_id, True, root_id=a.root_id)) is Code.OK
        await h.tick()
    finally:
        await h.close()
    used, leased = balances(ledger, t)
    assert leased == 0
    assert request_rows(ledger, t, a.request_id) == [("settled", 1)], "in the audit, charged"
    assert used == 2 and h.stats.in_doubt == 0


async def test_given_an_admission_while_an_idle_lease_is_being_released_then_it_is_still_charged(
    ledger: InProcessLedger, clock: Clock
) -> None:
    t = package(ledger, 1000)
    wire = Wire(ledger)
    h = holder(wire, clock, idle_release_s=5.0)
    try:
        assert (await served(h, t.admission())).code is Code.OK
        clock.advance(6)  # idle: the next round releases the lease
        wire.gate = asyncio.Event()
        releasing = asyncio.ensure_future(h.tick())
        for _ in range(100):
            if wire.calls["lease_sync"] == 2:
                break
            await asyncio.sleep(0)
        assert wire.calls["lease_sync"] == 2, "the release is on its way"
        racing = await served(h, t.admission())
        wire.gate.set()
        await releasing
        await h.tick()
    finally:
        await h.close()
    used, leased = balances(ledger, t)
    assert leased == 0
    rows = request_rows(ledger, t, racing.request_id)
    assert rows == ([("settled", 1)] if racing.code is Code.OK else [("denied", 0)]), "in the audit"
    assert used == 1 + (racing.code is Code.OK), "an admitted request is charged (or refused), never free"
