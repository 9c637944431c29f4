"""Detector: one Serve deployment per model version (DESIGN §1), a thin shell over an `Engine`.

The engine comes from the backend registry by the version's `backend` (serve_app.engine.registry).
Every request waits in this replica's scheduler (serve_app.engine.scheduler, DESIGN §3c), not in
the callers' routers: `max_ongoing_requests` is high (`SchedulerArgs.max_ongoing`), and the
scheduler decides whose requests form the next batch — priority level, then fair share among
packages and their teams. A `BatchRunner` runs one batch at a time on the engine in a worker
thread, one forward pass per letterboxed shape; each call gets its own detections back, in order.

A request the scheduler refuses (its tenant's queue share is full, or it could not start before
its deadline) is answered at once as `{"refused": "model_busy", ...}` — a value, not an exception,
so that shedding a flood costs no traceback — and the ingress refunds it (503 `model_busy`).

Only the ingress calls it: `detect` is its whole handle surface (serve_app.surface), and it answers
only a caller presenting the key the app builder derived from the ledger's capability, so a Ray job
cannot reach the model unmetered with one line (`serve.get_deployment_handle(...).detect.remote`).
Each replica publishes its queue by package and team to the `QueueBoard` (serve_app.board) at most
once a second, which the console's Models page reads.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ray import serve

from ledger import Service, default_service
from serve_app import surface
from serve_app.config import ModelSpec
from serve_app.engine.protocol import Engine, EngineFactory
from serve_app.engine.registry import BACKENDS, create_engine
from serve_app.engine.runner import BatchRunner
from serve_app.engine.scheduler import Busy, Job
from serve_app.errors import ApiCode, ApiError
from serve_app.metrics import DetectorMetrics
from serve_app.results import InferenceParams

PUBLISH_S = 1.0  # queue snapshots to the board and the metrics, at most this often


@serve.deployment
class Detector:
    __surface__ = surface.Surface(handle=frozenset({"detect"}))

    def __init__(
        self, spec: ModelSpec, key: str, board: Any = None, engines: Mapping[str, EngineFactory] = BACKENDS
    ) -> None:
        surface.install()
        spec.check_weights()
        self.spec = spec
        self.key = key
        self.board = board  # the QueueBoard's handle (None: not published, e.g. in unit tests)
        self.engine: Engine = create_engine(
            spec.backend,
            spec.weights,
            device="cuda" if spec.num_gpus > 0 else "cpu",
            half=spec.half,
            imgsz=spec.imgsz,
            max_batch=spec.max_batch_size,
            registry=engines,
        )
        self.metrics = DetectorMetrics(spec.key)
        self.runner = BatchRunner(self.engine.detect, spec.scheduler_config(), on_batch=self._batched)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (unit tests)
            self.replica = "local"
        self.published = 0.0
        self.dirty = False  # calls seen since the last publication
        self.shown_queue = False  # the last publication showed queued work
        self.trailing: asyncio.TimerHandle | None = None  # a publication due later

    async def detect(
        self,
        images: list[np.ndarray],
        params: InferenceParams,
        key: str | None = None,
        service: Service | None = None,
    ) -> dict[str, Any]:
        if not isinstance(key, str) or not hmac.compare_digest(key, self.key):
            raise ApiError(ApiCode.FORBIDDEN, "the detectors answer the ingress only: call the app's `detect`")
        if not isinstance(service, tuple) or len(service) != len(Service._fields):
            service = default_service("unknown", "unknown")
        self.dirty = True
        try:
            return await self.runner.submit(images, params, Service(*service), self.spec.timeout_s)
        except Busy as busy:
            self.metrics.refused(service.level, service.package)
            self._publish(idle=not self.runner.scheduler.queued)
            return {"refused": ApiCode.MODEL_BUSY.value, "message": busy.message, "retry_after": busy.retry_after}

    def _publish_trailing(self) -> None:
        self.trailing = None
        self._publish(idle=not self.runner.scheduler.queued)

    def _batched(self, batch: Sequence[Job], seconds: float, started: float) -> None:
        self.dirty = True
        self.metrics.batch(sum(j.cost for j in batch), seconds)
        for j in batch:
            self.metrics.waited(j.service.level, j.service.package, started - j.enqueued)
        self._publish(idle=not self.runner.scheduler.queued)

    def _publish(self, idle: bool = False) -> None:
        """What changed, at most every PUBLISH_S; at once when the queue emptied after the board was
        last shown a queue (so its last word is never a queue that is gone). A change not published
        at once is published by a timer PUBLISH_S after the last publication, so the board is never
        further behind. (It published at every emptying before: once per request at low load, a Ray
        call each, which the stream benchmark of issue 22 showed as 1.5 ms per frame.)"""
        now = time.monotonic()
        if not self.dirty:
            return
        wait = PUBLISH_S - (now - self.published)
        if wait > 0 and not (idle and self.shown_queue):
            if self.trailing is None:
                self.trailing = asyncio.get_running_loop().call_later(wait, self._publish_trailing)
            return
        if self.trailing is not None:
            self.trailing.cancel()
            self.trailing = None
        self.dirty = False
        self.published = now
        self.shown_queue = bool(self.runner.scheduler.queued)
        rows = self.runner.scheduler.snapshot()
        self.metrics.queues(rows)
        if self.board is not None:
            self.board.publish.remote(self.spec.key, self.replica, time.time(), rows, self.key)
