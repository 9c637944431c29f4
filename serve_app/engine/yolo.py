"""YoloEngine: what the ultralytics YOLO backends share — one model version, batched inference, no Ray.

Preprocessing is ultralytics' `predict()`'s, so that a served image gets exactly the boxes
`YOLO(weights).predict(path, imgsz=...)` gives for the same file:

* `imgsz` and each image's letterbox follow predict()'s rules (`serve_app.engine.letterbox`);
* images are RGB uint8 (`serve_app.imaging` applies EXIF orientation and converts grayscale and
  alpha to RGB, which is what ultralytics' file loader does too), padded with 114, scaled to [0, 1];
* precision: FP32, or FP16 on CUDA when `half` (predict's `quantize=16`).

Batching: images whose letterboxed shapes are equal share one forward pass (a camera stream has
one shape, so it batches fully); each other shape is its own group in the same call, and groups
larger than `max_batch` are split. Results come back in input order.

A backend (serve_app.engine.backends) says only which file AutoBackend loads (`_artifact`): the
.pt itself, or an export of it. There is never a silent fallback to another backend.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, cast

import numpy as np
import torch
from ultralytics.data.augment import LetterBox
from ultralytics.nn.autobackend import AutoBackend
from ultralytics.utils import nms, ops

from serve_app.engine.errors import EngineUnavailable, ModelFileMissing
from serve_app.engine.letterbox import letterbox_shape, round_to_stride
from serve_app.engine.protocol import DEFAULT_PARAMS, BatchResult, params_per_image
from serve_app.results import Detection, InferenceParams


class YoloEngine(ABC):
    """Implements `Engine`. Thread-compatible for `detect` calls made one at a time (a Serve
    replica batches them)."""

    backend: ClassVar[str]

    def __init__(
        self, weights: Path, *, device: str = "cpu", half: bool = False, imgsz: int = 640, max_batch: int = 32
    ) -> None:
        weights = Path(weights)
        if not weights.is_file():
            raise ModelFileMissing(f"weights file not found: {weights.resolve()}")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.weights = weights
        self.device = torch.device(device)
        if half and self.device.type != "cuda":
            raise EngineUnavailable("FP16 needs a CUDA device")
        self.half = half
        self.max_batch = max_batch
        self.imgsz = int(imgsz)  # rounded to the stride below, once the model's stride is known
        self.model = self._load(force_export=False)
        if not self.dynamic:  # only an export put there by hand: export afresh, once
            self.model = self._load(force_export=True)
            if not self.dynamic:
                raise EngineUnavailable(f"the {self.backend} export of {weights} does not take dynamic shapes")
        self.names: dict[int, str] = {int(k): str(v) for k, v in self.model.names.items()}
        self.stride = int(self.model.stride)
        self.imgsz = round_to_stride(self.imgsz, self.stride)
        # predict(): the minimal rectangle (auto=True) for PyTorch models and dynamic-shape exports
        self.letterbox = LetterBox((self.imgsz, self.imgsz), auto=True, stride=self.stride)
        self.model.warmup(imgsz=(1, 3, self.imgsz, self.imgsz))

    @abstractmethod
    def _artifact(self, *, force_export: bool) -> Path:
        """The file AutoBackend loads; exported afresh when `force_export`."""

    @property
    def dynamic(self) -> bool:
        """Whether the loaded model takes any input shape (always, for torch)."""
        return self.model.format == "pt" or bool(getattr(self.model, "dynamic", False))

    def _load(self, *, force_export: bool) -> AutoBackend:
        artifact = self._artifact(force_export=force_export)
        model: AutoBackend = AutoBackend(str(artifact), device=self.device, fp16=self.half, fuse=True, verbose=False)
        return model

    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is letterboxed to: predict()'s rectangle."""
        return letterbox_shape(height, width, imgsz=self.imgsz, stride=self.stride)

    def detect(
        self, images: Sequence[np.ndarray], params: InferenceParams | Sequence[InferenceParams] = DEFAULT_PARAMS
    ) -> BatchResult:
        """RGB uint8 images (H, W, 3) of any sizes → detections per image in input order (original
        pixels), and the forward ms summed over the passes.

        Images with the same letterboxed shape share a forward pass (at most `max_batch` images
        each); NMS per image with that image's params.
        """
        if not images:
            return BatchResult([], 0.0)
        per_image = params_per_image(images, params)
        boxed = [cast(np.ndarray, self.letterbox(image=im)) for im in images]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, b in enumerate(boxed):
            groups.setdefault(b.shape, []).append(i)
        out: list[list[Detection]] = [[] for _ in images]
        forward_ms = 0.0
        for members in groups.values():
            for k in range(0, len(members), self.max_batch):
                chunk = members[k : k + self.max_batch]
                forward_ms += self._run(chunk, boxed, images, per_image, out)
        return BatchResult(out, forward_ms)

    def _run(
        self,
        chunk: list[int],
        boxed: list[np.ndarray],
        images: Sequence[np.ndarray],
        per_image: list[InferenceParams],
        out: list[list[Detection]],
    ) -> float:
        """One forward pass over same-shape letterboxes; fills `out` at the chunk's indices."""
        x = torch.from_numpy(np.stack([boxed[i] for i in chunk])).to(self.device).permute(0, 3, 1, 2).contiguous()
        # the input dtype the loaded model takes, as predict() does (an FP16 ONNX/TensorRT export may keep FP32 inputs)
        x = (x.half() if self.model.fp16 else x.float()).div_(255)
        t0 = time.perf_counter()
        with torch.inference_mode():
            preds = self.model(x)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        forward_ms = (time.perf_counter() - t0) * 1000
        pred = preds[0] if isinstance(preds, list | tuple) else preds
        end2end = getattr(self.model, "end2end", False)
        for j, i in enumerate(chunk):
            p = per_image[i]
            det = nms.non_max_suppression(pred[j : j + 1], p.conf, p.iou, max_det=p.max_det, end2end=end2end)[0]
            det = det.detach().float().cpu()
            if len(det):
                det[:, :4] = ops.scale_boxes((int(x.shape[2]), int(x.shape[3])), det[:, :4], images[i].shape)
            out[i] = [
                Detection(
                    int(c), self.names.get(int(c), str(int(c))), float(s), float(a), float(b), float(cc), float(d)
                )
                for a, b, cc, d, s, c in det[:, :6].tolist()
            ]
        return forward_ms
