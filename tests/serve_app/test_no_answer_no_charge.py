"""Never charged without an answer, over real HTTP and handles, through the real graph.

A side app beside the live one shares its ledger and serves two versions made to misbehave:
`cold@1` needs 64 CPUs (the test cluster has 6: it can never be scheduled) and `slow@1` holds
each lone request for 4 s in its batch window (time for a client to hang up mid-inference).
Packages of 20 units are leased (DESIGN §3a): an ingress replica admits and settles locally and
the ledger hears of it in the replica's next report, in the same commit as the request's audit
row, so balances are read once every request's row is there (polled, with a deadline).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from ledger.core.entities import TokenSpec
from ledger.store.repository import Store, UsageQuery
from serve_app.config import DEMO_WEIGHTS, AppArgs, Autoscaling, ModelSpec
from serve_app.errors import ApiError
from tests.serve_app.conftest import LiveApp, jpeg

pytestmark = pytest.mark.ray
SIDE = "yt-no-answer"
COLD_TIMEOUT_S = 4.0


@dataclass
class SideApp:
    url: str
    live: LiveApp


@pytest.fixture(scope="module")
def side_app(live_app: LiveApp) -> Iterator[SideApp]:
    from ray import serve

    from serve_app.app import build_app

    args = AppArgs(
        database_url=live_app.args.database_url,
        data_dir=live_app.args.data_dir,
        ledger_name=live_app.args.ledger_name,
        namespace=live_app.args.namespace,
        models=[
            ModelSpec(
                name="cold",
                version="1",
                weights=DEMO_WEIGHTS,
                imgsz=320,
                num_cpus=64,
                timeout_s=COLD_TIMEOUT_S,
                graceful_shutdown_timeout_s=1.0,  # its replica never starts: Serve waits this long to kill it
                autoscaling=Autoscaling(min_replicas=0, max_replicas=1),
            ),
            ModelSpec(
                name="slow",
                version="1",
                weights=DEMO_WEIGHTS,
                imgsz=320,
                num_cpus=0.25,
                max_batch_size=8,
                batch_wait_timeout_s=4.0,
                autoscaling=Autoscaling(min_replicas=1, max_replicas=1),
            ),
        ],
        default_model="slow@1",
    )
    serve.run(build_app(args), name=SIDE, route_prefix="/noanswer")
    yield SideApp(f"{live_app.url}/noanswer", live_app)
    serve.delete(SIDE)


def package(app: LiveApp, units: int = 20) -> tuple[str, str]:
    out = app.ledger.create_package(TokenSpec.build(f"na-{uuid.uuid4().hex[:8]}", units))
    return out.token.id, out.credential


def settled_rows(app: LiveApp, token_id: str, n: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """The token's usage rows once `n` of them exist and none is still `admitted`."""
    store = Store(app.args.ledger_settings().database_url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = store.usage(UsageQuery(token_id=token_id, limit=100))
            if (len(rows) >= n and all(r["state"] != "admitted" for r in rows)) or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)
    finally:
        store.close()


def test_given_a_version_that_cannot_be_scheduled_then_503_within_its_timeout_and_nothing_charged(
    side_app: SideApp,
) -> None:
    tid, cred = package(side_app.live)
    headers = {"Authorization": f"Bearer {cred}", "Content-Type": "image/jpeg"}
    times = []
    for _ in range(3):
        t0 = time.monotonic()
        r = httpx.post(
            f"{side_app.url}/v1/detect", params={"model": "cold@1"}, content=jpeg(), headers=headers, timeout=60
        )
        elapsed = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "model_unavailable"
        assert int(r.headers["Retry-After"]) >= 1
        assert COLD_TIMEOUT_S - 0.5 <= elapsed < COLD_TIMEOUT_S + 10, elapsed
        times.append(round(elapsed, 2))
    rows = settled_rows(side_app.live, tid, 3)
    assert [(r["state"], r["units"]) for r in rows] == [("refunded", 0)] * 3
    print(json.dumps({"trust": "unschedulable", "requests": 3, "status": 503, "seconds": times, "charged": 0}))
    assert side_app.live.ledger.token(tid).used == 0
    models = httpx.get(f"{side_app.url}/v1/models", headers=headers, timeout=30).json()["models"]
    cold = next(m for m in models if m["key"] == "cold@1")
    assert cold["status"] == "unschedulable" and "CPU 64" in cold["message"], cold
    assert next(m for m in models if m["key"] == "slow@1")["status"] != "unschedulable"


def test_given_a_client_that_hangs_up_mid_inference_then_refunded(side_app: SideApp) -> None:
    tid, cred = package(side_app.live)
    headers = {"Authorization": f"Bearer {cred}", "Content-Type": "image/jpeg"}
    for _ in range(2):  # the client's read timeout closes the connection while the batch window holds it
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{side_app.url}/v1/detect", content=jpeg(), headers=headers, timeout=1.5)
    rows = settled_rows(side_app.live, tid, 2)
    assert sorted(r["state"] for r in rows) == ["refunded", "refunded"], rows
    assert side_app.live.ledger.token(tid).used == 0
    print(json.dumps({"trust": "hang-up", "requests": 2, "refunded": 2, "charged": 0}))
    # the client that waits gets its answer and pays for it
    r = httpx.post(f"{side_app.url}/v1/detect", content=jpeg(), headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    assert len(settled_rows(side_app.live, tid, 3)) == 3
    assert side_app.live.ledger.token(tid).used == 1


def test_given_a_handle_caller_that_times_out_then_refunded(side_app: SideApp) -> None:
    from ray import serve

    tid, cred = package(side_app.live)
    handle = serve.get_app_handle(SIDE)
    response = handle.detect.remote(token=cred, images=[jpeg()])
    with pytest.raises(TimeoutError):
        response.result(timeout_s=1.0)
    response.cancel()  # what a Ray job does when it stops waiting
    rows = settled_rows(side_app.live, tid, 1)
    assert [r["state"] for r in rows] == ["refunded"], rows
    assert side_app.live.ledger.token(tid).used == 0


def test_given_a_handle_to_the_app_or_the_ingress_then_no_unmetered_or_admin_path(side_app: SideApp) -> None:
    """A Ray job that takes a handle to the app, or to its `Ingress` deployment (the token-check
    deployment), gets what HTTP gets: every credential verified, the price from the ingress's
    catalog; its helpers and routes are not reachable at all."""
    from ray import serve

    from serve_app.app import APP_NAME

    live = side_app.live
    tid, cred = package(live, 20)
    other_tid, _ = package(live, 20)
    admin = live.ledger.issue_admin("ops", 600)
    app = serve.get_app_handle(APP_NAME)
    ingress = serve.get_deployment_handle("Ingress", APP_NAME)
    for handle in (app, ingress):
        for forged in (None, "", "Bearer nope", admin):
            with pytest.raises(ApiError) as err:
                handle.detect.remote(token=forged, images=[jpeg()]).result(timeout_s=60)
            assert err.value.status in (401, 403), (forged, err.value.code)
    # the ingress prices the request itself: the 2-unit version costs 2, whatever the caller thinks
    body = app.detect.remote(token=cred, images=[jpeg()], model="parts@2").result(timeout_s=120)
    assert body["usage"]["units"] == 2
    body = ingress.detect.remote(token=cred, images=[jpeg()], model="parts@1").result(timeout_s=120)
    assert body["usage"]["units"] == 1
    assert sorted((r["state"], r["units"]) for r in settled_rows(live, tid, 2)) == [("settled", 1), ("settled", 2)]
    assert live.ledger.token(tid).used == 3  # refusals cost nothing
    # the ingress's helpers and route methods are not reachable by handle (test_handle_surface.py)
    with pytest.raises(ApiError) as err:
        ingress.options(method_name="_ledger").remote("top_up", None).result(timeout_s=60)
    assert err.value.code == "forbidden"
    assert live.ledger.token(tid).allocation == 20 and live.ledger.token(other_tid).status == "active"
    stats = ingress.stats.remote().result(timeout_s=60)  # read-only counters: no money moves through it
    assert set(stats) >= {"holder", "local", "strict", "leases", "units"}


def test_given_a_forged_proxy_mark_then_ray_names_the_request(side_app: SideApp) -> None:
    tid, cred = package(side_app.live, 10)
    headers = {
        "Authorization": f"Bearer {cred}",
        "Content-Type": "image/jpeg",
        "X-YT-Proxy-Checked": "1",
        "X-Request-ID": "forged-1",
    }
    ids = set()
    for _ in range(2):
        r = httpx.post(f"{side_app.live.url}/v1/detect", content=jpeg(), headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        ids.add(r.json()["request_id"])
    assert "forged-1" not in ids and len(ids) == 2
    assert len(settled_rows(side_app.live, tid, 2)) == 2
    assert side_app.live.ledger.token(tid).used == 2


def test_given_a_stored_idempotent_result_then_it_is_replayed_only_to_a_credential_admitted_now(
    side_app: SideApp,
) -> None:
    live = side_app.live
    tid, cred = package(live, 10)
    headers = {"Authorization": f"Bearer {cred}", "Content-Type": "image/jpeg", "Idempotency-Key": "order-1"}
    first = httpx.post(f"{live.url}/v1/detect", content=jpeg(), headers=headers, timeout=60)
    assert first.status_code == 200, first.text
    again = httpx.post(f"{live.url}/v1/detect", content=jpeg(), headers=headers, timeout=60)
    assert again.status_code == 200 and again.headers.get("Idempotent-Replayed") == "true"
    live.ledger.revoke(tid)
    after = httpx.post(f"{live.url}/v1/detect", content=jpeg(), headers=headers, timeout=60)
    assert after.status_code == 401 and after.json()["error"]["code"] == "revoked_token", after.text
    assert "images" not in after.json()


def test_given_a_version_that_cannot_be_scheduled_then_the_console_models_page_says_why(
    side_app: SideApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamlit as st

    from tests.ui.test_console import signed_in

    monkeypatch.setenv("YT_LEDGER_NAME", side_app.live.args.ledger_name)
    monkeypatch.setenv("YT_NAMESPACE", side_app.live.args.namespace)
    st.cache_resource.clear()
    try:
        at = signed_in(side_app.live.ledger, "Models")
        errors = [e.value for e in at.error]
        assert any("Detector-cold-1" in e and "CPU 64" in e for e in errors), errors
        assert not any("Detector-slow-1" in e for e in errors)
    finally:
        st.cache_resource.clear()
