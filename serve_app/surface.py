"""The closed request surface of a deployment (DESIGN §3d): the methods a request may name.

Serve resolves a request's method by name on the replica's object (`UserCallableWrapper.
get_user_method_info` does `getattr(self._callable, name)`, Ray 2.60 `serve/_private/replica.py`).
A handle caller chooses that name (`handle.options(method_name=...)`), so without this module it
could call any attribute: `__del__` (closing the replica's lease holder), `__init__`, `__setattr__`,
a private helper, or an HTTP route method with a request object it built itself.

A deployment class declares what may be called as `__surface__ = Surface(handle=..., grpc=...)`.
`install()` wraps the replica's three request entry points: `call_user_method` and
`call_user_generator`, which every handle request and every gRPC request from the proxy passes
through before its method is looked up, and `call_http_entrypoint`, by which HTTP from the proxy
reaches the ASGI app (`__call__`, and nothing else). A request naming anything else is refused with
`ApiError(ApiCode.FORBIDDEN)` before any user code runs: it changes nothing.

What stays as it was:
- A handle call naming `__call__` is refused, so a caller does not build an ASGI scope (and with it
  a client address) through the public handle API. (Code that forges Serve's private request
  metadata to pose as the proxy is code running in the cluster: docs/SECURITY.md.)
- Serve's own calls are not requests: the graceful-shutdown destructor (`call_destructor`), health
  checks and `reconfigure` run as before, and cannot be reached as requests.
- Deployments that declare no surface (other apps sharing the cluster) are not restricted.

If a Ray upgrade renames or reshapes the entry points, `install` raises and the replica does not
start: the door fails closed, never silently open.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ray.serve._private.replica import UserCallableWrapper  # Serve's private module: its shape is checked

from serve_app.errors import ApiCode, ApiError

DETECTOR_KEY = "detector-caller"  # the purpose of the key the detectors check (`Capability.derive`)
_MARK = "__yolo_tokens_surface__"
# Ray 2.60: call_user_method is a coroutine function (unwrapped: a future-returning wrapper in some
# versions); call_user_generator and call_http_entrypoint are async generator functions
_ENTRY_POINTS = {
    "call_user_method": inspect.iscoroutinefunction,
    "call_user_generator": inspect.isasyncgenfunction,
    "call_http_entrypoint": inspect.isasyncgenfunction,
}


@dataclass(frozen=True, slots=True)
class Surface:
    """Method names a handle call may name, and those a gRPC request from Serve's proxy may."""

    handle: frozenset[str]
    grpc: frozenset[str] = frozenset()

    def check(self, method: object, grpc: bool) -> None:
        allowed = self.grpc if grpc else self.handle
        if type(method) is not str or method not in allowed:
            shown = method if isinstance(method, str) and len(method) <= 64 else "that method"
            raise ApiError(
                ApiCode.FORBIDDEN,
                f"{shown!s} is not part of this deployment's API (it takes: {', '.join(sorted(allowed)) or 'nothing'})",
            )


def surface_of(callable_: object) -> Surface | None:
    declared = getattr(type(callable_), "__surface__", None)
    return declared if isinstance(declared, Surface) else None


def _check(wrapper: Any, request_metadata: Any) -> None:
    surface = surface_of(getattr(wrapper, "_callable", None))
    if surface is not None:
        surface.check(request_metadata.call_method, bool(request_metadata.is_grpc_request))


def _check_http(wrapper: Any, request_metadata: Any) -> None:
    """HTTP reaches the ASGI app (`__call__`) and nothing else."""
    if surface_of(getattr(wrapper, "_callable", None)) is not None and request_metadata.call_method != "__call__":
        raise ApiError(ApiCode.FORBIDDEN, "HTTP reaches this deployment's routes only")


def install(wrapper_class: type | None = None) -> None:
    """Guard the request entry points of Serve's `UserCallableWrapper` in this process (idempotent).
    Call it from a deployment's `__init__`: it runs in the replica's process before any request.
    Raises `RuntimeError` when the entry points are not the ones this guard was written for."""
    wrapper_class = wrapper_class or UserCallableWrapper
    for name, kind in _ENTRY_POINTS.items():
        fn = getattr(wrapper_class, name, None)
        if getattr(fn, _MARK, False):
            continue
        params = list(inspect.signature(fn).parameters)[:2] if callable(fn) else []
        if not (callable(fn) and kind(inspect.unwrap(fn)) and params == ["self", "request_metadata"]):
            raise RuntimeError(
                f"Ray Serve's {wrapper_class.__name__}.{name} is not the request entry point this version of "
                "yolo-tokens guards (Ray was upgraded?): refusing to start with an open handle surface"
            )
        if name == "call_user_method":
            setattr(wrapper_class, name, _guarded_method(fn))
        else:
            setattr(
                wrapper_class, name, _guarded_generator(fn, _check_http if name == "call_http_entrypoint" else _check)
            )


def _guarded_method(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Keeps Serve's shape: a plain function returning an awaitable (a refusal raises when awaited,
    where a failure of user code would)."""

    @functools.wraps(fn)
    def call_user_method(self: Any, request_metadata: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            _check(self, request_metadata)
        except ApiError as exc:
            return _raising(exc)
        return fn(self, request_metadata, *args, **kwargs)

    setattr(call_user_method, _MARK, True)
    return call_user_method


async def _raising(exc: ApiError) -> Any:
    raise exc


def _guarded_generator(fn: Callable[..., Any], check: Callable[[Any, Any], None]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def guarded(self: Any, request_metadata: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        check(self, request_metadata)
        gen = fn(self, request_metadata, *args, **kwargs)
        try:
            async for item in gen:
                yield item
        finally:
            await gen.aclose()  # a client that went away still cancels the user code, as unwrapped

    setattr(guarded, _MARK, True)
    return guarded
