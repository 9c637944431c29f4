"""TokenGate: the token-check deployment (DESIGN §1), through which every detection is routed.

    Ingress ──verify, decode──► TokenGate.detect ──admit──► ledger actor (micro-batched)
                                    │ admitted
                                    ├──► Detector[model@version] (autoscaling replicas)
                                    └──► settle: refund on a detector failure (awaited);
                                         a success completes its audit row in the background

All ingress replicas send their admissions here, so the client's micro-batcher merges them
into few ledger-actor calls. Signatures are verified by the ingress with the public keys this
gate hands out; revocation, expiry, limits and quota are decided by the ledger at admission.
With `admission=None` (the overhead benchmark's unmetered baseline app) the gate only routes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from ledger.client import LedgerClient
from ledger.codes import Code
from ledger.entities import Admission, Decision, Settlement
from ledger.settings import LedgerSettings
from serve_app.results import InferenceParams

log = logging.getLogger(__name__)
SETTLE_RETRY_DELAYS_S = (0.2, 1.0, 5.0)


@dataclass(frozen=True, slots=True)
class GateReply:
    """What one routed detection came to. `result` is the detector's output when it ran;
    `failure` names a detector failure (already refunded); `decision` is None when unmetered."""

    decision: Decision | None
    result: dict[str, Any] | None = None
    failure: str | None = None
    admit_ms: float = 0.0
    infer_ms: float = 0.0


@serve.deployment(name="TokenGate", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
class TokenGate:
    def __init__(self, settings: LedgerSettings, detectors: dict[str, Any]) -> None:
        self.client = LedgerClient.connect(settings)
        self.detectors = detectors
        self._pending: set[asyncio.Future[None]] = set()  # success settlements in flight

    async def detect(
        self,
        admission: Admission | None,
        model_key: str,
        pixels: list[np.ndarray],
        params: InferenceParams,
        settle_now: bool = True,
    ) -> GateReply:
        """Admit, then (only if admitted) infer on the model's replicas, then settle.

        `settle_now=False` leaves the success settlement to the caller, which must send it with
        the response body (idempotent requests replay that body)."""
        t0 = time.perf_counter()
        decision = None
        if admission is not None:
            decision = await self.client.admit(admission)
            if not decision.admitted:
                return GateReply(decision, admit_ms=_ms(t0))
        t_admitted = time.perf_counter()
        try:
            result: dict[str, Any] = await self.detectors[model_key].detect.remote(pixels, params)
        except Exception as exc:  # refund before answering, so a 5xx never costs the caller
            if admission is not None:
                await self.client.settle(
                    Settlement(admission.request_id, admission.token_id, success=False, latency_ms=_ms(t0))
                )
            log.warning("detector %s failed: %r", model_key, exc)
            return GateReply(decision, failure=type(exc).__name__, admit_ms=_ms(t0, t_admitted))
        reply = GateReply(decision, result, admit_ms=_ms(t0, t_admitted), infer_ms=_ms(t_admitted))
        if admission is not None and settle_now:
            # the units were charged durably at admission; a success settlement only completes the
            # audit row (latency, detections, GPU time), so the caller does not wait for it
            self._settle_later(
                Settlement(
                    admission.request_id,
                    admission.token_id,
                    success=True,
                    latency_ms=_ms(t0),
                    detections=sum(len(d) for d in result["detections"]),
                    gpu_ms=float(result["gpu_ms"]),
                )
            )
        return reply

    async def settle(self, settlement: Settlement) -> Code:
        return await self.client.settle(settlement)

    async def public_keys(self) -> dict[str, bytes]:
        keys: dict[str, bytes] = await self.client.acall("public_keys")
        return keys

    async def call(self, op: str, kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """Token-scoped tree operations and reads for the HTTP routes (`actor` is always set by the caller).
        Returns the ledger's reply tuple; the caller unwraps it (`ledger.client.unwrap`)."""
        return await self.client.acall_reply(op, **kwargs)

    # ------------------------------------------------------------ background settlements
    def _settle_later(self, settlement: Settlement) -> None:
        task = asyncio.ensure_future(self._settle_with_retries(settlement))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _settle_with_retries(self, settlement: Settlement) -> None:
        for delay in (*SETTLE_RETRY_DELAYS_S, None):
            try:
                code = await self.client.settle(settlement)
            except Exception as exc:
                log.warning("settlement of %s failed: %r", settlement.request_id, exc)
                code = Code.LEDGER_UNAVAILABLE
            if code is not Code.LEDGER_UNAVAILABLE:
                return
            if delay is None:
                # the admission stays charged (right for a success); only its audit details are missing
                log.error("settlement of %s not recorded after retries", settlement.request_id)
                return
            await asyncio.sleep(delay)


def _ms(start: float, end: float | None = None) -> float:
    return round(((time.perf_counter() if end is None else end) - start) * 1000, 2)
