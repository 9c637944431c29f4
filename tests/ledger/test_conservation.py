"""Conservation: a random mix of tree operations checked against a simple model after every step."""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ledger.core.book import QuotaBook
from ledger.core.codes import Code
from ledger.core.entities import Admission, Settlement, TokenSpec
from ledger.core.errors import OperationRefused
from tests.ledger.book_helpers import Clock


class Model:
    """Naive reference: recomputes everything from the raw per-node facts."""

    def __init__(self) -> None:
        self.alloc: dict[str, int] = {}
        self.used: dict[str, int] = {}
        self.parent: dict[str, str | None] = {}
        self.dead: set[str] = set()

    def children(self, t: str) -> list[str]:
        return [c for c, p in self.parent.items() if p == t]

    def subtree(self, t: str) -> list[str]:
        out = [t]
        for c in self.children(t):
            out += self.subtree(c)
        return out

    def free(self, t: str) -> int:
        if t in self.dead:
            return 0
        return self.alloc[t] - self.used[t] - sum(self.alloc[c] for c in self.children(t))

    def spent(self, t: str) -> int:
        return sum(self.used[x] for x in self.subtree(t))

    def kill(self, t: str) -> None:
        for x in reversed(self.subtree(t)):
            self.dead.add(x)
            self.alloc[x] = self.used[x] + sum(self.alloc[c] for c in self.children(x))

    def refund(self, t: str, units: int) -> None:
        self.used[t] -= units
        x: str | None = t
        while x is not None and x in self.dead:
            self.alloc[x] -= units
            x = self.parent[x]


class Conservation(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.book = QuotaBook(self.clock)
        self.model = Model()
        self.ids = itertools.count()
        self.pending: list[tuple[str, str, int]] = []
        for _ in range(2):
            tid = f"pkg{next(self.ids)}"
            self.book.tree.create_package(tid, "j", TokenSpec(tid, 50))
            self.model.alloc[tid], self.model.used[tid], self.model.parent[tid] = 50, 0, None

    def pick(self, i: int) -> str:
        keys = sorted(self.model.alloc)
        return keys[i % len(keys)]

    @rule(i=st.integers(0, 1000), units=st.integers(1, 30))
    def split(self, i: int, units: int) -> None:
        parent = self.pick(i)
        tid = f"tok{next(self.ids)}"
        try:
            self.book.tree.split(parent, tid, "j", TokenSpec(tid, units))
        except OperationRefused:
            assert parent in self.model.dead or self.model.free(parent) < units or self._dead_above(parent)
            return
        assert self.model.free(parent) >= units
        self.model.alloc[tid], self.model.used[tid], self.model.parent[tid] = units, 0, parent

    def _dead_above(self, t: str) -> bool:
        x: str | None = t
        while x is not None:
            if x in self.model.dead:
                return True
            x = self.model.parent[x]
        return False

    @rule(i=st.integers(0, 1000), units=st.integers(1, 8))
    def admit(self, i: int, units: int) -> None:
        t = self.pick(i)
        rid = f"r{next(self.ids)}"
        d = self.book.admit(Admission(rid, t, "j", units, "parts@1"))
        should = not self._dead_above(t) and self.model.free(t) >= units
        assert (d.code is Code.OK) == should, (d, self.model.free(t))
        if d.code is Code.OK:
            self.model.used[t] += units
            self.pending.append((rid, t, units))

    @precondition(lambda self: self.pending)
    @rule(i=st.integers(0, 1000), ok=st.booleans(), keep=st.integers(0, 8))
    def settle(self, i: int, ok: bool, keep: int) -> None:
        rid, t, units = self.pending.pop(i % len(self.pending))
        assert self.book.settle(Settlement(rid, t, success=ok, charged=keep if ok else None)) is Code.OK
        refund = units if not ok else units - min(keep, units)
        if refund:
            self.model.refund(t, refund)

    @rule(i=st.integers(0, 1000))
    def revoke(self, i: int) -> None:
        t = self.pick(i)
        self.book.tree.revoke(t)
        self.model.kill(t)

    @rule(i=st.integers(0, 1000), units=st.one_of(st.none(), st.integers(1, 20)))
    def reclaim(self, i: int, units: int | None) -> None:
        t = self.pick(i)
        try:
            moved = self.book.tree.reclaim(t, units)
        except OperationRefused:
            return
        if t in self.model.dead:
            return
        self.model.alloc[t] -= moved

    @rule(i=st.integers(0, 1000), units=st.integers(1, 20))
    def top_up(self, i: int, units: int) -> None:
        t = self.pick(i)
        try:
            self.book.tree.top_up(t, units)
        except OperationRefused:
            return
        self.model.alloc[t] += units

    @invariant()
    def books_agree_and_conserve(self) -> None:
        assert self.book.tree.invariant_violations() == []
        for t, n in self.book.nodes.items():
            assert n.used == self.model.used[t] >= 0
            assert n.allocation == self.model.alloc[t] >= 0
            assert (n.free if n.live else 0) == self.model.free(t) >= 0
        for root in self.book.roots.values():
            assert (
                self.model.spent(root.id) + sum(self.model.free(x) for x in self.model.subtree(root.id))
                == self.model.alloc[root.id]
            )


Conservation.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None, derandomize=True)
TestConservation = Conservation.TestCase
