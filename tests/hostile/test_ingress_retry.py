"""Item 2, on Ray itself: an ingress replica dies with requests routed to it and Ray's router
redelivers them to the other replica. Every request is answered 200 and charged once.

The replica is frozen (SIGSTOP) after a warm-up, so the router, trusting its cached queue
lengths, still sends it requests that it never acknowledges; then it is SIGKILLed. Requests that
waited for the kill and were then served are the ones Ray redelivered.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from ledger.client.over_ray import LedgerClient
from ledger.client.service import attach, stop
from ledger.core.entities import TokenSpec
from ledger.store.repository import Store, UsageQuery
from tests.hostile.conftest import replica_pids, side_app_args
from tests.serve_app.conftest import LiveApp, jpeg

pytestmark = pytest.mark.ray
APP = "retry-app"
KILL_AFTER_S = 2.0
N = 16


async def burst(url: str, credential: str, n: int, victim: int | None = None) -> list[tuple[int, str, float]]:
    """`n` concurrent detections (status, request id or error text, seconds); SIGKILLs `victim`
    KILL_AFTER_S into the burst when given."""
    headers = {"Authorization": f"Bearer {credential}", "Content-Type": "image/jpeg"}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as client:

        async def one() -> tuple[int, str, float]:
            t0 = time.monotonic()
            r = await client.post(url, content=jpeg(), headers=headers)
            rid = r.json().get("request_id", "") if r.status_code == 200 else r.text
            return r.status_code, rid, time.monotonic() - t0

        async def kill() -> None:
            if victim is not None:
                await asyncio.sleep(KILL_AFTER_S)
                os.kill(victim, signal.SIGKILL)

        *out, _ = await asyncio.gather(*(one() for _ in range(n)), kill())
    return out


def used_once_reported(client: LedgerClient, token_id: str, expected: int) -> int:
    """The token's `used` once it reached `expected`, or whatever it is at the deadline."""
    deadline = time.monotonic() + 30
    while (used := client.token(token_id).used) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return int(used)


def test_given_an_ingress_replica_dead_before_it_acknowledged_then_ray_redelivers_and_each_is_charged_once(
    live_app: LiveApp, tmp_path: Path
) -> None:
    from ray import serve

    from serve_app.app import build_app

    args = side_app_args(f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path, f"retry-ledger-{uuid.uuid4().hex[:6]}")
    args = args.model_copy(update={"ingress_replicas": 2})
    serve.run(build_app(args), name=APP, route_prefix="/retry")
    client = attach(args.ledger_settings())
    url = f"{live_app.url}/retry/v1/detect"
    try:
        pkg = client.create_package(TokenSpec.build("retry", 1000))
        tid, cred = pkg.token.id, pkg.credential
        warm = asyncio.run(burst(url, cred, 8))  # both replicas answer: the router caches their queues
        assert [s for s, _, _ in warm] == [200] * 8
        # each replica charges what it admitted from its lease in its next report: let those land, so
        # that the frozen replica holds no answered-but-unreported request (what a replica that dies
        # with some in hand leaves is the lost-lease policy's business, tested in the lease suite)
        assert used_once_reported(client, tid, 8) == 8
        victim, *_ = replica_pids(APP, "Ingress")
        os.kill(victim, signal.SIGSTOP)
        try:
            out = asyncio.run(burst(url, cred, N, victim))
        finally:
            if psutil.pid_exists(victim):
                os.kill(victim, signal.SIGKILL)
        assert [s for s, _, _ in out] == [200] * N, out
        redelivered = [rid for _, rid, t in out if t >= KILL_AFTER_S]
        assert redelivered, "no request waited for the frozen replica: the router avoided it"
        ids = {rid for _, rid, _ in out}
        assert len(ids) == N
        assert used_once_reported(client, tid, 8 + N) == 8 + N
        store = Store(args.ledger_settings().database_url)
        try:
            rows = store.usage(UsageQuery(token_id=tid, limit=1000))
        finally:
            store.close()
        charged = [r["request_id"] for r in rows if r["outcome"] == "ok" and r["state"] != "refunded"]
        assert len(charged) == 8 + N and ids <= set(charged)
        print(json.dumps({"hostile": "ingress_retry", "requests": N, "redelivered": len(redelivered),
                          "statuses": {"200": N}, "charged": N}))  # fmt: skip
    finally:
        serve.delete(APP)

        stop(client)
