"""QuotaBook: admission and settlement on top of the token trees of `ledger.core.tree`. No I/O.

Contract:
* `admit` is one synchronous step: all checks, then the debit; a denial moves no
  counter (not the quota, not any rate bucket, not another limit's state).
* For every root: sum(used over all nodes) + sum(free over live nodes) == root.allocation.
  Dead (revoked/expired) nodes are shrunk to what their subtree spent, so their unspent
  allocation is back in the nearest live ancestor's `free`.
* Every change is also appended to an outbox (`drain()`) that the store persists in
  one transaction. If that write fails the owner must rebuild the book from the store.
* State is partitioned by package root (`roots`), ready for sharding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

from ledger.core import columns
from ledger.core.changes import Changes, IdemRecord, Lease, Pending, UsageRow
from ledger.core.codes import Code
from ledger.core.entities import (
    RETURNED,
    WRITTEN_OFF,
    Admission,
    Decision,
    Node,
    Settlement,
    Status,
    UsageState,
)
from ledger.core.rules import access_refusal, field_refusal, status_refusal
from ledger.core.service import ServiceClass, service_of
from ledger.core.shards import ID_STRIDE, ShardScope
from ledger.core.tree import MAX_TREE_DEPTH, MAX_UNITS, TokenTree

IDEMPOTENCY_TTL_S = 24 * 3600.0
# an idempotent admission still unsettled after this long was never answered (the serving side
# gives up on a detector after 30 s): it is refunded and its key forgotten, so a retry is charged once
IDEM_PENDING_TIMEOUT_S = 120.0
RECENT_REQUEST_TTL_S = 120.0  # retries (proxy, client, actor restart) come within seconds
MAX_RECENT = 1_000_000  # bound memory under sustained load: the oldest settled ids are forgotten first

_ADMITTED = UsageState.ADMITTED.value
_DENIED = UsageState.DENIED.value
_SETTLED = UsageState.SETTLED.value
_OK = Code.OK.value
MAX_REQUEST_ID = columns.REQUEST_ID
MAX_IDEM_KEY = columns.IDEMPOTENCY_KEY


def _fits(value: object, limit: int) -> bool:
    return type(value) is str and 0 < len(value) <= limit


class QuotaBook:
    """The token trees of one shard's packages (`tree`) plus admission state. Mutated only by
    its owner (a ledger shard), one call at a time. Tree operations are `book.tree.<op>`."""

    def __init__(
        self,
        clock: Callable[[], float],
        max_depth: int = MAX_TREE_DEPTH,
        idem_pending_timeout_s: float = IDEM_PENDING_TIMEOUT_S,
        scope: ShardScope | None = None,
    ) -> None:
        self.clock = clock
        self.tree = TokenTree(clock, max_depth)
        self.idem_pending_timeout_s = idem_pending_timeout_s
        self.pending: dict[str, Pending] = {}
        # request_id -> (token_id, settled state, ts) for recently settled requests (dedupe retries)
        self.recent: dict[str, tuple[str, str, float]] = {}
        # (node, now) -> whether leases of other holders hold its units, asked back (the shard's lease desk)
        self.recall: Callable[[Node, float], bool] | None = None
        # usage row id -> copies of a request settled in a batch that failed (`keep_copies`)
        self.carry_copies: dict[int, set[str]] = {}
        self.idem: dict[tuple[str, str], IdemRecord] = {}
        self.leases: dict[str, Lease] = {}  # quota leases of ingress replicas (ledger.core.leases)
        self.scope = scope or ShardScope()
        # usage row ids are assigned here (the shard is the only writer of its rows): this shard's
        # residue modulo ID_STRIDE, so that no two shards ever pick the same id
        self.next_row_id = self.scope.first_row_id(0)

    @property
    def nodes(self) -> dict[str, Node]:
        return self.tree.nodes

    @property
    def service_table(self) -> Mapping[str, ServiceClass]:
        return self.tree.service_table

    @property
    def roots(self) -> dict[str, Node]:
        return self.tree.roots

    @property
    def out(self) -> Changes:
        return self.tree.out

    def node(self, token_id: str, by_token: str | None = None) -> Node:
        return self.tree.node(token_id, by_token)

    # ------------------------------------------------------------------ loading
    def load(
        self,
        nodes: Iterable[Node],
        pending: Iterable[Pending],
        recent: Iterable[tuple[str, str, str, float]],
        idem: Iterable[IdemRecord],
        last_row_id: int = 0,
        leases: Iterable[Lease] = (),
    ) -> None:
        """Rebuild from stored rows (any order). Derived fields are recomputed here.

        Rate buckets carry over from the nodes this book holds now (a rebuild in the same process
        never refills them); a book that holds none (a cold start) starts every bucket empty.
        A failure leaves the book as it was (see `TokenTree.link`)."""
        self.tree.link(nodes, carry=self.nodes)
        before = self.pending
        self.pending = {p.request_id: p for p in pending}
        carried, self.carry_copies = self.carry_copies, {}
        for p in self.pending.values():  # a rebuild in the same process keeps which copies are served
            old = before.get(p.request_id)
            if old is not None and old.row_id == p.row_id:
                p.copies = old.copies
            elif p.row_id in carried:  # settled in a batch that was never written: pending again
                p.copies = carried[p.row_id]
        self.recent = {}
        for rid, tid, state, ts in recent:  # oldest first: the rule of `remember`, row by row
            self.remember(rid, tid, state, ts)
        self.idem = {(r.token_id, r.key): r for r in idem}
        self.leases = {}
        for lease in leases:
            node = self.nodes.get(lease.token_id)
            if node is not None:  # a lease names a token of its package: always here
                node.leased += lease.units
                self.leases[lease.id] = lease
        self.next_row_id = self.scope.first_row_id(last_row_id)
        self.tree.out = Changes()

    def drain(self) -> Changes:
        out, self.tree.out = self.tree.out, Changes()
        return out

    def keep_copies(self, changes: Changes) -> None:
        """`changes` will never be committed: the next rebuild still knows the copies being served
        of the requests they settled (those requests are pending again)."""
        self.carry_copies.update(changes.copies)

    def give_back_rate(self, changes: Changes) -> None:
        """Return the rate-bucket tokens taken by the admissions in `changes`, which will never be
        committed (their batch failed): the book is about to be rebuilt, carrying these buckets."""
        nodes = self.nodes
        for row in changes.usage:
            if row.state != _ADMITTED:  # denials and redeliveries took none
                continue
            node = nodes.get(row.token_id)
            if node is None:
                continue
            for n in node.path():
                if n.bucket is not None:
                    n.bucket.give_back()

    # ------------------------------------------------------------------ admission
    def admit_many(self, items: Iterable[Admission]) -> list[Decision]:
        now = self.clock()
        return [self.admit(a, now) for a in items]

    def admit(self, a: Admission, now: float | None = None) -> Decision:
        if now is None:
            now = self.clock()
        if not _fits(a.request_id, MAX_REQUEST_ID) or (a.idem_key is not None and not _fits(a.idem_key, MAX_IDEM_KEY)):
            # refused without a usage row: its columns could not hold these
            message = f"request id must be 1-{MAX_REQUEST_ID} and an idempotency key 1-{MAX_IDEM_KEY} characters"
            return Decision(code=Code.INVALID_REQUEST, request_id=str(a.request_id)[:MAX_REQUEST_ID], message=message)
        bad_field = field_refusal(a.model, a.client_ip)
        if bad_field is not None:  # refused without a usage row: its columns could not hold these
            return Decision(code=Code.INVALID_REQUEST, request_id=a.request_id, message=bad_field)
        node = self.nodes.get(a.token_id)
        if node is None:
            return self._deny(a, None, Code.INVALID_TOKEN, "unknown token", now)
        if a.jti != node.jti:
            return self._deny(a, node, Code.REVOKED_TOKEN, "credential was rotated or revoked", now)
        # status and expiry first: a credential that would be refused now gets its 401, never a
        # stored result (the replays below) nor a redelivery's OK
        path = node.path()
        refusal = status_refusal(path, now)
        if refusal is not None:
            return self._deny(a, node, refusal[0], refusal[1], now)
        # a request id names one request: the same id again is a redelivery of it (the client's
        # resend to a restarted ledger, or Ray Serve retrying it on another replica). It is
        # served without a second debit, after the same model and IP checks below.
        prior = self.pending.get(a.request_id)
        if prior is not None:
            if prior.token_id != a.token_id:  # ids are per request; never let one token touch another's
                return self._deny(a, node, Code.INVALID_REQUEST, "request id already in use", now)
            if (prior.units, prior.model) != (a.units, a.model) or (
                prior.body_hash is not None and prior.body_hash != (a.body_hash or "")
            ):
                return self._deny(a, node, Code.INVALID_REQUEST, "request id already in use for another request", now)
        else:
            seen = self.recent.get(a.request_id)
            if seen is not None and seen[0] == a.token_id and seen[1] != UsageState.REFUNDED.value:
                # served and charged already; a refunded attempt cost nothing, so it may be admitted again
                return self._decision(Code.REPLAY, a.request_id, node, 0, message=f"request already {seen[1]}")
        if a.idem_key is not None and prior is None:
            rec = self.idem.get((a.token_id, a.idem_key))
            if rec is not None and now - rec.created_at >= IDEMPOTENCY_TTL_S:
                self._forget_idem((a.token_id, a.idem_key))  # expired: the new request replaces its row
                rec = None
            if rec is not None and rec.state != "done" and self._abandoned(rec, now):
                rec = None  # its first attempt was never answered: refunded, the key is free again
            if rec is not None:
                if rec.body_hash != (a.body_hash or ""):
                    return self._deny(
                        a, node, Code.IDEMPOTENCY_CONFLICT, "Idempotency-Key reused with a different request body", now
                    )
                if rec.state != "done":
                    return self._deny(
                        a, node, Code.IDEMPOTENCY_IN_PROGRESS, "a request with this Idempotency-Key is in progress", now
                    )
                return self._decision(Code.REPLAY, rec.request_id, node, 0, replay=rec.result)
        if type(a.units) is not int or not 0 < a.units <= MAX_UNITS:
            return self._deny(a, node, Code.INVALID_REQUEST, f"units must be an integer in 1..{MAX_UNITS}", now)
        refusal = access_refusal(path, a.model, a.client_ip)
        if refusal is not None:
            return self._deny(a, node, refusal[0], refusal[1], now)
        if prior is not None:  # a redelivery that passes every check: no second debit, no rate token
            if prior.copies is not None:
                if a.copy:
                    if a.copy not in prior.copies:  # another copy served: the debit stays until all are settled
                        prior.copies.add(a.copy)
                        self.out.copies_new.append((prior.row_id, a.copy))
                else:
                    prior.copies = None  # a copy nobody named: the first settlement decides
                    self.out.copies_cleared.append(prior.row_id)
            return self._decision(Code.OK, a.request_id, node, prior.units, replayed=True)
        if node.free < a.units:
            if a.wait and node.leased > 0 and self.recall is not None and self.recall(node, now):
                # the last units sit in replicas' leases: they are asked back, the holder asks again
                # (nothing is recorded: this answer is not final; the holder's last attempt is)
                message = f"quota exhausted: {node.free} units free, {node.leased} being given back from leases"
                return self._decision(Code.QUOTA_EXHAUSTED, a.request_id, node, 0, message=message, recalled=True)
            left = f"{node.free} units left" + (f" ({node.leased} more in leases)" if node.leased > 0 else "")
            return self._deny(a, node, Code.QUOTA_EXHAUSTED, f"quota exhausted: {left}, {a.units} needed", now)
        wait = 0.0
        for n in path:
            b = n.bucket
            if b is not None:
                b.refill(now)
                wait = max(wait, b.wait_s())
        if wait > 0.0:
            return self._deny(a, node, Code.RATE_LIMITED, "rate limit exceeded", now, retry_after=wait)
        # every check passed: debit, in this same step
        for n in path:
            if n.bucket is not None:
                n.bucket.take()
        node.used += a.units
        self.out.dirty[node.id] = node
        for n in path:
            n.consumed += a.units
            self._check_thresholds(n, now)
        row_id = self.next_row_id
        self.next_row_id = row_id + ID_STRIDE
        body_hash = a.body_hash or ""
        rid = a.request_id
        copies = {a.copy} if a.copy else None
        if a.copy:
            self.out.copies_new.append((row_id, a.copy))
        self.pending[rid] = Pending(rid, node.id, a.units, now, a.idem_key, row_id, a.model, body_hash, copies)
        if a.idem_key is not None:
            rec = IdemRecord(node.id, a.idem_key, body_hash, a.request_id, now)
            self.idem[(node.id, a.idem_key)] = rec
            self.out.idem_new.append(rec)
        self.out.usage.append(
            UsageRow(
                row_id,
                now,
                node.root_id,
                node.id,
                a.request_id,
                a.model,
                a.units,
                _ADMITTED,
                _OK,
                a.client_ip,
                a.image_bytes,
                body_hash,
            )
        )
        return self._decision(Code.OK, a.request_id, node, a.units)

    def _deny(
        self, a: Admission, node: Node | None, code: Code, message: str, now: float, retry_after: float | None = None
    ) -> Decision:
        p = self.pending.get(a.request_id) if node is not None and code is not Code.INVALID_REQUEST else None
        if p is not None and (p.token_id, p.units, p.model) == (a.token_id, a.units, a.model):
            # a resend of a request admitted before (its answer was lost), refused now (revoked,
            # expired, narrowed meanwhile): the caller will not serve that copy, so it is settled as
            # refunded (the debit goes back once no other copy is being served)
            self.settle(Settlement(a.request_id, a.token_id, success=False, copy=a.copy), now)
        row_id = self.next_row_id
        self.next_row_id = row_id + ID_STRIDE
        self.out.usage.append(
            UsageRow(
                row_id,
                now,
                node.root_id if node else "",
                a.token_id if node else "",
                a.request_id,
                a.model,
                0,
                _DENIED,
                code.value,
                a.client_ip,
                a.image_bytes,
                None,
            )
        )
        if node is None:
            return Decision(code=code, request_id=a.request_id, message=message)
        return self._decision(code, a.request_id, node, 0, message=message, retry_after=retry_after)

    def _decision(
        self,
        code: Code,
        request_id: str,
        node: Node,
        units: int,
        *,
        message: str = "",
        retry_after: float | None = None,
        replay: str | None = None,
        replayed: bool = False,
        recalled: bool = False,
    ) -> Decision:
        tight = None
        for n in node.path():
            b = n.bucket
            if b is not None and (tight is None or b.level < tight.level):
                tight = b
        return Decision(
            code,
            request_id,
            node.id,
            units,
            node.used,
            node.allocation,
            max(0, node.allocation - node.delegated - node.used) if node.status is Status.ACTIVE else 0,
            tight.limit.rate if tight else None,
            (int(tight.level) if tight.level > 0 else 0) if tight else None,
            math.ceil(retry_after) if retry_after else None,
            message,
            replay,
            replayed,
            recalled,
            service=service_of(node, self.tree.service_table) if code is Code.OK else None,
        )

    def _check_thresholds(self, n: Node, now: float) -> None:
        if n.allocation <= 0:
            return
        for t in n.thresholds:
            if t not in n.fired and n.consumed * 100 >= t * n.allocation:
                self.tree.fire(n, now, "usage", t, t)

    # ------------------------------------------------------------------ settlement
    def settle_many(self, items: Iterable[Settlement]) -> list[Code]:
        now = self.clock()
        return [self.settle(s, now) for s in items]

    def settle(self, s: Settlement, now: float | None = None) -> Code:
        """Keep the debit (success) or refund it (server-side failure). Unknown ids are NOT_FOUND."""
        if now is None:
            now = self.clock()
        p = self.pending.get(s.request_id)
        if p is None or p.token_id != s.token_id:
            return Code.NOT_FOUND
        if not s.success and s.copy and p.copies is not None:
            if s.copy in p.copies:
                p.copies.discard(s.copy)
                if p.copies:
                    self.out.copies_gone.append((p.row_id, s.copy))
            if p.copies:  # another copy of it is still being served: that one settles the debit
                return Code.OK
        del self.pending[s.request_id]
        if p.copies is not None:
            self.out.copies[p.row_id] = p.copies
            self.out.copies_cleared.append(p.row_id)
        charged = s.charged if type(s.charged) is int else None
        keep = (p.units if charged is None else max(0, min(charged, p.units))) if s.success else 0
        refund = p.units - keep
        node = self.nodes[p.token_id]
        if refund:
            self._refund(node, refund)
        state = UsageState.SETTLED.value if s.success else UsageState.REFUNDED.value
        self.remember(s.request_id, p.token_id, state, now)
        self.out.settles.append((state, keep, s.latency_ms, s.detections, s.gpu_ms, now, p.row_id))
        if p.idem_key is not None:
            rec = self.idem.get((p.token_id, p.idem_key))
            if rec is not None and rec.request_id == s.request_id:
                if s.success:
                    rec.state, rec.result = "done", s.result
                    self.out.idem_done.append(rec)
                else:  # a failed request may be retried with the same key
                    self._forget_idem((p.token_id, p.idem_key))
        return Code.OK

    def remember(self, request_id: str, token_id: str, state: str, now: float) -> None:
        """A settled request id, so that a redelivery of it is not charged again."""
        recent = self.recent
        seen = recent.get(request_id)
        if seen is not None and seen[0] == token_id and seen[1] == _SETTLED and state != _SETTLED:
            return  # a request charged once stays charged: a later copy's refund does not reopen it
        recent.pop(request_id, None)  # a re-admitted id moves to the end: eviction stays oldest-first
        recent[request_id] = (token_id, state, now)
        if len(recent) > MAX_RECENT:
            del recent[next(iter(recent))]

    def take_row_id(self) -> int:
        row_id = self.next_row_id
        self.next_row_id = row_id + ID_STRIDE
        return row_id

    # ------------------------------------------------------------------ leases (ledger.core.leases)
    def charge_leased(self, node: Node, units: int, now: float) -> None:
        """Leased units answered for: they become `used` (free does not move)."""
        if units <= 0:
            return
        node.leased -= units
        node.used += units
        self.out.dirty[node.id] = node
        for n in node.path():
            n.consumed += units
            self._check_thresholds(n, now)

    def unlease(self, node: Node, units: int) -> None:
        """Leased units back to `free`; a dead node passes them up, as a refund does."""
        if units <= 0:
            return
        node.leased -= units
        self.out.dirty[node.id] = node
        n: Node | None = node
        while n is not None and not n.live:  # dead nodes hold exactly what they spent
            n.allocation -= units
            n.meta[RETURNED] = int(n.meta.get(RETURNED, 0)) + units
            self.out.dirty[n.id] = n
            if n.parent is not None:
                n.parent.delegated -= units
            n = n.parent
        self.tree.pass_unspent(n, units)  # reclaimed whole while these units were leased: to the parent

    def write_off(self, node: Node, units: int) -> None:
        """Leased units in doubt (a lost lease under `refund`) leave the books: neither used nor free.
        The allocation of the node and of every ancestor shrinks by them (each one's `free` does not
        move), so they can never be granted again, and nobody is charged for them."""
        if units <= 0:
            return
        node.leased -= units
        for n in node.path():
            n.allocation -= units
            n.meta[WRITTEN_OFF] = int(n.meta.get(WRITTEN_OFF, 0)) + units
            self.out.dirty[n.id] = n
            if n.parent is not None:
                n.parent.delegated -= units

    def _abandoned(self, rec: IdemRecord, now: float) -> bool:
        """Whether the unfinished idempotent request `rec` was abandoned; if so it is refunded (never
        answered, so never charged) and its key forgotten. A late settlement is then NOT_FOUND."""
        p = self.pending.get(rec.request_id)
        if p is not None and p.token_id == rec.token_id and p.idem_key == rec.key:
            if now - p.ts < self.idem_pending_timeout_s:
                return False
            self.settle(Settlement(p.request_id, p.token_id, success=False), now)  # forgets the key
            return True
        if now - rec.created_at < self.idem_pending_timeout_s:
            return False
        self._forget_idem((rec.token_id, rec.key))  # its admission is gone (pruned): nothing to refund
        return True

    def refund_abandoned(self, now: float | None = None) -> list[str]:
        """Sweep: refund every idempotent admission unsettled for `idem_pending_timeout_s` and forget
        its key; returns their request ids. (Admit does the same lazily when the key comes again.)"""
        now = self.clock() if now is None else now
        cutoff = now - self.idem_pending_timeout_s
        done: list[str] = []
        for p in [p for p in self.pending.values() if p.idem_key is not None and p.ts <= cutoff]:
            rec = self.idem.get((p.token_id, p.idem_key or ""))
            if rec is not None and rec.request_id == p.request_id and rec.state != "done":
                self._abandoned(rec, now)
                done.append(p.request_id)
        return done

    def _forget_idem(self, key: tuple[str, str]) -> None:
        rec = self.idem.pop(key)
        if any(r is rec for r in self.out.idem_new):  # never written: just do not write it
            self.out.idem_new = [r for r in self.out.idem_new if r is not rec]
        else:
            self.out.idem_deleted.append(key)

    def _refund(self, node: Node, units: int) -> None:
        node.used -= units
        self.out.dirty[node.id] = node
        n: Node | None = node
        landed: Node | None = None  # the first live node on the path: its `free` grows by the refund
        while n is not None:
            n.consumed -= units
            if not n.live:  # dead nodes hold exactly what they spent: pass the refund up
                n.allocation -= units
                n.meta[RETURNED] = int(n.meta.get(RETURNED, 0)) + units
                self.out.dirty[n.id] = n
                if n.parent is not None:
                    n.parent.delegated -= units
            elif landed is None:
                landed = n
            n = n.parent
        self.tree.pass_unspent(landed, units)  # ... unless it was reclaimed whole: then to its parent

    def prune(
        self, now: float | None = None, settle_window_s: float = 3600.0, recent_window_s: float = RECENT_REQUEST_TTL_S
    ) -> None:
        """Forget idempotency records past 24 h, settled request ids past the retry window, and
        unsettled admissions past the settle window (they stay charged; the caller never settled).
        Idempotent admissions left unsettled are refunded first (`refund_abandoned`): their caller
        was never answered, and a retry with the same key must be charged once."""
        now = self.clock() if now is None else now
        self.refund_abandoned(now)
        for key in [k for k, r in self.idem.items() if now - r.created_at >= IDEMPOTENCY_TTL_S]:
            self._forget_idem(key)
        cutoff = now - recent_window_s
        for rid in [r for r, (_, _, ts) in self.recent.items() if ts < cutoff]:
            del self.recent[rid]
        stale = now - settle_window_s
        for rid in [r for r, p in self.pending.items() if p.ts < stale]:
            p = self.pending.pop(rid)
            if p.idem_key is None:
                continue
            stale_key = (p.token_id, p.idem_key)
            if stale_key in self.idem and self.idem[stale_key].request_id == rid:
                self._forget_idem(stale_key)  # never settled: let the client retry with the same key

    def check_credential(self, token_id: str, jti: str) -> Code:
        n = self.nodes.get(token_id) if type(token_id) is str else None
        if n is None:
            return Code.INVALID_TOKEN
        if n.jti != jti:
            return Code.REVOKED_TOKEN
        now = self.clock()
        for a in n.path():
            if a.status is not Status.ACTIVE:
                return Code.REVOKED_TOKEN if a.status is Status.REVOKED else Code.EXPIRED_TOKEN
            if a.expires_at is not None and now >= a.expires_at:
                return Code.EXPIRED_TOKEN
        return Code.OK
