"""Middleware for Ray Serve's HTTP proxy: a request's id is Ray's, never the client's.

Ray Serve names every request with an id: the client's `X-Request-ID` header when it sends one,
else a fresh one. When Ray routes a request to a replica that dies before it acknowledges the
request, it sends the same request, under the same id, to another replica. The ingress uses that
id as the ledger's request id, so a redelivered request is charged once (DESIGN §4: request ids
make admission exactly-once).

That is only safe if clients cannot choose the id: a client repeating one id on purpose would
have its concurrent copies admitted as redeliveries of one charged request. This middleware runs
in the proxy before Serve's own request-id middleware and renames a client's `X-Request-ID` to
`X-Client-Request-ID`, so Serve always generates the id, and marks the request as checked
(`X-YT-Proxy-Checked`, after removing any copy a client sent). It is installed through Ray's
environment variable, which every Ray process of the cluster must carry:

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.proxy_hooks:middlewares

(`make serve`, the tests, the benchmarks and the cluster files set it). The ingress uses Serve's
id only on requests that carry the mark: without the middleware, each HTTP request gets a fresh
random ledger id (safe, but a Ray redelivery would then be charged twice).
"""

from __future__ import annotations

import os
from typing import Any

from starlette.middleware import Middleware

CALLBACK_VAR = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve_app.proxy_hooks:middlewares"
_CLIENT_HEADER = b"x-request-id"
_RENAMED = b"x-client-request-id"
MARK = b"x-yt-proxy-checked"  # set only here; a client's copy is dropped


class ClientRequestIdMiddleware:
    """Pure ASGI: renames the client's X-Request-ID before Serve reads it, and marks the request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            headers = [
                (_RENAMED if k.lower() == _CLIENT_HEADER else k, v)
                for k, v in scope.get("headers") or []
                if k.lower() != MARK
            ]
            scope = {**scope, "headers": [*headers, (MARK, b"1")]}
        await self.app(scope, receive, send)


def middlewares() -> list[Middleware]:
    """Called by Ray Serve's proxy at start-up (see the module docstring)."""
    return [Middleware(ClientRequestIdMiddleware)]


def installed(env: dict[str, str] | None = None) -> bool:
    """Whether this Ray process was started with the callback: the proxies of the same cluster
    then run the middleware and Serve's request ids are Ray's own."""
    return (os.environ if env is None else env).get(CALLBACK_VAR) == CALLBACK
