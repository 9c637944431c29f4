"""ShardCore: one ledger shard's quota book and store behind one single-threaded owner.

No Ray here. The owner (the shard actor, `InProcessLedger`, or a test) calls operations, then
`commit()` once for everything they changed (group commit). If the commit fails, the in-memory
book is rebuilt from the database, so the book never claims what the database lacks.

A shard owns the packages whose root maps to it (`ledger.core.shards`): it loads and commits only
their rows, and it is fenced: `start()` takes the shard's next epoch, and a commit after a newer
instance took one is refused (`Fenced`). Credentials are signed by the coordinator (it holds the
key ring): operations that mint one return `Unsigned`, which the owner has signed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from ledger.core.book import QuotaBook
from ledger.core.changes import Changes
from ledger.core.codes import Code
from ledger.core.credentials import new_id, new_jti
from ledger.core.entities import Admission, Decision, Node, Settlement, TokenSpec, TokenView, make_token_limits
from ledger.core.errors import Fenced, LedgerError, LedgerUnavailable, OperationRefused
from ledger.core.leases import (
    MAX_DENIALS,
    NARROWING,
    LeaseDesk,
    LeaseGrant,
    LeaseRules,
    Version,
    WatchLog,
    WatchReply,
)
from ledger.core.results import Consistency, Returned, SweepReport, Unsigned, UsageEvent
from ledger.core.service import service_table
from ledger.core.settings import LedgerSettings
from ledger.core.shards import ShardScope
from ledger.store.repository import Store, UsageQuery

log = logging.getLogger(__name__)


class ShardCore:
    def __init__(
        self,
        settings: LedgerSettings,
        clock: Callable[[], float] = time.time,
        scope: ShardScope | None = None,
        fence_owner: str = "in-process",
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.scope = scope or ShardScope()
        self.fence_owner = fence_owner  # who took the shard's epoch (node:pid): the `shards` row says
        self.store = Store(settings.database_url, self.scope)
        self.book = QuotaBook(
            clock,
            max_depth=settings.max_tree_depth,
            idem_pending_timeout_s=settings.idem_pending_timeout_s,
            scope=self.scope,
        )
        self.watch = WatchLog()
        self.leases = LeaseDesk(
            self.book,
            LeaseRules(
                settings.lease_ttl_s, settings.lost_lease_policy, settings.lease_max_share, settings.lease_strict_below
            ),
            clock,
            self.watch,
        )
        # a holder's strict admission that finds the last units in leases has them asked back
        self.book.recall = self.leases.recall_for
        self.book.tree.known_models = frozenset(settings.known_models)
        self.book.tree.service_table = service_table(settings.tiers)
        self.ready = False
        self.fenced = False  # a newer instance of this shard started: this one never commits again
        self.unwritten: Changes | None = None  # the outbox of a commit that failed, until discarded

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Migrate the schema, take this shard's epoch (once per instance), then rebuild the
        book. Every failure is LedgerUnavailable (`Fenced` once superseded: for good)."""
        if self.fenced:
            raise Fenced(f"shard {self.scope.index} was superseded by a newer instance")
        try:
            self.store.migrate()
        except LedgerUnavailable:
            raise
        except Exception as exc:  # e.g. a schema newer than this code knows
            log.exception("ledger database migration failed")
            raise LedgerUnavailable(f"database migration failed: {type(exc).__name__}") from exc
        if self.store.epoch is None:
            self.watch.epoch = self.store.fence(self.fence_owner, self.clock())
        self.reload()

    def reload(self) -> None:
        """Rebuild the book from the database (the truth). Raises LedgerUnavailable, whatever went
        wrong (the database, a row that does not fit the trees, a bug): the owner stays up, unready,
        and retries later. Rate buckets of tokens already in memory carry over (see QuotaBook.load)."""
        self.ready = False
        if self.fenced:
            raise Fenced(f"shard {self.scope.index} was superseded by a newer instance")
        try:
            nodes, pending, recent, idem, last_id, leases = self.store.load(
                self.clock(), self.settings.settle_window_s, self.settings.recent_window_s
            )
            self.book.load(nodes, pending, recent, idem, last_id, leases)
            # denials reported without a lease carry no sequence number: the desk dedupes their
            # resends by request id, from the database after a restart
            denied = self.store.recent_denials(self.clock() - self.settings.settle_window_s, MAX_DENIALS)
            self.leases.denials = dict.fromkeys(denied)
        except Fenced:
            self.fenced = True
            raise
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
        self.leases.committed(False)
        for dropped in (self.unwritten, self.book.drain()):
            if dropped is not None:
                self.book.give_back_rate(dropped)
                self.book.keep_copies(dropped)
        self.unwritten = None
        self.ready = False
        with contextlib.suppress(LedgerUnavailable):
            self.reload()

    def authenticate(self, by_token: str | None, token_jti: str | None) -> None:
        """A token acting on the tree must hold its current credential, on a live path."""
        if by_token is None:
            return
        code = self.book.check_credential(by_token, token_jti or "")
        if code is not Code.OK:
            raise OperationRefused(f"credential is {code.value.replace('_', ' ')}", code)

    def commit(self) -> None:
        """Persist everything changed since the last commit, in one transaction.

        On failure the book is marked unready and the error propagates: no caller may be told
        "admitted"; the owner calls `discard()` to rebuild the book from the database.
        """
        changes = self.book.drain()
        if not changes:
            self.leases.committed(True)
            return
        try:
            self.store.commit(changes)
        except Fenced:
            self.leases.committed(False)
            log.error("ledger shard %d: superseded by a newer instance; committing nothing more", self.scope.index)
            self.fenced = True
            self.ready = False
            self.unwritten = changes
            raise
        except Exception:
            self.leases.committed(False)
            self.ready = False
            self.unwritten = changes
            raise
        self.leases.committed(True)
        # durable now: holders watching the changed tokens may be told (DESIGN §3a)
        self.watch.publish(e["token_id"] for e in changes.admin_events if e["action"] in NARROWING)

    def close(self) -> None:
        self.store.close()

    # ---------------------------------------------------------------- hot path
    def admit_rows(self, rows: object) -> list[Decision]:
        """Admissions in wire form (`Admission.row`); a malformed row is refused on its own and
        records nothing."""
        now = self.clock()
        self.leases.expire_loans(now)  # rate tokens lent to holders and past their time free the buckets
        admit = self.book.admit
        return [admit(a, now) if (a := Admission.from_row(r)) else _malformed(r) for r in _rows(rows)]

    def settle_rows(self, rows: object) -> list[str]:
        """Settlements in wire form (`Settlement.row`); a malformed one is refused (INVALID_REQUEST)."""
        now = self.clock()
        settle = self.book.settle
        bad = Code.INVALID_REQUEST.value
        return [settle(s, now).value if (s := Settlement.from_row(r)) else bad for r in _rows(rows)]

    # ---------------------------------------------------------------- leases (DESIGN §3a)
    def lease_sync(self, asks: object) -> list[LeaseGrant]:
        """Holders' reports, releases and grants (`LeaseAsk`); a malformed ask is refused alone."""
        return self.leases.answer(_rows(asks))

    def settle_lost_leases(self) -> list[str]:
        return self.leases.settle_lost()

    def lease_watch(self, since: Version, tokens: object) -> WatchReply:
        ok = isinstance(since, tuple) and len(since) == 2 and all(type(v) is int for v in since)
        return self.leases.watch_answer(since if ok else (-1, -1), [t for t in _rows(tokens) if isinstance(t, str)])

    # ---------------------------------------------------------------- credentials
    def _unsigned(self, n: Node) -> Unsigned:
        exp = n.expires_at or (self.clock() + self.settings.default_credential_ttl_s)
        return Unsigned(n.view(), {"sub": n.id, "pkg": n.root_id, "jti": n.jti, "typ": "access", "exp": int(exp)})

    def check_credential(self, token_id: str, jti: str) -> str:
        return self.book.check_credential(token_id, jti).value

    # ---------------------------------------------------------------- tree operations
    def create_package(self, spec: TokenSpec, by_token: str | None = None) -> Unsigned:
        """A new package, with a root id that maps to this shard; its credential is shown once."""
        root_id = new_id("pkg")
        while not self.scope.owns_root(root_id):  # `count` tries on average
            root_id = new_id("pkg")
        n = self.book.tree.create_package(root_id, new_jti(), spec, by_token=by_token)
        return self._unsigned(n)

    def split(self, parent_id: str, spec: TokenSpec, by_token: str | None = None) -> Unsigned:
        """A child token carved from the parent's free units."""
        n = self.book.tree.split(parent_id, new_id("tok"), new_jti(), spec, by_token=by_token)
        return self._unsigned(n)

    def update_limits(
        self,
        token_id: str,
        *,
        expires_at: float | None = None,
        models: Iterable[str] | None = None,
        ips: Iterable[str] | None = None,
        rate: str | None = None,
        by_token: str | None = None,
    ) -> TokenView:
        limits = make_token_limits(expires_at, models, ips, rate)
        return self.book.tree.update_limits(token_id, limits, by_token=by_token).view()

    def top_up(self, token_id: str, units: int, by_token: str | None = None) -> TokenView:
        return self.book.tree.top_up(token_id, units, by_token=by_token).view()

    def revoke(self, token_id: str, by_token: str | None = None) -> Returned:
        return Returned(self.book.tree.revoke(token_id, by_token=by_token), self.book.node(token_id).view())

    def reclaim(self, token_id: str, units: int | None = None, by_token: str | None = None) -> Returned:
        return Returned(self.book.tree.reclaim(token_id, units, by_token=by_token), self.book.node(token_id).view())

    def rotate(self, token_id: str, by_token: str | None = None) -> Unsigned:
        return self._unsigned(self.book.tree.rotate(token_id, new_jti(), by_token=by_token))

    def sweep(self) -> SweepReport:
        expired = self.book.tree.expire_due()
        warned = self.book.tree.warn_expiring(self.settings.expiry_warning_days * 86400)
        abandoned = self.book.refund_abandoned()
        lost = self.leases.settle_lost()
        self.book.prune(settle_window_s=self.settings.settle_window_s, recent_window_s=self.settings.recent_window_s)
        return SweepReport(expired, warned, abandoned, lost)

    def alert_context(self, token_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Meta of the token and each ancestor (for its alert contacts), and its name/team."""
        try:
            n = self.book.node(token_id)
        except LedgerError:  # a token deleted since: only the catch-all channels apply
            return [], {"name": token_id, "team": None}
        return [dict(a.meta) for a in n.path()], {"name": n.name, "team": n.team}

    # ---------------------------------------------------------------- reads
    def token(self, token_id: str, by_token: str | None = None) -> TokenView:
        return self.book.node(token_id, by_token).view()

    def tokens(self, root_id: str | None = None, by_token: str | None = None) -> list[TokenView]:
        return self.book.tree.views(root_id, by_token)

    def usage(
        self,
        *,
        token_id: str | None = None,
        model: str | None = None,
        outcome: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        by_token: str | None = None,
    ) -> list[UsageEvent]:
        if by_token is not None:
            if token_id is None:
                token_id = by_token
            self.book.node(token_id, by_token)  # raises NOT_FOUND outside the acting token's subtree
        return cast(
            "list[UsageEvent]",
            self.store.usage(
                UsageQuery(token_id=token_id, model=model, outcome=outcome, since=since, until=until, limit=limit)
            ),
        )

    def consistency(self) -> Consistency:
        """This shard's book vs its rows in the database, and the conservation invariant."""
        book = {n.id: (n.allocation, n.used, n.status.value) for n in self.book.nodes.values()}
        return Consistency(book, self.store.balances(), self.book.tree.invariant_violations())


def _rows(rows: object) -> list[object]:
    """The rows of a batch; anything but a list or tuple of them is an empty batch."""
    return list(rows) if isinstance(rows, list | tuple) else []


def _malformed(r: object) -> Decision:
    rid = r[0] if isinstance(r, tuple | list) and r and isinstance(r[0], str) else ""
    return Decision(Code.INVALID_REQUEST, rid, message="malformed admission")
