"""The detection pipeline shared by HTTP and handle calls — one order for every request:

verify signature (local, no I/O) → decode + validate images (bounded) → admit (ledger,
atomic, durable) → infer (Detector replica) → settle (keep, or refund on server failure).
The ingress verifies and decodes; admit, infer and settle happen in the TokenGate deployment,
which routes each admitted request into its model version's Detector replicas.

Client errors are caught before admission, so they never cost anything; a detector failure
after admission is refunded, so a 5xx never costs the caller either.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ledger.codes import Code
from ledger.credentials import Claims, Verifier
from ledger.entities import Admission, Decision, Settlement
from ledger.errors import CredentialError
from serve_app.config import AppArgs, ModelSpec
from serve_app.errors import ApiError
from serve_app.gate import GateReply
from serve_app.imaging import DecodedImage, ImageLimits, decode_image
from serve_app.results import Detection, InferenceParams

KEY_REFRESH_INTERVAL_S = 5.0
log = logging.getLogger(__name__)


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


class Pipeline:
    """Plain object; the Ingress deployment owns one and passes its handles in."""

    def __init__(self, args: AppArgs, gate: Any, public_keys: dict[str, bytes]) -> None:
        self.args = args
        self.gate = gate
        self.models: dict[str, ModelSpec] = {m.key: m for m in args.models}
        self.verifier = Verifier(public_keys)
        # -inf: the first credential with a kid we lack fetches the ring at once (a fresh replica
        # starts with none); after that at most one fetch per KEY_REFRESH_INTERVAL_S, shared by
        # every request that waits for it, so random kids cannot flood the ledger
        self.keys_at = float("-inf")
        self._key_fetch: asyncio.Future[None] | None = None
        self.image_limits = ImageLimits(max_bytes=args.limits.max_body_bytes, max_pixels=args.limits.max_pixels)

    # ------------------------------------------------------------ steps
    async def verify(self, credential: str | None, typ: str = "access") -> Claims:
        try:
            claims = self.verifier.verify(credential)
        except CredentialError as exc:
            # an unknown kid may be a key rotated in after we loaded ours (or we have none yet)
            if exc.code is not Code.INVALID_TOKEN:
                raise ApiError.from_code(exc.code, exc.message) from None
            await self.refresh_keys()
            try:
                claims = self.verifier.verify(credential)
            except CredentialError as again:
                raise ApiError.from_code(again.code, again.message) from None
        if claims.typ != typ:
            raise ApiError("forbidden", f"a {claims.typ} credential cannot be used here")
        return claims

    async def refresh_keys(self) -> None:
        """Fetch the public key ring, single-flight and at most once per interval."""
        stale = time.monotonic() - self.keys_at > KEY_REFRESH_INTERVAL_S
        if self._key_fetch is None or (self._key_fetch.done() and stale):
            self.keys_at = time.monotonic()
            self._key_fetch = asyncio.ensure_future(self._fetch_keys())
        await asyncio.shield(self._key_fetch)
        if not self.verifier.has_keys:
            raise ApiError("ledger_unavailable", "signing keys are not available yet; retry shortly")

    async def _fetch_keys(self) -> None:
        try:
            self.verifier.update_keys(await self.gate.public_keys.remote())
        except Exception as exc:  # the ledger restarting: keep the keys we have, try again next interval
            log.warning("public key refresh failed: %s", type(exc).__name__)

    def resolve_model(self, requested: str | None) -> ModelSpec:
        name = requested or self.args.default_model
        if name in self.models:
            return self.models[name]
        versions = sorted((m for m in self.models.values() if m.name == name), key=lambda m: m.version)
        if not versions:
            raise ApiError("unknown_model", f"no model {name!r}; GET /v1/models lists them")
        return versions[-1]

    def decode(self, blobs: list[bytes]) -> list[DecodedImage]:
        if not blobs:
            raise ApiError("invalid_request", "no image in the request")
        if len(blobs) > self.args.limits.max_images:
            raise ApiError("invalid_request", f"at most {self.args.limits.max_images} images per request")
        if sum(len(b) for b in blobs) > self.args.limits.max_body_bytes:
            raise ApiError("payload_too_large", f"images exceed {self.args.limits.max_body_bytes} bytes")
        return [decode_image(b, self.image_limits) for b in blobs]

    # ------------------------------------------------------------ the whole request
    async def detect_unmetered(self, call: DetectCall) -> DetectOutcome:
        """Decode and infer only, through the same gate and detectors: the baseline of the
        overhead benchmark (`limits.auth: false`)."""
        t0 = time.perf_counter()
        images = self.decode(call.images)
        spec = self.resolve_model(call.model)
        reply: GateReply = await self.gate.detect.remote(None, spec.key, [i.pixels for i in images], call.params)
        if reply.result is None:
            raise ApiError("model_unavailable", f"model {spec.key} failed: {reply.failure}")
        body = _result_body(call.request_id, spec, images, reply.result["detections"])
        body.update(usage=None, timing_ms={"total": _ms(t0, time.perf_counter())})
        return DetectOutcome(body)

    async def detect(self, call: DetectCall) -> DetectOutcome:
        t0 = time.perf_counter()
        claims = await self.verify(call.credential)
        images = self.decode(call.images)
        spec = self.resolve_model(call.model)
        t_decoded = time.perf_counter()
        body_hash = _body_hash(call, spec)
        admission = Admission(
            call.request_id,
            claims.sub,
            claims.jti,
            spec.cost_units * len(images),
            spec.key,
            call.client_ip,
            call.idempotency_key,
            body_hash,
            sum(i.nbytes for i in images),
        )
        reply: GateReply = await self.gate.detect.remote(
            admission, spec.key, [i.pixels for i in images], call.params, settle_now=not call.idempotency_key
        )
        decision = reply.decision
        assert decision is not None  # metered calls always carry an admission
        headers = usage_headers(decision)
        if decision.code is Code.REPLAY:
            if decision.replay is None:
                raise ApiError("idempotency_conflict", "this request was already processed")
            return DetectOutcome(json.loads(decision.replay), {**headers, "Idempotent-Replayed": "true"})
        if not decision.admitted:
            raise ApiError.from_code(decision.code, decision.message, decision.retry_after, headers)
        if reply.result is None:  # the gate refunded it before answering
            raise ApiError("model_unavailable", f"model {spec.key} failed: {reply.failure}")
        result = reply.result
        body = _result_body(call.request_id, spec, images, result["detections"])
        body |= {
            "usage": {
                "units": decision.units,
                "used": decision.used,
                "allocation": decision.allocation,
                "remaining": decision.remaining,
            },
            "timing_ms": {
                "decode": _ms(t0, t_decoded),
                "admit": reply.admit_ms,
                "infer": reply.infer_ms,
                "total": _ms(t0, time.perf_counter()),
            },
        }
        if call.idempotency_key:
            # a retry with this key replays the stored body: it is recorded before we answer
            await self.gate.settle.remote(
                Settlement(
                    call.request_id,
                    claims.sub,
                    success=True,
                    latency_ms=_ms(t0, time.perf_counter()),
                    detections=sum(len(d) for d in result["detections"]),
                    gpu_ms=float(result["gpu_ms"]),
                    result=json.dumps(body),
                )
            )
        return DetectOutcome(body, headers)


def _result_body(
    request_id: str, spec: ModelSpec, images: list[DecodedImage], detections: list[list[Detection]]
) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "model": {"name": spec.name, "version": spec.version},
        "images": [
            {"width": im.width, "height": im.height, "detections": [d.to_json() for d in dets]}
            for im, dets in zip(images, detections, strict=True)
        ],
    }


def usage_headers(d: Decision) -> dict[str, str]:
    h = {"X-Quota-Remaining": str(d.remaining)}
    if d.rate_limit is not None:
        h["X-RateLimit-Limit"] = f"{d.rate_limit:g}"
        h["X-RateLimit-Remaining"] = str(d.rate_remaining if d.rate_remaining is not None else 0)
    return h


def _body_hash(call: DetectCall, spec: ModelSpec) -> str:
    h = hashlib.sha256()
    for b in call.images:
        h.update(hashlib.sha256(b).digest())
    p = call.params
    h.update(f"{spec.key}|{p.conf}|{p.iou}|{p.max_det}".encode())
    return h.hexdigest()


def _ms(a: float, b: float) -> float:
    return round((b - a) * 1000, 2)
