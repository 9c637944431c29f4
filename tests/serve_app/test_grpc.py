"""Issue 22: the gRPC API and the frame streams, over real clients (grpcio, websockets) through Serve's
own proxies to the session's live app (real model on CPU, real ledger on SQLite).

- gRPC unary `Detect`: the same answer as HTTP, each error class with its status and the table's
  code in the trailers and the rich status, idempotency by metadata;
- `DetectStream`: 200 frames with a revoke in the middle (nothing served 250 ms after it), a
  rate-limited stream (frames refused, the connection kept), a hang-up mid-stream (exactly the
  answered frames charged);
- the WebSocket route `/v1/detect/stream` through Serve's HTTP proxy.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import httpx
import pytest
import websockets

from serve_app.grpc_api import GRPC_STATUS, error_of
from serve_app.launcher import APP_NAME
from serve_app.proto.yolo_tokens.v1 import detect_pb2 as pb
from serve_app.proto.yolo_tokens.v1 import detect_pb2_grpc as rpc
from tests.hostile.lease_helpers import wait_until
from tests.serve_app.conftest import GRPC_PORT, LiveApp, jpeg
from tests.serve_app.test_http import package, post

pytestmark = pytest.mark.ray

TARGET = f"127.0.0.1:{GRPC_PORT}"


def md(cred: str | None, **extra: str) -> list[tuple[str, str]]:
    out = [("application", APP_NAME)]
    if cred is not None:
        out.append(("authorization", f"Bearer {cred}"))
    out.extend(extra.items())
    return out


@pytest.fixture(scope="module")
def stub(live_app: LiveApp) -> Iterator[rpc.DetectServiceStub]:
    with grpc.insecure_channel(TARGET) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        yield rpc.DetectServiceStub(channel)


def failure(call: Any, request: Any, metadata: list[tuple[str, str]]) -> tuple[grpc.StatusCode, dict[str, Any]]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, metadata=metadata, timeout=60)
    err = info.value
    return err.code(), error_of(err.trailing_metadata() or ())


def charged(app: LiveApp, token_id: str, units: int) -> bool:
    view = app.ledger.token(token_id)
    return (view.used == units and view.leased == 0) or view.used == units


def test_given_grpc_detect_then_the_answer_is_the_http_answer_and_charged_once(
    live_app: LiveApp, stub: rpc.DetectServiceStub
) -> None:
    tid, cred = package(live_app, 10)
    img = jpeg(200, 120, (200, 40, 40))
    reply = stub.Detect(pb.DetectRequest(images=[img], model="parts@1"), metadata=md(cred), timeout=60)
    http = post(live_app, cred, img, model="parts@1").json()
    assert (reply.model.name, reply.model.version) == ("parts", "1")
    assert [(i.width, i.height) for i in reply.images] == [(200, 120)]
    got = [(d.class_id, d.class_name, round(d.confidence, 5), round(d.box.x1, 2)) for d in reply.images[0].detections]
    want = [(d["class_id"], d["class_name"], d["confidence"], d["box"]["x1"]) for d in http["images"][0]["detections"]]
    assert got == want
    assert reply.usage.units == 1 and reply.usage.allocation == 10
    wait_until(lambda: live_app.ledger.token(tid).used, lambda u: u == 2, 30, "both charged")
    models = stub.Models(pb.ModelsRequest(), metadata=md(cred), timeout=60)
    assert models.default == "parts@1" and "parts@1" in {m.key for m in models.models}


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("no credential", "missing_token"),
        ("bad credential", "invalid_token"),
        ("not an image", "invalid_image"),
        ("no image", "invalid_request"),
        ("bad conf", "invalid_request"),
        ("unknown model", "unknown_model"),
        ("model not allowed", "model_not_allowed"),
        ("quota", "quota_exhausted"),
        ("revoked", "revoked_token"),
    ],
)
def test_given_a_bad_grpc_call_then_its_status_and_table_code_and_nothing_charged(
    live_app: LiveApp, stub: rpc.DetectServiceStub, case: str, code: str
) -> None:
    tid, cred = package(live_app, 1, models=["parts@1"])
    request = pb.DetectRequest(images=[jpeg()])
    sent: str | None = cred
    if case == "no credential":
        sent = None
    elif case == "bad credential":
        sent = cred[:-4] + "AAAA"
    elif case == "not an image":
        request = pb.DetectRequest(images=[b"\xff\xd8\xff\xe0 a broken JPEG"])
    elif case == "no image":
        request = pb.DetectRequest()
    elif case == "bad conf":
        request = pb.DetectRequest(images=[jpeg()], conf=1.5)
    elif case == "unknown model":
        request = pb.DetectRequest(images=[jpeg()], model="nope@9")
    elif case == "model not allowed":
        request = pb.DetectRequest(images=[jpeg()], model="scaler@1")
    elif case == "quota":
        request = pb.DetectRequest(images=[jpeg(), jpeg()])  # 2 units of 1
    elif case == "revoked":
        live_app.ledger.revoke(tid)
    status, err = failure(stub.Detect, request, md(sent))
    assert err["code"] == code
    assert status == GRPC_STATUS[err["code"]]
    assert err["request_id"]
    if code == "quota_exhausted":
        assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert live_app.ledger.token(tid).used == 0


def test_given_a_rate_limited_grpc_call_then_resource_exhausted_with_retry_info(
    live_app: LiveApp, stub: rpc.DetectServiceStub
) -> None:
    _, cred = package(live_app, 100, rate="1/s:1")
    stub.Detect(pb.DetectRequest(images=[jpeg()]), metadata=md(cred), timeout=60)
    status, err = failure(stub.Detect, pb.DetectRequest(images=[jpeg()]), md(cred))
    assert (status, err["code"]) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limited")
    assert err["retry_after"] >= 1 and 0 < err["retry_delay_s"] <= 1.0


def test_given_an_idempotency_key_over_grpc_then_a_retry_replays_and_another_body_conflicts(
    live_app: LiveApp, stub: rpc.DetectServiceStub
) -> None:
    tid, cred = package(live_app, 10)
    key = f"k-{time.monotonic_ns()}"
    request = pb.DetectRequest(images=[jpeg()])
    first = stub.Detect(request, metadata=md(cred, **{"idempotency-key": key}), timeout=60)
    again = stub.Detect(request, metadata=md(cred, **{"idempotency-key": key}), timeout=60)
    assert not first.idempotent_replayed and again.idempotent_replayed
    assert again.request_id == first.request_id
    status, err = failure(stub.Detect, pb.DetectRequest(images=[jpeg(64, 64)]), md(cred, **{"idempotency-key": key}))
    assert (status, err["code"]) == (grpc.StatusCode.FAILED_PRECONDITION, "idempotency_conflict")
    wait_until(lambda: live_app.ledger.token(tid).used, lambda u: u == 1, 30, "charged once")


# ------------------------------------------------------------------ frame streams over gRPC
async def _frames(n: int, gap_s: float = 0.0, marks: dict[int, float] | None = None) -> AsyncIterator[pb.Frame]:
    img = jpeg(96, 64)
    for i in range(n):
        if marks is not None:
            marks[i] = time.monotonic()
        yield pb.Frame(image=img, seq=i)
        if gap_s:
            await asyncio.sleep(gap_s)


async def test_given_a_stream_revoked_in_the_middle_then_nothing_is_served_250_ms_after_it(live_app: LiveApp) -> None:
    tid, cred = package(live_app, 1000)
    answers: list[tuple[float, pb.FrameResult]] = []
    revoked_at: list[float] = []
    async with grpc.aio.insecure_channel(TARGET) as channel:
        call = rpc.DetectServiceStub(channel).DetectStream(_frames(240, 0.01), metadata=md(cred), timeout=120)
        with pytest.raises(grpc.aio.AioRpcError) as info:  # the session ends with the credential's error
            async for r in call:
                answers.append((time.monotonic(), r))
                if len(answers) == 100:
                    await asyncio.to_thread(live_app.ledger.revoke, tid)
                    revoked_at.append(time.monotonic())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_of(info.value.trailing_metadata() or ())["code"] == "revoked_token"
    seqs = [r.seq for _, r in answers]
    assert seqs == sorted(seqs) and seqs[0] == 0  # in order
    served_late = [r.seq for t, r in answers if r.HasField("result") and t > revoked_at[0] + 0.25]
    assert served_late == []
    last = answers[-1][1]
    assert last.HasField("error") and last.error.code == "revoked_token" and last.ends_session
    served = sum(1 for _, r in answers if r.HasField("result"))
    # frames sent faster than the CPU model answers are dropped past the window: model_busy, unpaid
    before = [r for t, r in answers if t <= revoked_at[0]]
    assert {r.error.code for r in before if r.HasField("error")} <= {"model_busy"}
    assert served >= 10
    wait_until(lambda: live_app.ledger.token(tid).used, lambda u: u == served, 30, "served frames charged")


async def test_given_a_rate_limited_stream_then_frames_are_refused_and_the_connection_kept(live_app: LiveApp) -> None:
    tid, cred = package(live_app, 1000, rate="5/s:2")
    async with grpc.aio.insecure_channel(TARGET) as channel:
        call = rpc.DetectServiceStub(channel).DetectStream(_frames(30, 0.05), metadata=md(cred), timeout=120)
        answers = [r async for r in call]
        assert await call.code() == grpc.StatusCode.OK
    assert [r.seq for r in answers] == list(range(30))  # every frame answered, in order, one connection
    refused = [r.error for r in answers if r.HasField("error")]
    served = sum(1 for r in answers if r.HasField("result"))
    assert refused and served >= 2
    assert {e.code for e in refused} == {"rate_limited"}
    assert all(e.retry_after_s > 0 and e.http_status == 429 for e in refused)
    wait_until(lambda: live_app.ledger.token(tid).used, lambda u: u == served, 30, "served frames charged")


async def test_given_a_client_that_hangs_up_mid_stream_then_exactly_the_answered_frames_are_charged(
    live_app: LiveApp,
) -> None:
    tid, cred = package(live_app, 1000)
    got = 0
    async with grpc.aio.insecure_channel(TARGET) as channel:
        call = rpc.DetectServiceStub(channel).DetectStream(_frames(400), metadata=md(cred), timeout=120)
        async for r in call:
            assert r.HasField("result") or r.error.code == "model_busy"
            got += r.HasField("result")
            if got == 25:
                call.cancel()  # the client hangs up with frames in detection and answers on the way
                break
    # the answers the client took are charged; every other frame is refunded (none left in doubt)
    view = wait_until(
        lambda: live_app.ledger.token(tid), lambda v: v.leased == 0 or v.used >= 25, 30, "the stream settled"
    )
    rows = wait_until(
        lambda: live_app.ledger.usage(token_id=tid, limit=1000),
        lambda rs: all(r["state"] in ("settled", "refunded") for r in rs),
        30,
        "every frame settled or refunded",
    )
    states = Counter(r["state"] for r in rows)
    view = live_app.ledger.token(tid)
    # the client may have had answers in flight in the proxy when it hung up (sent, not read): they
    # are answered frames, charged; never more than the frames the ingress handed over
    assert view.used == states["settled"] >= 25
    assert view.used <= 25 + 8 + 1, (view.used, states)


async def test_given_a_stream_with_a_bad_credential_then_it_ends_at_once_unauthenticated(live_app: LiveApp) -> None:
    async with grpc.aio.insecure_channel(TARGET) as channel:
        call = rpc.DetectServiceStub(channel).DetectStream(_frames(5), metadata=md("nope"), timeout=60)
        answers = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for r in call:
                answers.append(r)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_of(info.value.trailing_metadata() or ())["code"] == "invalid_token"
    assert [(r.error.code, r.ends_session) for r in answers] == [("invalid_token", True)]


# ------------------------------------------------------------------ the WebSocket route
async def test_given_a_websocket_stream_through_serve_then_frames_are_answered_in_order_and_charged(
    live_app: LiveApp,
) -> None:
    tid, cred = package(live_app, 100)
    url = live_app.url.replace("http://", "ws://") + "/v1/detect/stream?model=parts@1"
    answers = []
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {cred}"}) as ws:
        for _ in range(12):
            await ws.send(jpeg(80, 60))
        for _ in range(12):
            answers.append(json.loads(await ws.recv()))
        await ws.send(b"\xff\xd8\xff\xe0 a broken JPEG")
        bad = json.loads(await ws.recv())
    assert [a["seq"] for a in answers] == list(range(12))
    results = [a["result"] for a in answers if "result" in a]
    assert all(r["model"] == {"name": "parts", "version": "1"} for r in results)
    assert all(a.get("error", {}).get("code") in (None, "model_busy") for a in answers)
    assert bad["seq"] == 12 and bad["error"]["code"] == "invalid_image"
    wait_until(lambda: live_app.ledger.token(tid).used, lambda u: u == len(results), 30, "frames charged")


async def test_given_a_websocket_with_a_bad_credential_then_it_closes_with_the_code(live_app: LiveApp) -> None:
    url = live_app.url.replace("http://", "ws://") + "/v1/detect/stream"
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"authorization": "Bearer nope"}))
        last = json.loads(await ws.recv())
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
    assert last["error"]["code"] == "invalid_token"
    assert info.value.rcvd is not None and (info.value.rcvd.code, info.value.rcvd.reason) == (1008, "invalid_token")
    assert httpx.get(f"{live_app.url}/healthz", timeout=30).status_code == 200
