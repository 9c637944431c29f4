"""predict()'s input-size arithmetic, as plain integers (no torch, no ultralytics).

* `imgsz` is rounded UP to a multiple of the model's stride (`check_imgsz`, as predict does);
* each image is letterboxed on its own to the minimal stride-multiple rectangle whose long side is
  `imgsz` (`LetterBox(auto=True)`, predict's rule for PyTorch and dynamic-shape exports), not to an
  `imgsz` square: a 1280 x 720 photo at 640 runs as 640 x 384.
"""

from __future__ import annotations

import math


def round_to_stride(imgsz: int, stride: int) -> int:
    """predict()'s `check_imgsz`: the size rounded UP to a multiple of the stride, at least one stride."""
    return max(math.ceil(imgsz / stride) * stride, stride)


def letterbox_shape(height: int, width: int, *, imgsz: int, stride: int) -> tuple[int, int]:
    """The (height, width) an image of this size is letterboxed to: predict()'s rectangle for a
    stride-multiple `imgsz`."""
    r = min(imgsz / height, imgsz / width)
    h, w = max(round(height * r), 1), max(round(width * r), 1)
    return h + (imgsz - h) % stride, w + (imgsz - w) % stride
