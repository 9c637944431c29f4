"""Quota leases (DESIGN §3a), the shard's side: grants, reports, releases, lost leases, the watch log.

A lease escrows units of one token for one holder (an ingress replica): `free` → `leased`, durably.
The holder admits locally from them and reports what it did; the shard turns reported units into
`used` ones. Everything here runs inside the shard's single-threaded owner, on its `QuotaBook`; no
I/O, every change goes to the book's outbox, and the store commits it in the same group commit
as admissions.

    LeaseAsk  (holder → shard, one per token)   report rows (idempotent by `seq`), release, `want` more
    LeaseGrant (shard → holder)                 units granted, units escrowed, the token's policy
    lost leases                                 past their deadline: settled by `lost_lease_policy`
                                                (`refund` | `charge`), one `lease.lost` audit row

Lost leases: the units left in a dead holder's lease are in doubt (some were answered and not yet
reported). `refund` never charges them (`used` does not move) and never grants them again: they are
written off the allocation of the token and of each ancestor, so no unit is served twice and the
package never serves more than it was granted (the lease.lost row says how many). `charge` turns
them into `used` (never served unpaid; units never admitted are charged too).

Lease deadlines: the durable `expires_at` (renewed by every report) and, in memory only, the time
this shard instance last heard from the holder, or started: a shard instance never settles a lease
before its own start + TTL, so a holder whose reports could not be committed (the database down)
or whose shard restarted keeps its lease while it keeps reporting. The holder stops admitting from
a lease `ttl - margin` after the send time of its last answered report, which is never later than
the shard's deadline: units are never granted twice.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeGuard

from ledger.core import columns
from ledger.core.changes import Changes, Lease, Pending
from ledger.core.codes import Code
from ledger.core.credentials import new_id
from ledger.core.entities import RECLAIMING, Node, Settlement, UsageState
from ledger.core.limits import Bucket
from ledger.core.rules import Rule, status_refusal
from ledger.core.service import SERVICE_CLASSES, Service, ServiceClass, service_of

# tree actions that can make a holder refuse what it admitted before (DESIGN §3a: narrowing changes)
NARROWING = frozenset({"token.revoke", "token.expire", "token.rotate", "token.reclaim", "token.limits", "token.top_up"})
WATCH_LOG = 100_000
MAX_DENIALS = 200_000
MAX_WANT = 10**9
RECALL_EVERY_S = 0.05  # changed token ids remembered for watchers; an older `since` gets every policy
STRICT_RATE = 5.0  # requests per second: tokens limited below this on their path admit at the shard
MAX_REPLIES = 200_000
# a holder spends the rate tokens drawn by one ask for at most RATE_SPEND_S after sending it; the
# shard counts them against their buckets' burst until given back or RATE_LOAN_S after the draw
# (RATE_SPEND_S plus room for a holder's clock running ahead)
RATE_SPEND_S = 0.1
RATE_LOAN_S = 0.25

Version = tuple[int, int]  # (shard epoch, change counter): a new epoch makes every cached policy stale


# ---------------------------------------------------------------- wire types
@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """A token's local admission rules (itself, then each ancestor) and its balance at `version`."""

    token_id: str
    root_id: str
    jti: str
    path: tuple[Rule, ...]
    allocation: int
    used: int
    free: int
    rate_limit: float | None
    strict: bool
    version: Version
    reclaimed: bool = False  # reclaimed whole: nothing more is admitted from a lease; leased units go back
    delegated: int = 0  # units given to children: remaining = allocation - delegated - used
    service: Service | None = None  # its tier's level and weight, its package and team (DESIGN §3c)

    @staticmethod
    def of(node: Node, version: Version, table: Mapping[str, ServiceClass] = SERVICE_CLASSES) -> TokenPolicy:
        path = node.path()
        rates = [n.rate.rate for n in path if n.rate is not None]
        return TokenPolicy(
            node.id,
            node.root_id,
            node.jti,
            tuple(Rule(n.id, n.status.value, n.expires_at, n.models, n.ips) for n in path),
            node.allocation,
            node.used,
            max(node.free, 0) if node.live else 0,
            min(rates) if rates else None,
            is_strict(node),
            version,
            bool(node.meta.get(RECLAIMING)),
            node.delegated,
            service_of(node, table),
        )


@dataclass(frozen=True, slots=True)
class LeaseUse:
    """One request a holder finished (settled, refunded) or denied, reported once."""

    request_id: str
    ts: float
    model: str
    units: int  # units it held from the lease (0 for a denial)
    kept: int  # units charged: what the holder answered for
    state: str  # settled | refunded | denied
    outcome: str  # the Code value
    client_ip: str | None = None
    image_bytes: int = 0
    latency_ms: float = 0.0
    detections: int = 0
    gpu_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class LeaseAsk:
    """One holder's message about one lease of one token: a report, a give-back, a release, and/or
    `want` more units and `rate_want` rate tokens.

    Exactly once (DESIGN §3b): the holder names its lease (`lease_id`, chosen by the holder before
    the first grant) and numbers every message of it (`seq`: the last acknowledged + 1; the first is
    1). The shard applies a message only if its number is above the lease's durable `seq`; a resend
    is answered with the first delivery's result. `lease_id` "" (no lease, only denials reported)
    and `seq` 0 (unnumbered, tools and old tests) are applied on every delivery."""

    token_id: str
    jti: str
    root_id: str
    holder_id: str  # the asking LeaseHolder's id
    lease_id: str = ""  # "" = no lease yet
    seq: int = 0  # this message's number in the lease (the last applied + 1); 0 = unnumbered
    uses: tuple[LeaseUse, ...] = ()
    want: int = 0
    release: bool = False
    give_back: int = 0  # unused units returned to `free`, the lease going on (after a recall)
    rate_want: int = 0  # rate tokens for the next `report_interval` (tokens with a rate on their path)
    rate_back: int = 0  # rate tokens drawn earlier and never used (they expired unused): back to the buckets
    in_doubt: int = 0  # with `release`: units of requests still unanswered (settled by lost_lease_policy)


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """The shard's answer to one `LeaseAsk`. `code` says why nothing (more) was granted."""

    code: Code
    lease_id: str = ""
    granted: int = 0  # units added now
    units: int = 0  # units escrowed for the lease after this answer (the holder's truth)
    applied_seq: int = 0  # the last message applied: the holder forgets messages up to it
    ttl_s: float = 0.0
    policy: TokenPolicy | None = None
    strict: bool = False  # admit this token synchronously at the shard (strict package, small balance)
    lost: bool = False  # the lease is gone (settled by policy): drop it, its unreported rows with it
    alive: bool = True  # the shard heard this holder (its deadline moved) even if nothing was committed
    recalled: bool = False  # other holders' leases hold this token's units: asked back, ask again soon
    message: str = ""
    retry_after: float | None = None
    rate_granted: int = 0  # rate tokens drawn for this holder, spendable for one report interval


@dataclass(frozen=True, slots=True)
class WatchReply:
    """Fresh policies of the watched tokens that changed since `since` (None: the token is gone), and
    every token id changed since (`changed`; None: anything may have, e.g. the shard restarted)."""

    version: Version
    policies: dict[str, TokenPolicy | None] = field(default_factory=dict)
    changed: frozenset[str] | None = frozenset()
    recalls: frozenset[str] = frozenset()  # give back the unused units of these tokens' leases


def is_strict(node: Node) -> bool:
    """Packages created `--strict`, and tokens with a rate below STRICT_RATE on their path, admit
    every request synchronously at the shard (a round trip per request costs nothing at that rate)."""
    path = node.path()
    return bool(path[-1].meta.get("strict")) or any(n.rate is not None and n.rate.rate < STRICT_RATE for n in path)


# ---------------------------------------------------------------- the watch log
class WatchLog:
    """Versions of narrowing changes, published after their commit. Lives outside the book: a
    rebuilt book never takes a version back."""

    def __init__(self, epoch: int = 0) -> None:
        self.epoch = epoch
        self.counter = 0
        self.log: deque[tuple[int, str]] = deque(maxlen=WATCH_LOG)
        self.recalls: deque[tuple[int, str]] = deque(maxlen=WATCH_LOG)

    @property
    def version(self) -> Version:
        return (self.epoch, self.counter)

    def publish(self, token_ids: Iterable[str]) -> bool:
        ids = set(token_ids)
        if not ids:
            return False
        self.counter += 1
        for t in ids:
            self.log.append((self.counter, t))
        return True

    def recall(self, token_id: str) -> None:
        """Ask every holder of a lease on `token_id` to give back the units it is not using (another
        holder needs them; nothing changed durably, so this is published at once)."""
        self.counter += 1
        self.recalls.append((self.counter, token_id))

    def recalled_since(self, since: Version) -> set[str]:
        if since[0] != self.epoch:
            return set()
        return {t for v, t in self.recalls if v > since[1]}

    def changed_since(self, since: Version) -> set[str] | None:
        """Token ids changed after `since`; None when `since` is from another epoch or too old."""
        if since[0] != self.epoch or (self.log and since[1] < self.log[0][0] - 1):
            return None
        if since[1] >= self.counter:
            return set()
        return {t for v, t in self.log if v > since[1]}


# ---------------------------------------------------------------- the shard's desk
@dataclass(frozen=True, slots=True)
class LeaseRules:
    ttl_s: float = 10.0
    lost_lease_policy: str = "refund"
    max_share: int = 4  # one grant takes at most 1/max_share of the token's free units
    strict_below: int = 16  # tokens with fewer free units admit synchronously
    max_grant: int = 100_000


class LeaseDesk:
    """Grants, reports and releases on a `QuotaBook` (passed in; its `leases` hold the state).

    `seen` is the in-memory "last heard from" of each lease and `started` this shard instance's
    start: see the module docstring for the deadlines they give."""

    def __init__(self, book: LeaseBook, rules: LeaseRules, clock: Callable[[], float], watch: WatchLog) -> None:
        self.book = book
        self.rules = rules
        self.clock = clock
        self.watch = watch
        self.seen: dict[str, float] = {}
        # denied request ids reported without a lease (those reports carry no sequence number): a
        # resent report is not recorded twice
        self.denials: dict[str, None] = {}
        self.fresh_denials: dict[str, None] = {}  # ... recorded since the last commit
        self.recalled: dict[str, float] = {}  # token id -> when its leases were last asked back
        # in memory (a restart forgets them; the lease's durable `seq` still dedupes every resend):
        self.replies: dict[str, LeaseGrant] = {}  # lease id -> the answer to its last applied message
        # lease id -> (rate tokens lent and not given back, the serials of the buckets they came
        # from, when they can no longer be spent); loans_due: (that time, lease id), oldest first
        self.rate_out: dict[str, tuple[int, tuple[int, ...], float]] = {}
        self.loans_due: deque[tuple[float, str]] = deque()
        self.ended: dict[str, bool] = {}  # leases released (False) or lost (True) here: never created again
        self.started = clock()
        self.lost_units = 0  # units of lost leases settled by this instance (metrics)

    def heard(self, asks: Sequence[object]) -> None:
        """Record that the holders of these asks are alive (memory only; see the module docstring)."""
        now = self.clock()
        for a in asks:
            lease_id = getattr(a, "lease_id", "")
            if isinstance(lease_id, str) and lease_id:
                self.seen[lease_id] = now

    def answer(self, asks: Sequence[object]) -> list[LeaseGrant]:
        """One grant per ask; a malformed ask is refused alone (INVALID_REQUEST) and changes nothing."""
        now = self.clock()
        self.expire_loans(now)
        return [self._one(a, now) if _well_formed(a) else LeaseGrant(Code.INVALID_REQUEST) for a in asks]

    def _one(self, a: LeaseAsk, now: float) -> LeaseGrant:
        book = self.book
        node = book.nodes.get(a.token_id) if type(a.token_id) is str else None
        if node is None or type(a.holder_id) is not str or not a.holder_id:
            return LeaseGrant(Code.INVALID_TOKEN, message="unknown token")
        lease = book.leases.get(a.lease_id) if a.lease_id else None
        foreign = lease is not None and (lease.holder_id != a.holder_id or lease.token_id != node.id)
        # a holder-named lease that does not exist yet is created by its first message (seq 1)
        creating = bool(a.lease_id) and lease is None and a.seq == 1 and not a.release and a.lease_id not in self.ended
        if a.lease_id and (foreign or (lease is None and not creating)):
            if a.release and lease is None and self.ended.get(a.lease_id) is False:  # a resent release: done
                return LeaseGrant(Code.OK, applied_seq=a.seq, ttl_s=self.rules.ttl_s, policy=self._policy(node))
            # expired and settled by policy (or never this holder's): its unreported rows are in the
            # lost_lease row; denials in them still go to the audit
            self._record(node, None, [u for u in a.uses if u.state == UsageState.DENIED.value], now)
            return LeaseGrant(Code.OK, lost=True, ttl_s=self.rules.ttl_s, policy=self._policy(node))
        if lease is not None and a.seq and a.seq <= lease.seq:
            return self._resent(node, lease, a)
        if lease is not None:
            lease.expires_at = now + self.rules.ttl_s  # renewed: durable with this commit
            book.out.lease_put[lease.id] = lease
            self._record(node, lease, a.uses, now)
            if a.seq:
                lease.seq = a.seq
            self.replies.pop(lease.id, None)
        elif a.uses:  # no lease: only denials can be reported
            self._record(node, None, [u for u in a.uses if u.state == UsageState.DENIED.value], now)
        if lease is not None and a.rate_back:
            self._rate_back(node, lease, a.rate_back, now)
        if a.give_back and lease is not None:
            back = min(a.give_back, lease.units)
            lease.units -= back
            self.book.unlease(node, back)
            book.out.lease_put[lease.id] = lease
        if a.release:
            if lease is not None:
                doubt = min(max(a.in_doubt, 0), lease.units)
                if doubt:  # closed with requests unanswered: those units are settled as a lost lease's
                    self._settle_doubt(lease, node, doubt, now, "released with requests in flight")
                self._end(lease, node)
            return LeaseGrant(Code.OK, applied_seq=a.seq, ttl_s=self.rules.ttl_s, policy=self._policy(node))
        wants = type(a.want) is int and (a.want > 0 or a.rate_want > 0)
        grant = self._grant(a, node, lease, now) if wants else None
        if grant is None:
            grant = self._reply(Code.OK, node, lease, 0, a)
        if grant.lease_id:
            self.replies[grant.lease_id] = grant
            if len(self.replies) > MAX_REPLIES:
                del self.replies[next(iter(self.replies))]
        return grant

    def _resent(self, node: Node, lease: Lease, a: LeaseAsk) -> LeaseGrant:
        """A message applied before (its reply was lost, or the client resent it to a restarted
        shard): nothing is applied again; the answer is the first delivery's (what it granted), with
        the lease as it is now. After a shard restart the first answer is gone: nothing granted."""
        lease.expires_at = max(lease.expires_at, self.clock() + self.rules.ttl_s)
        self.book.out.lease_put[lease.id] = lease
        first = self.replies.get(lease.id)
        if first is not None and first.applied_seq == a.seq:
            return replace(first, units=lease.units, policy=self._policy(node))
        return self._reply(Code.OK, node, lease, 0, a)

    def _rate_back(self, node: Node, lease: Lease, tokens: int, now: float) -> None:
        """Rate tokens this lease drew and never used are repaid to the buckets they were lent by
        (`Bucket.repay`): as if they had never been drawn. Past their time they were spent."""
        loan = self.rate_out.get(lease.id)
        if loan is None:
            return
        out, serials, due = loan
        tokens = min(tokens, out)
        if tokens <= 0:
            return
        for x in node.path():
            b = x.bucket
            if b is not None and b.serial in serials:
                b.refill(now)
                b.repay(tokens)
        if out > tokens:
            self.rate_out[lease.id] = (out - tokens, serials, due)
        else:
            del self.rate_out[lease.id]

    def _lend(self, node: Node, lease: Lease, buckets: list[Bucket], r: int, now: float) -> None:
        for b in buckets:
            b.lend(r)
        serials = tuple(b.serial for b in buckets)
        loan = self.rate_out.get(lease.id)
        if loan is not None and loan[1] != serials:  # drawn from buckets replaced since: spent there
            self._spend_loan(lease.id, node)
            loan = None
        due = now + RATE_LOAN_S
        self.rate_out[lease.id] = (r + (loan[0] if loan else 0), serials, due)
        self.loans_due.append((due, lease.id))

    def _spend_loan(self, lease_id: str, node: Node | None) -> None:
        """The tokens still lent to a lease can no longer be spent (its time passed, or it ended)."""
        loan = self.rate_out.pop(lease_id, None)
        if loan is None or node is None:
            return
        out, serials, _ = loan
        for x in node.path():
            b = x.bucket
            if b is not None and b.serial in serials:
                b.spent(out)

    def expire_loans(self, now: float) -> None:
        """Rate tokens lent longer ago than RATE_LOAN_S stop holding back their buckets."""
        due = self.loans_due
        while due and due[0][0] <= now:
            _, lease_id = due.popleft()
            loan = self.rate_out.get(lease_id)
            if loan is None or loan[2] > now:
                continue  # repaid, ended, or lent again since (a later entry is due for it)
            lease = self.book.leases.get(lease_id)
            self._spend_loan(lease_id, self.book.nodes.get(lease.token_id) if lease is not None else None)

    def _reply(
        self,
        code: Code,
        node: Node,
        lease: Lease | None,
        granted: int,
        a: LeaseAsk,
        *,
        strict: bool = False,
        message: str = "",
        retry_after: float | None = None,
        recalled: bool = False,
    ) -> LeaseGrant:
        return LeaseGrant(
            code,
            lease.id if lease else "",
            granted,
            lease.units if lease else 0,
            lease.seq if lease else a.seq,
            self.rules.ttl_s,
            self._policy(node),
            strict,
            recalled=recalled,
            message=message,
            retry_after=retry_after,
        )

    def _policy(self, node: Node) -> TokenPolicy:
        return TokenPolicy.of(node, self.watch.version, self.book.service_table)

    def _grant(self, a: LeaseAsk, node: Node, lease: Lease | None, now: float) -> LeaseGrant | None:
        """All checks of DESIGN §3 except the per-request ones (model, IP: the holder checks those),
        then `n` units from `free` to the lease and, for a token with a rate on its path, `r` rate
        tokens from every bucket on it, which the holder may spend for one report interval only."""
        if a.jti != node.jti:
            return self._reply(Code.REVOKED_TOKEN, node, lease, 0, a, message="credential was rotated or revoked")
        path = node.path()
        refusal = status_refusal(path, now)
        if refusal is not None:
            return self._reply(refusal[0], node, lease, 0, a, message=refusal[1])
        if is_strict(node):
            return self._reply(Code.OK, node, lease, 0, a, strict=True)
        free = node.free
        n = 0
        if a.want > 0:
            if free < self.rules.strict_below:
                # the last units: whatever other holders keep unused in their leases is asked back
                recalled = self._recall(node, a.holder_id, now)
                if free <= 0:
                    return self._reply(
                        Code.QUOTA_EXHAUSTED,
                        node,
                        lease,
                        0,
                        a,
                        message=f"quota exhausted: {max(free, 0)} units left",
                        recalled=recalled,
                    )
                return self._reply(Code.OK, node, lease, 0, a, strict=True, recalled=recalled)
            n = min(a.want, self.rules.max_grant, max(1, free // self.rules.max_share))
        buckets = [x.bucket for x in path if x.bucket is not None]
        r = 0
        if buckets and a.rate_want > 0:
            wait = 0.0
            r = a.rate_want
            for b in buckets:
                b.refill(now)
                r = min(r, math.floor(b.level))
                wait = max(wait, b.wait_s())
            if r < 1:
                return self._reply(
                    Code.RATE_LIMITED, node, lease, 0, a, message="rate limit exceeded", retry_after=wait
                )
        if n < 1 and r < 1:
            return None
        if lease is None:
            lease_id = a.lease_id or new_id("lse")
            lease = Lease(
                lease_id, node.id, node.root_id, a.holder_id[: columns.HOLDER], 0, now, now + self.rules.ttl_s, a.seq
            )
            self.book.leases[lease.id] = lease
        lease.units += n
        node.leased += n
        if r:
            self._lend(node, lease, buckets, r, now)
        self.book.out.lease_put[lease.id] = lease
        return replace(self._reply(Code.OK, node, lease, n, a), rate_granted=r)

    def recall_for(self, node: Node, now: float) -> bool:
        """A strict admission found too few free units: whether leases (of any holder) hold units of
        `node`; if so they are asked back, as for a lease ask."""
        return self._recall(node, "", now)

    def _recall(self, node: Node, asker: str, now: float) -> bool:
        """Whether other holders hold units of `node` in their leases; if so they are asked (through
        the watch, at most every RECALL_EVERY_S per token) to give back what they do not use."""
        held = any(x.units > 0 and x.holder_id != asker for x in self.book.leases.values() if x.token_id == node.id)
        if held and now - self.recalled.get(node.id, float("-inf")) >= RECALL_EVERY_S:
            self.recalled[node.id] = now
            if len(self.recalled) > MAX_DENIALS:
                del self.recalled[next(iter(self.recalled))]
            self.watch.recall(node.id)
        return held

    def _record(self, node: Node, lease: Lease | None, uses: Iterable[LeaseUse], now: float) -> None:
        """Audit rows of reported requests; settled units go from the lease to `used` (once per
        request id: a request Ray redelivered to two holders is charged once)."""
        book = self.book
        for u in uses:
            if not isinstance(u, LeaseUse) or not _fits(u):
                continue
            if u.state == UsageState.DENIED.value:
                if u.request_id in self.denials or u.request_id in self.fresh_denials:
                    continue
                self.fresh_denials[u.request_id] = None  # remembered once committed (`committed`)
            kept = 0
            state, outcome = u.state, u.outcome
            if state == UsageState.SETTLED.value and lease is not None:
                seen = book.recent.get(u.request_id)
                if seen is not None and seen[0] == node.id and seen[1] == UsageState.SETTLED.value:
                    outcome = Code.REPLAY.value  # answered twice (Ray redelivered it), charged once
                else:
                    kept = max(0, min(u.kept, u.units, lease.units))
                    lease.units -= kept
                    book.charge_leased(node, kept, now)
                    prior = book.pending.get(u.request_id)
                    if prior is not None and (prior.token_id, prior.model, prior.units) == (node.id, u.model, u.units):
                        # a copy of the same request admitted at the shard, not settled yet: this
                        # answer is charged, so that copy is not (its own settlement finds nothing)
                        book.settle(Settlement(u.request_id, node.id, success=False), now)
                book.remember(u.request_id, node.id, state, now)
            elif state == UsageState.REFUNDED.value:
                book.remember(u.request_id, node.id, state, now)
            book.out.usage_done.append(
                (
                    book.take_row_id(),
                    u.ts,
                    node.root_id,
                    node.id,
                    u.request_id,
                    u.model,
                    kept,
                    state,
                    outcome,
                    u.client_ip,
                    u.image_bytes,
                    None,
                    u.latency_ms if state != UsageState.DENIED.value else None,
                    u.detections if state != UsageState.DENIED.value else None,
                    u.gpu_ms if state != UsageState.DENIED.value else None,
                    now if state != UsageState.DENIED.value else None,
                )
            )

    def committed(self, ok: bool) -> None:
        """The group commit of what `answer` recorded succeeded (or failed: the denials it recorded
        were not written, so a resend records them)."""
        if ok:
            for rid in self.fresh_denials:
                self.denials[rid] = None
            while len(self.denials) > MAX_DENIALS:
                del self.denials[next(iter(self.denials))]
        self.fresh_denials.clear()

    def _end(self, lease: Lease, node: Node, lost: bool = False) -> None:
        """Return what is left in the lease to `free` (or up the tree, if the token is dead)."""
        self.book.unlease(node, lease.units)
        lease.units = 0
        del self.book.leases[lease.id]
        self.book.out.lease_put.pop(lease.id, None)
        self.book.out.lease_deleted.append(lease.id)
        self.seen.pop(lease.id, None)
        self.replies.pop(lease.id, None)
        self._spend_loan(lease.id, node)  # its holder spends none of them any more
        self.ended[lease.id] = lost
        if len(self.ended) > MAX_REPLIES:
            del self.ended[next(iter(self.ended))]

    def deadline(self, lease: Lease) -> float:
        return max(lease.expires_at, self.seen.get(lease.id, 0.0) + self.rules.ttl_s, self.started + self.rules.ttl_s)

    def settle_lost(self) -> list[str]:
        """Leases past their deadline: their units in doubt settled by `lost_lease_policy`, one
        `lease.lost` audit row each. Returns their ids."""
        now = self.clock()
        self.expire_loans(now)
        lost = [x for x in self.book.leases.values() if now > self.deadline(x)]
        for lease in lost:
            node = self.book.nodes[lease.token_id]
            self._settle_doubt(lease, node, lease.units, now, "holder silent past the lease TTL")
            self._end(lease, node, lost=True)
        return [x.id for x in lost]

    def _settle_doubt(self, lease: Lease, node: Node, units: int, now: float, reason: str) -> None:
        """Units of `lease` in doubt (answered or not, never reported) settled by `lost_lease_policy`,
        with one `lease.lost` audit row."""
        self.lost_units += units
        if units:
            lease.units -= units
            if self.rules.lost_lease_policy == "charge":  # never served unpaid: every unit in doubt is used
                self.book.charge_leased(node, units, now)
            else:  # never charged without an answer, and never granted twice: written off
                self.book.write_off(node, units)
            self.book.out.lease_put[lease.id] = lease
        self.book.out.admin_events.append(
            {
                "ts": now,
                "actor": "ledger",
                "action": "lease.lost",
                "token_id": node.id,
                "root_id": node.root_id,
                "detail": {
                    "lease": lease.id,
                    "holder": lease.holder_id,
                    "units": units,
                    "policy": self.rules.lost_lease_policy,
                    "granted_at": lease.granted_at,
                    "reported_seq": lease.seq,
                    "reason": reason,
                },
            }
        )

    def watch_answer(self, since: Version, tokens: Iterable[str]) -> WatchReply:
        """Policies of the `tokens` (a holder's) whose path changed after `since`."""
        changed = self.watch.changed_since(since)
        out: dict[str, TokenPolicy | None] = {}
        for t in tokens:
            node = self.book.nodes.get(t) if type(t) is str else None
            if node is None:
                if changed is None or t in changed:
                    out[t] = None
                continue
            if changed is None or any(n.id in changed for n in node.path()):
                out[t] = self._policy(node)
        recalls = frozenset(self.watch.recalled_since(since).intersection(tokens))
        return WatchReply(self.watch.version, out, None if changed is None else frozenset(changed), recalls)

    def outstanding(self) -> tuple[int, int]:
        leases = self.book.leases.values()
        return len(leases), sum(x.units for x in leases)


class LeaseBook(Protocol):
    """What `LeaseDesk` needs of the quota book (`QuotaBook` implements it)."""

    leases: dict[str, Lease]
    pending: dict[str, Pending]
    recent: dict[str, tuple[str, str, float]]

    @property
    def nodes(self) -> dict[str, Node]: ...

    @property
    def out(self) -> Changes: ...

    @property
    def service_table(self) -> Mapping[str, ServiceClass]: ...

    def charge_leased(self, node: Node, units: int, now: float) -> None: ...

    def unlease(self, node: Node, units: int) -> None: ...

    def write_off(self, node: Node, units: int) -> None: ...

    def remember(self, request_id: str, token_id: str, state: str, now: float) -> None: ...

    def take_row_id(self) -> int: ...

    def settle(self, s: Settlement, now: float | None = None) -> Code: ...


def _well_formed(a: object) -> TypeGuard[LeaseAsk]:
    """Field types and ranges of an ask (a bad one must neither raise inside a batch nor reach a column)."""
    return (
        isinstance(a, LeaseAsk)
        and type(a.token_id) is str
        and len(a.token_id) <= columns.TOKEN_ID
        and type(a.jti) is str
        and len(a.jti) <= columns.JTI
        and type(a.root_id) is str
        and len(a.root_id) <= columns.TOKEN_ID
        and type(a.holder_id) is str
        and 0 < len(a.holder_id) <= columns.HOLDER
        and type(a.lease_id) is str
        and len(a.lease_id) <= columns.TOKEN_ID
        and type(a.seq) is int
        and 0 <= a.seq < 2**62
        and isinstance(a.uses, tuple | list)
        and type(a.want) is int
        and 0 <= a.want <= MAX_WANT
        and type(a.release) is bool
        and type(a.give_back) is int
        and 0 <= a.give_back <= 2**62
        and type(a.rate_want) is int
        and 0 <= a.rate_want <= MAX_WANT
        and type(a.rate_back) is int
        and 0 <= a.rate_back <= MAX_WANT
        and type(a.in_doubt) is int
        and 0 <= a.in_doubt <= 2**62
    )


def _fits(u: LeaseUse) -> bool:
    return (
        type(u.request_id) is str
        and 0 < len(u.request_id) <= columns.REQUEST_ID
        and type(u.model) is str
        and 0 < len(u.model) <= columns.MODEL
        and type(u.units) is int
        and type(u.kept) is int
        and u.state in (UsageState.SETTLED.value, UsageState.REFUNDED.value, UsageState.DENIED.value)
        and type(u.outcome) is str
        and len(u.outcome) <= columns.OUTCOME
        and (u.client_ip is None or (type(u.client_ip) is str and len(u.client_ip) <= columns.CLIENT_IP))
        and type(u.image_bytes) is int
        and 0 <= u.image_bytes < 2**62
        and isinstance(u.ts, int | float)
        and math.isfinite(u.ts)
        and all(isinstance(v, int | float) and math.isfinite(v) and 0 <= v < 1e12 for v in (u.latency_ms, u.gpu_ms))
        and type(u.detections) is int
        and 0 <= u.detections < 2**31
    )
