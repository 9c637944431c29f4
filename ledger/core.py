"""LedgerCore: the quota book, the store and the key ring behind one single-threaded owner.

No Ray here. The owner (the actor shell, or a test) calls operations, then `commit()`
once for everything they changed (group commit). If the commit fails, the in-memory
book is rebuilt from the database, so the book never claims what the database lacks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ledger.book import RECENT_REQUEST_TTL_S, QuotaBook
from ledger.credentials import KeyRing, issue, new_id, new_jti
from ledger.entities import Admission, Decision, Node, Settlement, TokenSpec, TokenView, make_limits
from ledger.errors import LedgerUnavailable
from ledger.settings import LedgerSettings
from ledger.store.repository import Store, UsageQuery


class LedgerCore:
    def __init__(self, settings: LedgerSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.store = Store(settings.database_url)
        self.ring = KeyRing.open(settings.key_dir, clock=clock)
        self.book = QuotaBook(clock)
        self.ready = False

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self.store.migrate()
        self.reload()

    def reload(self) -> None:
        """Rebuild the book from the database (the truth). Raises LedgerUnavailable."""
        self.ready = False
        nodes, pending, recent, idem, last_id = self.store.load(
            self.clock(), self.settings.settle_window_s, max(self.settings.recent_window_s, RECENT_REQUEST_TTL_S)
        )
        self.book.load(nodes, pending, recent, idem, last_id)
        self.ready = True

    def require_ready(self) -> None:
        if not self.ready:
            self.reload()

    def commit(self) -> None:
        """Persist everything changed since the last commit, in one transaction.

        On failure the book is rebuilt from the database (or left not-ready if that fails
        too) and LedgerUnavailable propagates: no caller may be told "admitted".
        """
        changes = self.book.drain()
        if not changes:
            return
        try:
            self.store.commit(changes)
        except Exception:
            self.ready = False
            with contextlib.suppress(LedgerUnavailable):
                self.reload()
            raise

    def close(self) -> None:
        self.store.close()

    # ---------------------------------------------------------------- hot path
    def admit_rows(self, rows: Iterable[Sequence[Any]]) -> list[Decision]:
        now = self.clock()
        admit = self.book.admit
        return [admit(Admission(*r), now) for r in rows]

    def settle_rows(self, rows: Iterable[Sequence[Any]]) -> list[str]:
        now = self.clock()
        return [self.book.settle(Settlement(*r), now).value for r in rows]

    # ---------------------------------------------------------------- credentials
    def _credential(self, n: Node) -> str:
        exp = n.expires_at or (self.clock() + self.settings.default_credential_ttl_s)
        return issue(self.ring, sub=n.id, pkg=n.root_id, jti=n.jti, typ="access", exp=int(exp))

    def issue_admin(self, name: str, ttl_s: float) -> str:
        """An admin credential (typ=admin) for the console and admin routes."""
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
        n = self.book.create_package(new_id("pkg"), new_jti(), spec, actor=actor)
        return {"token": n.view(), "credential": self._credential(n)}

    def split(self, parent_id: str, spec: TokenSpec, actor: str | None = None) -> dict[str, Any]:
        """A child token carved from the parent's free units; same return shape as create_package."""
        n = self.book.split(parent_id, new_id("tok"), new_jti(), spec, actor=actor)
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
        return self.book.update_limits(token_id, make_limits(expires_at, models, ips, rate), actor=actor).view()

    def top_up(self, token_id: str, units: int, actor: str | None = None) -> TokenView:
        return self.book.top_up(token_id, units, actor=actor).view()

    def revoke(self, token_id: str, actor: str | None = None) -> dict[str, Any]:
        return {"returned": self.book.revoke(token_id, actor=actor), "token": self.book.node(token_id).view()}

    def reclaim(self, token_id: str, units: int | None = None, actor: str | None = None) -> dict[str, Any]:
        return {"returned": self.book.reclaim(token_id, units, actor=actor), "token": self.book.node(token_id).view()}

    def rotate(self, token_id: str, actor: str | None = None) -> dict[str, Any]:
        n = self.book.rotate(token_id, new_jti(), actor=actor)
        return {"token": n.view(), "credential": self._credential(n)}

    def sweep(self) -> dict[str, Any]:
        expired = self.book.expire_due()
        self.book.prune(settle_window_s=self.settings.settle_window_s)
        return {"expired": expired}

    # ---------------------------------------------------------------- reads
    def token(self, token_id: str, actor: str | None = None) -> TokenView:
        return self.book.node(token_id, actor).view()

    def tokens(self, root_id: str | None = None, actor: str | None = None) -> list[TokenView]:
        return self.book.views(root_id, actor)

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
        return {"book": book, "db": self.store.balances(), "violations": self.book.invariant_violations()}
