"""Detector: one deployment per model version (DESIGN §1), a thin shell over `YoloEngine`.

Concurrent calls are merged by `@serve.batch`; the engine runs one forward pass per letterboxed
shape (images of any sizes, preprocessed as ultralytics' `predict()` does, so a camera stream of
one shape batches fully), at most `max_batch_size` images a pass. Each call carries its own images
and inference parameters and gets its own detections back, in order. The forward passes run
in a worker thread, one batch at a time (serve.batch's default), so the replica's event loop
keeps taking requests for the next batch meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from ray import serve

from serve_app.config import ModelSpec
from serve_app.engine import YoloEngine
from serve_app.results import InferenceParams


@serve.deployment
class Detector:
    def __init__(self, spec: ModelSpec) -> None:
        spec.check_weights()
        self.spec = spec
        self.engine = YoloEngine(
            spec.weights,
            backend=spec.backend,
            device="cuda" if spec.num_gpus > 0 else "cpu",
            half=spec.half,
            imgsz=spec.imgsz,
            max_batch=spec.max_batch_size,
        )
        self.detect_batch.set_max_batch_size(spec.max_batch_size)
        self.detect_batch.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def detect_batch(self, calls: list[tuple[list[np.ndarray], InferenceParams]]) -> list[dict[str, Any]]:
        images = [im for ims, _ in calls for im in ims]
        params = [p for ims, p in calls for _ in ims]
        t0 = time.perf_counter()
        # off the event loop (torch releases the GIL): requests keep arriving and queue up for the
        # next batch while this one computes, so batches fill under load
        dets, forward_ms = await asyncio.to_thread(self.engine.detect, images, params)
        total_ms = (time.perf_counter() - t0) * 1000
        out, i = [], 0
        for ims, _ in calls:
            share = len(ims) / len(images)
            out.append(
                {
                    "detections": dets[i : i + len(ims)],
                    "gpu_ms": forward_ms * share,
                    "infer_ms": total_ms,
                    "batch_images": len(images),
                }
            )
            i += len(ims)
        return out

    async def detect(self, images: list[np.ndarray], params: InferenceParams) -> dict[str, Any]:
        result: dict[str, Any] = await self.detect_batch((images, params))
        return result
