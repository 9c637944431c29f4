"""The gRPC API's pure parts (serve_app/grpc_api.py): the status of every error code, the trailers
and their client-side reading, the reply built from an HTTP result body, the request parameters,
the call's peer and metadata, and the checked-in stubs against `make proto`. No server."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from serve_app import grpc_api
from serve_app.answer import result_body
from serve_app.errors import ERRORS, ApiCode, ApiError
from serve_app.proto.yolo_tokens.v1 import detect_pb2 as pb
from serve_app.results import Detection, InferenceParams

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("serve_app/proto/yolo_tokens/v1/detect.proto")
STUBS = ("detect_pb2.py", "detect_pb2.pyi", "detect_pb2_grpc.py")

STATUS_OF_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


# ---------------------------------------------------------------------------------------- statuses


def test_given_the_error_table_then_every_code_has_a_grpc_status() -> None:
    assert set(grpc_api.GRPC_STATUS) == set(ApiCode) == set(ERRORS)


@pytest.mark.parametrize("code", list(ApiCode), ids=str)
def test_given_a_code_then_its_grpc_status_follows_its_http_status(code: ApiCode) -> None:
    assert ERRORS[code] in STATUS_OF_HTTP, f"no expected gRPC status for HTTP {ERRORS[code]}"
    assert grpc_api.GRPC_STATUS[code] is STATUS_OF_HTTP[ERRORS[code]]


# ---------------------------------------------------------------------------------------- trailers


def test_given_a_retryable_error_then_its_trailers_round_trip_code_request_id_and_retry() -> None:
    trailing = grpc_api.trailers(ApiError(ApiCode.RATE_LIMITED, "x", retry_after=1.2), "rid")

    md = dict(trailing)
    assert md[grpc_api.CODE_KEY] == "rate_limited"
    assert md[grpc_api.REQUEST_ID_KEY] == "rid"
    assert md[grpc_api.RETRY_AFTER_KEY] == "2"  # whole seconds, never early
    assert isinstance(md[grpc_api.DETAILS_KEY], bytes)
    assert all(isinstance(v, str) for k, v in trailing if k != grpc_api.DETAILS_KEY)

    seen = grpc_api.error_of(trailing)
    assert seen["code"] == "rate_limited"
    assert seen["request_id"] == "rid"
    assert seen["retry_after"] == 2
    assert seen["retry_delay_s"] == pytest.approx(1.2, abs=1e-6)


def test_given_an_error_without_retry_after_then_the_trailers_carry_no_retry() -> None:
    trailing = grpc_api.trailers(ApiError(ApiCode.FORBIDDEN, "no"), "rid-2")

    assert grpc_api.RETRY_AFTER_KEY not in dict(trailing)
    seen = grpc_api.error_of(trailing)
    assert seen == {"code": "forbidden", "request_id": "rid-2"}


def test_given_only_the_rich_status_then_error_of_still_finds_the_code_and_retry() -> None:
    trailing = grpc_api.trailers(ApiError(ApiCode.MODEL_BUSY, "busy", retry_after=0.25), "rid-3")
    rich_only = [(k, v) for k, v in trailing if k != grpc_api.CODE_KEY]

    seen = grpc_api.error_of(rich_only)
    assert seen["code"] == "model_busy"
    assert seen["retry_delay_s"] == pytest.approx(0.25, abs=1e-6)


def test_given_a_failed_call_then_fail_sets_the_status_details_and_trailers_on_the_context() -> None:
    class Context:
        def set_code(self, code: grpc.StatusCode) -> None:
            self.code = code

        def set_details(self, details: str) -> None:
            self.details = details

        def set_trailing_metadata(self, md: Any) -> None:
            self.trailing = md

    ctx = Context()
    exc = ApiError(ApiCode.REVOKED_TOKEN, "this token was revoked")
    grpc_api.fail(ctx, exc, "rid-4")

    assert ctx.code is grpc.StatusCode.UNAUTHENTICATED
    assert ctx.details == "this token was revoked"
    assert ctx.trailing == grpc_api.trailers(exc, "rid-4")


# ------------------------------------------------------------------------------------------ replies


def http_body() -> dict[str, Any]:
    """A body as `IngressSteps.detect_held` makes it: `result_body` plus usage and timing."""
    body = result_body(
        "req-1",
        "yolo11n",
        "v2",
        [(640, 480), (32, 16)],
        [
            [
                Detection(0, "person", 0.91234, 1.5, 2.25, 100.0, 200.75),
                Detection(16, "dog", 0.5, 10.0, 20.0, 30.0, 40.0),
            ],
            [],
        ],
    )
    body |= {
        "usage": {"units": 3, "used": 120, "allocation": 1000, "remaining": 880},
        "timing_ms": {"decode": 1.5, "admit": 0.25, "infer": 12.75, "total": 14.5},
    }
    return body


def test_given_an_http_result_body_then_the_reply_keeps_every_field() -> None:
    body = http_body()
    msg = grpc_api.reply(body)

    assert msg.request_id == "req-1"
    assert (msg.model.name, msg.model.version) == ("yolo11n", "v2")
    assert [(i.width, i.height) for i in msg.images] == [(640, 480), (32, 16)]
    dets = msg.images[0].detections
    assert [(d.class_id, d.class_name) for d in dets] == [(0, "person"), (16, "dog")]
    assert [d.confidence for d in dets] == [d["confidence"] for d in body["images"][0]["detections"]]
    assert [(d.box.x1, d.box.y1, d.box.x2, d.box.y2) for d in dets] == [
        (1.5, 2.25, 100.0, 200.75),
        (10.0, 20.0, 30.0, 40.0),
    ]
    assert list(msg.images[1].detections) == []
    assert (msg.usage.units, msg.usage.used, msg.usage.allocation, msg.usage.remaining) == (3, 120, 1000, 880)
    assert (msg.timing_ms.decode, msg.timing_ms.admit, msg.timing_ms.infer, msg.timing_ms.total) == (
        1.5,
        0.25,
        12.75,
        14.5,
    )
    assert msg.idempotent_replayed is False
    assert grpc_api.reply(body, replayed=True).idempotent_replayed is True
    # survives the wire
    assert pb.DetectReply.FromString(msg.SerializeToString()) == msg


# ---------------------------------------------------------------------------------------- requests


def test_given_a_request_without_parameters_then_params_are_the_defaults() -> None:
    assert grpc_api.params(pb.DetectRequest(images=[b"x"])) == InferenceParams()
    assert grpc_api.params(pb.Frame(image=b"x")) == InferenceParams()


def test_given_a_request_with_parameters_then_params_are_those() -> None:
    got = grpc_api.params(pb.DetectRequest(images=[b"x"], conf=0.5, iou=0.25, max_det=7))
    assert got == InferenceParams(0.5, 0.25, 7)


def test_given_a_parameter_set_to_zero_then_it_is_zero_not_the_default() -> None:
    got = grpc_api.params(pb.DetectRequest(conf=0.0, max_det=0))
    assert got == InferenceParams(0.0, InferenceParams().iou, 0)


class PeerContext:
    def __init__(self, peer: str | None, md: Any = ()) -> None:
        self._peer = peer
        self._md = md

    def peer(self) -> str | None:
        return self._peer

    def invocation_metadata(self) -> Any:
        return self._md


@pytest.mark.parametrize(
    ("peer", "ip"),
    [
        ("ipv4:127.0.0.1:5000", "127.0.0.1"),
        ("ipv6:[::1]:5000", "::1"),
        ("ipv6:[2001:db8::7]:443", "2001:db8::7"),
        ("unix:/tmp/x", None),
        ("", None),
        (None, None),
    ],
)
def test_given_a_peer_string_then_peer_ip_is_its_address(peer: str | None, ip: str | None) -> None:
    assert grpc_api.peer_ip(PeerContext(peer)) == ip


def test_given_invocation_metadata_then_keys_are_lowercased_and_binary_values_skipped() -> None:
    ctx = PeerContext(
        "ipv4:1.2.3.4:1",
        [
            ("Authorization", "Bearer abc"),
            ("idempotency-key", "k-1"),
            ("trace-bin", b"\x00\x01"),
            ("X-Forwarded-For", "10.0.0.1"),
        ],
    )
    assert grpc_api.metadata(ctx) == {
        "authorization": "Bearer abc",
        "idempotency-key": "k-1",
        "x-forwarded-for": "10.0.0.1",
    }
    assert grpc_api.metadata(PeerContext(None, None)) == {}


# ------------------------------------------------------------------------------------------- stubs


def test_given_the_proto_then_the_checked_in_stubs_are_what_protoc_makes(tmp_path: Path) -> None:
    src = tmp_path / PROTO
    src.parent.mkdir(parents=True)
    shutil.copyfile(ROOT / PROTO, src)
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{tmp_path}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    stale = [
        name for name in STUBS if (out / PROTO.parent / name).read_bytes() != (ROOT / PROTO.parent / name).read_bytes()
    ]
    assert not stale, f"the gRPC stubs {stale} do not match {PROTO}: run `make proto`"
