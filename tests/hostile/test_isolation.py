"""Issue 21: one team's flood does not disturb another's requests on the same model version
(DESIGN §3c), on real Ray: the production Ingress in front of a Detector whose engine takes a
fixed 100 ms per pass of up to 4 images (capacity 40 images/s, known), one replica of each.

- The article's scene over HTTP: a stress-test team (custom rate) floods from 16 connections while
  a production team (`pro`) sends 4 requests/s: every production request answers 200, the flood
  gets 503 `model_busy` with Retry-After, and the books are exact (refused requests refunded, an
  audit row for every request).
- Fair shares over a handle: three packages of the same tier keep 12, 6 and 3 calls in flight
  (FIFO would serve them about 12:6:3); each gets about a third of the images served.

No timing is asserted (the benchmark, bench/isolation.py, measures latency and shares exactly).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from ledger.core.entities import TokenSpec
from serve_app.board import BOARD_NAME
from serve_app.config import DEMO_WEIGHTS, AppArgs, Autoscaling, ModelSpec, SchedulerArgs
from serve_app.engine.fake import timed
from serve_app.errors import ApiCode
from tests.hostile.lease_cluster import LeaseApp, deployed, lease_args, serve_proxy
from tests.hostile.lease_helpers import wait_until
from tests.serve_app.conftest import HTTP_PORT, jpeg
from ui.data import queue_rows

pytestmark = pytest.mark.ray

PASS_S = 0.1
MAX_BATCH = 4
APP = "isolation"


def isolation_args(tmp: Path) -> AppArgs:
    spec = ModelSpec(
        name="fast",
        weights=DEMO_WEIGHTS,
        imgsz=64,
        num_cpus=0,
        max_batch_size=MAX_BATCH,
        timeout_s=10.0,
        autoscaling=Autoscaling(min_replicas=1, max_replicas=1),
        scheduler=SchedulerArgs(policy="fair", queue_s=0.25),
    )
    base = lease_args(f"sqlite:///{tmp / 'ledger.db'}", tmp, namespace=f"yt-iso-{uuid.uuid4().hex[:6]}")
    return base.model_copy(update={"models": [spec], "ingress_replicas": 1})


@pytest.fixture(scope="module")
def iso(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeaseApp]:
    tmp = tmp_path_factory.mktemp("isolation")
    with deployed(isolation_args(tmp), APP, serve_proxy(HTTP_PORT), engines={"torch": timed(PASS_S)}) as app:
        yield app


def package(app: LeaseApp, name: str, rate: str) -> tuple[str, str]:
    made = app.ledger.create_package(TokenSpec.build(f"{name}-{time.monotonic_ns()}", 100_000, rate=rate))
    return made.token.id, made.credential


async def test_given_a_flood_beside_production_over_http_then_production_is_served_and_the_flood_refused_unpaid(
    iso: LeaseApp,
) -> None:
    prod_id, prod_cred = package(iso, "production", "pro")
    flood_id, flood_cred = package(iso, "stress", "2000/s:2000")
    body = jpeg(64, 64)
    stop = asyncio.Event()
    flood: list[tuple[int, str, str | None]] = []  # (status, code, Retry-After)

    async def post(client: httpx.AsyncClient, cred: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {cred}", "Content-Type": "image/jpeg"}
        return await client.post(iso.url, content=body, headers=headers, timeout=30)

    async def flooder(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            r = await post(client, flood_cred)
            code = "" if r.status_code == 200 else r.json()["error"]["code"]
            flood.append((r.status_code, code, r.headers.get("Retry-After")))
            if r.status_code != 200:
                await asyncio.sleep(0.05)  # a hostile client, but not a busy loop on 2 cores

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32)) as client:
        for _ in range(3):  # warm: the replicas' first requests (leases, keys) off the clock
            assert (await post(client, prod_cred)).status_code == 200
        workers = [asyncio.ensure_future(flooder(client)) for _ in range(16)]
        await asyncio.sleep(1.0)  # the flood is established
        production = []
        for _ in range(24):
            production.append(await post(client, prod_cred))
            await asyncio.sleep(0.25)
        stop.set()
        await asyncio.gather(*workers)

    # then: every production request answered; the flood shed as model_busy with a Retry-After
    assert [r.status_code for r in production] == [200] * 24
    busy = [f for f in flood if f[0] == 503]
    assert busy, f"the flood was never refused: {Counter(s for s, _, _ in flood)}"
    assert {code for _, code, _ in busy} == {ApiCode.MODEL_BUSY}
    assert all(ra is not None and int(ra) >= 1 for _, _, ra in busy)
    assert {s for s, _, _ in flood} <= {200, 503}
    # and the books are exact: charged = answered, a refunded audit row for every refusal
    served = sum(1 for s, _, _ in flood if s == 200)
    wait_until(lambda: iso.settled(flood_id), lambda t: t[0] == served and t[2] == served, 30, "flood settled")
    rows = iso.rows(flood_id)
    assert len(rows) == len(flood)
    assert Counter(r["state"] for r in rows) == Counter({"settled": served, "refunded": len(busy)})
    wait_until(lambda: iso.settled(prod_id), lambda t: t[0] == 27, 30, "production settled")
    # and the console's queue table (from the detectors' board) names both teams, the flood's refusals
    table = await asyncio.to_thread(queue_table, iso, len(busy))
    by_team = {r["package"].split("-")[0]: r for r in table}
    assert by_team["stress"]["served"] == served and by_team["stress"]["queued"] == 0
    assert by_team["production"]["refused"] == 0 and by_team["production"]["served"] == 27
    assert by_team["production"]["level"] == by_team["stress"]["level"] == 1


def queue_table(iso: LeaseApp, busy: int) -> list[dict[str, Any]]:
    """The console's queue rows once the board's last word counts every refusal the flood saw
    (a sync handle call: off the test's event loop)."""
    board = serve.get_deployment_handle(BOARD_NAME, APP)
    return wait_until(
        lambda: queue_rows(board.snapshot.remote().result(timeout_s=10), iso.ledger.tokens()),
        lambda rows: sum(r["refused"] + r["expired"] for r in rows if r["package"].startswith("stress")) == busy,
        30,
        "the queue board's last word",
    )


async def test_given_three_equal_packages_flooding_unequally_over_a_handle_then_each_gets_about_a_third(
    iso: LeaseApp,
) -> None:
    handle = serve.get_app_handle(APP)
    creds = {name: package(iso, name, "2000/s:2000")[1] for name in ("a", "b", "c")}
    image = jpeg(64, 64)
    served: Counter[str] = Counter()
    counting = asyncio.Event()
    stop = asyncio.Event()

    async def caller(name: str) -> None:
        while not stop.is_set():
            try:
                await handle.detect.remote(token=creds[name], images=[image])
            except Exception as exc:
                assert getattr(exc, "code", None) == ApiCode.MODEL_BUSY, repr(exc)
                await asyncio.sleep(0.05)
                continue
            if counting.is_set():
                served[name] += 1

    tasks = [asyncio.ensure_future(caller(n)) for n, k in (("a", 12), ("b", 6), ("c", 3)) for _ in range(k)]
    await asyncio.sleep(1.5)  # every flow backlogged
    counting.set()
    await asyncio.sleep(6.0)
    stop.set()
    await asyncio.gather(*tasks)

    total = sum(served.values())
    assert total > 100, served  # about 40 images/s for 6 s
    shares = {k: v / total for k, v in served.items()}
    assert all(0.23 <= shares[k] <= 0.43 for k in "abc"), shares
