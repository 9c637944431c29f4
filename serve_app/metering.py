"""Meter: the life of one paid request's units inside an ingress replica (DESIGN §1 steps 3 and 5).

    admit ──► the replica's LeaseHolder (local from its lease; synchronous at the shard for
              Idempotency-Key requests, strict packages and small balances)
    settle ─► success keeps the units; a detector failure, a timeout or a caller that went away
              gives them back (to the lease, or refunds them at the shard)

Never charged without an answer: every admitted request ends settled or refunded, also when Serve
cancels the call (the client hung up or timed out), and a settlement the shard could not take is
retried in the background until it is durable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

from ledger import Admission, Code, Decision, LeaseHolder, LedgerError, Settlement

log = logging.getLogger(__name__)
SETTLE_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)  # then every 5 s
SETTLE_GIVE_UP_S = 3600.0  # the book keeps an unsettled admission this long (settle_window_s)


class Meter:
    """Plain object, one per replica, around the replica's `LeaseHolder`."""

    def __init__(self, holder: LeaseHolder) -> None:
        self.holder = holder
        self._pending: set[asyncio.Future[Any]] = set()  # settlements in flight

    async def admit(self, admission: Admission) -> Decision:
        """The verdict. If the caller is cancelled meanwhile, the admission may still be granted:
        then it is given back as soon as the verdict arrives."""
        task = asyncio.ensure_future(self.holder.admit(admission))
        try:
            d = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(partial(self._refund_if_admitted, admission))
            raise
        except LedgerError:
            # no verdict, but the shard may have committed the debit before its answer was lost:
            # refunded (a refund of nothing is NOT_FOUND), so no charge without an answer
            self.settle_later(refund(admission))
            raise
        if d.code is Code.LEDGER_UNAVAILABLE:
            # the same, answered rather than raised: a resend whose commit failed, after an earlier
            # delivery of it that may have committed (found by the simulator, seed 1537)
            self.settle_later(refund(admission, d))
        return d

    def _refund_if_admitted(self, admission: Admission, task: asyncio.Future[Decision]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        if task.result().code is Code.OK:
            self.settle_later(refund(admission, task.result()))

    async def settle_soon(self, settlement: Settlement, wait_s: float = 2.0) -> None:
        """Settle, waiting up to `wait_s` for it to be durable; past that it goes on in the
        background until it is. Shielded: a cancelled caller does not stop it."""
        task = self.settle_later(settlement)
        try:
            await asyncio.wait_for(asyncio.shield(task), wait_s)
        except TimeoutError:
            log.warning("settlement of %s not durable yet; retrying in the background", settlement.request_id)

    def refusal(self, admission: Admission) -> tuple[Code, str] | None:
        """The lease holder's cached verdict on the admission's token now (`LeaseHolder.refusal`)."""
        return self.holder.refusal(admission.token_id, admission.jti)

    def settle_later(self, settlement: Settlement) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(self._settle_durably(settlement))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _settle_durably(self, settlement: Settlement) -> Code:
        """Retry while the ledger is unavailable, until the settlement is durable (or the book has
        forgotten the admission, after `SETTLE_GIVE_UP_S`). A local admission settles at once."""
        deadline = time.monotonic() + SETTLE_GIVE_UP_S
        attempt = 0
        while True:
            try:
                code = await self.holder.settle(settlement)
            except Exception as exc:
                log.warning("settlement of %s failed: %r", settlement.request_id, exc)
                code = Code.LEDGER_UNAVAILABLE
            if code is not Code.LEDGER_UNAVAILABLE:
                return code
            if time.monotonic() > deadline:
                log.error("settlement of %s not recorded after %.0fs", settlement.request_id, SETTLE_GIVE_UP_S)
                return code
            await asyncio.sleep(SETTLE_BACKOFF_S[min(attempt, len(SETTLE_BACKOFF_S) - 1)])
            attempt += 1


def refund(admission: Admission, decision: Decision | None = None) -> Settlement:
    """Give an admission's units back; `decision` names the delivery it was (`Decision.copy`)."""
    copy = decision.copy if decision is not None else ""
    return Settlement(admission.request_id, admission.token_id, success=False, root_id=admission.root_id, copy=copy)
