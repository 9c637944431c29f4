"""The steps of a detection request inside the ingress replica that received it (DESIGN §1), shared
by HTTP and handle calls. One order for every request:

verify signature (local, no I/O) → decode + validate images (bounded, before any charge) →
admit from this replica's lease (local, no I/O; `serve_app.metering`) → infer on the model
version's Detector replicas (the image crosses the object store once, from here to there) →
settle (keep, or give back on a server failure).

No middle replica: the ingress IS the token-check deployment. It trusts nothing the caller says
about money: it verifies the credential and prices the request from its own model catalog, so a
Ray job holding a handle gets exactly what HTTP gets — no unmetered inference, no chosen price.
Client errors are caught before admission, so they never cost anything; a detector failure,
timeout or a caller that went away after admission is given back, so no answer never costs either.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from ledger import (
    MAX_IDEMPOTENCY_KEY,
    Admission,
    Claims,
    Code,
    Decision,
    LedgerApi,
    LedgerError,
    Service,
    Settlement,
    ops,
    wire,
)
from serve_app.answer import result_body, usage_headers
from serve_app.auth import KeyedVerifier
from serve_app.catalog import ModelCatalog
from serve_app.config import AppArgs, ModelSpec
from serve_app.errors import ApiCode, ApiError
from serve_app.imaging import DecodedImage, ImageLimits, decode_image
from serve_app.metering import Meter, refund
from serve_app.results import InferenceParams

log = logging.getLogger(__name__)
R = TypeVar("R")
# the detector call of admitted images: (spec, pixels, params, service) -> its reply
Infer = Callable[[ModelSpec, list[np.ndarray], InferenceParams, Service | None], Awaitable[dict[str, Any]]]
IDEM_SETTLE_WAIT_S = 5.0  # an idempotent answer waits this long for its stored replay body
MODEL_RETRY_AFTER_S = 10.0
GRPC_ARG_LIMIT = 3 * 1024 * 1024  # pixels sent to a detector over gRPC, at most (the rest: object store)


_IDEM_KEY = re.compile(rf"[\x21-\x7e]{{1,{MAX_IDEMPOTENCY_KEY}}}")


def check_params(params: InferenceParams) -> None:
    """`invalid_request` unless conf and iou are numbers in [0, 1] and max_det an int in [1, 1000]
    (a handle caller may send any Python object: NaN, bool, str are refused here, before admission)."""
    conf, iou, max_det = params.conf, params.iou, params.max_det
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in (conf, iou))
    numbers = numbers and isinstance(max_det, int) and not isinstance(max_det, bool)
    if not (numbers and 0.0 <= conf <= 1.0 and 0.0 <= iou <= 1.0 and 1 <= max_det <= 1000):
        raise ApiError(ApiCode.INVALID_REQUEST, "conf and iou must be in [0, 1], max_det in [1, 1000]")


def check_idempotency_key(key: object) -> None:
    if key is not None and not (isinstance(key, str) and _IDEM_KEY.fullmatch(key)):
        raise ApiError(
            ApiCode.INVALID_REQUEST, f"the idempotency key must be 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters"
        )


def check_call(call: DetectCall) -> None:
    """What a handle caller controls, checked as HTTP checks it (types included), before admission."""
    check_params(call.params)
    check_idempotency_key(call.idempotency_key)
    if call.model is not None and not isinstance(call.model, str):
        raise ApiError(ApiCode.INVALID_REQUEST, "model must be a string: name or name@version")
    if not isinstance(call.images, list) or not all(isinstance(b, bytes | bytearray) for b in call.images):
        raise ApiError(ApiCode.INVALID_REQUEST, "images must be a list of encoded image bytes")


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


@dataclass(slots=True)
class Held:
    """An answer computed and not yet charged (`IngressSteps.detect_held`): `success` is its
    settlement until `commit` or `release` takes it (None: nothing to charge, e.g. a replay)."""

    outcome: DetectOutcome
    success: Settlement | None = None
    stored: bool = False  # an idempotency key's answer: stored before it is sent
    admission: Admission | None = None
    decision: Decision | None = None


class IngressSteps:
    """Plain object; the Ingress deployment owns one and passes the ledger, its lease holder (in a
    `Meter`) and the detector handles in."""

    def __init__(
        self,
        args: AppArgs,
        ledger: LedgerApi,
        meter: Meter,
        detectors: Mapping[str, Any],
        public_keys: dict[str, bytes] | None = None,
        detector_key: str | None = None,
    ) -> None:
        self.args = args
        self.ledger = ledger
        self.meter = meter
        self.detectors = detectors
        self._by_reference: dict[str, Any] = {}  # the detectors' handles through the object store
        self.detector_key = detector_key  # the detectors answer only callers that know it (serve_app.surface)
        self.catalog = ModelCatalog.from_args(args)
        self.auth = KeyedVerifier(self._fetch_keys, public_keys or {})
        self.image_limits = ImageLimits(max_bytes=args.limits.max_body_bytes, max_pixels=args.limits.max_pixels)

    async def _fetch_keys(self) -> dict[str, bytes]:
        return await self.ledger.acall(ops.PublicKeys())

    # ------------------------------------------------------------ steps
    async def verify(self, credential: str | None, typ: str = "access") -> Claims:
        return await self.auth.verify(credential, typ)

    def resolve_model(self, requested: str | None) -> ModelSpec:
        return self.catalog.resolve(requested)

    def decode(self, blobs: list[bytes]) -> list[DecodedImage]:
        if not blobs:
            raise ApiError(ApiCode.INVALID_REQUEST, "no image in the request")
        if len(blobs) > self.args.limits.max_images:
            raise ApiError(ApiCode.INVALID_REQUEST, f"at most {self.args.limits.max_images} images per request")
        if sum(len(b) for b in blobs) > self.args.limits.max_body_bytes:
            raise ApiError(ApiCode.PAYLOAD_TOO_LARGE, f"images exceed {self.args.limits.max_body_bytes} bytes")
        return [decode_image(b, self.image_limits) for b in blobs]

    async def token_call(self, credential: str | None, op: ops.Call[R]) -> R:
        """A tree operation or read on behalf of the credential's token (its id AND current
        credential id: the ledger refuses stale or revoked actors; an unscoped operation is
        `forbidden`). Raises `ApiError`."""
        claims = await self.verify(credential)
        as_token = self.ledger.acting_as(claims.sub, claims.jti, claims.pkg)  # the actor is the verified token
        try:
            return await as_token.acall(op)
        except LedgerError as exc:
            raise ApiError.from_code(exc.code, exc.message) from None

    async def admin_call(self, credential: str | None, name: str, body: Any) -> dict[str, Any]:
        """Any ledger operation, as an admin (the CLI over HTTP: `ledger.client.over_http`): an admin
        credential, the record decoded by its hints, the result encoded by them."""
        await self.verify(credential, "admin")
        try:
            return wire.encode_result(await self.ledger.acall(wire.decode_call(name, body)))
        except LedgerError as exc:
            raise ApiError.from_code(exc.code, exc.message) from None

    # ------------------------------------------------------------ the whole request
    async def detect(self, call: DetectCall) -> DetectOutcome:
        """Verify, decode, price and admit here; only if admitted infer on the version's replicas;
        then settle. Denials raise `ApiError`."""
        held = await self.detect_held(call)
        await self.commit(held)
        return held.outcome

    async def commit(self, held: Held) -> None:
        """Turn a held answer's units into used ones (and complete its audit row). An answer with an
        idempotency key is stored durably first (a retry replays it), so commit before sending it;
        any other answer may be committed after it was handed to the caller."""
        if held.success is None:
            return
        success, held.success = held.success, None
        if held.stored:
            # a retry with this key replays the stored body, so it is stored before we answer
            # (shielded: an answer already computed is kept and charged once even if the caller left)
            await self.meter.settle_soon(success, wait_s=IDEM_SETTLE_WAIT_S)
        else:
            # the units are held for this request; settling only turns them into used ones, so the
            # caller does not wait for it
            self.meter.settle_later(success)

    def recheck(self, held: Held) -> ApiError | None:
        """A held answer's token as the lease holder sees it now: an `ApiError` if it was revoked or
        expired (or its credential rotated) since the admission, else None. No I/O."""
        if held.success is None or held.admission is None:
            return None
        refusal = self.meter.refusal(held.admission)
        return None if refusal is None else ApiError.from_code(refusal[0], refusal[1])

    def release(self, held: Held) -> None:
        """The answer never reached its caller (a stream's client hung up before it was sent): its
        units go back, so it costs nothing. A committed or replayed answer is left as it is."""
        if held.success is None or held.admission is None:
            return
        held.success = None
        self.meter.settle_later(refund(held.admission, held.decision))

    async def detect_held(self, call: DetectCall, infer: Infer | None = None) -> Held:
        """`detect` up to its answer, not yet charged: the caller commits it (`commit`) or gives it
        back (`release`). Denials raise `ApiError`, and cost nothing. `infer` replaces `self.infer`
        (a stream's `Coalescer`, which sends its frames to the detector together)."""
        t0 = time.perf_counter()
        check_call(call)
        claims = await self.verify(call.credential)
        images = self.decode(call.images)
        spec = self.resolve_model(call.model)
        t_decoded = time.perf_counter()
        admission = Admission(
            call.request_id,
            claims.sub,
            claims.jti,
            self.catalog.units(spec, len(images)),
            spec.key,
            call.client_ip,
            call.idempotency_key,
            body_hash(call, spec),
            sum(i.nbytes for i in images),
            claims.pkg,  # the package root: the ledger shard that owns the token
        )
        decision = await self.meter.admit(admission)
        headers = usage_headers(decision)
        if decision.code is Code.REPLAY:
            if decision.replay is None:
                raise ApiError(ApiCode.IDEMPOTENCY_CONFLICT, "this request was already processed")
            return Held(DetectOutcome(json.loads(decision.replay), {**headers, "Idempotent-Replayed": "true"}))
        if not decision.admitted:
            raise ApiError.from_code(decision.code, decision.message, decision.retry_after, headers)
        t_admitted = time.perf_counter()
        try:
            result = await (infer or self.infer)(spec, [i.pixels for i in images], call.params, decision.service)
        except asyncio.CancelledError:
            # the caller went away (Serve cancels the call when the client hangs up): no answer, no charge
            self.meter.settle_later(refund(admission, decision))
            raise
        except Exception as exc:  # give the units back before answering, so a 5xx never costs the caller
            await self.meter.settle_soon(refund(admission, decision))
            reason = f"did not answer within {spec.timeout_s:g}s" if isinstance(exc, TimeoutError) else "failed"
            log.warning("detector %s %s: %r", spec.key, reason, exc)
            raise ApiError(
                ApiCode.MODEL_UNAVAILABLE,
                f"model {spec.key} {reason}; nothing was charged",
                retry_after=MODEL_RETRY_AFTER_S,
            ) from None
        t_inferred = time.perf_counter()
        if "refused" in result:  # the version's scheduler shed it (DESIGN §3c): refunded, never charged
            await self.meter.settle_soon(refund(admission, decision))
            raise ApiError(
                ApiCode.MODEL_BUSY,
                f"{result['message']}; nothing was charged",
                retry_after=float(result["retry_after"]),
                headers=headers,
            )
        body = result_body(
            call.request_id, spec.name, spec.version, [(i.width, i.height) for i in images], result["detections"]
        )
        body |= {
            "usage": {
                "units": decision.units,
                "used": decision.used,
                "allocation": decision.allocation,
                "remaining": decision.remaining,
            },
            "timing_ms": {
                "decode": _ms(t0, t_decoded),
                "admit": _ms(t_decoded, t_admitted),
                "infer": _ms(t_admitted, t_inferred),
                "total": _ms(t0, t_inferred),
            },
        }
        success = Settlement(
            admission.request_id,
            admission.token_id,
            success=True,
            latency_ms=_ms(t0, t_inferred),
            detections=sum(len(d) for d in result["detections"]),
            gpu_ms=float(result["gpu_ms"]),
            result=json.dumps(body) if call.idempotency_key else None,
            root_id=admission.root_id,
            copy=decision.copy,
        )
        return Held(DetectOutcome(body, headers), success, bool(call.idempotency_key), admission, decision)

    def _detector(self, key: str, pixels: list[np.ndarray]) -> Any:
        """The version's handle for these pixels: over gRPC by value (RAY_SERVE_USE_GRPC_BY_DEFAULT),
        or, past `GRPC_ARG_LIMIT` bytes, through Ray's object store: a replica's gRPC server takes at
        most 4 MiB per message (`RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH`), which a 1080p frame's
        pixels already exceed (a 4000x3000 photo's are 36 MB)."""
        handle = self.detectors[key]
        if sum(int(getattr(p, "nbytes", 0)) for p in pixels) <= GRPC_ARG_LIMIT or not hasattr(handle, "options"):
            return handle
        by_ref = self._by_reference.get(key)
        if by_ref is None:
            by_ref = self._by_reference[key] = handle.options(_by_reference=True)
        return by_ref

    async def infer(
        self, spec: ModelSpec, pixels: list[np.ndarray], params: InferenceParams, service: Service | None
    ) -> dict[str, Any]:
        """The version's answer within `spec.timeout_s` (queueing for a replica and a cold start
        included), or its scheduler's refusal (`{"refused": "model_busy", ...}`); `TimeoutError`
        otherwise. The request is withdrawn on timeout or cancellation. `service` says whose
        request it is (the admission's verdict carries it; None: the detector files it under a default
        tenant), for the scheduler."""
        response = self._detector(spec.key, pixels).detect.remote(
            pixels, params, key=self.detector_key, service=service
        )
        try:
            async with asyncio.timeout(spec.timeout_s):  # no task of its own, as wait_for makes (-20 us)
                result: dict[str, Any] = await response
        except BaseException:
            response.cancel()
            raise
        return result


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
