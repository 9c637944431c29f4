"""Detector: one Serve deployment per model version (DESIGN §1), a thin shell over an `Engine`.

The engine comes from the backend registry by the version's `backend` (serve_app.engine.registry).
Concurrent calls are merged by `@serve.batch` into one `Engine.detect` (serve_app.engine.batching),
which runs one forward pass per letterboxed shape, at most `max_batch_size` images a pass. Each
call carries its own images and inference parameters and gets its own detections back, in order.
The forward passes run in a worker thread, one batch at a time (serve.batch's default), so the
replica's event loop keeps taking requests for the next batch meanwhile.

Only the ingress calls it: `detect` is its whole handle surface (serve_app.surface), and it answers
only a caller presenting the key the app builder derived from the ledger's capability, so a Ray job
cannot reach the model unmetered with one line (`serve.get_deployment_handle(...).detect.remote`).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Mapping
from typing import Any, Protocol, cast

import numpy as np
from ray import serve

from serve_app import surface
from serve_app.config import ModelSpec
from serve_app.engine.batching import Call, merge_calls, split_result
from serve_app.engine.protocol import Engine, EngineFactory
from serve_app.engine.registry import BACKENDS, create_engine
from serve_app.errors import ApiCode, ApiError
from serve_app.metrics import DetectorMetrics
from serve_app.results import InferenceParams


class TunableBatch(Protocol):
    """The setters `@serve.batch` adds to the method it wraps (Ray's type hints leave them out)."""

    def set_max_batch_size(self, new_max_batch_size: int) -> None: ...

    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None: ...


@serve.deployment
class Detector:
    __surface__ = surface.Surface(handle=frozenset({"detect"}))

    def __init__(self, spec: ModelSpec, key: str, engines: Mapping[str, EngineFactory] = BACKENDS) -> None:
        surface.install()
        spec.check_weights()
        self.spec = spec
        self.key = key
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
        batch = cast(TunableBatch, self.detect_batch)
        batch.set_max_batch_size(spec.max_batch_size)
        batch.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def detect_batch(self, calls: list[Call]) -> list[dict[str, Any]]:
        images, params = merge_calls(calls)
        t0 = time.perf_counter()
        # off the event loop (torch releases the GIL): requests keep arriving and queue up for the
        # next batch while this one computes, so batches fill under load
        result = await asyncio.to_thread(self.engine.detect, images, params)
        seconds = time.perf_counter() - t0
        self.metrics.batch(len(images), seconds)
        return split_result(calls, result, seconds * 1000)

    async def detect(self, images: list[np.ndarray], params: InferenceParams, key: str | None = None) -> dict[str, Any]:
        if not isinstance(key, str) or not hmac.compare_digest(key, self.key):
            raise ApiError(ApiCode.FORBIDDEN, "the detectors answer the ingress only: call the app's `detect`")
        result: dict[str, Any] = await self.detect_batch((images, params))
        return result
