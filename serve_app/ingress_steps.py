"""The ingress-side steps of a detection request, shared by HTTP and handle calls. One order
for every request:

verify signature (local, no I/O) → decode + validate images (bounded) → admit (ledger,
atomic, durable) → infer (Detector replica) → settle (keep, or refund on server failure).
The ingress verifies and decodes here; admit, infer and settle happen in the TokenGate
deployment, which verifies the credential again, prices the request from its own catalog and
routes each admitted request into its model version's Detector replicas.

Client errors are caught before admission, so they never cost anything; a detector failure,
timeout or a caller that went away after admission is refunded, so no answer never costs either.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ledger.credentials import Claims
from serve_app.auth import KeyedVerifier
from serve_app.catalog import ModelCatalog
from serve_app.config import AppArgs, ModelSpec
from serve_app.errors import ApiError
from serve_app.gate import GateReply, GateRequest
from serve_app.imaging import DecodedImage, ImageLimits, decode_image
from serve_app.results import InferenceParams


def new_request_id() -> str:
    """Time-ordered (ms prefix) so that database indexes on it grow at their end."""
    return f"{int(time.time() * 1000):012x}{uuid.uuid4().hex[:20]}"


@dataclass(frozen=True, slots=True)
class DetectCall:
    request_id: str
    credential: str | None
    images: list[bytes]
    model: str | None
    params: InferenceParams
    client_ip: str | None
    idempotency_key: str | None = None


@dataclass(slots=True)
class DetectOutcome:
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class IngressSteps:
    """Plain object; the Ingress deployment owns one and passes its gate handle in."""

    def __init__(self, args: AppArgs, gate: Any, public_keys: dict[str, bytes]) -> None:
        self.args = args
        self.gate = gate
        self.catalog = ModelCatalog.from_args(args)
        self.auth = KeyedVerifier(self._fetch_keys, public_keys)
        self.image_limits = ImageLimits(max_bytes=args.limits.max_body_bytes, max_pixels=args.limits.max_pixels)

    async def _fetch_keys(self) -> dict[str, bytes]:
        keys: dict[str, bytes] = await self.gate.public_keys.remote()
        return keys

    # ------------------------------------------------------------ steps
    async def verify(self, credential: str | None, typ: str = "access") -> Claims:
        return await self.auth.verify(credential, typ)

    def resolve_model(self, requested: str | None) -> ModelSpec:
        return self.catalog.resolve(requested)

    def decode(self, blobs: list[bytes]) -> list[DecodedImage]:
        if not blobs:
            raise ApiError("invalid_request", "no image in the request")
        if len(blobs) > self.args.limits.max_images:
            raise ApiError("invalid_request", f"at most {self.args.limits.max_images} images per request")
        if sum(len(b) for b in blobs) > self.args.limits.max_body_bytes:
            raise ApiError("payload_too_large", f"images exceed {self.args.limits.max_body_bytes} bytes")
        return [decode_image(b, self.image_limits) for b in blobs]

    # ------------------------------------------------------------ the whole request
    async def detect(self, call: DetectCall) -> DetectOutcome:
        """Verify and decode here (client errors cost nothing), then the gate admits, infers and settles."""
        t0 = time.perf_counter()
        await self.verify(call.credential)
        images = self.decode(call.images)
        spec = self.resolve_model(call.model)
        t_decoded = time.perf_counter()
        request = GateRequest(
            call.request_id,
            call.credential,
            spec.key,
            call.client_ip,
            call.idempotency_key,
            body_hash(call, spec),
            tuple((i.width, i.height) for i in images),
            sum(i.nbytes for i in images),
        )
        reply: GateReply = await self.gate.detect.remote(request, [i.pixels for i in images], call.params)
        if reply.error is not None:
            raise reply.error
        assert reply.body is not None  # a reply is a body or an error
        body = reply.body
        if "Idempotent-Replayed" not in reply.headers:
            body["timing_ms"] = {
                "decode": _ms(t0, t_decoded),
                **body["timing_ms"],
                "total": _ms(t0, time.perf_counter()),
            }
        return DetectOutcome(body, reply.headers)


def body_hash(call: DetectCall, spec: ModelSpec) -> str:
    """What makes two requests the same request: the images, the model version and the parameters."""
    h = hashlib.sha256()
    for b in call.images:
        h.update(hashlib.sha256(b).digest())
    p = call.params
    h.update(f"{spec.key}|{p.conf}|{p.iou}|{p.max_det}".encode())
    return h.hexdigest()


def _ms(a: float, b: float) -> float:
    return round((b - a) * 1000, 2)
