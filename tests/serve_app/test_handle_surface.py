"""Issue 19: a Ray job reaches only the documented API (DESIGN §3d, docs/SECURITY.md).

A separate Ray driver, holding nothing but a team token's credential, names every door the issue
found: the ingress's dunders, private helpers and route methods, the detectors, and the ledger's
named actors. Each is refused with a typed error and changes nothing, while other callers' requests
go on over HTTP, every one answered and charged exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import httpx
import pytest
import ray

from ledger.core.entities import TokenSpec
from tests.serve_app.conftest import LiveApp, jpeg

pytestmark = pytest.mark.ray

DRIVER = textwrap.dedent("""
    import io, json, pickle, sys, tempfile
    from pathlib import Path
    import numpy as np
    import ray
    from ray import serve
    from PIL import Image
    from ledger.core import ops
    from ledger.core.entities import Admission, Settlement, TokenSpec
    from ledger.core.errors import OperationRefused
    from ledger.client.service import attach
    from ledger.core.settings import LedgerSettings
    from serve_app.results import InferenceParams

    address, token, jti, token_id, ip_token, ledger_name, namespace, detector = sys.argv[1:9]
    ray.init(address=address, log_to_driver=False)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 90, 90)).save(buf, format="JPEG")
    image = buf.getvalue()
    out = {}

    def code_of(exc):
        cause = getattr(exc, "cause", None) or exc
        return getattr(cause, "code", None) and str(getattr(cause.code, "value", cause.code))

    def attempt(name, fn):
        try:
            value = fn()
            out[name] = ["answered", repr(value)[:200]]
        except Exception as exc:
            out[name] = [code_of(exc) or type(exc).__name__, str(exc)[:300]]

    app = serve.get_app_handle("yolo-tokens")
    ingress = serve.get_deployment_handle("Ingress", "yolo-tokens")
    scope = {"type": "http", "method": "POST", "path": "/v1/detect", "headers": [], "query_string": b"",
             "client": ("10.1.2.3", 1)}
    for label, handle in (("app", app), ("ingress", ingress)):
        calls = {
            "__del__": (),
            "__init__": (None, {}, None, None),
            "__setattr__": ("holder", None),
            "__delattr__": ("holder",),
            "_gauge_loop": (),
            "_ledger": ("tokens", None),
            "detect_http": (None,),
            # the gRPC methods take Serve's gRPC context (the peer address an IP allowlist checks):
            # only Serve's gRPC proxy may call them, never a handle with a context it made up
            "Detect": (None, None),
            "DetectStream": (None, None),
            "Models": (None, None),
            "detect_stream_ws": (None,),
            "revoke": (None, token_id),
            "admin_op": (None, "issue_admin"),
            "__call__": (scope, None, None),
            "holder": (),
            "no_such_method": (),
        }
        for method, args in calls.items():
            attempt(f"{label}.{method}", lambda: handle.options(method_name=method).remote(*args).result(timeout_s=60))
        attempt(f"{label}.plain_call", lambda: handle.remote(scope, None, None).result(timeout_s=60))
    # a token with an IP allowlist: a handle call has no client address, so it is refused
    attempt("ip_token.detect", lambda: app.detect.remote(token=ip_token, images=[image]).result(timeout_s=60))
    # the detectors, called directly: unmetered inference if they answered
    det = serve.get_deployment_handle(detector, "yolo-tokens")
    pixels = [np.zeros((48, 64, 3), np.uint8)]
    attempt("detector.detect", lambda: det.detect.remote(pixels, InferenceParams()).result(timeout_s=60))
    attempt("detector.detect_bad_key",
            lambda: det.detect.remote(pixels, InferenceParams(), key="0" * 64).result(timeout_s=60))
    attempt("detector.detect_batch", lambda: det.detect_batch.remote((pixels, InferenceParams())).result(timeout_s=60))
    # the ledger's named actors: no capability, only a team token
    shard = ray.get_actor(f"{ledger_name}-shard-0", namespace=namespace)
    coordinator = ray.get_actor(ledger_name, namespace=namespace)
    g = lambda ref: ray.get(ref, timeout=60)
    spec = TokenSpec.build("minted", 10**6)
    attempt("shard.create_package", lambda: g(shard.call.remote(ops.CreatePackage(spec))))
    attempt("shard.split_as_token",
            lambda: g(shard.call.remote(ops.Split(token_id, spec, by_token=token_id), jti)))
    attempt("shard.top_up", lambda: g(shard.call.remote(ops.TopUp(token_id, 10**6))))
    attempt("shard.tokens", lambda: g(shard.call.remote(ops.Tokens())))
    attempt("shard.settle_refund",
            lambda: g(shard.settle_batch.remote([Settlement("job-1", token_id, False, root_id=token_id).row()])))
    attempt("shard.admit_packed",
            lambda: g(shard.admit_packed.remote(pickle.dumps([Admission("job-2", token_id, jti, 1, "parts@1").row()]))))
    attempt("shard.lease_sync", lambda: g(shard.lease_sync.remote(pickle.dumps([]))))
    attempt("shard.stats", lambda: g(shard.stats.remote()))
    attempt("coordinator.issue_admin", lambda: g(coordinator.call.remote(ops.IssueAdmin("me"))))
    attempt("coordinator.usage", lambda: g(coordinator.call.remote(ops.Usage())))
    claims = {"sub": token_id, "pkg": token_id, "jti": "jti_forged", "typ": "admin", "exp": 2**31}
    attempt("coordinator.sign", lambda: g(coordinator.sign.remote(claims)))
    attempt("coordinator.root_of", lambda: g(coordinator.root_of.remote(token_id)))
    attempt("shard.__ray_call__", lambda: g(shard.__ray_call__.remote(lambda actor: actor._capability)))
    attempt("coordinator.__ray_call__", lambda: g(coordinator.__ray_call__.remote(lambda actor: actor._capability)))
    out["describe_keys"] = sorted(g(coordinator.describe.remote()))
    # the client a job gets with the settings of its own working directory: no capability there
    elsewhere = LedgerSettings(actor_name=ledger_name, namespace=namespace, data_dir=Path(tempfile.mkdtemp()))
    client = attach(elsewhere)
    attempt("client.tokens", lambda: client.tokens())
    attempt("client.issue_admin", lambda: client.issue_admin("me"))
    print("RESULT " + json.dumps(out))
""")


def test_given_a_team_job_then_only_the_api_answers_and_other_callers_go_on_exactly(live_app: LiveApp) -> None:
    from ledger.core.credentials import Verifier

    ledger = live_app.ledger
    settings = live_app.args.ledger_settings()
    team = ledger.create_package(TokenSpec.build(f"team-{uuid.uuid4().hex[:6]}", 50))
    ip_only = ledger.create_package(TokenSpec.build(f"ip-{uuid.uuid4().hex[:6]}", 50, ips=["10.0.0.0/8"]))
    other = ledger.create_package(TokenSpec.build(f"other-{uuid.uuid4().hex[:6]}", 500))
    jti = Verifier(ledger.public_keys()).verify(team.credential).jti
    detector = next(m.deployment_name for m in live_app.args.models if m.key == "parts@1")
    answered: list[int] = []
    stop = threading.Event()

    def good_traffic() -> None:  # another team, over HTTP, all along
        headers = {"Authorization": f"Bearer {other.credential}", "Content-Type": "image/jpeg"}
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                answered.append(http.post(f"{live_app.url}/v1/detect", content=jpeg(), headers=headers).status_code)

    traffic = threading.Thread(target=good_traffic, daemon=True)
    traffic.start()
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                DRIVER,
                ray.get_runtime_context().gcs_address,
                team.credential,
                jti,
                team.token.id,
                ip_only.credential,
                settings.actor_name,
                settings.namespace,
                detector,
            ],
            env=dict(os.environ),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    finally:
        stop.set()
        traffic.join(timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])

    refused = {k: v for k, v in out.items() if k != "describe_keys"}
    for name, (code, message) in refused.items():
        expected = "ip_not_allowed" if name == "ip_token.detect" else "forbidden"
        assert code == expected, (name, code, message)
    assert out["describe_keys"] == ["shards"]  # no settings (a database password) without the capability

    # nothing changed: the team's token, the package count, nothing minted, refunded or charged
    after = ledger.token(team.token.id)
    assert (after.allocation, after.used, after.status) == (50, 0, "active")
    assert not [t for t in ledger.tokens() if t.name == "minted"]
    assert ledger.token(ip_only.token.id).used == 0
    # the other team was answered all along, and charged exactly what was answered
    assert answered and set(answered) == {200}, sorted(set(answered))
    deadline = time.monotonic() + 30
    while ledger.token(other.token.id).used != len(answered) and time.monotonic() < deadline:
        time.sleep(0.2)  # the last answers' settlements are reported within the holder's interval
    assert ledger.token(other.token.id).used == len(answered)
    assert not ledger.consistency().violations
    # the replicas still hold open lease holders (`__del__` did not run) and keep serving
    handle_stats = [ray.get(ledger.shard_actors[0].stats.remote(ledger.capability))]
    assert handle_stats[0]["ready"]
    from ray import serve

    ingress = serve.get_deployment_handle("Ingress", "yolo-tokens")
    seen = {s["holder"]: s for s in (ingress.stats.remote().result(timeout_s=60) for _ in range(8))}
    assert seen and not any(s["closed"] for s in seen.values())
    r = httpx.post(
        f"{live_app.url}/v1/detect",
        content=jpeg(),
        headers={"Authorization": f"Bearer {team.credential}", "Content-Type": "image/jpeg"},
        timeout=120,
    )
    assert r.status_code == 200, r.text


def test_given_the_app_deleted_then_serve_still_runs_the_replicas_cleanup(
    live_app: LiveApp, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`__del__` is closed to requests, and Serve's graceful shutdown still runs it: the replica's
    lease holder reports and releases at once (a lease TTL of 10 minutes could not explain it)."""
    from ray import serve

    from ledger.client.service import attach, stop
    from serve_app.app import build_app
    from serve_app.config import LedgerArgs
    from tests.hostile.conftest import side_app_args

    tmp = tmp_path_factory.mktemp("cleanup")
    args = side_app_args(f"sqlite:///{tmp / 'ledger.db'}", tmp, f"cleanup-{uuid.uuid4().hex[:6]}")
    args = args.model_copy(update={"ledger": LedgerArgs(lease_ttl_s=600)})
    serve.run(build_app(args), name="yt-cleanup", route_prefix="/cleanup")
    ledger = attach(args.ledger_settings())
    try:
        pkg = ledger.create_package(TokenSpec.build("cleanup", 1000))
        headers = {"Authorization": f"Bearer {pkg.credential}", "Content-Type": "image/jpeg"}
        deadline = time.monotonic() + 120
        with httpx.Client(timeout=120) as http:
            while ledger.token(pkg.token.id).leased == 0:  # traffic until the replica holds a lease
                assert time.monotonic() < deadline, "the replica never took a lease"
                r = http.post(f"{live_app.url}/cleanup/v1/detect", content=jpeg(), headers=headers)
                assert r.status_code == 200, r.text
        serve.delete("yt-cleanup")
        view = ledger.token(pkg.token.id)
        assert view.leased == 0, view  # released by the destructor, not by the TTL
        assert not [e for e in ledger.admin_events(token_id=pkg.token.id) if e["action"] == "lease.lost"]
        rows = ledger.usage(token_id=pkg.token.id)
        assert view.used == len(rows) and {r["state"] for r in rows} == {"settled"}  # every answer charged once
    finally:
        with contextlib.suppress(Exception):
            serve.delete("yt-cleanup")
        stop(ledger)
