"""LedgerCore: the quota book, the store and the key ring behind one single-threaded owner.

No Ray here. The owner (the actor shell, or a test) calls operations, then `commit()`
once for everything they changed (group commit). If the commit fails, the in-memory
book is rebuilt from the database, so the book never claims what the database lacks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ledger.book import QuotaBook
from ledger.changes import Changes
from ledger.codes import Code
from ledger.credentials import MAX_CLAIM_CHARS, KeyRing, issue, new_id, new_jti
from ledger.entities import Admission, Decision, Node, Settlement, TokenSpec, TokenView, make_limits
from ledger.errors import LedgerError, LedgerUnavailable, OperationRefused
from ledger.settings import LedgerSettings
from ledger.store.repository import Store, UsageQuery

log = logging.getLogger(__name__)
MAX_ADMIN_TTL_S = 366 * 86400.0
MAX_IMAGE_BYTES = 2**62  # image_bytes is a BIGINT column


class LedgerCore:
    def __init__(self, settings: LedgerSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.store = Store(settings.database_url)
        self.ring = KeyRing.open(settings.key_dir, clock=clock)
        self.book = QuotaBook(
            clock, max_depth=settings.max_tree_depth, idem_pending_timeout_s=settings.idem_pending_timeout_s
        )
        self.ready = False
        self.unwritten: Changes | None = None  # the outbox of a commit that failed, until discarded

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Migrate the schema, then rebuild the book. Every failure is LedgerUnavailable."""
        try:
            self.store.migrate()
        except LedgerUnavailable:
            raise
        except Exception as exc:  # e.g. a schema newer than this code knows
            log.exception("ledger database migration failed")
            raise LedgerUnavailable(f"database migration failed: {type(exc).__name__}") from exc
        self.reload()

    def reload(self) -> None:
        """Rebuild the book from the database (the truth). Raises LedgerUnavailable, whatever went
        wrong (the database, a row that does not fit the trees, a bug): the owner stays up, unready,
        and retries later. Rate buckets of tokens already in memory carry over (see QuotaBook.load)."""
        self.ready = False
        try:
            nodes, pending, recent, idem, last_id = self.store.load(
                self.clock(), self.settings.settle_window_s, self.settings.recent_window_s
            )
            self.book.load(nodes, pending, recent, idem, last_id)
        except LedgerUnavailable as exc:
            log.warning("ledger book not rebuilt: %s", exc.message)
            raise
        except Exception as exc:
            log.exception("ledger book could not be rebuilt from the database")
            raise LedgerUnavailable(f"ledger book could not be rebuilt: {type(exc).__name__}") from exc
        self.ready = True

    def discard(self) -> None:
        """Drop unwritten changes and rebuild from the database (or stay unready if it is down).

        The rate tokens that the dropped admissions took are given back first, and the rebuilt
        book carries every bucket over, so a failed batch neither refills nor drains anyone's."""
        for dropped in (self.unwritten, self.book.drain()):
            if dropped is not None:
                self.book.give_back_rate(dropped)
        self.unwritten = None
        self.ready = False
        with contextlib.suppress(LedgerUnavailable):
            self.reload()

    def authenticate(self, actor: str | None, actor_jti: str | None) -> None:
        """A token acting on the tree must hold its current credential, on a live path."""
        if actor is None:
            return
        code = self.book.check_credential(actor, actor_jti or "")
        if code is not Code.OK:
            raise OperationRefused(f"credential is {code.value.replace('_', ' ')}", code)

    def commit(self) -> None:
        """Persist everything changed since the last commit, in one transaction.

        On failure the book is marked unready and the error propagates: no caller may be told
        "admitted"; the owner calls `discard()` to rebuild the book from the database.
        """
        changes = self.book.drain()
        if not changes:
            return
        try:
            self.store.commit(changes)
        except Exception:
            self.ready = False
            self.unwritten = changes
            raise

    def close(self) -> None:
        self.store.close()

    # ---------------------------------------------------------------- hot path
    def admit_rows(self, rows: Iterable[Sequence[Any]]) -> list[Decision]:
        """Admissions in wire form; a malformed row is refused on its own and records nothing."""
        now = self.clock()
        admit = self.book.admit
        return [admit(Admission(*r), now) if _well_formed(r) else _malformed(r) for r in _rows(rows)]

    def settle_rows(self, rows: Iterable[Sequence[Any]]) -> list[str]:
        """Settlements in wire form; a malformed row is refused on its own (INVALID_REQUEST)."""
        now = self.clock()
        settle = self.book.settle
        bad = Code.INVALID_REQUEST.value
        return [settle(Settlement(*r), now).value if _well_formed_settlement(r) else bad for r in _rows(rows)]

    # ---------------------------------------------------------------- credentials
    def _credential(self, n: Node) -> str:
        exp = n.expires_at or (self.clock() + self.settings.default_credential_ttl_s)
        return issue(self.ring, sub=n.id, pkg=n.root_id, jti=n.jti, typ="access", exp=int(exp))

    def issue_admin(self, name: str, ttl_s: float) -> str:
        """An admin credential (typ=admin) for the console and admin routes."""
        if type(name) is not str or not 0 < len(name) <= MAX_CLAIM_CHARS - 6:
            raise OperationRefused("admin name must be a short non-empty string", Code.INVALID_REQUEST)
        if type(ttl_s) not in (int, float) or not (1.0 <= ttl_s <= MAX_ADMIN_TTL_S):
            raise OperationRefused(f"ttl must be 1 s .. {MAX_ADMIN_TTL_S:.0f} s", Code.INVALID_REQUEST)
        return issue(self.ring, sub=f"admin:{name}", pkg="*", jti=new_jti(), typ="admin", exp=int(self.clock() + ttl_s))

    def public_keys(self) -> dict[str, bytes]:
        return self.ring.public_keys()

    def rotate_keys(self) -> dict[str, Any]:
        kid = self.ring.rotate()
        return {"active_kid": kid, "pruned": self.ring.prune()}

    def check_credential(self, token_id: str, jti: str) -> str:
        return self.book.check_credential(token_id, jti).value

    # ---------------------------------------------------------------- tree operations
    def create_package(self, spec: TokenSpec, actor: str | None = None) -> dict[str, Any]:
        """A new package; returns {"token": TokenView, "credential": str} (shown once)."""
        n = self.book.tree.create_package(new_id("pkg"), new_jti(), spec, actor=actor)
        return {"token": n.view(), "credential": self._credential(n)}

    def split(self, parent_id: str, spec: TokenSpec, actor: str | None = None) -> dict[str, Any]:
        """A child token carved from the parent's free units; same return shape as create_package."""
        n = self.book.tree.split(parent_id, new_id("tok"), new_jti(), spec, actor=actor)
        return {"token": n.view(), "credential": self._credential(n)}

    def update_limits(
        self,
        token_id: str,
        *,
        expires_at: float | None = None,
        models: Iterable[str] | None = None,
        ips: Iterable[str] | None = None,
        rate: str | None = None,
        actor: str | None = None,
    ) -> TokenView:
        return self.book.tree.update_limits(token_id, make_limits(expires_at, models, ips, rate), actor=actor).view()

    def top_up(self, token_id: str, units: int, actor: str | None = None) -> TokenView:
        return self.book.tree.top_up(token_id, units, actor=actor).view()

    def revoke(self, token_id: str, actor: str | None = None) -> dict[str, Any]:
        return {"returned": self.book.tree.revoke(token_id, actor=actor), "token": self.book.node(token_id).view()}

    def reclaim(self, token_id: str, units: int | None = None, actor: str | None = None) -> dict[str, Any]:
        return {"returned": self.book.tree.reclaim(token_id, units, actor=actor), "token": self.book.node(token_id).view()}

    def rotate(self, token_id: str, actor: str | None = None) -> dict[str, Any]:
        n = self.book.tree.rotate(token_id, new_jti(), actor=actor)
        return {"token": n.view(), "credential": self._credential(n)}

    def sweep(self) -> dict[str, Any]:
        expired = self.book.tree.expire_due()
        warned = self.book.tree.warn_expiring(self.settings.expiry_warning_days * 86400)
        abandoned = self.book.refund_abandoned()
        self.book.prune(settle_window_s=self.settings.settle_window_s, recent_window_s=self.settings.recent_window_s)
        return {"expired": expired, "expiry_warned": warned, "idem_refunded": abandoned}

    def alert_context(self, token_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Meta of the token and each ancestor (for its alert contacts), and its name/team."""
        try:
            n = self.book.node(token_id)
        except LedgerError:  # a token deleted since: only the catch-all channels apply
            return [], {"name": token_id, "team": None}
        return [dict(a.meta) for a in n.path()], {"name": n.name, "team": n.team}

    # ---------------------------------------------------------------- reads
    def token(self, token_id: str, actor: str | None = None) -> TokenView:
        return self.book.node(token_id, actor).view()

    def tokens(self, root_id: str | None = None, actor: str | None = None) -> list[TokenView]:
        return self.book.tree.views(root_id, actor)

    def usage(
        self,
        *,
        token_id: str | None = None,
        model: str | None = None,
        outcome: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        actor: str | None = None,
    ) -> list[dict[str, Any]]:
        if actor is not None:
            if token_id is None:
                token_id = actor
            self.book.node(token_id, actor)  # raises NOT_FOUND outside the actor's subtree
        return self.store.usage(
            UsageQuery(token_id=token_id, model=model, outcome=outcome, since=since, until=until, limit=limit)
        )

    def admin_events(self, token_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        return self.store.admin_events(token_id, limit)

    def alerts(self, limit: int = 1000) -> list[dict[str, Any]]:
        return self.store.alerts(limit)

    def consistency(self) -> dict[str, Any]:
        """Book vs database, and the conservation invariant: for tests and `yolo-tokens doctor`."""
        book = {n.id: (n.allocation, n.used, n.status.value) for n in self.book.nodes.values()}
        return {"book": book, "db": self.store.balances(), "violations": self.book.tree.invariant_violations()}


def _opt_str(v: object, limit: int) -> bool:
    return v is None or (isinstance(v, str) and len(v) <= limit)


def _well_formed(r: Sequence[Any]) -> bool:
    """Types and sizes of an admission row, so that a bad caller can neither crash a batch nor the write."""
    return (
        len(r) == 9
        and isinstance(r[0], str)
        and 0 < len(r[0]) <= 64
        and isinstance(r[1], str)
        and len(r[1]) <= 40
        and isinstance(r[2], str)
        and len(r[2]) <= 64
        and type(r[3]) is int
        and isinstance(r[4], str)
        and 0 < len(r[4]) <= 200
        and _opt_str(r[5], 64)
        and _opt_str(r[6], 255)
        and _opt_str(r[7], 128)
        and type(r[8]) is int
        and 0 <= r[8] < MAX_IMAGE_BYTES
    )


def _rows(rows: Iterable[Sequence[Any]]) -> list[Sequence[Any]]:
    """The rows of a batch; anything but a list or tuple of them is an empty batch."""
    return [r if isinstance(r, list | tuple) else () for r in rows] if isinstance(rows, list | tuple) else []


def _finite(v: object, top: float) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v < top


def _well_formed_settlement(r: Sequence[Any]) -> bool:
    """Types and sizes of a settlement row (fields of `Settlement`), so that no value can fail the write."""
    return (
        len(r) == 8
        and isinstance(r[0], str)
        and 0 < len(r[0]) <= 64
        and isinstance(r[1], str)
        and len(r[1]) <= 40
        and type(r[2]) is bool
        and (r[3] is None or type(r[3]) is int)
        and _finite(r[4], 1e12)
        and type(r[5]) is int
        and 0 <= r[5] < 2**31
        and _finite(r[6], 1e12)
        and _opt_str(r[7], 16 * 2**20)
    )


def _malformed(r: Sequence[Any]) -> Decision:
    rid = r[0] if len(r) > 0 and isinstance(r[0], str) else ""
    return Decision(Code.INVALID_REQUEST, rid, message="malformed admission")
