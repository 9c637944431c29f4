"""TokenTree: the token tree of every package and the operations that reshape it (DESIGN §3).

Split, top-up, limits, reclaim, revoke, expire and rotate; who may do what to which node;
the conservation invariant. `QuotaBook` (book.py) holds one and adds admission and settlement.
Dead (revoked/expired) nodes are shrunk to what their subtree spent, so their unspent
allocation is back in the nearest live ancestor's `free`. No I/O; every change goes to
the outbox `out`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ledger.core.changes import Changes
from ledger.core.codes import Code
from ledger.core.entities import (
    RECLAIMING,
    RETURNED,
    Node,
    Status,
    TokenLimits,
    TokenSpec,
    TokenView,
    check_token_limits,
    spec_problems,
)
from ledger.core.errors import LedgerUnavailable, OperationRefused
from ledger.core.limits import Bucket, ips_narrow, models_narrow
from ledger.core.service import SERVICE_CLASSES, ServiceClass

# marker in Node.fired: this token's expiry warning went out (usage thresholds are 1..100)
EXPIRY_WARNED = 0

MAX_UNITS = 10**12
MAX_BALANCE = 10**15  # a node's allocation: far below the BIGINT columns' 9.2e18
MIN_LIFETIME_S = 1.0
MAX_TREE_DEPTH = 16
MAX_ID = 40  # the tokens.id column


class TokenTree:
    """Package trees, partitioned by root (`roots`) so they can later be sharded.

    `max_depth` bounds how many levels a tree may have (a root alone is one level); deeper
    splits are refused. Stored trees of any depth still load (nothing here recurses)."""

    def __init__(self, clock: Callable[[], float], max_depth: int = MAX_TREE_DEPTH) -> None:
        self.clock = clock
        self.max_depth = max_depth
        # the deployed model versions (name@version): an allowlist naming another is refused; empty =
        # not known here (a ledger without the serving side), anything is taken
        self.known_models: frozenset[str] = frozenset()
        # tier -> priority level and weight at the detectors (DESIGN §3c; LedgerSettings.tiers)
        self.service_table: Mapping[str, ServiceClass] = SERVICE_CLASSES
        self.nodes: dict[str, Node] = {}
        self.roots: dict[str, Node] = {}
        self.out = Changes()

    def link(self, nodes: Iterable[Node], carry: Mapping[str, Node] | None = None) -> None:
        """Replace the trees with stored nodes (any order); derived fields are recomputed.

        Rate buckets are not stored. A node found in `carry` (the book in memory before this
        rebuild) keeps that node's bucket level and stamp, so that a rebuild never refills a
        bucket; any other node (a cold start) starts with an EMPTY bucket: conservative, every
        bucket then refills at its own rate. Stored rows that do not form trees (a missing
        parent, a cycle, a duplicate id) raise LedgerUnavailable and leave the book as it was.
        """
        by_id: dict[str, Node] = {}
        for n in nodes:
            if n.id in by_id:
                raise LedgerUnavailable(f"stored tokens: duplicate id {n.id!r}")
            by_id[n.id] = n
        roots: dict[str, Node] = {}
        now = self.clock()
        for n in by_id.values():
            n.children, n.parent, n.delegated, n.consumed, n.ancestry = [], None, 0, 0, ()
            n.leased = 0  # set from the leases table by the book
            old = carry.get(n.id) if carry else None
            if n.rate is None:
                n.bucket = None
            elif old is not None and old.bucket is not None:
                n.bucket = Bucket.resumed(n.rate, old.bucket)
            else:
                n.bucket = Bucket.empty(n.rate, now)
        for n in by_id.values():
            if n.parent_id is None:
                if n.root_id != n.id:
                    raise LedgerUnavailable(f"stored tokens: root {n.id!r} names root {n.root_id!r}")
                roots[n.id] = n
                continue
            parent = by_id.get(n.parent_id)
            if parent is None:
                raise LedgerUnavailable(f"stored tokens: parent {n.parent_id!r} of {n.id!r} is missing")
            n.parent = parent
            parent.children.append(n)
        # breadth first from the roots: parents before children, each node once; a node not
        # reached sits on a cycle of parent links
        order: list[Node] = list(roots.values())
        i = 0
        while i < len(order):
            x = order[i]
            x.children.sort(key=_creation_order)  # rows come in any order; children in creation order
            for c in x.children:
                if c.root_id != x.root_id:
                    raise LedgerUnavailable(f"stored tokens: {c.id!r} is under {x.id!r} but names root {c.root_id!r}")
                order.append(c)
            i += 1
        if len(order) != len(by_id):
            raise LedgerUnavailable(f"stored tokens: {len(by_id) - len(order)} tokens are on a cycle of parent links")
        for x in reversed(order):  # children first: their `consumed` is complete when added up
            x.consumed += x.used
            if x.parent is not None:
                x.parent.consumed += x.consumed
                x.parent.delegated += x.allocation
        self.nodes, self.roots = by_id, roots

    def node(self, token_id: str, by_token: str | None = None) -> Node:
        """Look up a node the acting token may see: admin (None) sees all, a token its own subtree."""
        n = self.nodes.get(token_id) if type(token_id) is str else None
        if n is None or (by_token is not None and (type(by_token) is not str or not self._within(by_token, n))):
            raise OperationRefused(f"token {str(token_id)[:MAX_ID]!r} not found", Code.NOT_FOUND)
        return n

    def _within(self, by_token: str, n: Node) -> bool:
        return any(a.id == by_token for a in n.path())

    def _strict_descendant(self, token_id: str, by_token: str | None) -> Node:
        n = self.node(token_id, by_token)
        if by_token is not None and n.id == by_token:
            raise OperationRefused("a token cannot do this to itself; ask its parent", Code.FORBIDDEN)
        return n

    def _require_usable(self, n: Node, now: float) -> None:
        for a in n.path():
            if a.status is not Status.ACTIVE:
                raise OperationRefused(f"token {n.id} or an ancestor is {a.status.value}", Code.REVOKED_TOKEN)
            if a.expires_at is not None and now >= a.expires_at:
                raise OperationRefused(f"token {n.id} or an ancestor has expired", Code.EXPIRED_TOKEN)

    @staticmethod
    def _require_lifetime(n: Node, now: float) -> None:
        """A new credential must outlive its issue time: refuse when the token or an ancestor
        expires within MIN_LIFETIME_S (the credential would have exp <= iat)."""
        for a in n.path():
            if a.expires_at is not None and a.expires_at <= now + MIN_LIFETIME_S:
                raise OperationRefused(
                    f"token {n.id} or an ancestor expires in less than {MIN_LIFETIME_S:g} s: no new credential",
                    Code.INVALID_REQUEST,
                )

    @staticmethod
    def _check_units(units: object, what: str) -> int:
        if type(units) is not int or not 0 < units <= MAX_UNITS:
            raise OperationRefused(f"{what} must be an integer in 1..{MAX_UNITS}", Code.INVALID_REQUEST)
        return units

    def _event(self, now: float, by_token: str | None, action: str, n: Node, **detail: Any) -> None:
        self.out.admin_events.append(
            {
                "ts": now,
                "actor": by_token or "admin",
                "action": action,
                "token_id": n.id,
                "root_id": n.root_id,
                "detail": detail,
            }
        )

    def create_package(self, token_id: str, jti: str, spec: TokenSpec, by_token: str | None = None) -> Node:
        """A new package root holding `spec.allocation` freshly granted units."""
        if by_token is not None:
            raise OperationRefused("only an admin may create packages", Code.FORBIDDEN)
        spec_problems(spec)
        self._check_models(spec.limits)
        now = self.clock()
        if spec.limits.expires_at is not None and spec.limits.expires_at <= now + MIN_LIFETIME_S:
            raise OperationRefused("expiry must be at least a second in the future", Code.INVALID_REQUEST)
        n = self._add(token_id, jti, spec, None, spec.limits.expires_at, now)
        self.roots[n.id] = n
        self._event(now, by_token, "package.create", n, allocation=spec.allocation, name=spec.name)
        return n

    def split(self, parent_id: str, token_id: str, jti: str, spec: TokenSpec, by_token: str | None = None) -> Node:
        """Carve `spec.allocation` units of the parent's free quota into a new child token."""
        parent = self.node(parent_id, by_token)
        spec_problems(spec)
        self._check_models(spec.limits)
        now = self.clock()
        self._require_usable(parent, now)
        self._check_units(spec.allocation, "allocation")
        if len(parent.path()) >= self.max_depth:
            raise OperationRefused(
                f"a token tree may be at most {self.max_depth} levels deep: {parent.id} is on the last level",
                Code.INVALID_REQUEST,
            )
        if spec.allocation > parent.free:
            raise OperationRefused(
                f"parent has {parent.free} free units, {spec.allocation} requested", Code.QUOTA_EXHAUSTED
            )
        expires_at = self._narrow_limits(parent, spec.limits, now)
        n = self._add(token_id, jti, spec, parent, expires_at, now)
        parent.children.append(n)
        parent.delegated += spec.allocation
        self._event(now, by_token, "token.split", n, parent=parent.id, allocation=spec.allocation, name=spec.name)
        return n

    def _add(
        self, token_id: str, jti: str, spec: TokenSpec, parent: Node | None, expires_at: float | None, now: float
    ) -> Node:
        self._check_units(spec.allocation, "allocation")
        if type(token_id) is not str or not 0 < len(token_id) <= MAX_ID or type(jti) is not str or len(jti) > 64:
            raise OperationRefused("malformed token id or credential id", Code.INVALID_REQUEST)
        if token_id in self.nodes:
            raise OperationRefused(f"token id {token_id} exists", Code.INVALID_REQUEST)
        lim = spec.limits
        n = Node(
            id=token_id,
            root_id=parent.root_id if parent else token_id,
            parent_id=parent.id if parent else None,
            name=spec.name,
            allocation=spec.allocation,
            jti=jti,
            expires_at=expires_at,
            models=lim.models,
            ips=lim.ips,
            rate=lim.rate,
            team=spec.team if spec.team is not None or parent is None else parent.team,
            created_at=now,
            thresholds=_thresholds(spec.thresholds),
            meta=dict(spec.meta),
            parent=parent,
        )
        n.bucket = Bucket(n.rate, now) if n.rate else None
        self.nodes[n.id] = n
        self.out.new_nodes.append(n)
        return n

    def _check_models(self, limits: TokenLimits) -> None:
        """An allowlist names deployed models only: `name` (every version) or `name@version`."""
        if not self.known_models or limits.models is None:
            return
        names = {k.partition("@")[0] for k in self.known_models}
        unknown = sorted(m for m in limits.models if m not in self.known_models and m not in names)
        if unknown:
            raise OperationRefused(
                f"no such model deployed: {', '.join(unknown)[:200]} (deployed: {', '.join(sorted(self.known_models))};"
                " an allowlist takes a name or name@version; GET /v1/models lists them)",
                Code.UNKNOWN_MODEL,
            )

    def _narrow_limits(self, parent: Node, limits: TokenLimits, now: float) -> float | None:
        """Refuse anything wider than the parent's effective limits; return the child's expiry."""
        eff_exp = min((a.expires_at for a in parent.path() if a.expires_at is not None), default=None)
        expires_at = limits.expires_at if limits.expires_at is not None else eff_exp
        if expires_at is not None and expires_at <= now + MIN_LIFETIME_S:
            raise OperationRefused("expiry must be at least a second in the future", Code.INVALID_REQUEST)
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

    def update_limits(self, token_id: str, limits: TokenLimits, by_token: str | None = None) -> Node:
        """Change limits of a node (fields left None stay as they are); children may only narrow."""
        n = self._strict_descendant(token_id, by_token)
        check_token_limits(limits)
        self._check_models(limits)
        now = self.clock()
        self._require_usable(n, now)
        if n.parent is not None:
            self._narrow_limits(n.parent, limits, now)
        elif limits.expires_at is not None and limits.expires_at <= now + MIN_LIFETIME_S:
            raise OperationRefused("expiry must be at least a second in the future", Code.INVALID_REQUEST)
        if limits.expires_at is not None:
            n.expires_at = limits.expires_at
            n.fired.discard(EXPIRY_WARNED)  # a new expiry gets its own warning
        if limits.models is not None:
            n.models = limits.models
        if limits.ips is not None:
            n.ips = limits.ips
        if limits.rate is not None:
            n.rate = limits.rate
            # a new rate never brings a fresh burst: what was banked carries over (cut to the new burst)
            if n.bucket is not None:
                n.bucket.refill(now)
                n.bucket = Bucket.resumed(limits.rate, n.bucket)
            else:
                n.bucket = Bucket(limits.rate, now)
        self.out.dirty[n.id] = n
        self._event(
            now,
            by_token,
            "token.limits",
            n,
            expires_at=limits.expires_at,
            models=sorted(limits.models) if limits.models is not None else None,
            ips=[str(i) for i in limits.ips] if limits.ips is not None else None,
            rate=limits.rate.describe() if limits.rate else None,
        )
        return n

    def top_up(self, token_id: str, units: int, by_token: str | None = None) -> Node:
        """Root: grant new units. Child: move units from the parent's free quota."""
        n = self._strict_descendant(token_id, by_token)
        self._check_units(units, "units")
        now = self.clock()
        self._require_usable(n, now)
        if n.allocation + units > MAX_BALANCE:
            raise OperationRefused(f"a token may hold at most {MAX_BALANCE} units", Code.INVALID_REQUEST)
        if n.parent is not None:
            if n.parent.free < units:
                raise OperationRefused(
                    f"parent has {n.parent.free} free units, {units} requested", Code.QUOTA_EXHAUSTED
                )
            n.parent.delegated += units
        elif by_token is not None:
            raise OperationRefused("only an admin may top up a package", Code.FORBIDDEN)
        n.allocation += units
        n.meta.pop(RECLAIMING, None)  # topped up again: units coming back from leases stay here
        # thresholds now below consumption are re-armed, so the next crossing alerts again
        n.fired = {t for t in n.fired if n.consumed * 100 >= t * n.allocation}
        self.out.dirty[n.id] = n
        self._event(now, by_token, "token.top_up", n, units=units, allocation=n.allocation)
        return n

    def reclaim(self, token_id: str, units: int | None = None, by_token: str | None = None) -> int:
        """Return unspent allocation of a child to its parent; returns the units moved.

        A live child gives back `units` (default: all) of its free quota and stays active.
        A dead or expired child gives back everything its subtree did not spend.
        """
        n = self._strict_descendant(token_id, by_token)
        if n.parent is None:
            raise OperationRefused("a package root has no parent to reclaim into", Code.INVALID_REQUEST)
        now = self.clock()
        if not n.live or (n.expires_at is not None and now >= n.expires_at):
            return self._retire(n, Status.EXPIRED if n.live else n.status, now, by_token, "token.reclaim")
        take = n.free if units is None else self._check_units(units, "units")
        if take > n.free:
            leased = f" ({n.leased} more are in replicas' leases: reclaim all to have them back)" if n.leased else ""
            raise OperationRefused(
                f"only {max(n.free, 0)} units are unspent and free, {take} requested{leased}", Code.INVALID_REQUEST
            )
        n.allocation -= take
        n.parent.delegated -= take
        n.meta[RETURNED] = int(n.meta.get(RETURNED, 0)) + take
        if units is None:
            # reclaimed whole: it admits nothing more until a top-up. Holders stop admitting from
            # their leases once they see this, and whatever becomes unspent later (leased units as
            # they come back, refunds, a child's return) follows to the parent (DESIGN §3b)
            n.meta[RECLAIMING] = True
        self.out.dirty[n.id] = n
        self.pass_unspent(n.parent, take)
        self._event(now, by_token, "token.reclaim", n, units=take)
        return take

    def revoke(self, token_id: str, by_token: str | None = None) -> int:
        """Revoke a node and its subtree at once; their unspent allocation returns to the parent."""
        n = self.node(token_id, by_token)
        if n.status is Status.REVOKED:
            return 0
        return self._retire(n, Status.REVOKED, self.clock(), by_token, "token.revoke")

    def rotate(self, token_id: str, jti: str, by_token: str | None = None) -> Node:
        """Replace the node's credential id: the old credential stops working at once."""
        n = self.node(token_id, by_token)
        now = self.clock()
        self._require_usable(n, now)
        self._require_lifetime(n, now)
        if type(jti) is not str or not 0 < len(jti) <= 64:
            raise OperationRefused("malformed credential id", Code.INVALID_REQUEST)
        n.jti = jti
        self.out.dirty[n.id] = n
        self._event(now, by_token, "token.rotate", n)
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

    def warn_expiring(self, ahead_s: float) -> list[str]:
        """Sweep: one `expiry` alert per live token whose expiry is within `ahead_s` (DESIGN §3:
        a week ahead by default); `threshold` carries the whole days left."""
        now = self.clock()
        warned: list[str] = []
        for n in self.nodes.values():
            if not (n.live and n.expires_at is not None and now < n.expires_at <= now + ahead_s):
                continue
            if EXPIRY_WARNED in n.fired:
                continue
            self.fire(n, now, "expiry", EXPIRY_WARNED, max(1, math.ceil((n.expires_at - now) / 86400)))
            warned.append(n.id)
        return warned

    def fire(self, n: Node, now: float, kind: str, marker: int, threshold: int) -> None:
        """Record that alert `marker` of `n` fired (once; persisted with the node) and queue its row."""
        n.fired.add(marker)
        self.out.dirty[n.id] = n
        self.out.alerts.append(
            {
                "ts": now,
                "token_id": n.id,
                "root_id": n.root_id,
                "threshold": threshold,
                "consumed": n.consumed,
                "allocation": n.allocation,
                "kind": kind,
            }
        )

    def _retire(self, n: Node, status: Status, now: float, by_token: str | None, action: str) -> int:
        """Mark the subtree dead and shrink each node to what it spent (children first)."""
        sub = n.subtree()
        before = n.allocation
        for x in reversed(sub):  # children first, so x.delegated is already their spend
            if x.live:
                x.status = status
            shrunk = x.allocation - (x.used + x.delegated + x.leased)  # leased units stay escrowed
            x.allocation -= shrunk
            if shrunk:
                x.meta[RETURNED] = int(x.meta.get(RETURNED, 0)) + shrunk
            if x.parent is not None:
                x.parent.delegated -= shrunk  # a root has no parent: its unspent units are withdrawn
            self.out.dirty[x.id] = x
        returned = before - n.allocation
        self.pass_unspent(n.parent, returned)
        self._event(now, by_token, action, n, returned=returned, subtree=len(sub))
        return returned

    def pass_unspent(self, n: Node | None, units: int) -> None:
        """`units` just became free on `n`: a live token reclaimed whole keeps none of them, they go
        on up to its parent (and further, while that one is reclaimed whole too)."""
        while units > 0 and n is not None and n.live and n.meta.get(RECLAIMING) and n.parent is not None:
            n.allocation -= units
            n.parent.delegated -= units
            n.meta[RETURNED] = int(n.meta.get(RETURNED, 0)) + units
            self.out.dirty[n.id] = n
            n = n.parent

    def views(self, root_id: str | None = None, by_token: str | None = None) -> list[TokenView]:
        if by_token is not None:
            return [x.view() for x in self.node(by_token).subtree()]
        if root_id is not None:
            return [x.view() for x in self.node(root_id).subtree()]
        return [x.view() for r in self.roots.values() for x in r.subtree()]

    def invariant_violations(self) -> list[str]:
        """DESIGN §3 conservation, per root, and non-negativity. Empty list means healthy."""
        bad: list[str] = []
        for root in self.roots.values():
            used = free = leased = 0
            first = len(bad)
            for x in root.subtree():  # one pass: this runs after every step of the simulator
                used += x.used
                leased += x.leased
                live = x.live
                if live:
                    free += x.free
                if x.used < 0 or x.allocation < 0 or x.delegated < 0 or x.leased < 0 or (live and x.free < 0):
                    bad.append(f"node {x.id}: negative balance {x.view()}")
                if not live and x.free != 0:
                    bad.append(f"dead node {x.id} holds {x.free} free units")
                if x.delegated != sum(c.allocation for c in x.children):
                    bad.append(f"node {x.id}: delegated {x.delegated} != children's allocation")
            if used + free + leased != root.allocation:
                bad.insert(
                    first,
                    f"root {root.id}: used {used} + free {free} + leased {leased} != allocation {root.allocation}",
                )
        return bad


def _creation_order(n: Node) -> tuple[float, str]:
    return (n.created_at, n.id)


def _thresholds(values: Iterable[int]) -> tuple[int, ...]:
    out = tuple(sorted({int(v) for v in values}))
    if any(not 0 < v <= 100 for v in out):
        raise OperationRefused("alert thresholds must be percentages in 1..100", Code.INVALID_REQUEST)
    return out
