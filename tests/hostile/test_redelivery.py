"""Item 2, second half: a request Ray delivers more than once is charged once.

When a replica dies before it acknowledges a request, Ray Serve's router sends the same request,
with the same request metadata (so the same request id), to another replica. The ingress uses
Serve's id as the ledger's request id. These tests run what each ingress replica runs for a
delivery (`IngressSteps.detect`, one per delivery, against the live gate, detector and
ledger) with one id, and check the books. HTTP clients cannot choose that id: the proxy
middleware (serve_app/proxy_hooks.py) renames their X-Request-ID.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import jwt
import pytest

from ledger.codes import Code
from ledger.entities import Admission, Settlement, TokenSpec
from ledger.store.repository import Store, UsageQuery
from tests.serve_app.conftest import LiveApp, jpeg

pytestmark = pytest.mark.ray


def deliver(live_app: LiveApp, rid: str, n: int, token: str, model: str | None = None) -> list[Any]:
    """`n` concurrent deliveries of one request under request id `rid`, each through its own
    ingress steps (as on `n` ingress replicas): a body dict or the error table's code."""
    from ray import serve

    from serve_app.app import APP_NAME
    from serve_app.errors import ApiError
    from serve_app.ingress_steps import DetectCall, IngressSteps
    from serve_app.results import InferenceParams

    gate = serve.get_deployment_handle("TokenGate", APP_NAME)
    call = DetectCall(rid, token, [jpeg()], model, InferenceParams(), "127.0.0.1")

    async def run() -> list[Any]:
        deliveries = [IngressSteps(live_app.args, gate, {}) for _ in range(n)]  # keys fetched on first use
        return await asyncio.gather(*(p.detect(call) for p in deliveries), return_exceptions=True)

    outcomes: list[Any] = []
    for out in asyncio.run(run()):
        if isinstance(out, ApiError):
            outcomes.append(out.code)
        elif isinstance(out, BaseException):
            raise out
        else:
            outcomes.append(out.body)
    return outcomes


def rows_of(live_app: LiveApp, token_id: str) -> list[dict[str, Any]]:
    store = Store(live_app.args.ledger_settings().database_url)
    try:
        deadline = time.monotonic() + 30
        while True:  # successes complete their audit rows in the background
            rows = store.usage(UsageQuery(token_id=token_id, limit=1000))
            if all(r["state"] != "admitted" for r in rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)
    finally:
        store.close()


def direct_admission(live_app: LiveApp, credential: str, rid: str) -> None:
    """The first delivery's admission, made as the gate makes it (with the body hash of the
    request `deliver` sends, which a redelivery must match): its ingress then died."""
    from serve_app.ingress_steps import DetectCall, IngressSteps, body_hash
    from serve_app.results import InferenceParams

    call = DetectCall(rid, credential, [jpeg()], None, InferenceParams(), "127.0.0.1")
    spec = IngressSteps(live_app.args, None, {}).resolve_model(None)
    assert spec.key == "parts@1"
    claims = jwt.decode(credential, options={"verify_signature": False})
    admission = Admission(rid, claims["sub"], claims["jti"], 1, spec.key, "127.0.0.1", None, body_hash(call, spec))
    (d,) = live_app.ledger.admit_sync([admission])
    assert d.code is Code.OK


def test_given_one_request_id_delivered_six_times_at_once_then_charged_once(live_app: LiveApp) -> None:
    pkg = live_app.ledger.create_package(TokenSpec.build("redeliver", 10))
    tid, cred = pkg.token.id, pkg.credential
    rid = str(uuid.uuid4())
    outcomes = deliver(live_app, rid, 6, cred)
    served = [o for o in outcomes if isinstance(o, dict)]
    # each copy is served (a copy that arrives after the first settled is told it was processed)
    assert served and all(o == "idempotency_conflict" for o in outcomes if not isinstance(o, dict)), outcomes
    assert {o["request_id"] for o in served} == {rid}
    assert live_app.ledger.token(tid).used == 1
    rows = rows_of(live_app, tid)
    assert [(r["request_id"], r["state"], r["units"]) for r in rows if r["outcome"] == "ok"] == [(rid, "settled", 1)]
    # delivered again once settled: answered from the books, no second charge
    assert deliver(live_app, rid, 1, cred) == ["idempotency_conflict"]
    assert live_app.ledger.token(tid).used == 1
    print(json.dumps({"hostile": "redelivery", "deliveries": 7, "served": len(served), "charged": 1}))


def test_given_a_first_delivery_admitted_then_lost_when_redelivered_then_served_and_charged_once(
    live_app: LiveApp,
) -> None:
    pkg = live_app.ledger.create_package(TokenSpec.build("lost-first", 10))
    tid, cred = pkg.token.id, pkg.credential
    rid = str(uuid.uuid4())
    direct_admission(live_app, cred, rid)  # admitted, then the replica that held it died
    (out,) = deliver(live_app, rid, 1, cred)
    assert isinstance(out, dict) and out["request_id"] == rid, out
    assert live_app.ledger.token(tid).used == 1
    rows = rows_of(live_app, tid)
    assert [(r["request_id"], r["state"]) for r in rows] == [(rid, "settled")]


def test_given_a_first_delivery_refunded_when_redelivered_then_served_and_charged_once(live_app: LiveApp) -> None:
    pkg = live_app.ledger.create_package(TokenSpec.build("refunded-first", 10))
    tid, cred = pkg.token.id, pkg.credential
    rid = str(uuid.uuid4())
    direct_admission(live_app, cred, rid)
    assert live_app.ledger.settle_sync([Settlement(rid, tid, success=False)]) == [Code.OK]  # its detector failed
    assert live_app.ledger.token(tid).used == 0
    (out,) = deliver(live_app, rid, 1, cred)
    assert isinstance(out, dict) and out["usage"]["units"] == 1, out
    assert live_app.ledger.token(tid).used == 1
    states = sorted(r["state"] for r in rows_of(live_app, tid) if r["request_id"] == rid)
    assert states == ["refunded", "settled"]


def test_given_another_tokens_request_id_then_refused_and_nothing_charged(live_app: LiveApp) -> None:
    a = live_app.ledger.create_package(TokenSpec.build("owner", 10))
    b = live_app.ledger.create_package(TokenSpec.build("other", 10))
    rid = str(uuid.uuid4())
    direct_admission(live_app, a.credential, rid)
    assert deliver(live_app, rid, 1, b.credential) == ["invalid_request"]
    assert (live_app.ledger.token(a.token.id).used, live_app.ledger.token(b.token.id).used) == (1, 0)


def test_given_a_client_chosen_x_request_id_then_ray_names_the_request_and_each_is_charged(
    live_app: LiveApp,
) -> None:
    pkg = live_app.ledger.create_package(TokenSpec.build("chooser", 10))
    tid, cred = pkg.token.id, pkg.credential
    headers = {"Authorization": f"Bearer {cred}", "Content-Type": "image/jpeg", "X-Request-ID": "mine-1"}
    ids = []
    for _ in range(2):
        r = httpx.post(f"{live_app.url}/v1/detect", content=jpeg(), headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == r.json()["request_id"] != "mine-1"
        ids.append(r.json()["request_id"])
    assert len(set(ids)) == 2
    assert live_app.ledger.token(tid).used == 2  # not one charge for two detections


def test_given_a_pending_id_when_delivered_for_another_model_then_refused_and_not_charged(live_app: LiveApp) -> None:
    pkg = live_app.ledger.create_package(TokenSpec.build("switch-model", 10))
    tid, cred = pkg.token.id, pkg.credential
    rid = str(uuid.uuid4())
    direct_admission(live_app, cred, rid)  # parts@1, 1 unit
    assert deliver(live_app, rid, 1, cred, model="parts@2") == ["invalid_request"]  # 2 units, another model
    assert live_app.ledger.token(tid).used == 1


def test_given_handle_calls_under_one_request_context_then_each_call_is_its_own_request(live_app: LiveApp) -> None:
    """A Serve deployment calling the handle several times while serving one request of its own
    shares that request's context: its calls must not merge into one charged request."""
    import contextvars

    from ray.serve import get_app_handle
    from ray.serve.context import _set_request_context

    from serve_app.app import APP_NAME

    pkg = live_app.ledger.create_package(TokenSpec.build("composed", 10))
    tid, cred = pkg.token.id, pkg.credential
    handle = get_app_handle(APP_NAME)

    def send() -> list[Any]:
        _set_request_context(request_id=str(uuid.uuid4()))
        return [handle.detect.remote(token=cred, images=[jpeg()]) for _ in range(3)]

    bodies = [r.result(timeout_s=120) for r in contextvars.copy_context().run(send)]
    assert len({b["request_id"] for b in bodies}) == 3
    assert live_app.ledger.token(tid).used == 3
