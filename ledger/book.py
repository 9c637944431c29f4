"""QuotaBook: the token tree and every quota rule of DESIGN §3, in memory, no I/O.

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
from collections.abc import Callable, Iterable
from typing import Any

from ledger.changes import Changes, IdemRecord, Pending
from ledger.codes import Code
from ledger.entities import (
    DEFAULT_THRESHOLDS,
    Admission,
    Decision,
    Limits,
    Node,
    Settlement,
    Status,
    TokenView,
    UsageState,
)
from ledger.errors import OperationRefused
from ledger.limits import Bucket, ip_allowed, ips_narrow, model_allowed, models_narrow

IDEMPOTENCY_TTL_S = 24 * 3600.0
RECENT_REQUEST_TTL_S = 120.0  # retries (proxy, client, actor restart) come within seconds
MAX_RECENT = 1_000_000  # bound memory under sustained load: the oldest settled ids are forgotten first
MAX_UNITS = 10**12

_ADMITTED = UsageState.ADMITTED.value
_DENIED = UsageState.DENIED.value
_OK = Code.OK.value


class QuotaBook:
    """All packages' token trees. Mutated only by its owner (the ledger actor), one call at a time."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.nodes: dict[str, Node] = {}
        self.roots: dict[str, Node] = {}
        self.pending: dict[str, Pending] = {}
        # request_id -> (token_id, settled state, ts) for recently settled requests (dedupe retries)
        self.recent: dict[str, tuple[str, str, float]] = {}
        self.idem: dict[tuple[str, str], IdemRecord] = {}
        self.next_row_id = 1  # usage row ids are assigned here: the book is the only writer
        self.out = Changes()

    # ------------------------------------------------------------------ loading
    def load(
        self,
        nodes: Iterable[Node],
        pending: Iterable[Pending],
        recent: Iterable[tuple[str, str, str, float]],
        idem: Iterable[IdemRecord],
        last_row_id: int = 0,
    ) -> None:
        """Rebuild from stored rows (any order). Derived fields are recomputed here."""
        self.nodes = {n.id: n for n in nodes}
        self.roots = {}
        now = self.clock()
        for n in self.nodes.values():
            n.children, n.parent, n.delegated, n.consumed, n.ancestry = [], None, 0, 0, ()
            n.bucket = Bucket(n.rate, now) if n.rate else None
        for n in self.nodes.values():
            if n.parent_id is None:
                self.roots[n.id] = n
            else:
                parent = self.nodes[n.parent_id]
                n.parent = parent
                parent.children.append(n)
        for n in self.nodes.values():
            if n.parent is not None:
                n.parent.delegated += n.allocation
            for a in n.path():
                a.consumed += n.used
        self.pending = {p.request_id: p for p in pending}
        self.recent = {rid: (tid, state, ts) for rid, tid, state, ts in recent}
        self.idem = {(r.token_id, r.key): r for r in idem}
        self.next_row_id = last_row_id + 1
        self.out = Changes()

    def drain(self) -> Changes:
        out, self.out = self.out, Changes()
        return out

    # ------------------------------------------------------------------ admission
    def admit_many(self, items: Iterable[Admission]) -> list[Decision]:
        now = self.clock()
        return [self.admit(a, now) for a in items]

    def admit(self, a: Admission, now: float | None = None) -> Decision:
        if now is None:
            now = self.clock()
        node = self.nodes.get(a.token_id)
        if node is None:
            return self._deny(a, None, Code.INVALID_TOKEN, "unknown token", now)
        if a.jti != node.jti:
            return self._deny(a, node, Code.REVOKED_TOKEN, "credential was rotated or revoked", now)
        prior = self.pending.get(a.request_id)
        if prior is not None and prior.token_id == a.token_id:
            return self._decision(Code.OK, a.request_id, node, prior.units, replayed=True)
        seen = self.recent.get(a.request_id)
        if seen is not None and seen[0] == a.token_id:
            return self._decision(Code.REPLAY, a.request_id, node, 0, message=f"request already {seen[1]}")
        if a.idem_key is not None:
            rec = self.idem.get((a.token_id, a.idem_key))
            if rec is not None and now - rec.created_at < IDEMPOTENCY_TTL_S:
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
        path = node.path()
        for n in path:
            if n.status is not Status.ACTIVE:
                return self._deny(
                    a,
                    node,
                    Code.REVOKED_TOKEN if n.status is Status.REVOKED else Code.EXPIRED_TOKEN,
                    f"token {'or an ancestor ' if n is not node else ''}is {n.status.value}",
                    now,
                )
            if n.expires_at is not None and now >= n.expires_at:
                return self._deny(
                    a, node, Code.EXPIRED_TOKEN, f"token {'or an ancestor ' if n is not node else ''}has expired", now
                )
        for n in path:
            if n.models is not None and not model_allowed(n.models, a.model):
                return self._deny(
                    a, node, Code.MODEL_NOT_ALLOWED, f"model {a.model!r} is not allowed for this token", now
                )
        for n in path:
            if n.ips is not None and not ip_allowed(n.ips, a.client_ip):
                return self._deny(
                    a, node, Code.IP_NOT_ALLOWED, f"client IP {a.client_ip!r} is not allowed for this token", now
                )
        if node.free < a.units:
            return self._deny(
                a, node, Code.QUOTA_EXHAUSTED, f"quota exhausted: {node.free} units left, {a.units} needed", now
            )
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
        self.next_row_id = row_id + 1
        self.pending[a.request_id] = Pending(a.request_id, node.id, a.units, now, a.idem_key, row_id)
        if a.idem_key is not None:
            rec = IdemRecord(node.id, a.idem_key, a.body_hash or "", a.request_id, now)
            self.idem[(node.id, a.idem_key)] = rec
            self.out.idem_new.append(rec)
        self.out.usage.append(
            (
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
            )
        )
        return self._decision(Code.OK, a.request_id, node, a.units)

    def _deny(
        self, a: Admission, node: Node | None, code: Code, message: str, now: float, retry_after: float | None = None
    ) -> Decision:
        row_id = self.next_row_id
        self.next_row_id = row_id + 1
        self.out.usage.append(
            (
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
            (node.free if node.free > 0 else 0) if node.status is Status.ACTIVE else 0,
            tight.limit.rate if tight else None,
            (int(tight.level) if tight.level > 0 else 0) if tight else None,
            math.ceil(retry_after) if retry_after else None,
            message,
            replay,
            replayed,
        )

    def _check_thresholds(self, n: Node, now: float) -> None:
        if n.allocation <= 0:
            return
        for t in n.thresholds:
            if t not in n.fired and n.consumed * 100 >= t * n.allocation:
                n.fired.add(t)
                self.out.dirty[n.id] = n
                self.out.alerts.append(
                    {
                        "ts": now,
                        "token_id": n.id,
                        "root_id": n.root_id,
                        "threshold": t,
                        "consumed": n.consumed,
                        "allocation": n.allocation,
                        "kind": "usage",
                    }
                )

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
        del self.pending[s.request_id]
        keep = (p.units if s.charged is None else max(0, min(s.charged, p.units))) if s.success else 0
        refund = p.units - keep
        node = self.nodes[p.token_id]
        if refund:
            self._refund(node, refund)
        state = UsageState.SETTLED.value if s.success else UsageState.REFUNDED.value
        recent = self.recent
        recent[s.request_id] = (p.token_id, state, now)
        if len(recent) > MAX_RECENT:
            del recent[next(iter(recent))]
        self.out.settles.append((state, keep, s.latency_ms, s.detections, s.gpu_ms, now, p.row_id))
        if p.idem_key is not None:
            rec = self.idem.get((p.token_id, p.idem_key))
            if rec is not None and rec.request_id == s.request_id:
                if s.success:
                    rec.state, rec.result = "done", s.result
                    self.out.idem_done.append(rec)
                else:  # a failed request may be retried with the same key
                    del self.idem[(p.token_id, p.idem_key)]
                    self.out.idem_deleted.append((p.token_id, p.idem_key))
        return Code.OK

    def _refund(self, node: Node, units: int) -> None:
        node.used -= units
        self.out.dirty[node.id] = node
        n: Node | None = node
        while n is not None:
            n.consumed -= units
            if not n.live:  # dead nodes hold exactly what they spent: pass the refund up
                n.allocation -= units
                self.out.dirty[n.id] = n
                if n.parent is not None:
                    n.parent.delegated -= units
            n = n.parent

    # ------------------------------------------------------------------ tree operations
    def node(self, token_id: str, actor: str | None = None) -> Node:
        """Look up a node the actor may see: admin (None) sees all, a token its own subtree."""
        n = self.nodes.get(token_id)
        if n is None or (actor is not None and not self._within(actor, n)):
            raise OperationRefused(f"token {token_id!r} not found", Code.NOT_FOUND)
        return n

    def _within(self, actor: str, n: Node) -> bool:
        return any(a.id == actor for a in n.path())

    def _strict_descendant(self, token_id: str, actor: str | None) -> Node:
        n = self.node(token_id, actor)
        if actor is not None and n.id == actor:
            raise OperationRefused("a token cannot do this to itself; ask its parent", Code.FORBIDDEN)
        return n

    def _require_usable(self, n: Node, now: float) -> None:
        for a in n.path():
            if a.status is not Status.ACTIVE:
                raise OperationRefused(f"token {n.id} or an ancestor is {a.status.value}", Code.REVOKED_TOKEN)
            if a.expires_at is not None and now >= a.expires_at:
                raise OperationRefused(f"token {n.id} or an ancestor has expired", Code.EXPIRED_TOKEN)

    @staticmethod
    def _check_units(units: object, what: str) -> int:
        if type(units) is not int or not 0 < units <= MAX_UNITS:
            raise OperationRefused(f"{what} must be an integer in 1..{MAX_UNITS}", Code.INVALID_REQUEST)
        return units

    def _event(self, now: float, actor: str | None, action: str, n: Node, **detail: Any) -> None:
        self.out.admin_events.append(
            {
                "ts": now,
                "actor": actor or "admin",
                "action": action,
                "token_id": n.id,
                "root_id": n.root_id,
                "detail": detail,
            }
        )

    def create_package(
        self,
        *,
        token_id: str,
        jti: str,
        name: str,
        allocation: int,
        limits: Limits,
        team: str | None = None,
        thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS,
        meta: dict[str, Any] | None = None,
        actor: str | None = None,
    ) -> Node:
        if actor is not None:
            raise OperationRefused("only an admin may create packages", Code.FORBIDDEN)
        self._check_units(allocation, "allocation")
        now = self.clock()
        if limits.expires_at is not None and limits.expires_at <= now:
            raise OperationRefused("expiry must be in the future", Code.INVALID_REQUEST)
        if token_id in self.nodes:
            raise OperationRefused(f"token id {token_id} exists", Code.INVALID_REQUEST)
        n = Node(
            id=token_id,
            root_id=token_id,
            parent_id=None,
            name=name,
            allocation=allocation,
            jti=jti,
            expires_at=limits.expires_at,
            models=limits.models,
            ips=limits.ips,
            rate=limits.rate,
            team=team,
            created_at=now,
            thresholds=_thresholds(thresholds),
            meta=dict(meta or {}),
        )
        n.bucket = Bucket(n.rate, now) if n.rate else None
        self.nodes[n.id] = n
        self.roots[n.id] = n
        self.out.new_nodes.append(n)
        self._event(now, actor, "package.create", n, allocation=allocation, name=name)
        return n

    def split(
        self,
        parent_id: str,
        *,
        token_id: str,
        jti: str,
        name: str,
        allocation: int,
        limits: Limits,
        team: str | None = None,
        thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS,
        meta: dict[str, Any] | None = None,
        actor: str | None = None,
    ) -> Node:
        """Carve `allocation` units of the parent's free quota into a new child token."""
        parent = self.node(parent_id, actor)
        now = self.clock()
        self._require_usable(parent, now)
        self._check_units(allocation, "allocation")
        if token_id in self.nodes:
            raise OperationRefused(f"token id {token_id} exists", Code.INVALID_REQUEST)
        if allocation > parent.free:
            raise OperationRefused(f"parent has {parent.free} free units, {allocation} requested", Code.QUOTA_EXHAUSTED)
        expires_at = self._narrow_limits(parent, limits, now)
        n = Node(
            id=token_id,
            root_id=parent.root_id,
            parent_id=parent.id,
            name=name,
            allocation=allocation,
            jti=jti,
            expires_at=expires_at,
            models=limits.models,
            ips=limits.ips,
            rate=limits.rate,
            team=team if team is not None else parent.team,
            created_at=now,
            thresholds=_thresholds(thresholds),
            meta=dict(meta or {}),
            parent=parent,
        )
        n.bucket = Bucket(n.rate, now) if n.rate else None
        parent.children.append(n)
        parent.delegated += allocation
        self.nodes[n.id] = n
        self.out.new_nodes.append(n)
        self._event(now, actor, "token.split", n, parent=parent.id, allocation=allocation, name=name)
        return n

    def _narrow_limits(self, parent: Node, limits: Limits, now: float) -> float | None:
        """Refuse anything wider than the parent's effective limits; return the child's expiry."""
        eff_exp = min((a.expires_at for a in parent.path() if a.expires_at is not None), default=None)
        expires_at = limits.expires_at if limits.expires_at is not None else eff_exp
        if expires_at is not None and expires_at <= now:
            raise OperationRefused("expiry must be in the future", Code.INVALID_REQUEST)
        if eff_exp is not None and expires_at is not None and expires_at > eff_exp:
            raise OperationRefused("a child cannot expire after its parent", Code.LIMIT_WIDENING)
        for a in parent.path():
            if limits.models is not None and not models_narrow(limits.models, a.models):
                raise OperationRefused("a child cannot allow models its parent does not", Code.LIMIT_WIDENING)
            if limits.ips is not None and not ips_narrow(limits.ips, a.ips):
                raise OperationRefused("a child cannot allow IPs its parent does not", Code.LIMIT_WIDENING)
            if limits.rate is not None and not limits.rate.narrows(a.rate):
                raise OperationRefused("a child cannot have a higher rate than its parent", Code.LIMIT_WIDENING)
        return expires_at

    def update_limits(self, token_id: str, limits: Limits, actor: str | None = None) -> Node:
        """Change limits of a node (fields left None stay as they are); children may only narrow."""
        n = self._strict_descendant(token_id, actor)
        now = self.clock()
        self._require_usable(n, now)
        if n.parent is not None:
            self._narrow_limits(n.parent, limits, now)
        elif limits.expires_at is not None and limits.expires_at <= now:
            raise OperationRefused("expiry must be in the future", Code.INVALID_REQUEST)
        if limits.expires_at is not None:
            n.expires_at = limits.expires_at
        if limits.models is not None:
            n.models = limits.models
        if limits.ips is not None:
            n.ips = limits.ips
        if limits.rate is not None:
            n.rate = limits.rate
            n.bucket = Bucket(limits.rate, now)
        self.out.dirty[n.id] = n
        self._event(
            now,
            actor,
            "token.limits",
            n,
            expires_at=limits.expires_at,
            models=sorted(limits.models) if limits.models is not None else None,
            ips=[str(i) for i in limits.ips] if limits.ips is not None else None,
            rate=limits.rate.describe() if limits.rate else None,
        )
        return n

    def top_up(self, token_id: str, units: int, actor: str | None = None) -> Node:
        """Root: grant new units. Child: move units from the parent's free quota."""
        n = self._strict_descendant(token_id, actor)
        self._check_units(units, "units")
        now = self.clock()
        self._require_usable(n, now)
        if n.parent is not None:
            if n.parent.free < units:
                raise OperationRefused(
                    f"parent has {n.parent.free} free units, {units} requested", Code.QUOTA_EXHAUSTED
                )
            n.parent.delegated += units
        elif actor is not None:
            raise OperationRefused("only an admin may top up a package", Code.FORBIDDEN)
        n.allocation += units
        # thresholds now below consumption are re-armed, so the next crossing alerts again
        n.fired = {t for t in n.fired if n.consumed * 100 >= t * n.allocation}
        self.out.dirty[n.id] = n
        self._event(now, actor, "token.top_up", n, units=units, allocation=n.allocation)
        return n

    def reclaim(self, token_id: str, units: int | None = None, actor: str | None = None) -> int:
        """Return unspent allocation of a child to its parent; returns the units moved.

        A live child gives back `units` (default: all) of its free quota and stays active.
        A dead or expired child gives back everything its subtree did not spend.
        """
        n = self._strict_descendant(token_id, actor)
        if n.parent is None:
            raise OperationRefused("a package root has no parent to reclaim into", Code.INVALID_REQUEST)
        now = self.clock()
        if not n.live or (n.expires_at is not None and now >= n.expires_at):
            return self._retire(n, Status.EXPIRED if n.live else n.status, now, actor, "token.reclaim")
        take = n.free if units is None else self._check_units(units, "units")
        if take > n.free:
            raise OperationRefused(f"token has {n.free} free units, {take} requested", Code.QUOTA_EXHAUSTED)
        n.allocation -= take
        n.parent.delegated -= take
        self.out.dirty[n.id] = n
        self._event(now, actor, "token.reclaim", n, units=take)
        return take

    def revoke(self, token_id: str, actor: str | None = None) -> int:
        """Revoke a node and its subtree at once; their unspent allocation returns to the parent."""
        n = self.node(token_id, actor)
        if n.status is Status.REVOKED:
            return 0
        return self._retire(n, Status.REVOKED, self.clock(), actor, "token.revoke")

    def rotate(self, token_id: str, jti: str, actor: str | None = None) -> Node:
        """Replace the node's credential id: the old credential stops working at once."""
        n = self.node(token_id, actor)
        self._require_usable(n, self.clock())
        n.jti = jti
        self.out.dirty[n.id] = n
        self._event(self.clock(), actor, "token.rotate", n)
        return n

    def expire_due(self) -> list[str]:
        """Sweep: retire every live node past its expiry, returning its unspent units upward."""
        now = self.clock()
        due = [n for n in self.nodes.values() if n.live and n.expires_at is not None and now >= n.expires_at]
        done: list[str] = []
        for n in due:
            if n.live:  # may have been retired as part of an ancestor's subtree
                self._retire(n, Status.EXPIRED, now, None, "token.expire")
                done.append(n.id)
        return done

    def _retire(self, n: Node, status: Status, now: float, actor: str | None, action: str) -> int:
        """Mark the subtree dead and shrink each node to what it spent (children first)."""
        sub = n.subtree()
        before = n.allocation
        for x in reversed(sub):  # children first, so x.delegated is already their spend
            if x.live:
                x.status = status
            shrunk = x.allocation - (x.used + x.delegated)
            x.allocation -= shrunk
            if x.parent is not None:
                x.parent.delegated -= shrunk  # a root has no parent: its unspent units are withdrawn
            self.out.dirty[x.id] = x
        returned = before - n.allocation
        self._event(now, actor, action, n, returned=returned, subtree=len(sub))
        return returned

    def prune(self, now: float | None = None, settle_window_s: float = 3600.0) -> None:
        """Forget idempotency records past 24 h, settled request ids past the retry window, and
        unsettled admissions past the settle window (they stay charged; the caller never settled)."""
        now = self.clock() if now is None else now
        for key in [k for k, r in self.idem.items() if now - r.created_at >= IDEMPOTENCY_TTL_S]:
            del self.idem[key]
            self.out.idem_deleted.append(key)
        cutoff = now - RECENT_REQUEST_TTL_S
        for rid in [r for r, (_, _, ts) in self.recent.items() if ts < cutoff]:
            del self.recent[rid]
        stale = now - settle_window_s
        for rid in [r for r, p in self.pending.items() if p.ts < stale]:
            del self.pending[rid]

    # ------------------------------------------------------------------ reads & checks
    def check_credential(self, token_id: str, jti: str) -> Code:
        n = self.nodes.get(token_id)
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

    def views(self, root_id: str | None = None, actor: str | None = None) -> list[TokenView]:
        if actor is not None:
            return [x.view() for x in self.node(actor).subtree()]
        if root_id is not None:
            return [x.view() for x in self.node(root_id).subtree()]
        return [x.view() for r in self.roots.values() for x in r.subtree()]

    def invariant_violations(self) -> list[str]:
        """DESIGN §3 conservation, per root, and non-negativity. Empty list means healthy."""
        bad: list[str] = []
        for root in self.roots.values():
            sub = root.subtree()
            used = sum(x.used for x in sub)
            free = sum(x.free for x in sub if x.live)
            if used + free != root.allocation:
                bad.append(f"root {root.id}: used {used} + free {free} != allocation {root.allocation}")
            for x in sub:
                if x.used < 0 or x.allocation < 0 or x.delegated < 0 or (x.live and x.free < 0):
                    bad.append(f"node {x.id}: negative balance {x.view()}")
                if not x.live and x.free != 0:
                    bad.append(f"dead node {x.id} holds {x.free} free units")
                if x.delegated != sum(c.allocation for c in x.children):
                    bad.append(f"node {x.id}: delegated {x.delegated} != children's allocation")
        return bad


def _thresholds(values: Iterable[int]) -> tuple[int, ...]:
    out = tuple(sorted({int(v) for v in values}))
    if any(not 0 < v <= 100 for v in out):
        raise OperationRefused("alert thresholds must be percentages in 1..100", Code.INVALID_REQUEST)
    return out
