"""FakeEngine: an `Engine` that runs no model — deterministic, instant, no torch.

For unit tests of what sits on an engine (the Detector shell's batching, the registry). It keeps
the real engines' contract: one pass per letterboxed shape in chunks of at most `max_batch`
(recorded in `passes` as (n, height, width)), results in input order, each image filtered with
its own parameters. The real engines have their own tests against ultralytics' predict().

Each image gets up to three boxes, a function of its size and mean pixel value only:
confidences 0.9, 0.6 and 0.3, class ids from the mean value, boxes inside the image.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serve_app.engine.errors import EngineUnavailable
from serve_app.engine.letterbox import letterbox_shape, round_to_stride
from serve_app.engine.protocol import DEFAULT_PARAMS, BatchResult, params_per_image
from serve_app.results import Detection, InferenceParams

FAKE_NAMES = {0: "square", 1: "circle", 2: "triangle"}
FAKE_STRIDE = 32
FAKE_PASS_MS = 1.0  # "forward" time reported per pass
CONFIDENCES = (0.9, 0.6, 0.3)


class FakeEngine:
    """Implements `Engine` and `EngineFactory` (same constructor as the real backends)."""

    def __init__(
        self, weights: Path, *, device: str = "cpu", half: bool = False, imgsz: int = 640, max_batch: int = 32
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if half and not device.startswith("cuda"):
            raise EngineUnavailable("FP16 needs a CUDA device")
        self.weights = Path(weights)
        self.device = device
        self.names: dict[int, str] = dict(FAKE_NAMES)
        self.imgsz = round_to_stride(int(imgsz), FAKE_STRIDE)
        self.max_batch = max_batch
        self.passes: list[tuple[int, int, int]] = []  # (images, height, width) of each pass

    def detect(
        self, images: Sequence[np.ndarray], params: InferenceParams | Sequence[InferenceParams] = DEFAULT_PARAMS
    ) -> BatchResult:
        if not images:
            return BatchResult([], 0.0)
        per_image = params_per_image(images, params)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            shape = letterbox_shape(int(im.shape[0]), int(im.shape[1]), imgsz=self.imgsz, stride=FAKE_STRIDE)
            groups.setdefault(shape, []).append(i)
        out: list[list[Detection]] = [[] for _ in images]
        forward_ms = 0.0
        for (h, w), members in groups.items():
            for k in range(0, len(members), self.max_batch):
                chunk = members[k : k + self.max_batch]
                self.passes.append((len(chunk), h, w))
                forward_ms += FAKE_PASS_MS
                for i in chunk:
                    out[i] = self._boxes(images[i], per_image[i])
        return BatchResult(out, forward_ms)

    def _boxes(self, image: np.ndarray, p: InferenceParams) -> list[Detection]:
        height, width = int(image.shape[0]), int(image.shape[1])
        mean = int(image.mean()) if image.size else 0
        boxes = []
        for k, conf in enumerate(CONFIDENCES):
            if conf < p.conf:
                continue
            cls = (mean + k) % len(self.names)
            x1, y1 = width * k / 4, height * k / 4
            boxes.append(Detection(cls, self.names[cls], conf, x1, y1, x1 + width / 4, y1 + height / 4))
        return boxes[: p.max_det]


def timed(pass_s: float) -> type[FakeEngine]:
    """A FakeEngine class whose every forward pass takes `pass_s` seconds of wall time (it sleeps,
    releasing the GIL, as a GPU pass does): capacity is known, e.g. 25 ms per pass of up to 8
    images is 320 images/s (bench/isolation.py, the isolation tests under Serve)."""

    class TimedFakeEngine(FakeEngine):
        def detect(
            self, images: Sequence[np.ndarray], params: InferenceParams | Sequence[InferenceParams] = DEFAULT_PARAMS
        ) -> BatchResult:
            before = len(self.passes)
            result = super().detect(images, params)
            time.sleep(pass_s * (len(self.passes) - before))
            return BatchResult(result.detections, 1000 * pass_s * (len(self.passes) - before))

    TimedFakeEngine.__name__ = TimedFakeEngine.__qualname__ = f"TimedFakeEngine_{pass_s:g}s"
    return TimedFakeEngine
