"""The proxy middleware in isolation: a client's X-Request-ID never reaches Serve under that name."""

from __future__ import annotations

import asyncio
from typing import Any

from serve_app import proxy_hooks
from serve_app.proxy_hooks import ClientRequestIdMiddleware, MarkSecret

SECRET = b"0123abcd" * 8


def headers_seen(
    headers: list[tuple[bytes, bytes]], kind: str = "http", secret: bytes | None = SECRET
) -> list[tuple[bytes, bytes]]:
    seen: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen["headers"] = scope["headers"]

    mw = ClientRequestIdMiddleware(app, MarkSecret(lambda: secret))
    asyncio.run(mw({"type": kind, "headers": headers}, None, None))
    return list(seen["headers"])


def test_given_a_client_x_request_id_then_it_is_renamed_and_the_request_marked() -> None:
    raw = [(b"host", b"x"), (b"x-request-id", b"mine"), (b"X-Request-ID", b"again"), (b"accept", b"*/*")]
    mark = (proxy_hooks.MARK, SECRET)
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
    assert headers_seen(forged) == [(b"host", b"x"), (proxy_hooks.MARK, SECRET)]


def test_given_no_cluster_secret_then_requests_pass_unmarked_and_client_marks_are_still_dropped() -> None:
    forged = [(b"x-yt-proxy-checked", b"1"), (b"host", b"x")]
    assert headers_seen(forged, secret=None) == [(b"host", b"x")]


def test_given_the_ingress_check_then_only_the_cluster_secret_counts_as_the_mark() -> None:
    """A client's header can never pose as the mark, with or without the middleware installed."""
    ingress = MarkSecret(lambda: SECRET)
    assert ingress.matches(SECRET.decode())
    for forged in (None, "", "1", "yes", SECRET.decode()[:-1], SECRET.decode() + "0", SECRET.decode().upper()):
        assert not ingress.matches(forged), forged
    no_secret = MarkSecret(lambda: None)  # outside Ray, or the KV unreachable: nothing is trusted
    assert not no_secret.matches("1") and not no_secret.matches("")


def test_given_the_secret_source_fails_at_first_then_it_is_fetched_again_later(monkeypatch: Any) -> None:
    answers = iter([None, SECRET])
    secret = MarkSecret(lambda: next(answers))
    assert secret.get() is None
    monkeypatch.setattr(proxy_hooks, "_RETRY_S", 0.0)
    assert secret.get() == SECRET
    assert secret.get() == SECRET  # cached


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
