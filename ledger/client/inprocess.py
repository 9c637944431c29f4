"""InProcessLedger: the typed ledger API (`ledger.core.api.LedgerApi`) in one process, without Ray.

The same shard cores, coordinator core, routing and signing as the running service, each
call committed before it returns. It is the fake that unit tests of the gate, the ingress and
the console use (`ledger.client.fake.FakeLedger`), and a way to script a ledger without a cluster.
Single-threaded: one call at a time (tests, scripts).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import time
from collections.abc import Callable, Sequence
from operator import methodcaller
from typing import Any, TypeVar

from ledger.core import ops
from ledger.core.api import LedgerApi
from ledger.core.codes import Code
from ledger.core.entities import Admission, Decision, Settlement
from ledger.core.errors import OperationRefused
from ledger.core.leases import LeaseAsk, LeaseGrant, Version, WatchReply
from ledger.core.results import Issued, Unsigned
from ledger.core.settings import LedgerSettings
from ledger.core.shards import ShardMap, ShardScope
from ledger.shard.coordinator import AlertContext, CoordinatorCore
from ledger.shard.core import ShardCore

R = TypeVar("R")


class InProcessLedger(LedgerApi):
    """Implements `LedgerApi` in one process: each call runs where its record's routing says."""

    def __init__(self, settings: LedgerSettings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.coordinator = CoordinatorCore(settings, clock, context_of=self._context)
        self.coordinator.start()
        self.shard_map = ShardMap(settings.shards)
        self.shards = [ShardCore(settings, clock, ShardScope(i, settings.shards)) for i in range(settings.shards)]
        for shard in self.shards:
            shard.start()
        self.acting: tuple[str, str, str] | None = None
        self._turn = itertools.count()

    def acting_as(self, token_id: str, jti: str, root_id: str) -> InProcessLedger:
        clone = copy.copy(self)
        clone.acting = (token_id, jti, root_id)
        return clone

    def _context(self, token_id: str) -> AlertContext:
        return self._shard_of(token_id).alert_context(token_id)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
        self.coordinator.close()

    # ---------------------------------------------------------------- hot path
    async def admit(self, a: Admission) -> Decision:
        return self.admit_sync([a])[0]

    async def settle(self, s: Settlement) -> Code:
        return self.settle_sync([s])[0]

    def admit_sync(self, items: Sequence[Admission]) -> list[Decision]:
        out: list[Decision] = []
        for a in items:
            shard = self.shards[self.shard_map.of_root(a.root_id)] if a.root_id else self._shard_of(a.token_id)
            out.append(self._durably(shard, methodcaller("admit_rows", [a.row()]))[0])
        return out

    def settle_sync(self, items: Sequence[Settlement]) -> list[Code]:
        out: list[Code] = []
        for x in items:
            shard = self.shards[self.shard_map.of_root(x.root_id)] if x.root_id else self._shard_of(x.token_id)
            out.append(Code(self._durably(shard, methodcaller("settle_rows", [x.row()]))[0]))
        return out

    # ---------------------------------------------------------------- leases (ledger.client.holder.LeaseTransport)
    @property
    def shard_count(self) -> int:
        return self.shard_map.count

    def shard_of(self, root_id: str) -> int:
        return self.shard_map.of_root(root_id)

    async def lease_sync(self, shard: int, asks: list[LeaseAsk]) -> list[LeaseGrant]:
        core = self.shards[shard]
        core.leases.heard(asks)
        grants: list[LeaseGrant] = self._durably(core, methodcaller("lease_sync", asks))
        return grants

    async def lease_watch(self, shard: int, since: Version, tokens: list[str], timeout_s: float) -> WatchReply:
        """Polls (every 20 ms) instead of waiting on the commit: one process, no actor to wake it."""
        core = self.shards[shard]
        deadline = time.monotonic() + timeout_s
        while True:
            reply = core.lease_watch(since, tokens) if core.ready else WatchReply(since)
            if reply.version != since or reply.policies or time.monotonic() >= deadline:
                return reply
            await asyncio.sleep(0.02)

    @staticmethod
    def _durably(shard: ShardCore, op: Callable[[ShardCore], Any]) -> Any:
        """Apply and commit, as the shard actor's flusher does: a failed commit drops the change
        from the book (rebuilt from the database), so no answer outlives its write."""
        if not shard.ready:
            shard.start()
        try:
            value = op(shard)
            shard.commit()
        except OperationRefused:
            raise
        except Exception:
            shard.discard()
            raise
        return value

    def _shard_of(self, root_or_token: str) -> ShardCore:
        if self.shard_map.count == 1:  # one shard owns every package: no lookup
            return self.shards[0]
        root = self.coordinator.root_of(root_or_token) or root_or_token
        return self.shards[self.shard_map.of_root(root)]

    # ---------------------------------------------------------------- the typed API
    def call(self, op: ops.Call[R]) -> R:
        if self.acting is not None:
            op = op.as_token(self.acting[0])
        acting_root = self.acting[2] if self.acting else None
        key = ops.routing_key(op, self.shard_map, self.acting is not None)
        to = ops.targets(
            op, self.shard_map, acting_root, self.coordinator.root_of(key) if key else None, next(self._turn)
        )
        return ops.answer(op, [self._run(t, op) for t in to], to)

    def _run(self, target: int | None, op: ops.Call[R]) -> R:
        if target is None:
            return op.on_coordinator(self.coordinator)
        shard = self.shards[target]
        jti = self.acting[1] if self.acting is not None else None

        def run(s: ShardCore) -> R | Unsigned:
            s.authenticate(op.acting, jti)  # as the shard actor: an actor needs its credential id
            return op.on_shard(s)

        value = self._durably(shard, run)
        if isinstance(value, Unsigned):
            return Issued(value.token, self.coordinator.sign(value.claims))  # type: ignore[return-value]
        return value  # type: ignore[no-any-return]
