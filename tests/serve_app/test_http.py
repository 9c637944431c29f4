"""Every route and error code of the table over real HTTP on 127.0.0.1, through the real graph."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from ledger.core.entities import TokenSpec, TokenView
from ledger.store.repository import Store
from tests.serve_app.conftest import LiveApp, jpeg

pytestmark = pytest.mark.ray


def package(app: LiveApp, units: int = 50, **limits: Any) -> tuple[str, str]:
    out = app.ledger.create_package(TokenSpec.build(f"p-{time.monotonic_ns()}", units, **limits))
    return out.token.id, out.credential


def post(app: LiveApp, cred: str | None, body: bytes = b"", ctype: str = "image/jpeg", **params: Any) -> httpx.Response:
    headers = {"Content-Type": ctype}
    if cred is not None:
        headers["Authorization"] = f"Bearer {cred}"
    headers.update(params.pop("headers", {}))
    return httpx.post(f"{app.url}/v1/detect", content=body, headers=headers, params=params, timeout=120)


def token_once(app: LiveApp, token_id: str, done: Callable[[TokenView], bool], timeout_s: float = 30) -> TokenView:
    """The token once `done(view)` (replicas report within ~100 ms, release leases when told to),
    or as it is at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not done(view := app.ledger.token(token_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return view


def served_until_revoked(app: LiveApp, cred: str, timeout_s: float = 10) -> int:
    """Detections with `cred` until one is refused revoked_token; returns how many were served first.
    A replica admits nothing once it has seen a revocation, pushed to it through the ledger's watch
    (DESIGN §3a), so a request right after `revoke` returned may still be served from its lease."""
    deadline = time.monotonic() + timeout_s
    served = 0
    while (r := post(app, cred, jpeg())).status_code == 200:
        served += 1
        assert time.monotonic() < deadline, f"still served {served} times {timeout_s:g} s after the revocation"
    assert r.status_code == 401 and r.json()["error"]["code"] == "revoked_token", r.text
    return served


def test_given_a_token_when_detecting_then_200_with_the_schema_and_quota_headers(live_app: LiveApp) -> None:
    tid, cred = package(live_app, 10, rate="pro")
    r = post(live_app, cred, jpeg())
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"request_id", "model", "images", "usage", "timing_ms"}
    assert body["model"] == {"name": "parts", "version": "1"}
    assert body["images"][0]["width"] == 160 and body["images"][0]["height"] == 120
    assert body["usage"] == {"units": 1, "used": 1, "allocation": 10, "remaining": 9}
    assert r.headers["X-Quota-Remaining"] == "9"
    assert r.headers["X-RateLimit-Limit"] == "10"
    assert live_app.ledger.token(tid).used == 1


def test_given_multipart_and_json_bodies_then_each_image_is_detected_and_charged(live_app: LiveApp) -> None:
    tid, cred = package(live_app, 10)
    files = [("image", ("a.jpg", jpeg(), "image/jpeg")), ("image", ("b.png", jpeg(90, 60), "image/png"))]
    r = httpx.post(f"{live_app.url}/v1/detect", files=files, headers={"Authorization": f"Bearer {cred}"}, timeout=120)
    assert r.status_code == 200, r.text
    assert [im["width"] for im in r.json()["images"]] == [160, 90]
    r = httpx.post(
        f"{live_app.url}/v1/detect",
        json={"image": base64.b64encode(jpeg()).decode()},
        headers={"Authorization": f"Bearer {cred}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert live_app.ledger.token(tid).used == 3


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("no_token", 401, "missing_token"),
        ("garbage_token", 401, "invalid_token"),
        ("wrong_magic", 415, "unsupported_media_type"),
        ("empty", 400, "invalid_image"),
        ("truncated", 400, "invalid_image"),
        ("too_big", 413, "payload_too_large"),
        ("unknown_model", 404, "unknown_model"),
        ("bad_json", 400, "invalid_request"),
        ("bad_conf", 400, "invalid_request"),
    ],
)
def test_given_bad_input_then_the_tabled_error_and_no_charge(
    live_app: LiveApp, case: str, status: int, code: str
) -> None:
    tid, cred = package(live_app, 10)
    kw: dict[str, Any] = {}
    body, ctype, token = jpeg(), "image/jpeg", cred
    if case == "no_token":
        token = None
    elif case == "garbage_token":
        token = "not.a.jwt"
    elif case == "wrong_magic":
        body = b"GIF89a" + b"\0" * 100
    elif case == "empty":
        body = b""
    elif case == "truncated":
        body = jpeg(400, 400)[:300]
    elif case == "too_big":
        body = b"\xff\xd8\xff" + b"\0" * (3 * 1024 * 1024)
    elif case == "unknown_model":
        kw["model"] = "nosuch"
    elif case == "bad_json":
        body, ctype = b"{not json", "application/json"
    elif case == "bad_conf":
        kw["conf"] = 7
    r = post(live_app, token, body, ctype, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["request_id"]
    assert live_app.ledger.token(tid).used == 0


def test_given_quota_exhausted_then_429_and_denials_are_audited(live_app: LiveApp) -> None:
    tid, cred = package(live_app, 2)
    codes = [post(live_app, cred, jpeg()).status_code for _ in range(4)]
    assert codes == [200, 200, 429, 429]
    assert live_app.ledger.token(tid).used == 2  # charged at admission, before the answers
    store = Store(live_app.args.ledger_settings().database_url)
    deadline = time.monotonic() + 30  # successes and local denials reach the audit in the next report
    while (
        (counts := store.usage_counts(tid)).get("settled") != (2, 2) or counts.get("denied", (0, 0))[0] < 2
    ) and time.monotonic() < deadline:
        time.sleep(0.1)
    store.close()
    assert counts["settled"] == (2, 2) and counts["denied"][0] == 2


def test_given_a_rate_limit_then_429_with_retry_after(live_app: LiveApp) -> None:
    _, cred = package(live_app, 100, rate="1/min:1")
    assert post(live_app, cred, jpeg()).status_code == 200
    r = post(live_app, cred, jpeg())
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["Retry-After"]) <= 60


def test_given_a_token_for_another_model_then_403(live_app: LiveApp) -> None:
    tid, cred = package(live_app, 10, models=["parts@2"])
    r = post(live_app, cred, jpeg(), model="parts@1")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    assert live_app.ledger.token(tid).used == 0


def test_given_an_ip_pinned_token_then_only_that_client_or_a_trusted_proxy_hop_passes(live_app: LiveApp) -> None:
    _, cred = package(live_app, 10, ips=["10.9.9.9/32"])
    spoofed = post(live_app, cred, jpeg(), headers={"X-Forwarded-For": "10.9.9.9"})
    assert spoofed.status_code == 403 and spoofed.json()["error"]["code"] == "ip_not_allowed"
    _, local = package(live_app, 10, ips=["127.0.0.1/32"])
    assert post(live_app, local, jpeg()).status_code == 200


def test_given_an_idempotency_key_then_charged_once_replayed_and_conflict_on_other_body(live_app: LiveApp) -> None:
    tid, cred = package(live_app, 10)
    first = post(live_app, cred, jpeg(), headers={"Idempotency-Key": "order-1"})
    again = post(live_app, cred, jpeg(), headers={"Idempotency-Key": "order-1"})
    assert first.status_code == again.status_code == 200
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json()["request_id"] == first.json()["request_id"]
    other = post(live_app, cred, jpeg(50, 50), headers={"Idempotency-Key": "order-1"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    assert live_app.ledger.token(tid).used == 1


def test_given_a_cold_version_then_it_loads_on_the_first_request_and_costs_its_units(live_app: LiveApp) -> None:
    tid, cred = package(live_app, 10)
    r = post(live_app, cred, jpeg(), model="parts@2")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == {"name": "parts", "version": "2"}
    assert live_app.ledger.token(tid).used == 2


def test_given_token_routes_then_a_token_steers_only_its_own_subtree(live_app: LiveApp) -> None:
    _, cred = package(live_app, 100)
    other_id, _ = package(live_app, 100)
    auth = {"Authorization": f"Bearer {cred}"}
    r = httpx.post(f"{live_app.url}/v1/tokens", json={"name": "team", "quota": 30, "rate": "basic"}, headers=auth)
    assert r.status_code == 201, r.text
    child = r.json()["token"]["id"]
    child_cred = r.json()["credential"]
    assert httpx.get(f"{live_app.url}/v1/tokens/{child}", headers=auth).json()["allocation"] == 30
    assert httpx.get(f"{live_app.url}/v1/tokens/{other_id}", headers=auth).status_code == 404
    child_auth = {"Authorization": f"Bearer {child_cred}"}
    wide = httpx.post(f"{live_app.url}/v1/tokens", json={"name": "x", "quota": 1, "rate": "pro"}, headers=child_auth)
    assert wide.status_code == 403 and wide.json()["error"]["code"] == "limit_widening"
    rotated = httpx.post(f"{live_app.url}/v1/tokens/{child}/rotate", headers=auth)
    assert rotated.status_code == 200
    assert post(live_app, child_cred, jpeg()).json()["error"]["code"] == "revoked_token"
    new_cred = rotated.json()["credential"]
    assert post(live_app, new_cred, jpeg()).status_code == 200
    rec = httpx.post(f"{live_app.url}/v1/tokens/{child}/reclaim", json={"units": 10}, headers=auth)
    assert rec.status_code == 200 and rec.json()["returned"] == 10
    rev = httpx.post(f"{live_app.url}/v1/tokens/{child}/revoke", headers=auth)
    assert rev.status_code == 200, rev.text
    # what is not leased comes back at once; what an ingress replica holds in its lease stays escrowed
    # until it gives it back, and the unit it served counts as used only once it reported (DESIGN §3a):
    # whenever the answer was made, the 20 units add up
    returned, gone = rev.json()["returned"], rev.json()["token"]
    assert gone["status"] == "revoked" and gone["free"] == 0 and gone["used"] in (0, 1), gone
    assert returned + gone["used"] + gone["leased"] == 20 and returned + gone["allocation"] == 20, rev.json()
    late = served_until_revoked(live_app, new_cred)
    # a replica that served from its lease before it saw the revocation could only spend what the lease
    # held: no overspend; then the revoked token ends holding exactly what it spent
    assert 1 + late <= gone["allocation"], (late, gone)
    view = token_once(live_app, child, lambda v: (v.used, v.leased) == (1 + late, 0))
    assert (view.allocation, view.used, view.leased) == (1 + late, 1 + late, 0)
    usage = httpx.get(f"{live_app.url}/v1/usage", headers=auth).json()
    assert {t["name"] for t in usage["tokens"]} >= {"team"}


def test_given_models_route_then_versions_and_costs_are_listed(live_app: LiveApp) -> None:
    _, cred = package(live_app, 1)
    r = httpx.get(f"{live_app.url}/v1/models", headers={"Authorization": f"Bearer {cred}"})
    assert [(m["key"], m["cost_units"]) for m in r.json()["models"]] == [
        ("parts@1", 1),
        ("parts@2", 2),
        ("scaler@1", 1),
    ]
    assert httpx.get(f"{live_app.url}/openapi.json").status_code == 200
