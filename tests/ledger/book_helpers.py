"""Helpers for quota-book tests: a settable clock and short builders."""

from __future__ import annotations

import itertools

from ledger.core.book import QuotaBook
from ledger.core.entities import Admission, Decision, Node, TokenLimits, TokenSpec

_ids = itertools.count()


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def new_book() -> tuple[QuotaBook, Clock]:
    clock = Clock()
    return QuotaBook(clock), clock


def package(book: QuotaBook, allocation: int, limits: TokenLimits | None = None) -> Node:
    i = next(_ids)
    return book.tree.create_package(f"pkg{i}", f"j{i}", TokenSpec(f"p{i}", allocation, limits or TokenLimits()))


def child(
    book: QuotaBook, parent: Node, allocation: int, limits: TokenLimits | None = None, by_token: str | None = None
) -> Node:
    i = next(_ids)
    return book.tree.split(
        parent.id, f"tok{i}", f"j{i}", TokenSpec(f"c{i}", allocation, limits or TokenLimits()), by_token=by_token
    )


def admit(
    book: QuotaBook,
    node: Node,
    units: int = 1,
    model: str = "parts@1",
    ip: str | None = "10.0.0.1",
    key: str | None = None,
    body: str | None = None,
    rid: str | None = None,
    jti: str | None = None,
) -> Decision:
    return book.admit(Admission(rid or f"r{next(_ids)}", node.id, jti or node.jti, units, model, ip, key, body))


def counters(book: QuotaBook) -> dict[str, tuple[int, int, int, str, float | None]]:
    """Every number a denial must leave alone, including rate-bucket levels."""
    return {
        n.id: (n.allocation, n.used, n.delegated, n.status.value, n.bucket.level if n.bucket else None)
        for n in book.nodes.values()
    }
