"""The engine seam: what a Detector replica needs from a model backend, and nothing more.

An `Engine` is one model version loaded for inference. `detect` takes RGB uint8 images (H, W, 3)
of any sizes, each with its own inference parameters, and returns the detections of each image in
input order, in the image's own pixels, with the forward milliseconds summed over the passes it
ran. Calls are made one at a time (a Serve replica batches concurrent requests into one call).

An `EngineFactory` builds one from a weights file and the version's settings; every backend class
is one (its constructor has this signature), and the registry maps backend names to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import numpy as np

from serve_app.results import Detection, InferenceParams

# the backend names a model version may configure (ModelSpec.backend); registry.BACKENDS has one entry each
Backend = Literal["torch", "onnx", "tensorrt"]
DEFAULT_PARAMS = InferenceParams()


class BatchResult(NamedTuple):
    """One `Engine.detect` answer; unpacks as `(detections, forward_ms)`."""

    detections: list[list[Detection]]  # per image, in input order
    forward_ms: float  # summed over the forward passes of the call


class Engine(Protocol):
    names: dict[int, str]  # class id -> class name
    imgsz: int  # the inference size in use (the configured one, as the backend rounds it)
    max_batch: int  # the most images one forward pass takes

    def detect(
        self, images: Sequence[np.ndarray], params: InferenceParams | Sequence[InferenceParams] = DEFAULT_PARAMS
    ) -> BatchResult:
        """Detections per image, in input order. `params` is one for all images, or one per image
        (then as many as images, else `ValueError`)."""
        ...


class EngineFactory(Protocol):
    def __call__(
        self, weights: Path, *, device: str = "cpu", half: bool = False, imgsz: int = 640, max_batch: int = 32
    ) -> Engine:
        """Load `weights` for inference; `ModelFileMissing` or `EngineUnavailable` when it cannot."""
        ...


def params_per_image(
    images: Sequence[np.ndarray], params: InferenceParams | Sequence[InferenceParams]
) -> list[InferenceParams]:
    """`params` spread to one per image; `ValueError` when a list does not match the images."""
    if isinstance(params, InferenceParams):
        return [params] * len(images)
    if len(params) != len(images):
        raise ValueError(f"{len(images)} images but {len(params)} params")
    return list(params)
