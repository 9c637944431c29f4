"""Item 3: SIGKILL the ledger actor at a random moment under HTTP load, 20 seeds. After each restart
the book equals the database, conservation holds, and every 200 a client received has its debit."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time

import httpx
import pytest
import ray

from ledger.core.entities import TokenSpec
from ledger.store.repository import Store, UsageQuery
from tests.serve_app.conftest import LiveApp, jpeg

pytestmark = pytest.mark.ray
# 10 seeded kills in make test, 20 in make chaos (YT_LEASE_LONG=1): the suite's time (issue 17)
SEEDS = range(20 if os.environ.get("YT_LEASE_LONG") == "1" else 10)


async def load_with_a_kill(url: str, credential: str, pid: int, rng: random.Random, n: int) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {credential}", "Content-Type": "image/jpeg"}
    body = jpeg(64, 48)

    async def killer() -> None:
        await asyncio.sleep(rng.uniform(0.0, 1.0))
        os.kill(pid, signal.SIGKILL)

    async with httpx.AsyncClient(timeout=180, limits=httpx.Limits(max_connections=n)) as client:
        requests = [client.post(f"{url}/v1/detect", content=body, headers=headers) for _ in range(n)]
        *responses, _ = await asyncio.gather(*requests, killer())
    return responses


def wait_ready(app: LiveApp) -> int:
    deadline = time.monotonic() + 120
    while True:
        try:
            stats = ray.get(app.ledger.shard_actors[0].stats.remote(app.ledger.capability), timeout=10)
            if stats["ready"]:
                return int(stats["pid"])
        except Exception:  # restarting
            pass
        assert time.monotonic() < deadline, "the ledger actor did not come back"
        time.sleep(0.2)


def test_given_the_ledger_killed_under_load_then_no_served_request_lacks_its_debit(live_app: LiveApp) -> None:
    pkg = live_app.ledger.create_package(TokenSpec.build(f"kill-{time.monotonic_ns()}", 100_000))
    tid, cred = pkg.token.id, pkg.credential
    served: list[str] = []
    statuses: dict[int, int] = {}
    for seed in SEEDS:
        pid = wait_ready(live_app)
        responses = asyncio.run(load_with_a_kill(live_app.url, cred, pid, random.Random(seed), 12))
        for r in responses:
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code in (200, 503), (seed, r.status_code, r.text)
            if r.status_code == 503:
                assert r.json()["error"]["code"] in ("ledger_unavailable", "model_unavailable"), r.text
            else:
                served.append(r.json()["request_id"])
        assert wait_ready(live_app) != pid, f"seed {seed}: the actor was not restarted"
        report = live_app.ledger.consistency()
        assert report.violations == [], (seed, report.violations)
        assert {k: tuple(v) for k, v in report.book.items()} == {k: tuple(v) for k, v in report.db.items()}
    store = Store(live_app.args.ledger_settings().database_url)
    try:
        # requests admitted from leases are debited with the replicas' reports, and a refund the ledger
        # could not take during a kill is retried in the background: rows and `used` are read until
        # they agree (each read is one instant: a refund landing between them moves both)
        deadline = time.monotonic() + 60
        while True:
            rows = store.usage(UsageQuery(token_id=tid, limit=100_000))
            debited = {r["request_id"] for r in rows if r["outcome"] == "ok" and r["state"] != "refunded"}
            used = live_app.ledger.token(tid).used
            if (set(served) <= debited and used == len(debited)) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        store.close()
    assert set(served) <= debited, set(served) - debited  # no 200 without its durable debit
    assert used == len(debited)  # and nothing debited twice or lost
    summary = {"seeds": len(SEEDS), "kills": len(SEEDS), "requests": sum(statuses.values()), "statuses": statuses}
    print(json.dumps({"hostile": "ledger_sigkill_http", **summary, "served": len(served), "debited": len(debited)}))
