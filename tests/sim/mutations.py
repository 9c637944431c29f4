"""The fixes of issue 17, reverted one at a time, to show the simulator catches each defect.

`apply(name)` patches the real classes and returns an undo. Used by `python -m tests.sim.run
--mutation NAME` and `tests/sim/test_sim.py::test_mutations`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MUTATIONS: dict[str, Callable[[], Callable[[], None]]] = {}


def _patch(obj: Any, name: str, value: Any) -> Callable[[], None]:
    old = obj.__dict__[name]
    setattr(obj, name, value)
    return lambda: setattr(obj, name, old)


def apply(name: str) -> Callable[[], None]:
    return MUTATIONS[name]()


def _close_without_waiting() -> Callable[[], None]:
    """§1.1: close() releases at once, the units of requests in flight back to `free`."""
    from ledger.client.holder import LeaseHolder

    real_close, real_ask = LeaseHolder.close, LeaseHolder._ask

    async def close(self: Any, timeout_s: float = 2.0) -> None:
        await real_close(self, 0.0)

    def ask(self: Any, *args: Any, **kw: Any) -> Any:
        from dataclasses import replace

        return replace(real_ask(self, *args, **kw), in_doubt=0)

    undo = [_patch(LeaseHolder, "close", close), _patch(LeaseHolder, "_ask", ask)]
    return lambda: [u() for u in undo] and None


def _closed_admits_locally() -> Callable[[], None]:
    """§1.2: a closed holder keeps admitting from its cached leases and policies."""
    from ledger.client.holder import LeaseHolder

    real_close = LeaseHolder.close

    async def close(self: Any, timeout_s: float = 2.0) -> None:
        self.closed = True  # no release, no report: the lease stays, admissions go on locally
        for t in self.tasks:
            t.cancel()
        self.closed = False

    del real_close
    return _patch(LeaseHolder, "close", close)


def _resend_applied_again() -> Callable[[], None]:
    """§1.3/1.4: a resent message (give-back, grant, report) is applied on every delivery."""
    from ledger.core.leases import LeaseDesk

    def resent(self: Any, node: Any, lease: Any, a: Any) -> Any:
        lease.seq = a.seq - 1
        return self._one(a, self.clock())

    return _patch(LeaseDesk, "_resent", resent)


def _refund_returns_rate_token() -> Callable[[], None]:
    """§1.5: a refund puts its rate token back into the holder's stash."""
    from ledger.client.holder import LeaseHolder

    real = LeaseHolder.settle

    async def settle(self: Any, s: Any) -> Any:
        h = self.held.get(s.token_id)
        local = h is not None and s.request_id in h.inflight
        code = await real(self, s)
        if local and not s.success and h.rated:
            h.rate_avail += 1
        return code

    return _patch(LeaseHolder, "settle", settle)


def _rate_stash_never_expires() -> Callable[[], None]:
    """§1.5: rate tokens drawn for a lease are banked and spent later."""
    from ledger.client.holder import LeaseHolder

    real = LeaseHolder._apply

    def apply(self: Any, h: Any, *args: Any) -> None:
        real(self, h, *args)
        if h.rate_avail:
            h.rate_until = float("inf")

    return _patch(LeaseHolder, "_apply", apply)


def _reclaim_ignored() -> Callable[[], None]:
    """§1.6: a holder goes on serving a token reclaimed whole from its leases."""
    from ledger.core.leases import TokenPolicy

    real = TokenPolicy.of

    def of(node: Any, version: Any, *table: Any) -> Any:
        from dataclasses import replace

        return replace(real(node, version, *table), reclaimed=False)

    return _patch(TokenPolicy, "of", staticmethod(of))


def _refund_overwrites_settled() -> Callable[[], None]:
    """§1.7: a refunded copy's report overwrites the settled state of the same id."""
    from ledger.core.book import QuotaBook

    def remember(self: Any, request_id: str, token_id: str, state: str, now: float) -> None:
        self.recent.pop(request_id, None)
        self.recent[request_id] = (token_id, state, now)

    return _patch(QuotaBook, "remember", remember)


def _first_copy_settles() -> Callable[[], None]:
    """§1.7: copies of one request at the shard: the first settlement decides (an answered copy
    can be charged 0 when another copy was refunded or refused first)."""
    from dataclasses import replace

    from ledger.core.book import QuotaBook

    real = QuotaBook.settle

    def settle(self: Any, s: Any, now: Any = None) -> Any:
        return real(self, replace(s, copy=""), now)

    return _patch(QuotaBook, "settle", settle)


def _denials_forgotten_on_restart() -> Callable[[], None]:
    """A restarted shard forgets which lease-less denials it recorded: a resend records another row."""
    from ledger.store.repository import Store

    def recent_denials(self: Any, since: float, limit: int) -> list[str]:
        return []

    return _patch(Store, "recent_denials", recent_denials)


def _reload_latest_outcome_wins() -> Callable[[], None]:
    """§1.7 across a restart: the rebuilt book takes a request id's latest row (a copy's refund)
    as its outcome, so a later answered copy is charged again."""
    from ledger.core.book import QuotaBook

    real = QuotaBook.load

    def load(
        self: Any, nodes: Any, pending: Any, recent: Any, idem: Any, last_row_id: int = 0, leases: Any = ()
    ) -> None:
        recent = list(recent)
        real(self, nodes, pending, recent, idem, last_row_id, leases)
        self.recent = {rid: (tid, state, ts) for rid, tid, state, ts in recent}

    return _patch(QuotaBook, "load", load)


def _copy_skips_access_check() -> Callable[[], None]:
    """A copy of a request the holder is serving is admitted without the model and IP checks of
    the policy it has seen since (a narrowing does not apply to it)."""
    import ledger.client.holder as mod

    real, real_check = mod.LeaseHolder.admit, mod.access_refusal

    async def admit(self: Any, a: Any) -> Any:
        h = self.held.get(a.token_id)
        if h is None or a.request_id not in h.inflight:
            return await real(self, a)
        mod.access_refusal = lambda *args: None  # type: ignore[assignment]  # the copy path does not wait
        try:
            return await real(self, a)
        finally:
            mod.access_refusal = real_check

    return _patch(mod.LeaseHolder, "admit", admit)


def _refund_names_no_copy() -> Callable[[], None]:
    """A settlement does not name the delivery it settles (`Decision.copy`): the holder settles its
    oldest copy, so the refund of a copy that got no verdict settles another copy still in service."""
    from dataclasses import replace

    from ledger.client.holder import LeaseHolder

    real = LeaseHolder.settle

    async def settle(self: Any, s: Any) -> Any:
        return await real(self, replace(s, copy=""))

    return _patch(LeaseHolder, "settle", settle)


def _waiting_copy_debits_again() -> Callable[[], None]:
    """Two copies of one request wait for the same lease ask: both are debited, the second
    replacing the first in flight, so the first one's settlement settles the request."""
    from ledger.client.holder import LeaseHolder

    return _patch(LeaseHolder, "_admitted_meanwhile", lambda self, h, a, now: None)


def _copies_forgotten_on_restart() -> Callable[[], None]:
    """Schema 0005's rule: a rebuilt shard does not know which copies of a pending strict admission
    are being served, so a refunded copy un-charges an answered one and its unit is served again."""
    from ledger.store.repository import Store

    real = Store.load

    def load(self: Any, *args: Any, **kw: Any) -> Any:
        out = real(self, *args, **kw)
        for p in out[1]:
            p.copies = None
        return out

    return _patch(Store, "load", load)


def _named_copy_settles_local() -> Callable[[], None]:
    """A settlement that names a strict delivery settles the local admission of the same request
    when there is one (seed 23834: a closing replica's copy got no verdict; its refund un-charged
    the answer served from the lease)."""
    from dataclasses import replace

    from ledger.client.holder import LeaseHolder

    real = LeaseHolder.settle

    async def settle(self: Any, s: Any) -> Any:
        h = self.held.get(s.token_id)
        if s.copy and h is not None and s.request_id in h.inflight:
            s = replace(s, copy="")
        return await real(self, s)

    return _patch(LeaseHolder, "settle", settle)


def _idle_release_takes_inflight() -> Callable[[], None]:
    """A round that chose to release an idle lease sends the release even when a request was
    admitted from it meanwhile: its units go as in doubt, and its answer is never charged."""
    from ledger.client.holder import LeaseHolder

    return _patch(LeaseHolder, "_release_waits", lambda self, h: False)


def _strict_copy_admitted_locally() -> Callable[[], None]:
    """A redelivered copy of a request this replica admitted at the shard (and has not settled) is
    admitted again from the lease: a second debit, under a policy that may predate a rotation."""
    from ledger.client.holder import LeaseHolder

    return _patch(LeaseHolder, "_strict_copy_pending", lambda self, request_id: False)


MUTATIONS.update(
    {
        "strict_copy_admitted_locally": _strict_copy_admitted_locally,
        "idle_release_takes_inflight": _idle_release_takes_inflight,
        "named_copy_settles_local": _named_copy_settles_local,
        "copies_forgotten_on_restart": _copies_forgotten_on_restart,
        "refund_names_no_copy": _refund_names_no_copy,
        "waiting_copy_debits_again": _waiting_copy_debits_again,
        "close_without_waiting": _close_without_waiting,
        "closed_admits_locally": _closed_admits_locally,
        "resend_applied_again": _resend_applied_again,
        "refund_returns_rate_token": _refund_returns_rate_token,
        "rate_stash_never_expires": _rate_stash_never_expires,
        "reclaim_ignored": _reclaim_ignored,
        "refund_overwrites_settled": _refund_overwrites_settled,
        "denials_forgotten_on_restart": _denials_forgotten_on_restart,
        "first_copy_settles": _first_copy_settles,
        "reload_latest_outcome_wins": _reload_latest_outcome_wins,
        "copy_skips_access_check": _copy_skips_access_check,
    }
)
