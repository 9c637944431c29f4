"""serve_app.surface on stand-ins for Serve's `UserCallableWrapper` (the real one: test_handle_surface)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from serve_app import surface
from serve_app.errors import ApiError


@dataclass
class Meta:
    call_method: str
    is_grpc_request: bool = False


class Replica:
    __surface__ = surface.Surface(handle=frozenset({"detect"}), grpc=frozenset({"Detect"}))

    def __init__(self) -> None:
        self.touched: list[str] = []

    async def detect(self) -> str:
        return "answer"


class Wrapper:
    """The shape of Serve's wrapper: resolves the method by name, as Ray 2.60 does."""

    def __init__(self, callable_: object) -> None:
        self._callable = callable_
        self.looked_up: list[str] = []
        self.closed = False

    async def call_user_method(self, request_metadata: Any, request_args: Any, request_kwargs: Any) -> Any:
        self.looked_up.append(request_metadata.call_method)
        return await getattr(self._callable, request_metadata.call_method)(*request_args, **request_kwargs)

    async def call_user_generator(self, request_metadata: Any, request_args: Any, request_kwargs: Any) -> Any:
        self.looked_up.append(request_metadata.call_method)
        try:
            for i in range(3):
                yield i
        finally:
            self.closed = True

    async def call_http_entrypoint(
        self, request_metadata: Any, status_code_callback: Any, scope: Any, receive: Any
    ) -> Any:
        self.looked_up.append(request_metadata.call_method)
        yield [{"type": "http.response.start", "status": 200}]


def guarded() -> type[Wrapper]:
    cls = type("GuardedWrapper", (Wrapper,), {})
    surface.install(cls)
    return cls


def test_given_the_declared_method_then_it_answers() -> None:
    w = guarded()(Replica())
    assert asyncio.run(w.call_user_method(Meta("detect"), (), {})) == "answer"


@pytest.mark.parametrize("method", ["__del__", "__init__", "__setattr__", "_gauge_loop", "detect_http", "__call__", ""])
def test_given_any_other_name_then_refused_before_it_is_looked_up(method: str) -> None:
    w = guarded()(Replica())
    with pytest.raises(ApiError) as err:
        asyncio.run(w.call_user_method(Meta(method), (), {}))
    assert err.value.code == "forbidden" and err.value.status == 403
    assert w.looked_up == []


def test_given_a_grpc_request_then_the_grpc_names_apply_and_not_the_handle_ones() -> None:
    w = guarded()(Replica())
    with pytest.raises(ApiError):
        asyncio.run(w.call_user_method(Meta("detect", is_grpc_request=True), (), {}))
    with pytest.raises(ApiError):
        asyncio.run(w.call_user_method(Meta("Detect"), (), {}))  # a handle cannot pose as the gRPC proxy


def test_given_http_from_the_proxy_then_only_the_asgi_app_is_reached() -> None:
    w = guarded()(Replica())

    async def drain(method: str) -> list[Any]:
        return [m async for m in w.call_http_entrypoint(Meta(method), None, {}, None)]

    assert asyncio.run(drain("__call__")) == [[{"type": "http.response.start", "status": 200}]]
    with pytest.raises(ApiError):
        asyncio.run(drain("__del__"))
    assert w.looked_up == ["__call__"]


def test_given_a_stream_then_refused_or_passed_through_and_closed_as_unwrapped() -> None:
    w = guarded()(Replica())

    async def first_then_close() -> int:
        gen = w.call_user_generator(Meta("detect"), (), {})
        item = await gen.__anext__()
        await gen.aclose()  # the client went away
        return item

    assert asyncio.run(first_then_close()) == 0
    assert w.closed  # the wrapped generator was closed too (user code cancelled)

    async def drain(method: str) -> list[int]:
        return [x async for x in w.call_user_generator(Meta(method), (), {})]

    with pytest.raises(ApiError):
        asyncio.run(drain("__del__"))


def test_given_a_deployment_without_a_surface_then_unrestricted() -> None:
    class Other:
        async def anything(self) -> int:
            return 1

    assert asyncio.run(guarded()(Other()).call_user_method(Meta("anything"), (), {})) == 1


def test_given_install_twice_then_wrapped_once() -> None:
    cls = guarded()
    fn = cls.call_user_method
    surface.install(cls)
    assert cls.call_user_method is fn


def test_given_entry_points_of_another_shape_then_install_fails_closed() -> None:
    class Renamed:
        async def call_user_method_v2(self, request_metadata: Any) -> None: ...

    class Reshaped(Wrapper):
        async def call_user_method(self, metadata: Any, *args: Any) -> Any:  # type: ignore[override]
            return None

    class Synchronous(Wrapper):
        def call_user_method(self, request_metadata: Any, *args: Any) -> Any:  # type: ignore[override]
            return None

    for cls in (Renamed, Reshaped, Synchronous):
        with pytest.raises(RuntimeError, match="open handle surface"):
            surface.install(cls)


def test_given_this_ray_then_its_wrapper_has_the_guarded_shape() -> None:
    """The real UserCallableWrapper passes the shape check (a Ray upgrade that changes it fails here)."""
    from ray.serve._private.replica import UserCallableWrapper

    cls = type("Probe", (UserCallableWrapper,), {})
    surface.install(cls)
    assert all(
        getattr(getattr(cls, name), "__yolo_tokens_surface__", False)
        for name in ("call_user_method", "call_user_generator", "call_http_entrypoint")
    )
