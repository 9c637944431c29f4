"""Item 2, second half: a request Ray delivers more than once is charged once.

When a replica dies before it acknowledges a request, Ray Serve's router sends the same request,
with the same request metadata (so the same request id), to another replica. The ingress uses
Serve's id as the ledger's request id. These tests run what each ingress replica runs for a
delivery (`IngressSteps.detect` over its own `LeaseHolder`, one replica per delivery, against the
live detectors and ledger) with one id, and check the books. HTTP clients cannot choose that id:
the proxy middleware (serve_app/proxy_hooks.py) renames their X-Request-ID.

Two paths (DESIGN §3a). A package too small to lease (10 units) is admitted synchronously at its
shard, which knows every pending id: a copy is served without a second debit or refused. A leased
package (100 units) is admitted locally by each replica, which cannot know what the others
admitted: every copy may be served, and the shard dedupes by request id when the replicas
report — the first settled row is charged, every other copy's row says `replay` with 0 units.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest

from ledger.core.codes import Code
from ledger.core.entities import Admission, Settlement, TokenSpec
from ledger.store.repository import Store, UsageQuery
from serve_app.catalog import ModelCatalog
from tests.serve_app.conftest import LiveApp, jpeg

pytestmark = pytest.mark.ray
STRICT = 10  # below the ledger's lease_strict_below (16): admitted at the shard
LEASED = 100


def deliver(live_app: LiveApp, rid: str, n: int, token: str, model: str | None = None) -> list[Any]:
    """`n` concurrent deliveries of one request under request id `rid`, each through the steps of
    its own ingress replica (its own lease holder): a body dict or the error table's code. The
    replicas then report and release their leases, as a replica that shuts down does."""
    from ray import serve

    from ledger.client.holder import LeaseHolder
    from serve_app.app import APP_NAME
    from serve_app.errors import ApiError
    from serve_app.ingress_steps import DetectCall, IngressSteps
    from serve_app.metering import Meter
    from serve_app.results import InferenceParams
    from serve_app.surface import DETECTOR_KEY

    call = DetectCall(rid, token, [jpeg()], model, InferenceParams(), "127.0.0.1")

    async def run() -> list[Any]:
        detectors = {m.key: serve.get_deployment_handle(m.deployment_name, APP_NAME) for m in live_app.args.models}
        key = live_app.ledger.capability.derive(DETECTOR_KEY)  # the detectors answer the ingress's key only
        holders = [LeaseHolder(live_app.ledger, f"redelivery-{uuid.uuid4().hex[:8]}") for _ in range(n)]
        replicas = [
            IngressSteps(live_app.args, live_app.ledger, Meter(h), detectors, detector_key=key) for h in holders
        ]  # keys fetched on first use
        try:
            return await asyncio.gather(*(r.detect(call) for r in replicas), return_exceptions=True)
        finally:
            await asyncio.gather(*(p for r in replicas for p in list(r.meter._pending)))
            await asyncio.gather(*(h.close(timeout_s=30) for h in holders))

    outcomes: list[Any] = []
    for out in asyncio.run(run()):
        if isinstance(out, ApiError):
            outcomes.append(out.code)
        elif isinstance(out, BaseException):
            raise out
        else:
            outcomes.append(out.body)
    return outcomes


def rows_of(
    live_app: LiveApp, token_id: str, done: Callable[[list[dict[str, Any]]], bool] | None = None
) -> list[dict[str, Any]]:
    """The token's audit rows once `done(rows)` (default: none is still `admitted`) or a deadline passed."""
    done = done or (lambda rows: all(r["state"] != "admitted" for r in rows))
    store = Store(live_app.args.ledger_settings().database_url)
    try:
        deadline = time.monotonic() + 30
        while True:  # successes complete their audit rows in the background
            rows = store.usage(UsageQuery(token_id=token_id, limit=1000))
            if done(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)
    finally:
        store.close()


def assert_balanced(live_app: LiveApp) -> None:
    report = live_app.ledger.consistency()
    assert report.violations == [] and report.mismatched == [], report


def direct_admission(live_app: LiveApp, credential: str, rid: str) -> None:
    """The first delivery's admission, made at the shard as a replica makes it (with the body hash
    of the request `deliver` sends, which a redelivery must match): its ingress then died."""
    from serve_app.ingress_steps import DetectCall, body_hash
    from serve_app.results import InferenceParams

    call = DetectCall(rid, credential, [jpeg()], None, InferenceParams(), "127.0.0.1")
    spec = ModelCatalog.from_args(live_app.args).resolve(None)
    assert spec.key == "parts@1"
    claims = jwt.decode(credential, options={"verify_signature": False})
    admission = Admission(rid, claims["sub"], claims["jti"], 1, spec.key, "127.0.0.1", None, body_hash(call, spec))
    (d,) = live_app.ledger.admit_sync([admission])
    assert d.code is Code.OK


def test_given_one_request_id_delivered_six_times_at_once_then_charged_once(live_app: LiveApp) -> None:
    pkg = live_app.ledger.create_package(TokenSpec.build("redeliver", STRICT))
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
    assert_balanced(live_app)
    print(json.dumps({"hostile": "redelivery", "deliveries": 7, "served": len(served), "charged": 1}))


def test_given_one_request_id_admitted_locally_by_three_replicas_then_charged_once(live_app: LiveApp) -> None:
    pkg = live_app.ledger.create_package(TokenSpec.build("redeliver-leased", LEASED))
    tid, cred = pkg.token.id, pkg.credential
    rid = str(uuid.uuid4())
    outcomes = deliver(live_app, rid, 3, cred)
    # each replica admitted its copy from its own lease and served it
    assert [o["request_id"] if isinstance(o, dict) else o for o in outcomes] == [rid] * 3, outcomes
    rows = rows_of(live_app, tid, lambda rows: len(rows) >= 3)
    assert Counter((r["request_id"], r["state"], r["outcome"], r["units"]) for r in rows) == {
        (rid, "settled", "ok", 1): 1,
        (rid, "settled", "replay", 0): 2,
    }, rows
    view = live_app.ledger.token(tid)
    assert (view.used, view.leased, view.free) == (1, 0, LEASED - 1)  # the replicas released their leases
    # delivered again to yet another replica: served from its lease, still charged once
    (again,) = deliver(live_app, rid, 1, cred)
    assert isinstance(again, dict) and again["request_id"] == rid, again
    rows = rows_of(live_app, tid, lambda rows: len(rows) >= 4)
    assert sum(r["units"] for r in rows) == 1 and len(rows) == 4
    assert live_app.ledger.token(tid).used == 1
    assert_balanced(live_app)
    print(json.dumps({"hostile": "redelivery-leased", "deliveries": 4, "served": 4, "charged": 1}))


def test_given_a_first_delivery_admitted_then_lost_when_redelivered_then_served_and_charged_once(
    live_app: LiveApp,
) -> None:
    pkg = live_app.ledger.create_package(TokenSpec.build("lost-first", STRICT))
    tid, cred = pkg.token.id, pkg.credential
    rid = str(uuid.uuid4())
    direct_admission(live_app, cred, rid)  # admitted, then the replica that held it died
    (out,) = deliver(live_app, rid, 1, cred)
    assert isinstance(out, dict) and out["request_id"] == rid, out
    assert live_app.ledger.token(tid).used == 1
    rows = rows_of(live_app, tid)
    assert [(r["request_id"], r["state"]) for r in rows] == [(rid, "settled")]


def test_given_a_first_delivery_admitted_at_the_shard_then_lost_when_redelivered_to_a_lease_then_charged_once(
    live_app: LiveApp,
) -> None:
    pkg = live_app.ledger.create_package(TokenSpec.build("lost-first-leased", LEASED))
    tid, cred = pkg.token.id, pkg.credential
    rid = str(uuid.uuid4())
    direct_admission(live_app, cred, rid)  # admitted (debited) at the shard, then its replica died
    (out,) = deliver(live_app, rid, 1, cred)  # served from another replica's lease
    assert isinstance(out, dict) and out["request_id"] == rid, out
    rows = rows_of(live_app, tid, lambda rows: len(rows) >= 2)
    # one id, charged once (§1.7): the answered (leased) copy is charged, and the pending strict copy,
    # whose replica died before answering, is refunded so it cannot be charged as well
    assert sorted((r["state"], r["outcome"], r["units"]) for r in rows) == [
        ("refunded", "ok", 0),
        ("settled", "ok", 1),
    ], rows
    assert sum(r["units"] for r in rows) == 1
    view = live_app.ledger.token(tid)
    assert (view.used, view.leased) == (1, 0)
    assert_balanced(live_app)


def test_given_a_first_delivery_refunded_when_redelivered_then_served_and_charged_once(live_app: LiveApp) -> None:
    for units in (STRICT, LEASED):
        pkg = live_app.ledger.create_package(TokenSpec.build(f"refunded-first-{units}", units))
        tid, cred = pkg.token.id, pkg.credential
        rid = str(uuid.uuid4())
        direct_admission(live_app, cred, rid)
        assert live_app.ledger.settle_sync([Settlement(rid, tid, success=False)]) == [Code.OK]  # its detector failed
        assert live_app.ledger.token(tid).used == 0
        (out,) = deliver(live_app, rid, 1, cred)
        assert isinstance(out, dict) and out["usage"]["units"] == 1, out
        rows = rows_of(live_app, tid, lambda rows: len(rows) >= 2 and all(r["state"] != "admitted" for r in rows))
        assert sorted(r["state"] for r in rows if r["request_id"] == rid) == ["refunded", "settled"], units
        assert sum(r["units"] for r in rows) == 1, units
        assert live_app.ledger.token(tid).used == 1, units
    assert_balanced(live_app)


def test_given_another_tokens_request_id_then_refused_and_nothing_charged(live_app: LiveApp) -> None:
    a = live_app.ledger.create_package(TokenSpec.build("owner", STRICT))
    b = live_app.ledger.create_package(TokenSpec.build("other", STRICT))
    rid = str(uuid.uuid4())
    direct_admission(live_app, a.credential, rid)
    assert deliver(live_app, rid, 1, b.credential) == ["invalid_request"]
    assert (live_app.ledger.token(a.token.id).used, live_app.ledger.token(b.token.id).used) == (1, 0)


def test_given_another_tokens_request_id_on_a_lease_then_each_token_pays_for_its_own(live_app: LiveApp) -> None:
    a = live_app.ledger.create_package(TokenSpec.build("owner-leased", LEASED))
    b = live_app.ledger.create_package(TokenSpec.build("other-leased", LEASED))
    rid = str(uuid.uuid4())
    direct_admission(live_app, a.credential, rid)
    (out,) = deliver(live_app, rid, 1, b.credential)  # B's replica cannot know A's ids: it serves
    assert isinstance(out, dict), out
    rows_of(live_app, b.token.id, lambda rows: len(rows) >= 1)
    # never let one token touch another's: A's admission stays A's, B's answer is B's to pay
    assert (live_app.ledger.token(a.token.id).used, live_app.ledger.token(b.token.id).used) == (1, 1)


def test_given_a_client_chosen_x_request_id_then_ray_names_the_request_and_each_is_charged(
    live_app: LiveApp,
) -> None:
    pkg = live_app.ledger.create_package(TokenSpec.build("chooser", LEASED))
    tid, cred = pkg.token.id, pkg.credential
    headers = {"Authorization": f"Bearer {cred}", "Content-Type": "image/jpeg", "X-Request-ID": "mine-1"}
    ids = []
    for _ in range(2):
        r = httpx.post(f"{live_app.url}/v1/detect", content=jpeg(), headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == r.json()["request_id"] != "mine-1"
        ids.append(r.json()["request_id"])
    assert len(set(ids)) == 2
    assert len(rows_of(live_app, tid, lambda rows: len(rows) >= 2)) == 2
    assert live_app.ledger.token(tid).used == 2  # not one charge for two detections


def test_given_a_pending_id_when_delivered_for_another_model_then_refused_and_not_charged(live_app: LiveApp) -> None:
    pkg = live_app.ledger.create_package(TokenSpec.build("switch-model", STRICT))
    tid, cred = pkg.token.id, pkg.credential
    rid = str(uuid.uuid4())
    direct_admission(live_app, cred, rid)  # parts@1, 1 unit
    assert deliver(live_app, rid, 1, cred, model="parts@2") == ["invalid_request"]  # 2 units, another model
    assert live_app.ledger.token(tid).used == 1


def test_given_a_pending_id_when_served_from_a_lease_for_another_model_then_that_answer_is_charged(
    live_app: LiveApp,
) -> None:
    pkg = live_app.ledger.create_package(TokenSpec.build("switch-model-leased", LEASED))
    tid, cred = pkg.token.id, pkg.credential
    rid = str(uuid.uuid4())
    direct_admission(live_app, cred, rid)  # parts@1, 1 unit, at the shard
    (out,) = deliver(live_app, rid, 1, cred, model="parts@2")  # 2 units, another request: not a redelivery
    assert isinstance(out, dict) and out["usage"]["units"] == 2, out
    rows_of(live_app, tid, lambda rows: len(rows) >= 2)
    assert live_app.ledger.token(tid).used == 3


def test_given_handle_calls_under_one_request_context_then_each_call_is_its_own_request(live_app: LiveApp) -> None:
    """A Serve deployment calling the handle several times while serving one request of its own
    shares that request's context: its calls must not merge into one charged request."""
    import contextvars

    from ray.serve import get_app_handle
    from ray.serve.context import _set_request_context

    from serve_app.app import APP_NAME

    pkg = live_app.ledger.create_package(TokenSpec.build("composed", LEASED))
    tid, cred = pkg.token.id, pkg.credential
    handle = get_app_handle(APP_NAME)

    def send() -> list[Any]:
        _set_request_context(request_id=str(uuid.uuid4()))
        return [handle.detect.remote(token=cred, images=[jpeg()]) for _ in range(3)]

    bodies = [r.result(timeout_s=120) for r in contextvars.copy_context().run(send)]
    assert len({b["request_id"] for b in bodies}) == 3
    assert len(rows_of(live_app, tid, lambda rows: len(rows) >= 3)) == 3
    assert live_app.ledger.token(tid).used == 3
