"""Item 8: IP allowlists behind proxies. X-Forwarded-For from an untrusted peer is ignored; from the
configured trusted proxy (127.0.0.2 in the live app) the first untrusted hop from the right is
the client. Requests are sent from 127.0.0.1 and, as the proxy, from the source address 127.0.0.2."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from ledger.core.entities import TokenSpec
from tests.serve_app.conftest import LiveApp, jpeg

pytestmark = pytest.mark.ray
PINNED = "10.9.9.9"


def post(app: LiveApp, credential: str, source: str, forwarded: list[str]) -> httpx.Response:
    headers = [("Authorization", f"Bearer {credential}"), ("Content-Type", "image/jpeg")]
    headers += [("X-Forwarded-For", value) for value in forwarded]
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=60) as client:
        return client.post(f"{app.url}/v1/detect", content=jpeg(), headers=headers)


def test_given_forwarded_for_from_untrusted_and_trusted_peers_then_only_the_trusted_hop_counts(
    live_app: LiveApp,
) -> None:
    assert "127.0.0.2/32" in live_app.args.limits.trusted_proxies
    pkg = live_app.ledger.create_package(TokenSpec.build("pinned", 100, ips=[f"{PINNED}/32"]))
    tid, cred = pkg.token.id, pkg.credential
    cases = [  # (source, X-Forwarded-For lines, expected status)
        ("127.0.0.1", [PINNED], 403),  # untrusted peer: its header is ignored
        ("127.0.0.1", [f"1.2.3.4, {PINNED}"], 403),
        ("127.0.0.2", [], 403),  # the proxy itself is not the pinned client
        ("127.0.0.2", [PINNED], 200),  # the proxy says who the client is
        ("127.0.0.2", [f"{PINNED}, 127.0.0.2"], 200),  # trusted hops are skipped from the right
        ("127.0.0.2", [f"{PINNED}, 1.2.3.4"], 403),  # the client put the pinned IP in front
        ("127.0.0.2", [PINNED, "1.2.3.4"], 403),  # the same, as two header lines
        ("127.0.0.2", ["not-an-ip"], 403),
        ("127.0.0.2", ["::ffff:10.9.9.9"], 403),  # another family's spelling is not the pinned v4 address
    ]
    seen = []
    for source, forwarded, want in cases:
        r = post(live_app, cred, source, forwarded)
        seen.append(r.status_code)
        assert r.status_code == want, (source, forwarded, r.text)
        if want == 403:
            assert r.json()["error"]["code"] == "ip_not_allowed"
    served = seen.count(200)
    deadline = time.monotonic() + 30  # admitted from a replica's lease: charged at its next report
    while (used := live_app.ledger.token(tid).used) < served and time.monotonic() < deadline:
        time.sleep(0.05)
    assert used == served  # refusals cost nothing
    print(json.dumps({"hostile": "forwarded_for", "requests": len(cases), "served": served,
                      "refused": len(cases) - served, "charged": served}))  # fmt: skip
