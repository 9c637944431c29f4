"""LedgerClient: the one facade over the ledger actor, for the gateway, the CLI and the console.

Admissions and settlements are micro-batched: concurrent `await admit(...)` calls in one
process share one actor call (at most `max_inflight` batches in flight), so throughput
does not pay one Ray round trip per request. Admin operations are plain calls that raise
`OperationRefused` (with a `Code`) or `LedgerUnavailable`.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Iterable, Sequence
from typing import Any, cast

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError, RayTaskError

from ledger.actor import LedgerActor, unavailable
from ledger.codes import Code
from ledger.entities import Admission, Decision, Settlement, TokenSpec, TokenView
from ledger.errors import LedgerError, LedgerUnavailable, OperationRefused
from ledger.settings import LedgerSettings

RETRY_DELAYS_S = (0.05, 0.1, 0.2, 0.5, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0)


class _Batcher:
    """Collects items from concurrent coroutines of ONE event loop and sends them in batches."""

    def __init__(self, send: Any, max_batch: int, max_inflight: int) -> None:
        self.send = send
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self.inflight = 0

    async def submit(self, row: tuple[Any, ...]) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.append((row, fut))
        if self.inflight < self.max_inflight:
            self.inflight += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self.queue:
                batch = self.queue[: self.max_batch]
                del self.queue[: self.max_batch]
                try:
                    results = await self.send([r for r, _ in batch])
                except BaseException as exc:  # deliver, never lose a waiter
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), res in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(res)
        finally:
            self.inflight -= 1


class LedgerClient:
    def __init__(self, actor: Any, *, max_batch: int = 4096, max_inflight: int = 2) -> None:
        self.actor = actor
        self._admit = _Batcher(self._send_admissions, max_batch, max_inflight)
        self._settle = _Batcher(self._send_settlements, max_batch, max_inflight)

    @classmethod
    def connect(cls, settings: LedgerSettings, *, create: bool = True, **kw: Any) -> LedgerClient:
        """Attach to the named ledger actor, starting it (detached, auto-restarting) if absent."""
        settings = settings.resolved()
        if create:
            actor = LedgerActor.options(  # type: ignore[attr-defined]
                name=settings.actor_name,
                namespace=settings.namespace,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=-1,
                max_task_retries=0,
                max_concurrency=10_000,
                resources=dict(settings.actor_resources),
            ).remote(settings)
        else:
            try:
                actor = ray.get_actor(settings.actor_name, namespace=settings.namespace)
            except ValueError:
                raise LedgerUnavailable(
                    f"no ledger actor {settings.actor_name!r} in namespace "
                    f"{settings.namespace!r}: is the service running?"
                ) from None
        return cls(actor, **kw)

    # ---------------------------------------------------------------- hot path
    async def admit(self, a: Admission) -> Decision:
        """One atomic admission; batched with concurrent callers; durable when it returns."""
        decision: Decision = await self._admit.submit(a.row())
        return decision

    async def settle(self, s: Settlement) -> Code:
        return Code(await self._settle.submit(s.row()))

    async def _send_admissions(self, rows: list[tuple[Any, ...]]) -> list[Any]:
        try:
            blob = await self._retrying(self.actor.admit_packed, pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL))
            decisions: list[Decision] = pickle.loads(blob)
            return decisions
        except RayError:
            return [unavailable(r[0], "ledger actor unavailable") for r in rows]

    async def _send_settlements(self, rows: list[tuple[Any, ...]]) -> list[Any]:
        try:
            codes: list[str] = await self._retrying(self.actor.settle_batch, rows)
            return codes
        except RayError:
            return [Code.LEDGER_UNAVAILABLE.value] * len(rows)

    @staticmethod
    async def _retrying(method: Any, payload: Any) -> Any:
        """Resend the same rows while the actor restarts: request ids make this exactly-once."""
        for delay in (*RETRY_DELAYS_S, None):
            try:
                return await method.remote(payload)
            except (RayActorError, ActorUnavailableError):  # restarting: resend; a RayTaskError is final
                if delay is None:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def admit_sync(self, items: Sequence[Admission]) -> list[Decision]:
        """Blocking batch admission, for scripts and tests outside an event loop."""
        decisions: list[Decision] = ray.get(self.actor.admit_batch.remote([a.row() for a in items]))
        return decisions

    def settle_sync(self, items: Sequence[Settlement]) -> list[Code]:
        codes: list[str] = ray.get(self.actor.settle_batch.remote([s.row() for s in items]))
        return [Code(c) for c in codes]

    # ---------------------------------------------------------------- admin + reads
    def call(self, op: str, **kwargs: Any) -> Any:
        """An admin operation or read by name. Token-scoped calls pass `actor` (token id) AND
        `actor_jti` (its current credential id): the ledger refuses stale or revoked actors."""
        try:
            reply: tuple[Any, ...] = ray.get(self.actor.call.remote(op, kwargs))
        except RayError as exc:
            raise LedgerUnavailable(f"ledger actor unavailable: {type(exc).__name__}") from exc
        return unwrap(reply)

    async def acall(self, op: str, **kwargs: Any) -> Any:
        return unwrap(await self.acall_reply(op, **kwargs))

    async def acall_reply(self, op: str, **kwargs: Any) -> tuple[Any, ...]:
        """The raw reply tuple: for relaying across another process without losing the error code."""
        try:
            reply: tuple[Any, ...] = await self.actor.call.remote(op, kwargs)
        except RayError as exc:
            return ("err", Code.LEDGER_UNAVAILABLE.value, f"ledger actor unavailable: {type(exc).__name__}")
        return reply

    def create_package(self, spec: TokenSpec) -> dict[str, Any]:
        """Returns {"token": TokenView, "credential": str}; the credential is shown once."""
        return cast("dict[str, Any]", self.call("create_package", spec=spec))

    def split(self, parent_id: str, spec: TokenSpec) -> dict[str, Any]:
        return cast("dict[str, Any]", self.call("split", parent_id=parent_id, spec=spec))

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
        return cast(
            "TokenView",
            self.call(
                "update_limits",
                token_id=token_id,
                expires_at=expires_at,
                models=_opt_list(models),
                ips=_opt_list(ips),
                rate=rate,
                actor=actor,
            ),
        )

    def top_up(self, token_id: str, units: int) -> TokenView:
        return cast("TokenView", self.call("top_up", token_id=token_id, units=units))

    def revoke(self, token_id: str) -> dict[str, Any]:
        return cast("dict[str, Any]", self.call("revoke", token_id=token_id))

    def reclaim(self, token_id: str, units: int | None = None) -> dict[str, Any]:
        return cast("dict[str, Any]", self.call("reclaim", token_id=token_id, units=units))

    def rotate(self, token_id: str) -> dict[str, Any]:
        return cast("dict[str, Any]", self.call("rotate", token_id=token_id))

    def token(self, token_id: str) -> TokenView:
        return cast("TokenView", self.call("token", token_id=token_id))

    def tokens(self, root_id: str | None = None) -> list[TokenView]:
        return cast("list[TokenView]", self.call("tokens", root_id=root_id))

    def usage(self, **filters: Any) -> list[dict[str, Any]]:
        return cast("list[dict[str, Any]]", self.call("usage", **filters))

    def admin_events(self, token_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        return cast("list[dict[str, Any]]", self.call("admin_events", token_id=token_id, limit=limit))

    def alerts(self, limit: int = 1000) -> list[dict[str, Any]]:
        return cast("list[dict[str, Any]]", self.call("alerts", limit=limit))

    # ---------------------------------------------------------------- periodic jobs, on demand (admin)
    def deliver_alerts(self) -> dict[str, int]:
        """Run one alert delivery pass now (the actor also runs one every sweep interval)."""
        return cast("dict[str, int]", self._direct(self.actor.deliver_alerts))

    def prune_audit(self) -> dict[str, int]:
        """Delete audit rows older than the retention window now; returns rows deleted per table."""
        return cast("dict[str, int]", self._direct(self.actor.prune_audit))

    def acknowledge_alert(self, alert_id: int, by: str) -> bool:
        return cast(bool, self._direct(self.actor.acknowledge_alert, alert_id, by))

    @staticmethod
    def _direct(method: Any, *args: Any) -> Any:
        try:
            return ray.get(method.remote(*args))
        except RayTaskError as exc:
            if isinstance(exc.cause, LedgerError):
                raise exc.cause from None
            raise LedgerUnavailable(f"ledger actor failed: {type(exc.cause).__name__}") from exc
        except RayError as exc:
            raise LedgerUnavailable(f"ledger actor unavailable: {type(exc).__name__}") from exc

    def public_keys(self) -> dict[str, bytes]:
        return cast("dict[str, bytes]", self.call("public_keys"))

    def rotate_keys(self) -> dict[str, Any]:
        return cast("dict[str, Any]", self.call("rotate_keys"))

    def issue_admin(self, name: str, ttl_s: float = 12 * 3600.0) -> str:
        return cast("str", self.call("issue_admin", name=name, ttl_s=ttl_s))

    def sweep(self) -> dict[str, Any]:
        return cast("dict[str, Any]", self.call("sweep"))

    def consistency(self) -> dict[str, Any]:
        return cast("dict[str, Any]", self.call("consistency"))

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = ray.get(self.actor.stats.remote())
        return stats


def unwrap(reply: tuple[Any, ...]) -> Any:
    """An actor reply ("ok", value) | ("err", code, message) as a value or a typed exception."""
    if reply[0] == "ok":
        return reply[1]
    code = Code(reply[1])
    if code is Code.LEDGER_UNAVAILABLE:
        raise LedgerUnavailable(reply[2])
    raise OperationRefused(reply[2], code)


def _opt_list(values: Iterable[str] | None) -> list[str] | None:
    return None if values is None else list(values)
