"""Tree depth: splits stop at `max_tree_depth` levels; stored trees of any depth and row order load
without recursion; rows that do not form trees are LedgerUnavailable and leave the book as it was."""

from __future__ import annotations

import random
import sys

import pytest

from ledger.core.book import QuotaBook
from ledger.core.changes import Pending
from ledger.core.codes import Code
from ledger.core.entities import Node, Settlement
from ledger.core.errors import LedgerUnavailable, OperationRefused
from ledger.core.limits import RateLimit
from ledger.core.settings import LedgerSettings
from ledger.core.tree import MAX_TREE_DEPTH
from tests.ledger.book_helpers import Clock, admit, child, counters, package


def test_given_the_default_settings_then_trees_are_at_most_16_levels_deep() -> None:
    assert LedgerSettings().max_tree_depth == MAX_TREE_DEPTH == 16


def test_given_a_chain_of_16_levels_when_split_once_more_then_refused_with_nothing_changed() -> None:
    book = QuotaBook(Clock())
    node = package(book, 1000)
    for _ in range(15):
        node = child(book, node, 10)
    assert len(node.path()) == 16
    book.drain()
    before = counters(book)
    with pytest.raises(OperationRefused) as e:
        child(book, node, 1)
    assert e.value.code is Code.INVALID_REQUEST and "16 levels" in e.value.message
    assert counters(book) == before and not book.drain()
    assert admit(book, node).code is Code.OK, "the deepest token still works"


def test_given_a_smaller_max_depth_then_it_is_the_book_that_enforces_it() -> None:
    book = QuotaBook(Clock(), max_depth=2)
    kid = child(book, package(book, 10), 5)
    with pytest.raises(OperationRefused):
        child(book, kid, 1)


def chain(depth: int, clock: Clock, used: int = 1) -> list[Node]:
    """A stored chain pkg0 <- tok1 <- ... <- tok{depth-1}, each holding `used` spent units."""
    nodes: list[Node] = []
    for i in range(depth):
        nodes.append(
            Node(
                id="pkg0" if i == 0 else f"tok{i}",
                root_id="pkg0",
                parent_id=None if i == 0 else ("pkg0" if i == 1 else f"tok{i - 1}"),
                name=f"n{i}",
                allocation=(depth - i) * used,
                used=used,
                jti=f"j{i}",
                created_at=clock.t + i,
                rate=RateLimit(rate=1.0, burst=1) if i % 1000 == 999 else None,
            )
        )
    return nodes


def test_given_a_5000_deep_chain_in_shuffled_rows_when_loaded_then_it_loads_without_recursion() -> None:
    clock = Clock()
    rows = chain(5000, clock)
    random.Random(5000).shuffle(rows)
    book = QuotaBook(clock)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(400)  # far below the depth: any recursion over the chain would fail
    try:
        book.load(rows, [], [], [], 0)
        root, deepest = book.roots["pkg0"], book.nodes["tok4999"]
        assert len(deepest.path()) == 5000 and deepest.path()[-1] is root
        assert (root.consumed, root.delegated, root.free) == (5000, 4999, 0)
        assert book.nodes["tok4998"].children == [deepest]
        assert book.tree.invariant_violations() == []
        assert len(book.tree.views("pkg0")) == 5000
        repr(deepest)
        d = admit(book, deepest, units=1)
        assert d.code is Code.QUOTA_EXHAUSTED  # every unit spent; and the check walked the whole path
        assert book.tree.revoke("tok1") == 0
        assert deepest.status.value == "revoked"
    finally:
        sys.setrecursionlimit(limit)


def test_given_rows_in_any_order_then_the_same_tree_loads() -> None:
    clock = Clock()
    views = []
    for seed in range(5):
        rows = chain(30, clock, used=2)
        random.Random(seed).shuffle(rows)
        book = QuotaBook(clock)
        book.load(rows, [], [], [], 0)
        views.append(book.tree.views())
    assert all(v == views[0] for v in views)


@pytest.mark.parametrize("fault", ["missing_parent", "cycle", "duplicate", "foreign_root"])
def test_given_rows_that_do_not_form_trees_when_loaded_then_unavailable_and_the_book_unchanged(fault: str) -> None:
    clock = Clock()
    book = QuotaBook(clock)
    good = chain(3, clock)
    book.load(good, [], [], [], 0)
    before = dict(book.nodes)
    rows = chain(3, clock)
    if fault == "missing_parent":
        rows[2].parent_id = "tok_gone"
    elif fault == "cycle":
        rows += [
            Node(id="a", root_id="pkg0", parent_id="b", name="a", allocation=0),
            Node(id="b", root_id="pkg0", parent_id="a", name="b", allocation=0),
        ]
    elif fault == "duplicate":
        rows.append(chain(2, clock)[1])
    else:
        rows[2].root_id = "pkg_other"
    with pytest.raises(LedgerUnavailable):
        book.load(rows, [], [], [], 0)
    assert book.nodes == before
    assert book.roots["pkg0"] is before["pkg0"] and book.tree.invariant_violations() == []


def test_given_a_pending_admission_deep_in_a_revoked_subtree_when_refunded_then_the_live_root_gets_it() -> None:
    clock = Clock()
    book = QuotaBook(clock)
    pending = Pending("deep", "tok2999", 1, clock.t, None, 1, "parts@1")
    book.load(chain(3000, clock), [pending], [], [], 1)
    assert book.tree.revoke("tok1") == 0  # every unit below the root is spent
    assert book.settle(Settlement("deep", "tok2999", success=False)) is Code.OK
    root = book.roots["pkg0"]
    assert (root.free, book.nodes["tok1"].allocation) == (1, 2998)
    assert book.tree.invariant_violations() == []
