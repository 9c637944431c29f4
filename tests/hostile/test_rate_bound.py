"""Issue 17: a `basic` token (1/s, burst 2) used sparsely, then in a burst, keeps its rate bound
(DESIGN §3b) over real HTTP on 127.0.0.1, through 1 ingress replica and through 2.

The bound: for sorted admission times t_i of the token (the audit's admitted rows, stamped by the
ledger when it admitted them), every window [t_i, t_j] holds at most `burst + rate * (t_j - t_i +
SLACK_S)` admissions, over all replicas. The bug it pins: used once every 2.5 s, then 40 requests
at once, 10 were answered 200 within 0.47 s where the rate allows 3.

2 replicas: the session's live app (the real detector). 1 replica: an app of this module, its own
ledger, the production Ingress in front of the FakeEngine (a refused request never reaches it).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from ray import serve
from ray.serve.schema import ReplicaState

from ledger.client.over_ray import LedgerClient
from ledger.core.entities import TokenSpec
from ledger.core.limits import RateLimit
from ledger.store.repository import Store, UsageQuery
from tests.hostile.lease_cluster import LeaseApp, deployed, lease_args, serve_proxy
from tests.hostile.lease_helpers import wait_until
from tests.serve_app.conftest import HTTP_PORT, LiveApp, jpeg

pytestmark = pytest.mark.ray

BASIC = RateLimit.parse("basic")
SLACK_S = 0.1  # one report interval of rate (DESIGN §3b)
SPARSE = 4  # requests, one every SPARSE_GAP_S
SPARSE_GAP_S = 2.5
BURST = 40  # requests at once


@dataclass(frozen=True, slots=True)
class Target:
    """An app under test: its detect route, its ledger, the ledger's database."""

    url: str
    ledger: LedgerClient
    database_url: str
    replicas: int


@dataclass(frozen=True, slots=True)
class Answer:
    sent: float  # wall clock
    done: float
    status: int
    code: str  # the error code of a refusal ("" for a 200)
    request_id: str  # of a 200 ("" otherwise)
    retry_after: str | None


@pytest.fixture(scope="module")
def one_replica(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeaseApp]:
    tmp = tmp_path_factory.mktemp("rate-one")
    args = lease_args(f"sqlite:///{tmp / 'ledger.db'}", tmp).model_copy(update={"ingress_replicas": 1})
    with deployed(args, "rate-one", serve_proxy(HTTP_PORT)) as app:
        yield app


@pytest.fixture(params=[1, 2], ids=["1-replica", "2-replicas"])
def target(request: pytest.FixtureRequest) -> Target:
    if request.param == 1:
        one: LeaseApp = request.getfixturevalue("one_replica")
        return Target(one.url, one.ledger, one.args.database_url, 1)
    live: LiveApp = request.getfixturevalue("live_app")
    return Target(f"{live.url}/v1/detect", live.ledger, live.args.database_url, 2)


def running_ingress_replicas(app: str) -> int:
    return serve.status().applications[app].deployments["Ingress"].replica_states.get(ReplicaState.RUNNING, 0)


async def sparse_then_burst(url: str, credential: str) -> tuple[list[Answer], list[Answer]]:
    """SPARSE requests one SPARSE_GAP_S apart (each after the previous was answered), then, one gap
    after the last, BURST requests at once on connections opened beforehand."""
    headers = {"Authorization": f"Bearer {credential}", "Content-Type": "image/jpeg"}
    body = jpeg(64, 48)
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def one() -> Answer:
            sent = time.time()
            r = await client.post(url, content=body, headers=headers)
            done = time.time()
            data: Any = r.json()
            if r.status_code == 200:
                return Answer(sent, done, 200, "", str(data["request_id"]), None)
            return Answer(sent, done, r.status_code, str(data["error"]["code"]), "", r.headers.get("Retry-After"))

        sparse: list[Answer] = []
        next_at = time.monotonic()
        for _ in range(SPARSE):
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            sparse.append(await one())
            next_at += SPARSE_GAP_S
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        burst = await asyncio.gather(*(one() for _ in range(BURST)))
    return sparse, list(burst)


def audit(database_url: str, token_id: str) -> list[dict[str, Any]]:
    store = Store(database_url)
    try:
        return store.usage(UsageQuery(token_id=token_id, limit=10_000))
    finally:
        store.close()


def admitted(row: dict[str, Any]) -> bool:
    return bool(row["outcome"] == "ok" and row["state"] in ("admitted", "settled"))


def max_window_excess(times: list[float], rate: float) -> float:
    """max over i <= j of (j - i + 1) - rate * (t_j - t_i), for the sorted `times`: how far the
    busiest window goes past `rate * W` (at most the burst plus the slack under the rate bound)."""
    t = sorted(times)
    return max((j - i + 1) - rate * (t[j] - t[i]) for j in range(len(t)) for i in range(j + 1))


def test_given_a_basic_token_used_sparsely_when_40_requests_come_at_once_then_every_window_keeps_the_rate_bound(
    target: Target,
) -> None:
    """Given a `basic` token (1/s, burst 2) on `replicas` ingress replicas, used once every 2.5 s
    (each answered 200: its bucket refills in between),
    when 40 requests come at once,
    then the admissions the ledger recorded keep `burst + rate * (W + 0.1 s)` in every window W, the
    burst's 200s keep it from the first send to the last answer too, every other answer is 429
    rate_limited with a Retry-After, each 200 has exactly one admitted audit row, each 429 a
    rate_limited row, and the token used as many units as there were 200s."""
    if target.replicas == 2:
        assert running_ingress_replicas("yolo-tokens") == 2
    else:
        assert running_ingress_replicas("rate-one") == 1
    made = target.ledger.create_package(TokenSpec.build(f"rate-{time.monotonic_ns()}", 1000, rate="basic"))
    tid = made.token.id
    t0 = time.monotonic()
    sparse, burst = asyncio.run(sparse_then_burst(target.url, made.credential))
    answers = sparse + burst
    assert [a.status for a in sparse] == [200] * SPARSE, sparse

    ok = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status != 200]
    assert {(a.status, a.code) for a in refused} <= {(429, "rate_limited")}, refused
    assert all(a.retry_after is not None and a.retry_after.isdigit() for a in refused), refused

    # client clocks: every burst 200 was admitted between the first send and its own answer
    burst_ok = [a for a in burst if a.status == 200]
    burst_s = max(a.done for a in burst_ok) - min(a.sent for a in burst) if burst_ok else 0.0
    assert 1 <= len(burst_ok) <= BASIC.burst + BASIC.rate * (burst_s + SLACK_S), (len(burst_ok), burst_s)

    # the ledger's clock: admissions reach the audit at once (shard) or with the next report (lease)
    ok_ids = {a.request_id for a in ok}
    rows = wait_until(
        lambda: audit(target.database_url, tid),
        lambda rs: (
            {r["request_id"] for r in rs if admitted(r)} >= ok_ids
            and sum(1 for r in rs if r["outcome"] == "rate_limited") >= len(refused)
        ),
        30,
        "audit rows of the answers",
    )
    admissions = [r for r in rows if admitted(r)]
    assert sorted(r["request_id"] for r in admissions) == sorted(ok_ids)
    assert sum(1 for r in rows if r["outcome"] == "rate_limited") == len(refused)
    excess = max_window_excess([float(r["ts"]) for r in admissions], BASIC.rate)
    assert excess <= BASIC.burst + BASIC.rate * SLACK_S, (excess, sorted(r["ts"] for r in admissions))

    view = wait_until(lambda: target.ledger.token(tid), lambda v: v.used >= len(ok), 30, "used")
    assert view.used == len(ok)
    print(json.dumps({"rate_bound": "basic", "replicas": target.replicas, "sparse_ok": SPARSE,
                      "burst_ok": len(burst_ok), "burst_429": len(refused), "burst_s": round(burst_s, 3),
                      "max_window_excess": round(excess, 3), "bound": BASIC.burst + BASIC.rate * SLACK_S,
                      "retry_after": sorted({a.retry_after for a in refused}),
                      "test_s": round(time.monotonic() - t0, 1)}))  # fmt: skip
