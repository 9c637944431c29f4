"""Dispatcher: what every implementation of `ledger.api.LedgerApi` that routes by name shares.

A subclass implements `invoke(op, args, kwargs)` (and `ainvoke` when it has real async I/O);
it gets one method per operation of `ledger.api.OPS`, generated when the subclass is defined,
and the typed awaitable form `aio(LedgerApi.op, ...)`. No Ray here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

from ledger.api import OPS, LedgerApi

if TYPE_CHECKING:
    _Api = LedgerApi  # the generated methods, as the type checker sees them
else:
    _Api = object

P = ParamSpec("P")
R = TypeVar("R")


class Dispatcher(_Api):
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for op in OPS:  # the subclass mirrors the protocol: one generated method per operation
            if op not in cls.__dict__ and not any(op in vars(b) for b in cls.__mro__[1:-1] if b is not Dispatcher):
                setattr(cls, op, _operation(op))

    def invoke(self, op: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        """Operation `op` of `LedgerApi`, blocking. Raises the ledger's exception tree."""
        raise NotImplementedError

    async def ainvoke(self, op: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        return self.invoke(op, args, kwargs)

    async def aio(self, method: Callable[Concatenate[Any, P], R], *args: P.args, **kwargs: P.kwargs) -> R:
        """`await ledger.aio(LedgerApi.split, parent_id, spec)`: an operation, awaited, typed."""
        return cast(R, await self.ainvoke(method.__name__, args, kwargs))


def _operation(op: str) -> Callable[..., Any]:
    def method(self: Dispatcher, *args: Any, **kwargs: Any) -> Any:
        return self.invoke(op, args, kwargs)

    method.__name__ = method.__qualname__ = op
    method.__doc__ = getattr(LedgerApi, op).__doc__
    return method
