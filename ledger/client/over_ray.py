"""LedgerClient: the typed ledger API (`ledger.core.api.LedgerApi`) over Ray, for the gateway, the CLI
and the console. Attach with `ledger.client.service.attach(settings)`; only `launch` creates actors.

Routing: a call goes to the shard that owns its package (the credential's `pkg` claim, an
admission's `root_id`, or the token's root looked up once at the coordinator and cached: a
token never changes package), to every shard (merged), or to the coordinator (`ledger.core.ops`).

Admissions and settlements are micro-batched per shard: concurrent `await admit(...)` calls in
one process share one actor call (at most `max_inflight` batches in flight per shard), so
throughput does not pay one Ray round trip per request. Everything else raises the ledger's
exception tree: `OperationRefused` (with a `Code`) or `LedgerUnavailable`.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import time
from collections.abc import Sequence
from typing import Any, TypeVar, cast

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError, RayTaskError

from ledger.client.batcher import Batcher
from ledger.core import ops, wire
from ledger.core.api import LedgerApi
from ledger.core.capability import Capability
from ledger.core.codes import Code
from ledger.core.entities import Admission, Decision, Settlement
from ledger.core.errors import LedgerError, LedgerUnavailable
from ledger.core.leases import LeaseAsk, LeaseGrant, Version, WatchReply
from ledger.core.shards import ShardMap
from ledger.shard.flusher import unavailable

R = TypeVar("R")
RETRY_DELAYS_S = (0.05, 0.1, 0.2, 0.5, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0)


class _Shard:
    """One shard's actor handle and its two batchers."""

    def __init__(self, actor: Any, max_batch: int, max_inflight: int, capability: Capability | None) -> None:
        self.actor = actor
        self.capability = capability
        self.admit = Batcher(self._send_admissions, max_batch, max_inflight)
        self.settle = Batcher(self._send_settlements, max_batch, max_inflight)

    async def _send_admissions(self, rows: list[tuple[Any, ...]]) -> list[Any]:
        try:
            blob = await _retrying(self.actor.admit_packed, wire.pack(rows), self.capability)
            decisions: list[Decision] = wire.unpack(blob)
            return decisions
        except RayError:
            return [unavailable(r[0], "ledger shard unavailable") for r in rows]

    async def _send_settlements(self, rows: list[tuple[Any, ...]]) -> list[Any]:
        try:
            codes: list[str] = await _retrying(self.actor.settle_batch, wire.flat(rows), self.capability)
            return codes
        except RayError:
            return [Code.LEDGER_UNAVAILABLE.value] * len(rows)


async def _retrying(method: Any, *payload: Any) -> Any:
    """Resend the same rows while the shard restarts: request ids make this exactly-once."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return await method.remote(*payload)
        except (RayActorError, ActorUnavailableError):  # restarting: resend; a RayTaskError is final
            if delay is None:
                raise
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


class LedgerClient(LedgerApi):
    """Implements `LedgerApi` over Ray: each call goes where its record's routing says."""

    def __init__(
        self,
        coordinator: Any,
        shards: Sequence[Any],
        *,
        max_batch: int = 4096,
        max_inflight: int = 2,
        acting: tuple[str, str, str] | None = None,
        roots: dict[str, str] | None = None,
        capability: Capability | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.capability = capability  # every actor call presents it (ledger.core.capability)
        self.shard_map = ShardMap(len(shards))
        self.shards = [s if isinstance(s, _Shard) else _Shard(s, max_batch, max_inflight, capability) for s in shards]
        self.acting = acting  # (token id, credential id, root id) of a token acting on its subtree
        self.roots = {} if roots is None else roots  # token id -> root id (never changes)
        self._next = itertools.count()

    def acting_as(self, token_id: str, jti: str, root_id: str) -> LedgerClient:
        """This client for calls a token makes on its own subtree (from its verified credential): the
        shard refuses it unless `jti` is the token's current credential on a live path."""
        clone = copy.copy(self)  # shares the shards' batchers and the root cache
        clone.acting = (token_id, jti, root_id)
        return clone

    @property
    def shard_actors(self) -> list[Any]:
        return [s.actor for s in self.shards]

    # ---------------------------------------------------------------- leases (ledger.client.holder.LeaseTransport)
    @property
    def shard_count(self) -> int:
        return self.shard_map.count

    def shard_of(self, root_id: str) -> int:
        return self.shard_map.of_root(root_id)

    async def lease_sync(self, shard: int, asks: list[LeaseAsk]) -> list[LeaseGrant]:
        """One call for many holders' asks; raises LedgerUnavailable when the shard cannot be reached
        (its restart is waited for, as for admissions)."""
        try:
            blob = await _retrying(self.shards[shard].actor.lease_sync, wire.pack(asks), self.capability)
        except RayError as exc:
            raise LedgerUnavailable(f"ledger shard unavailable: {type(exc).__name__}") from None
        grants: list[LeaseGrant] = wire.unpack(blob)
        return grants

    async def lease_watch(self, shard: int, since: Version, tokens: list[str], timeout_s: float) -> WatchReply:
        try:
            reply: WatchReply = await self.shards[shard].actor.lease_watch.remote(
                since, tokens, timeout_s, self.capability
            )
        except RayError as exc:
            raise LedgerUnavailable(f"ledger shard unavailable: {type(exc).__name__}") from None
        return reply

    # ---------------------------------------------------------------- hot path
    async def admit(self, a: Admission) -> Decision:
        """One atomic admission; batched with concurrent callers; durable when it returns."""
        try:
            root = a.root_id or await self._aroot(a.token_id)
        except LedgerUnavailable as exc:
            return unavailable(a.request_id, exc.message)
        if root is None:
            return Decision(Code.INVALID_TOKEN, a.request_id, a.token_id, message="unknown token")
        decision: Decision = await self.shards[self.shard_map.of_root(root)].admit.submit(a.row())
        return decision

    async def settle(self, s: Settlement) -> Code:
        try:
            root = s.root_id or await self._aroot(s.token_id)
        except LedgerUnavailable:
            return Code.LEDGER_UNAVAILABLE
        if root is None:
            return Code.NOT_FOUND
        return Code(await self.shards[self.shard_map.of_root(root)].settle.submit(s.row()))

    def admit_sync(self, items: Sequence[Admission]) -> list[Decision]:
        """Blocking admissions, for scripts and tests outside an event loop (one call per shard)."""
        out: list[Decision | None] = [None] * len(items)
        for index, part in self._by_shard(items).items():
            rows = [items[i].row() for i in part]
            decisions = _get(self.shards[index].actor.admit_batch.remote(wire.flat(rows), self.capability))
            for i, d in zip(part, decisions, strict=True):
                out[i] = d
        return cast("list[Decision]", out)

    def settle_sync(self, items: Sequence[Settlement]) -> list[Code]:
        out: list[Code] = [Code.NOT_FOUND] * len(items)
        for index, part in self._by_shard(items).items():
            rows = [items[i].row() for i in part]
            codes = _get(self.shards[index].actor.settle_batch.remote(wire.flat(rows), self.capability))
            for i, c in zip(part, codes, strict=True):
                out[i] = Code(c)
        return out

    def _by_shard(self, items: Sequence[Admission | Settlement]) -> dict[int, list[int]]:
        parts: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            root = it.root_id or self._root(it.token_id) or ""
            parts.setdefault(self.shard_map.of_root(root), []).append(i)
        return parts

    # ---------------------------------------------------------------- the typed API
    def call(self, op: ops.Call[R]) -> R:
        """One operation, blocking. Raises the ledger's exception tree."""
        op = self._scoped(op)
        key = ops.routing_key(op, self.shard_map, self.acting is not None)
        to = ops.targets(op, self.shard_map, self._acting_root, self._root(key) if key else None, next(self._next))
        try:
            parts: list[R] = ray.get([self._send(t, op) for t in to])
        except RayError as exc:
            raise _unwrapped(exc) from None
        return ops.answer(op, parts, to)

    async def acall(self, op: ops.Call[R]) -> R:
        op = self._scoped(op)
        key = ops.routing_key(op, self.shard_map, self.acting is not None)
        to = ops.targets(
            op, self.shard_map, self._acting_root, await self._aroot(key) if key else None, next(self._next)
        )
        try:
            parts: list[R] = await asyncio.gather(*[self._send(t, op) for t in to])
        except RayError as exc:
            raise _unwrapped(exc) from None
        return ops.answer(op, parts, to)

    def _scoped(self, op: ops.Call[R]) -> ops.Call[R]:
        return op.as_token(self.acting[0]) if self.acting is not None else op

    def stats(self) -> list[dict[str, Any]]:
        """Each shard's counters (pid, node, epoch, commits, tokens, ...), waiting while one restarts."""
        out: list[dict[str, Any]] = []
        for shard in self.shards:
            for delay in (*RETRY_DELAYS_S, None):
                try:
                    out.append(ray.get(shard.actor.stats.remote(self.capability)))
                    break
                except (RayActorError, ActorUnavailableError) as exc:
                    if delay is None:
                        raise _unwrapped(exc) from None
                    time.sleep(delay)
                except RayError as exc:
                    raise _unwrapped(exc) from None
        return out

    # ---------------------------------------------------------------- routing
    @property
    def _acting_root(self) -> str | None:
        return self.acting[2] if self.acting is not None else None

    def _send(self, target: int | None, op: ops.Call[Any]) -> Any:
        jti = self.acting[1] if self.acting is not None else None
        actor = self.coordinator if target is None else self.shards[target].actor
        return actor.call.remote(op, jti, self.capability)

    def _root(self, token_id: str) -> str | None:
        if self.shard_map.count == 1:
            return token_id  # one shard owns every package
        root = self.roots.get(token_id)
        if root is None:
            try:
                root = ray.get(self.coordinator.root_of.remote(token_id, self.capability))
            except RayError as exc:
                raise LedgerUnavailable(f"ledger coordinator unavailable: {type(exc).__name__}") from exc
            if root is not None:
                self.roots[token_id] = root
        return root

    async def _aroot(self, token_id: str) -> str | None:
        if self.shard_map.count == 1:
            return token_id  # one shard owns every package
        root = self.roots.get(token_id)
        if root is None:
            try:
                root = await self.coordinator.root_of.remote(token_id, self.capability)
            except RayError as exc:
                raise LedgerUnavailable(f"ledger coordinator unavailable: {type(exc).__name__}") from exc
            if root is not None:
                self.roots[token_id] = root
        return root


def _get(ref: Any) -> Any:
    try:
        return ray.get(ref)
    except RayError as exc:
        raise _unwrapped(exc) from None


def _unwrapped(exc: RayError) -> LedgerError:
    """A Ray error as the ledger's exception tree."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, LedgerError):
        return exc.cause
    if isinstance(exc, RayTaskError):
        return LedgerUnavailable(f"internal error in the ledger: {type(exc.cause).__name__}")
    return LedgerUnavailable(f"ledger actor unavailable: {type(exc).__name__}")
