"""The ledger's Ray actors: shells that check the caller, then forward to `ledger.shard.runtime`.

    CoordinatorActor  (one, named `<name>`)            key ring, whole-database reads, periodic jobs
    ShardActor, N     (named `<name>-shard-<i>`)       the only writers of quota state

Both are detached and restart on failure; `ledger.client.service.launch` creates them (one launch step),
everyone else attaches. They are named, so any driver of the cluster can look them up. Ray makes
every method of an actor class callable by name, private helpers included, and gives each actor
`__ray_call__`, which runs a caller's function inside it. So these classes hold nothing but the
methods below, each of which refuses a caller without the ledger's capability (`ledger.core.capability`,
DESIGN §3d) before it does anything, `__ray_call__` included. The only method that answers without
the capability is `CoordinatorActor.describe`, with the shard count alone.
"""

from __future__ import annotations

from typing import Any

import ray

from ledger.core.capability import Capability, require
from ledger.core.codes import Code
from ledger.core.entities import Decision
from ledger.core.errors import OperationRefused
from ledger.core.leases import Version, WatchReply
from ledger.core.ops import Call
from ledger.core.settings import LedgerSettings
from ledger.shard.runtime import CoordinatorRuntime, ShardRuntime, shard_name

__all__ = ["CoordinatorActor", "ShardActor", "shard_name"]


def _checked_ray_call(self: Any, fn: Any, *args: Any, capability: Capability | None = None, **kwargs: Any) -> Any:
    """Ray's `__ray_call__` (run `fn(actor, *args, **kwargs)` inside the actor), for the capability's
    holder only (the tests' fault injection): anyone else is refused before `fn` runs."""
    require(self._capability, capability, "__ray_call__ (running a caller's function in a ledger actor)")
    return fn(self, *args, **kwargs)


def _once(actor: object) -> None:
    """`__init__` is a method too: called again by name, it would replace the capability."""
    if "_run" in vars(actor):
        raise OperationRefused("a ledger actor is initialised once", Code.FORBIDDEN)


class _Checked:
    """Base of the ledger's actor classes: the subclass Ray makes of each (`ray.actor._modify_class`
    adds `__ray_ready__`, `__ray_call__`, `__ray_terminate__`) gets a `__ray_call__` that needs the
    capability."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__ray_call__ = _checked_ray_call  # type: ignore[attr-defined]


@ray.remote(num_cpus=0)
class ShardActor(_Checked):
    """One ledger shard. Create through `ledger.client.service.launch`, never directly."""

    def __init__(self, settings: LedgerSettings, index: int, count: int, capability: Capability) -> None:
        _once(self)
        self._capability = capability
        self._run = ShardRuntime(settings, index, count, capability)

    async def admit_packed(self, blob: bytes, capability: Capability | None = None) -> bytes:
        """Admissions (`Admission.row`), both sides pickled as one bytes object."""
        require(self._capability, capability, "admit_packed")  # before unpickling the caller's bytes
        return await self._run.admit_packed(blob)

    async def admit_batch(self, rows: list[Any], capability: Capability | None = None) -> list[Decision]:
        require(self._capability, capability, "admit_batch")
        return await self._run.admit_batch(rows)

    async def settle_batch(self, rows: list[Any], capability: Capability | None = None) -> list[str]:
        require(self._capability, capability, "settle_batch")
        return await self._run.settle_batch(rows)

    async def lease_sync(self, blob: bytes, capability: Capability | None = None) -> bytes:
        require(self._capability, capability, "lease_sync")
        return await self._run.lease_sync(blob)

    async def lease_watch(
        self, since: Version, tokens: list[str], timeout_s: float, capability: Capability | None = None
    ) -> WatchReply:
        require(self._capability, capability, "lease_watch")
        return await self._run.lease_watch(since, tokens, timeout_s)

    async def call(self, op: Call[Any], token_jti: str | None = None, capability: Capability | None = None) -> Any:
        """One operation of `ledger.core.ops`. Its caller holds the capability: an admin, or a serving
        replica acting for a token (`op.by_token`) whose credential it verified."""
        require(self._capability, capability, "a ledger operation")
        return await self._run.call(op, token_jti)

    async def alert_context(
        self, token_id: str, capability: Capability | None = None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        require(self._capability, capability, "alert_context")
        return await self._run.alert_context(token_id)

    async def stats(self, capability: Capability | None = None) -> dict[str, Any]:
        require(self._capability, capability, "stats")
        return await self._run.stats()


@ray.remote(num_cpus=0)
class CoordinatorActor(_Checked):
    """The ledger coordinator. Create through `ledger.client.service.launch`, never directly."""

    def __init__(self, settings: LedgerSettings, shards: int, capability: Capability) -> None:
        _once(self)
        self._capability = capability
        self._run = CoordinatorRuntime(settings, shards, capability)

    def describe(self, capability: Capability | None = None) -> dict[str, Any]:
        """The shard count; with the capability, also the settings (they may name a database password)."""
        return self._run.describe(with_settings=self._capability.admits(capability))

    async def call(self, op: Call[Any], token_jti: str | None = None, capability: Capability | None = None) -> Any:
        require(self._capability, capability, "a ledger operation")
        return await self._run.call(op, token_jti)

    async def sign(self, claims: dict[str, Any], capability: Capability | None = None) -> str:
        """The credential of claims a shard minted (shards hold the capability)."""
        require(self._capability, capability, "sign")
        return await self._run.sign(claims)

    async def root_of(self, token_id: str, capability: Capability | None = None) -> str | None:
        require(self._capability, capability, "root_of")
        return await self._run.root_of(token_id)
