"""TokenGate: the token-check deployment (DESIGN §1), through which every detection is routed.

    Ingress ──verify, decode──► TokenGate.detect ──verify, admit──► ledger shard[root] (micro-batched)
                                    │ admitted
                                    ├──► Detector[model@version] (autoscaling replicas), within the
                                    │    version's `timeout_s` (a cold start included)
                                    └──► settle: success keeps the debit; a detector failure, a
                                         timeout or a caller that went away refunds it

The gate trusts nothing its caller says about money: it verifies the credential itself and
prices the request from its own model catalog, so a Ray job that takes a handle to it gets
exactly what the ingress gets — no unmetered inference, no admin operation, no chosen price.

Never charged without an answer: every admitted request ends settled or refunded, also when
Serve cancels the call (the client hung up or timed out), and a settlement the ledger could not
take is retried until it is durable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from ray import serve

from ledger.api import LedgerApi
from ledger.codes import Code
from ledger.entities import Admission, Decision, Settlement
from ledger.errors import LedgerError
from ledger.service import attach
from ledger.settings import LedgerSettings
from serve_app.answer import result_body, usage_headers
from serve_app.auth import KeyedVerifier
from serve_app.catalog import ModelCatalog
from serve_app.config import ModelSpec
from serve_app.errors import ApiError, QuietDenials
from serve_app.results import InferenceParams

log = logging.getLogger(__name__)
SETTLE_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)  # then every 5 s
SETTLE_GIVE_UP_S = 3600.0  # the book keeps an unsettled admission this long (settle_window_s)
IDEM_SETTLE_WAIT_S = 5.0  # an idempotent answer waits this long for its stored replay body
MODEL_RETRY_AFTER_S = 10.0
# operations a token may run on its own subtree (the HTTP routes under /v1/tokens and /v1/usage)
TOKEN_OPS = frozenset({"tokens", "token", "usage", "split", "revoke", "reclaim", "rotate"})


@dataclass(frozen=True, slots=True)
class GateRequest:
    """One detection request as the ingress saw it; images travel beside it as pixels."""

    request_id: str
    credential: str | None
    model: str | None
    client_ip: str | None = None
    idempotency_key: str | None = None
    body_hash: str = ""
    sizes: tuple[tuple[int, int], ...] = ()  # (width, height) of each image, for the answer
    image_bytes: int = 0


@dataclass(frozen=True, slots=True)
class GateReply:
    """The answer body and headers, or the error-table entry to answer with."""

    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    error: ApiError | None = None


@serve.deployment(name="TokenGate", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
class TokenGate:
    def __init__(
        self, settings: LedgerSettings, detectors: dict[str, Any], models: list[ModelSpec], default_model: str
    ) -> None:
        self.client = attach(settings)  # the app builder launched the ledger; replicas only attach
        self.detectors = detectors
        self.catalog = ModelCatalog(models, default_model)
        self.auth = KeyedVerifier(self.public_keys)
        self._pending: set[asyncio.Future[Any]] = set()  # settlements in flight
        QuietDenials.install()

    async def detect(self, req: GateRequest, pixels: list[np.ndarray], params: InferenceParams) -> GateReply:
        """Verify, price and admit; only if admitted infer on the version's replicas; then settle."""
        t0 = time.perf_counter()
        try:
            claims = await self.auth.verify(req.credential)
            spec = self.catalog.resolve(req.model)
            if not pixels or len(req.sizes) != len(pixels):
                raise ApiError("invalid_request", "images and their sizes do not match")
        except ApiError as exc:
            return GateReply(error=exc)
        admission = Admission(
            req.request_id,
            claims.sub,
            claims.jti,
            self.catalog.units(spec, len(pixels)),
            spec.key,
            req.client_ip,
            req.idempotency_key,
            req.body_hash,
            req.image_bytes,
            claims.pkg,  # the package root: the ledger shard that owns the token
        )
        decision = await self._admit(admission)
        headers = usage_headers(decision)
        if decision.code is Code.REPLAY:
            if decision.replay is None:
                return GateReply(error=ApiError("idempotency_conflict", "this request was already processed"))
            return GateReply(json.loads(decision.replay), {**headers, "Idempotent-Replayed": "true"})
        if not decision.admitted:
            return GateReply(error=ApiError.from_code(decision.code, decision.message, decision.retry_after, headers))
        t_admitted = time.perf_counter()
        refund = _refund(admission)
        try:
            result = await self._infer(spec, pixels, params)
        except asyncio.CancelledError:
            # the caller went away (Serve cancels the call when the client hangs up): no answer, no charge
            self._settle_later(refund)
            raise
        except Exception as exc:  # refund before answering, so a 5xx never costs the caller
            await self._settle_soon(refund)
            reason = f"did not answer within {spec.timeout_s:g}s" if isinstance(exc, TimeoutError) else "failed"
            log.warning("detector %s %s: %r", spec.key, reason, exc)
            return GateReply(
                error=ApiError(
                    "model_unavailable",
                    f"model {spec.key} {reason}; nothing was charged",
                    retry_after=MODEL_RETRY_AFTER_S,
                )
            )
        body = result_body(req.request_id, spec.name, spec.version, req.sizes, result["detections"])
        body |= {
            "usage": {
                "units": decision.units,
                "used": decision.used,
                "allocation": decision.allocation,
                "remaining": decision.remaining,
            },
            "timing_ms": {"admit": _ms(t0, t_admitted), "infer": _ms(t_admitted)},
        }
        success = Settlement(
            admission.request_id,
            admission.token_id,
            success=True,
            latency_ms=_ms(t0),
            detections=sum(len(d) for d in result["detections"]),
            gpu_ms=float(result["gpu_ms"]),
            result=json.dumps(body) if req.idempotency_key else None,
            root_id=admission.root_id,
        )
        if req.idempotency_key:
            # a retry with this key replays the stored body, so it is stored before we answer
            # (shielded: an answer already computed is kept and charged once even if the caller left)
            await self._settle_soon(success, wait_s=IDEM_SETTLE_WAIT_S)
        else:
            # the units were charged durably at admission; a success settlement only completes the
            # audit row (latency, detections, GPU time), so the caller does not wait for it
            self._settle_later(success)
        return GateReply(body, headers)

    async def call(self, credential: str | None, op: str, kwargs: dict[str, Any]) -> Any:
        """A token-scoped tree operation or read, on behalf of the credential's token (its id AND
        current credential id: the ledger refuses stale or revoked actors). Raises `ApiError`."""
        if op not in TOKEN_OPS:
            raise ApiError("forbidden", f"{op!r} is not a token operation")
        claims = await self.auth.verify(credential)
        # the actor is the verified token, whatever the caller put in kwargs
        as_token = self.client.acting_as(claims.sub, claims.jti, claims.pkg)
        try:
            return await as_token.ainvoke(op, (), {k: v for k, v in kwargs.items() if k not in ("actor", "actor_jti")})
        except LedgerError as exc:
            raise ApiError.from_code(exc.code, exc.message) from None

    async def public_keys(self) -> dict[str, bytes]:
        return await self.client.aio(LedgerApi.public_keys)

    # ------------------------------------------------------------ steps
    async def _admit(self, admission: Admission) -> Decision:
        """The ledger's verdict. If the caller is cancelled meanwhile, the admission may still be
        granted: then it is refunded as soon as the verdict arrives."""
        task = asyncio.ensure_future(self.client.admit(admission))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(partial(self._refund_if_admitted, admission))
            raise

    def _refund_if_admitted(self, admission: Admission, task: asyncio.Future[Decision]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        if task.result().code is Code.OK:
            self._settle_later(_refund(admission))

    async def _infer(self, spec: ModelSpec, pixels: list[np.ndarray], params: InferenceParams) -> dict[str, Any]:
        """The version's answer within `spec.timeout_s` (queueing for a replica and a cold start
        included); `TimeoutError` otherwise. The request is withdrawn on timeout or cancellation."""
        response = self.detectors[spec.key].detect.remote(pixels, params)
        try:
            result: dict[str, Any] = await asyncio.wait_for(_awaited(response), spec.timeout_s)
        except BaseException:
            response.cancel()
            raise
        return result

    # ------------------------------------------------------------ settlements
    async def _settle_soon(self, settlement: Settlement, wait_s: float = 2.0) -> None:
        """Settle, waiting up to `wait_s` for it to be durable; past that it goes on in the
        background until it is. Shielded: a cancelled caller does not stop it."""
        task = self._settle_later(settlement)
        try:
            await asyncio.wait_for(asyncio.shield(task), wait_s)
        except TimeoutError:
            log.warning("settlement of %s not durable yet; retrying in the background", settlement.request_id)

    def _settle_later(self, settlement: Settlement) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(self._settle_durably(settlement))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _settle_durably(self, settlement: Settlement) -> Code:
        """Retry while the ledger is unavailable, until the settlement is durable (or the book has
        forgotten the admission, after `SETTLE_GIVE_UP_S`)."""
        deadline = time.monotonic() + SETTLE_GIVE_UP_S
        attempt = 0
        while True:
            try:
                code = await self.client.settle(settlement)
            except Exception as exc:
                log.warning("settlement of %s failed: %r", settlement.request_id, exc)
                code = Code.LEDGER_UNAVAILABLE
            if code is not Code.LEDGER_UNAVAILABLE:
                return code
            if time.monotonic() > deadline:
                log.error("settlement of %s not recorded after %.0fs", settlement.request_id, SETTLE_GIVE_UP_S)
                return code
            await asyncio.sleep(SETTLE_BACKOFF_S[min(attempt, len(SETTLE_BACKOFF_S) - 1)])
            attempt += 1


async def _awaited(response: Any) -> Any:
    return await response


def _refund(admission: Admission) -> Settlement:
    return Settlement(admission.request_id, admission.token_id, success=False, root_id=admission.root_id)


def _ms(start: float, end: float | None = None) -> float:
    return round(((time.perf_counter() if end is None else end) - start) * 1000, 2)
