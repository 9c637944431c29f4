"""Item 1: a burst of 500 concurrent HTTP requests on a 100-unit token, through 2 ingress replicas."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from ledger.core.entities import TokenSpec
from ledger.store.repository import Store, UsageQuery
from tests.serve_app.conftest import LiveApp, jpeg

pytestmark = pytest.mark.ray


async def burst(url: str, credential: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    headers = {"Authorization": f"Bearer {credential}", "Content-Type": "image/jpeg"}
    body = jpeg(64, 48)
    async with httpx.AsyncClient(timeout=180, limits=limits) as client:
        return await asyncio.gather(*(client.post(f"{url}/v1/detect", content=body, headers=headers) for _ in range(n)))


def test_given_500_concurrent_requests_on_100_units_then_exactly_100_served_and_400_refused(live_app: LiveApp) -> None:
    from ray import serve

    ingress = serve.status().applications["yolo-tokens"].deployments["Ingress"]
    assert ingress.replica_states.get("RUNNING") == 2
    out = live_app.ledger.create_package(TokenSpec.build(f"burst-{time.monotonic_ns()}", 100))
    tid = out.token.id
    t0 = time.perf_counter()
    responses = asyncio.run(burst(live_app.url, out.credential, 500))
    elapsed = time.perf_counter() - t0
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 100 and codes.count(429) == 400, {c: codes.count(c) for c in set(codes)}
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == {"quota_exhausted"}
    # each replica answers from its own lease: `remaining` is its view (the shard's free units plus
    # what its lease still holds), not a global countdown
    assert all(r.json()["usage"]["units"] == 1 for r in responses if r.status_code == 200)
    assert all(0 <= r.json()["usage"]["remaining"] < 100 for r in responses if r.status_code == 200)
    store = Store(live_app.args.ledger_settings().database_url)
    try:
        deadline = time.monotonic() + 30  # local admissions and denials reach the audit in the next report
        while True:
            rows = store.usage(UsageQuery(token_id=tid, limit=10_000))
            done = sum(1 for r in rows if r["outcome"] == "ok" and r["state"] != "admitted") == 100
            if (
                done and sum(1 for r in rows if r["outcome"] == "quota_exhausted") == 400
            ) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        store.close()
    admitted = [r for r in rows if r["outcome"] == "ok"]
    assert len(admitted) == 100 and sum(r["units"] for r in admitted) == 100
    assert sum(1 for r in rows if r["outcome"] == "quota_exhausted") == 400
    view = live_app.ledger.token(tid)
    assert (view.used, view.leased, view.free) == (100, 0, 0)
    report = live_app.ledger.consistency()
    assert report.violations == [] and report.mismatched == [], report
    print(
        json.dumps({"hostile": "http_burst", "requests": 500, "ok": 100, "refused": 400, "seconds": round(elapsed, 2)})
    )
