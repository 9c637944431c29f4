"""The proxy middleware in isolation: a client's X-Request-ID never reaches Serve under that name."""

from __future__ import annotations

import asyncio
from typing import Any

from serve_app import proxy_hooks
from serve_app.proxy_hooks import ClientRequestIdMiddleware


def headers_seen(headers: list[tuple[bytes, bytes]], kind: str = "http") -> list[tuple[bytes, bytes]]:
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen["headers"] = scope["headers"]

    asyncio.run(ClientRequestIdMiddleware(app)({"type": kind, "headers": headers}, None, None))
    return list(seen["headers"])


def test_given_a_client_x_request_id_then_it_is_renamed_and_the_request_marked() -> None:
    raw = [(b"host", b"x"), (b"x-request-id", b"mine"), (b"X-Request-ID", b"again"), (b"accept", b"*/*")]
    mark = (proxy_hooks.MARK, b"1")
    assert headers_seen(raw) == [
        (b"host", b"x"),
        (b"x-client-request-id", b"mine"),
        (b"x-client-request-id", b"again"),
        (b"accept", b"*/*"),
        mark,
    ]
    assert headers_seen(raw, "websocket")[1] == (b"x-client-request-id", b"mine")
    assert headers_seen([(b"host", b"x")]) == [(b"host", b"x"), mark]


def test_given_a_client_copy_of_the_mark_then_only_the_middlewares_remains() -> None:
    forged = [(b"X-YT-Proxy-Checked", b"1"), (b"x-yt-proxy-checked", b"yes"), (b"host", b"x")]
    assert headers_seen(forged) == [(b"host", b"x"), (proxy_hooks.MARK, b"1")]


def test_given_a_lifespan_scope_then_it_passes_untouched() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen["scope"] = scope

    scope = {"type": "lifespan"}
    asyncio.run(ClientRequestIdMiddleware(app)(scope, None, None))
    assert seen["scope"] is scope


def test_given_the_callback_variable_then_installed_only_when_it_names_this_hook() -> None:
    assert proxy_hooks.installed({proxy_hooks.CALLBACK_VAR: proxy_hooks.CALLBACK})
    assert not proxy_hooks.installed({})
    assert not proxy_hooks.installed({proxy_hooks.CALLBACK_VAR: "other:hook"})
    (mw,) = proxy_hooks.middlewares()
    assert mw.cls is ClientRequestIdMiddleware
