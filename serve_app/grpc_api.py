"""The gRPC API's messages and statuses (serve_app/proto/yolo_tokens/v1/detect.proto), from the same
values as HTTP: result bodies become `DetectReply`, and the one error table's codes become gRPC
status codes (`GRPC_STATUS`), the table's code riding along in the trailing metadata
(`yt-error-code`, `retry-after`, `yt-request-id`) and in the rich status details
(`grpc-status-details-bin`: google.rpc.Status with ErrorInfo(reason=code) and, where a retry helps,
RetryInfo). Clients match on the code, never on the text.

Serve's gRPC proxy (Ray 2.60) sends what the replica sets on its `RayServegRPCContext`: the code,
the details and the trailing metadata of a unary call; a stream's per-frame refusals travel in its
`FrameResult`s instead, and only a session's end carries a status.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from serve_app.errors import ERRORS, ApiCode, ApiError
from serve_app.proto.yolo_tokens.v1 import detect_pb2 as pb
from serve_app.results import InferenceParams
from serve_app.streams import FrameIn, FrameOut

SERVICE = "yolo_tokens.v1.DetectService"
ERROR_DOMAIN = "yolo-tokens"
CODE_KEY = "yt-error-code"
REQUEST_ID_KEY = "yt-request-id"
RETRY_AFTER_KEY = "retry-after"  # whole seconds, never early (as HTTP's Retry-After)
DETAILS_KEY = "grpc-status-details-bin"

GRPC_STATUS: Mapping[ApiCode, grpc.StatusCode] = {
    ApiCode.INVALID_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ApiCode.INVALID_IMAGE: grpc.StatusCode.INVALID_ARGUMENT,
    ApiCode.PAYLOAD_TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    ApiCode.IMAGE_TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
    ApiCode.UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT,
    ApiCode.MISSING_TOKEN: grpc.StatusCode.UNAUTHENTICATED,
    ApiCode.INVALID_TOKEN: grpc.StatusCode.UNAUTHENTICATED,
    ApiCode.EXPIRED_TOKEN: grpc.StatusCode.UNAUTHENTICATED,
    ApiCode.REVOKED_TOKEN: grpc.StatusCode.UNAUTHENTICATED,
    ApiCode.MODEL_NOT_ALLOWED: grpc.StatusCode.PERMISSION_DENIED,
    ApiCode.IP_NOT_ALLOWED: grpc.StatusCode.PERMISSION_DENIED,
    ApiCode.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    ApiCode.LIMIT_WIDENING: grpc.StatusCode.PERMISSION_DENIED,
    ApiCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ApiCode.UNKNOWN_MODEL: grpc.StatusCode.NOT_FOUND,
    ApiCode.IDEMPOTENCY_CONFLICT: grpc.StatusCode.FAILED_PRECONDITION,
    ApiCode.IDEMPOTENCY_IN_PROGRESS: grpc.StatusCode.FAILED_PRECONDITION,
    ApiCode.QUOTA_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ApiCode.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ApiCode.MODEL_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ApiCode.MODEL_BUSY: grpc.StatusCode.UNAVAILABLE,
    ApiCode.LEDGER_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}
if set(GRPC_STATUS) != set(ERRORS):
    raise ImportError(f"no gRPC status for {sorted(set(ERRORS) - set(GRPC_STATUS))}")


def metadata(context: Any) -> dict[str, str]:
    """The call's invocation metadata (keys are lowercase in gRPC), text entries only."""
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out.setdefault(key.lower(), value)
    return out


def peer_ip(context: Any) -> str | None:
    """The client's address from gRPC's peer string: `ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`."""
    peer = str(context.peer() or "")
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0] or None
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]") or None
    return None


def params(msg: Any) -> InferenceParams:
    """A request's or frame's inference parameters, the defaults where a field is absent."""
    d = InferenceParams()
    return InferenceParams(
        msg.conf if msg.HasField("conf") else d.conf,
        msg.iou if msg.HasField("iou") else d.iou,
        msg.max_det if msg.HasField("max_det") else d.max_det,
    )


def reply(body: Mapping[str, Any], replayed: bool = False) -> pb.DetectReply:
    """The HTTP result body as a `DetectReply`."""
    images = [
        pb.ImageResult(
            width=int(img["width"]),
            height=int(img["height"]),
            detections=[
                pb.Detection(
                    class_id=int(d["class_id"]),
                    class_name=str(d["class_name"]),
                    confidence=float(d["confidence"]),
                    box=pb.Box(**{k: float(v) for k, v in d["box"].items()}),
                )
                for d in img["detections"]
            ],
        )
        for img in body["images"]
    ]
    usage = body.get("usage") or {}
    timing = body.get("timing_ms") or {}
    return pb.DetectReply(
        request_id=str(body["request_id"]),
        model=pb.ModelRef(name=str(body["model"]["name"]), version=str(body["model"]["version"])),
        images=images,
        usage=pb.Usage(**{k: int(usage.get(k, 0)) for k in ("units", "used", "allocation", "remaining")}),
        timing_ms=pb.Timing(**{k: float(timing.get(k, 0.0)) for k in ("decode", "admit", "infer", "total")}),
        idempotent_replayed=replayed,
    )


def body_of(r: pb.DetectReply) -> dict[str, Any]:
    """A `DetectReply` as the HTTP result body (the inverse of `reply`; a client prints the same JSON either way)."""
    return {
        "request_id": r.request_id,
        "model": {"name": r.model.name, "version": r.model.version},
        "images": [
            {
                "width": i.width,
                "height": i.height,
                "detections": [
                    {
                        "class_id": d.class_id,
                        "class_name": d.class_name,
                        "confidence": d.confidence,
                        "box": {"x1": d.box.x1, "y1": d.box.y1, "x2": d.box.x2, "y2": d.box.y2},
                    }
                    for d in i.detections
                ],
            }
            for i in r.images
        ],
        "usage": {k: getattr(r.usage, k) for k in ("units", "used", "allocation", "remaining")},
        "timing_ms": {k: getattr(r.timing_ms, k) for k in ("decode", "admit", "infer", "total")},
    }


def models_reply(listing: Mapping[str, Any]) -> pb.ModelsReply:
    fields = ("name", "version", "key", "cost_units", "imgsz", "backend", "timeout_s", "status", "message")
    return pb.ModelsReply(
        default=str(listing["default"]),
        models=[pb.ModelInfo(**{k: m[k] for k in fields}) for m in listing["models"]],
    )


def frame_in(msg: pb.Frame) -> FrameIn:
    return FrameIn(int(msg.seq), bytes(msg.image), msg.model or None, params(msg))


def frame_result(out: FrameOut) -> pb.FrameResult:
    if out.body is not None:
        return pb.FrameResult(seq=out.seq, result=reply(out.body))
    assert out.error is not None
    return pb.FrameResult(seq=out.seq, error=frame_error(out.error), ends_session=out.ends_session)


def frame_error(e: ApiError) -> pb.FrameError:
    return pb.FrameError(
        code=str(e.code), message=e.message, retry_after_s=float(e.retry_after or 0.0), http_status=e.status
    )


def trailers(exc: ApiError, request_id: str) -> list[tuple[str, str | bytes]]:
    """The trailing metadata of a failed call: the table's code, the request id, a retry hint, and
    the rich status (google.rpc.Status with ErrorInfo and RetryInfo)."""
    out: list[tuple[str, str | bytes]] = [(CODE_KEY, str(exc.code)), (REQUEST_ID_KEY, request_id)]
    details = [error_details_pb2.ErrorInfo(reason=str(exc.code), domain=ERROR_DOMAIN)]
    if exc.retry_after is not None:
        out.append((RETRY_AFTER_KEY, str(math.ceil(exc.retry_after))))
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(exc.retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=GRPC_STATUS[exc.code].value[0], message=exc.message)
    for d in details:
        status.details.add().Pack(d)
    out.append((DETAILS_KEY, status.SerializeToString()))
    return out


def fail(context: Any, exc: ApiError, request_id: str) -> None:
    """Make the call end with `exc`'s status (Serve's proxy sends what is set on the context)."""
    context.set_code(GRPC_STATUS[exc.code])
    context.set_details(exc.message)
    context.set_trailing_metadata(trailers(exc, request_id))


def error_of(trailing: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """A client's view of a failed call's trailing metadata: the table's code, retry hint (s) and
    request id; from the rich status when the plain entries are absent."""
    md = {k: v for k, v in trailing}
    out: dict[str, Any] = {"code": md.get(CODE_KEY), "request_id": md.get(REQUEST_ID_KEY)}
    if RETRY_AFTER_KEY in md:
        out["retry_after"] = float(md[RETRY_AFTER_KEY])
    raw = md.get(DETAILS_KEY)
    if isinstance(raw, bytes):
        status = status_pb2.Status.FromString(raw)
        for any_ in status.details:
            info = error_details_pb2.ErrorInfo()
            retry = error_details_pb2.RetryInfo()
            if any_.Unpack(info):
                out["code"] = out["code"] or info.reason
            elif any_.Unpack(retry):
                out["retry_delay_s"] = retry.retry_delay.ToNanoseconds() / 1e9
    return out
