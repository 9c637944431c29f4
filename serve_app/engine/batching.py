"""How the calls a Detector replica batched (`@serve.batch`) share one `Engine.detect`.

Each call carries its own images and inference parameters and gets its own detections back, in
order; the engine groups all the images by letterboxed shape, whichever call they came from.
The reply of each call is the Detector's wire format, which the ingress reads:
`{"detections": [[Detection, ...] per image], "gpu_ms", "infer_ms", "batch_images"}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from serve_app.engine.protocol import BatchResult
from serve_app.results import InferenceParams

Call = tuple[list[np.ndarray], InferenceParams]  # one caller's images and its parameters


def merge_calls(calls: Sequence[Call]) -> tuple[list[np.ndarray], list[InferenceParams]]:
    """Every image of every call in call order, and each image's own call's parameters."""
    images = [im for ims, _ in calls for im in ims]
    params = [p for ims, p in calls for _ in ims]
    return images, params


def split_result(calls: Sequence[Call], result: BatchResult, total_ms: float) -> list[dict[str, Any]]:
    """One reply per call, in call order: its own images' detections, its share of the forward
    time (by image count), the whole batch's wall time and size."""
    images = sum(len(ims) for ims, _ in calls)
    if len(result.detections) != images:
        raise ValueError(f"{images} images but {len(result.detections)} detection lists")
    out, i = [], 0
    for ims, _ in calls:
        out.append(
            {
                "detections": result.detections[i : i + len(ims)],
                "gpu_ms": result.forward_ms * len(ims) / images,
                "infer_ms": total_ms,
                "batch_images": images,
            }
        )
        i += len(ims)
    return out
