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
(`X-YT-Proxy-Checked`, after removing any copy a client sent). The mark's value is a per-cluster
secret (random, kept in Ray's internal key-value store, never sent to clients), so a client cannot
pose as the middleware even where it is NOT installed (e.g. `serve run ray_config.yaml` from a shell
without the variable): the ingress compares the mark with the same secret. It is installed through
Ray's environment variable, which every Ray process of the cluster must carry:

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.proxy_hooks:middlewares

(`make serve`, the tests, the benchmarks and the cluster files set it). The ingress uses Serve's
id only on requests that carry the mark: without the middleware, each HTTP request gets a fresh
random ledger id (safe, but a Ray redelivery would then be charged twice).
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

from starlette.middleware import Middleware

CALLBACK_VAR = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve_app.proxy_hooks:middlewares"
_CLIENT_HEADER = b"x-request-id"
_RENAMED = b"x-client-request-id"
MARK = b"x-yt-proxy-checked"  # set only here; a client's copy is dropped
_KV_KEY = b"yolo-tokens/proxy-mark"
_KV_NAMESPACE = b"yolo-tokens"
_RETRY_S = 1.0


def cluster_secret() -> bytes | None:
    """The cluster's mark secret from Ray's internal KV, created by whichever side asks first
    (the proxy middleware or an ingress replica). None outside a Ray worker."""
    from ray.experimental import internal_kv  # here: this module is imported by the proxy, before Ray is up

    if not internal_kv._internal_kv_initialized():
        return None
    internal_kv._internal_kv_put(_KV_KEY, secrets.token_hex(32).encode(), overwrite=False, namespace=_KV_NAMESPACE)
    value = internal_kv._internal_kv_get(_KV_KEY, namespace=_KV_NAMESPACE)
    return bytes(value) if value else None


class MarkSecret:
    """The secret, fetched once (retried at most every second until it is there)."""

    def __init__(self, source: Callable[[], bytes | None] = cluster_secret) -> None:
        self.source = source
        self.value: bytes | None = None
        self.tried_at = float("-inf")

    def get(self) -> bytes | None:
        if self.value is None and time.monotonic() - self.tried_at >= _RETRY_S:
            self.tried_at = time.monotonic()
            self.value = self.source()
        return self.value

    def matches(self, presented: str | None) -> bool:
        secret = self.get()
        return secret is not None and presented is not None and hmac.compare_digest(presented.encode(), secret)


class ClientRequestIdMiddleware:
    """Pure ASGI: renames the client's X-Request-ID before Serve reads it, and marks the request."""

    def __init__(self, app: Any, secret: MarkSecret | None = None) -> None:
        self.app = app
        self.secret = secret or MarkSecret()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            headers = [
                (_RENAMED if k.lower() == _CLIENT_HEADER else k, v)
                for k, v in scope.get("headers") or []
                if k.lower() != MARK
            ]
            mark = self.secret.get()
            scope = {**scope, "headers": [*headers, (MARK, mark)] if mark else headers}
        await self.app(scope, receive, send)


GRPC_HOST_VAR = "YT_GRPC_HOST"  # the address a node's gRPC proxy binds (the cluster files: the node's own)


def bind_grpc_to_loopback() -> None:
    """Ray 2.60's gRPC proxy listens on every interface (`[::]:port`, `grpc_util.start_grpc_server`
    through `default_impl.add_grpc_address`, which it imports when the server starts), and Serve has
    no host setting for it: in this process, the proxy's, it listens on 127.0.0.1 instead, or on
    `$YT_GRPC_HOST`, which the cluster files set to the node's own address (its pod IP, its first address). The proxy
    calls `middlewares()` before it starts its gRPC server."""
    from ray.serve._private import default_impl  # the proxy process: Ray is imported

    original = default_impl.add_grpc_address
    if getattr(original, "__yt_loopback__", False):
        return

    host = os.environ.get(GRPC_HOST_VAR) or "127.0.0.1"

    def add_grpc_address(grpc_server: Any, server_address: str) -> None:
        _, _, port = server_address.rpartition(":")
        original(grpc_server, f"{host}:{port}")

    add_grpc_address.__yt_loopback__ = True  # type: ignore[attr-defined]
    default_impl.add_grpc_address = add_grpc_address


def middlewares() -> list[Middleware]:
    """Called by Ray Serve's proxy at start-up (see the module docstring); also binds its gRPC
    server to loopback (`bind_grpc_to_loopback`)."""
    bind_grpc_to_loopback()
    return [Middleware(ClientRequestIdMiddleware)]


def installed(env: dict[str, str] | None = None) -> bool:
    """Whether this Ray process was started with the callback: the proxies of the same cluster
    then run the middleware and Serve's request ids are Ray's own."""
    return (os.environ if env is None else env).get(CALLBACK_VAR) == CALLBACK
