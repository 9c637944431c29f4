"""Items 6 and 7: every token against every object outside its own subtree (BOLA), functions a token
must not reach (BFLA), and a child that tries to widen any limit of its parent."""

from __future__ import annotations

import json
import time
from itertools import product

import httpx
import pytest

from ledger.core.entities import TokenSpec
from tests.serve_app.conftest import LiveApp

pytestmark = pytest.mark.ray


def tree(app: LiveApp, tag: str) -> dict[str, tuple[str, str]]:
    """A package, a child and a grandchild: name -> (token id, credential)."""
    pkg = app.ledger.create_package(TokenSpec.build(f"{tag}-{time.monotonic_ns()}", 100))
    kid = app.ledger.split(pkg.token.id, TokenSpec.build(f"{tag}-team", 40))
    grand = app.ledger.split(kid.token.id, TokenSpec.build(f"{tag}-dev", 10))
    return {tag: (pkg.token.id, pkg.credential), f"{tag}1": (kid.token.id, kid.credential),
            f"{tag}2": (grand.token.id, grand.credential)}  # fmt: skip


def call(app: LiveApp, method: str, path: str, credential: str, **kw: object) -> httpx.Response:
    return httpx.request(method, f"{app.url}{path}", headers={"Authorization": f"Bearer {credential}"},
                         timeout=30, **kw)  # type: ignore[arg-type]  # fmt: skip


def test_given_two_packages_then_no_token_reads_or_steers_outside_its_own_subtree(live_app: LiveApp) -> None:
    tokens = tree(live_app, "A") | tree(live_app, "B")
    inside = {"A": {"A", "A1", "A2"}, "A1": {"A1", "A2"}, "A2": {"A2"}, "B": {"B", "B1", "B2"}, "B1": {"B1", "B2"},
              "B2": {"B2"}}  # fmt: skip
    before = {n: live_app.ledger.token(tid) for n, (tid, _) in tokens.items()}
    probes = 0
    for caller, target in product(tokens, tokens):
        if target in inside[caller]:
            continue
        cred, tid = tokens[caller][1], tokens[target][0]
        for method, path in (("GET", f"/v1/tokens/{tid}"), ("POST", f"/v1/tokens/{tid}/revoke"),
                             ("POST", f"/v1/tokens/{tid}/reclaim"), ("POST", f"/v1/tokens/{tid}/rotate")):  # fmt: skip
            r = call(live_app, method, path, cred, **({"json": {}} if path.endswith("reclaim") else {}))
            probes += 1
            assert r.status_code in (403, 404), (caller, target, method, path, r.status_code, r.text)
            assert "allocation" not in r.text and "credential" not in r.json(), (caller, target, path)
        usage = call(live_app, "GET", "/v1/usage", cred).json()
        assert {t["id"] for t in usage["tokens"]} == {tokens[n][0] for n in inside[caller]}
    after = {n: live_app.ledger.token(tid) for n, (tid, _) in tokens.items()}
    assert after == before  # nothing moved, nothing revoked or rotated
    print(json.dumps({"hostile": "bola_matrix", "tokens": len(tokens), "probes": probes}))


def test_given_functions_a_token_must_not_reach_then_refused(live_app: LiveApp) -> None:
    tokens = tree(live_app, "C")
    pid, pcred = tokens["C"]
    kid_id, kid_cred = tokens["C1"]
    admin = live_app.ledger.issue_admin("ops")
    refused = [
        call(live_app, "POST", "/v1/packages", pcred, json={"name": "x", "quota": 10}),  # no such function
        call(live_app, "POST", f"/v1/tokens/{pid}/top-up", pcred, json={"units": 10**6}),  # admins only, not HTTP
        call(live_app, "DELETE", f"/v1/tokens/{pid}", pcred),
        call(live_app, "POST", f"/v1/tokens/{pid}/revoke", kid_cred),  # a child against its parent
        call(live_app, "GET", f"/v1/tokens/{pid}", kid_cred),
        call(live_app, "GET", "/v1/usage", admin),  # an admin credential is not a token credential
        call(live_app, "POST", "/v1/tokens", admin, json={"name": "x", "quota": 1}),
    ]
    for r in refused:
        assert r.status_code in (403, 404, 405), (r.request.method, r.request.url, r.status_code, r.text)
    assert live_app.ledger.token(pid).allocation == 100 and live_app.ledger.token(kid_id).status == "active"


def test_given_a_child_then_it_cannot_widen_any_limit_of_its_parent(live_app: LiveApp) -> None:
    parent = live_app.ledger.create_package(
        TokenSpec.build(
            f"narrow-{time.monotonic_ns()}",
            100,
            expires_at=time.time() + 86400,
            models=["parts@1"],
            ips=["127.0.0.1/32"],
            rate="basic",
        )
    )
    pid, cred = parent.token.id, parent.credential
    attempts = {
        "more quota": {"quota": 101},
        "later expiry": {"quota": 1, "expires_in_s": 2 * 86400},
        "more models": {"quota": 1, "models": ["scaler"]},
        "more IPs": {"quota": 1, "ips": ["10.0.0.0/8"]},
        "higher rate": {"quota": 1, "rate": "pro"},
    }
    for name, body in attempts.items():
        r = call(live_app, "POST", "/v1/tokens", cred, json={"name": name, **body})
        assert r.status_code in (403, 429), (name, r.status_code, r.text)
        assert r.json()["error"]["code"] in ("limit_widening", "quota_exhausted"), (name, r.text)
    assert live_app.ledger.token(pid).children == [] and live_app.ledger.token(pid).free == 100
    ok = call(live_app, "POST", "/v1/tokens", cred, json={"name": "narrower", "quota": 10, "models": ["parts@1"]})
    assert ok.status_code == 201, ok.text
