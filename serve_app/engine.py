"""YoloEngine: one ultralytics model version, batched inference, no Ray.

letterbox (square, like `YOLO.predict`) → forward → NMS → boxes in original-image pixels.
Backends:
* `torch`    the .pt file; CPU (FP32) or CUDA (FP16 when `half`).
* `onnx`     ONNX Runtime; exported once from the .pt (dynamic batch) and cached beside it.
* `tensorrt` a TensorRT engine exported through ultralytics, cached beside the .pt; needs the
             `tensorrt` package and a CUDA GPU, otherwise `EngineUnavailable` says which is
             missing. There is never a silent fallback to another backend.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics reads its settings: never download

import numpy as np
import torch
from ultralytics import YOLO
from ultralytics.data.augment import LetterBox
from ultralytics.nn.autobackend import AutoBackend
from ultralytics.utils import nms, ops

from serve_app.results import Detection, InferenceParams

DEFAULT_PARAMS = InferenceParams()
BACKENDS = ("torch", "onnx", "tensorrt")
_EXPORT_LOCK = threading.Lock()


class EngineError(Exception):
    """Base of the engine's exceptions."""


class ModelFileMissing(EngineError):
    """The configured weights file does not exist; the message names the path."""


class EngineUnavailable(EngineError):
    """The requested backend cannot run here (no GPU, package missing, export failed)."""


class YoloEngine:
    """Thread-compatible for `detect` calls made one at a time (a Serve replica batches them)."""

    def __init__(
        self, weights: Path, *, backend: str = "torch", device: str = "cpu", half: bool = False, imgsz: int = 640
    ) -> None:
        if backend not in BACKENDS:
            raise EngineUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        weights = Path(weights)
        if not weights.is_file():
            raise ModelFileMissing(f"weights file not found: {weights.resolve()}")
        self.weights = weights
        self.backend_name = backend
        self.device = torch.device(device)
        if half and self.device.type != "cuda":
            raise EngineUnavailable("FP16 needs a CUDA device")
        self.half = half
        self.imgsz = imgsz
        artifact = self._artifact(weights, backend)
        self.model = AutoBackend(str(artifact), device=self.device, fp16=half, fuse=True, verbose=False)
        self.names: dict[int, str] = {int(k): str(v) for k, v in self.model.names.items()}
        self.letterbox = LetterBox((imgsz, imgsz), auto=False, stride=int(self.model.stride))
        self.model.warmup(imgsz=(1, 3, imgsz, imgsz))

    def _artifact(self, weights: Path, backend: str) -> Path:
        if backend == "torch":
            return weights
        if backend == "tensorrt":
            if not torch.cuda.is_available():
                raise EngineUnavailable("the tensorrt backend needs a CUDA GPU; none is visible")
            if importlib.util.find_spec("tensorrt") is None:
                raise EngineUnavailable("the tensorrt backend needs `pip install yolo-tokens[tensorrt]`")
        suffix = {"onnx": ".onnx", "tensorrt": ".engine"}[backend]
        target = weights.with_suffix(suffix)
        with _EXPORT_LOCK:
            if not target.is_file() or target.stat().st_mtime < weights.stat().st_mtime:
                fmt = {"onnx": "onnx", "tensorrt": "engine"}[backend]
                try:
                    out = YOLO(str(weights)).export(
                        format=fmt,
                        imgsz=self.imgsz,
                        dynamic=True,
                        half=self.half,
                        device=str(self.device) if backend == "tensorrt" else "cpu",
                        simplify=False,
                        verbose=False,
                    )
                except Exception as exc:  # export failures are many and varied: report, never fall back
                    raise EngineUnavailable(f"{backend} export of {weights} failed: {exc}") from exc
                if Path(out) != target:
                    Path(out).replace(target)
        return target

    def detect(
        self, images: list[np.ndarray], params: InferenceParams | list[InferenceParams] = DEFAULT_PARAMS
    ) -> tuple[list[list[Detection]], float]:
        """RGB uint8 images (H, W, 3) → detections per image (original pixels), and forward ms.

        One forward pass for the whole batch; NMS per image with that image's params.
        """
        if not images:
            return [], 0.0
        per_image = params if isinstance(params, list) else [params] * len(images)
        boxed = np.stack([self.letterbox(image=im) for im in images])
        x = torch.from_numpy(boxed).to(self.device).permute(0, 3, 1, 2).contiguous()
        x = (x.half() if self.half else x.float()).div_(255)
        t0 = time.perf_counter()
        with torch.inference_mode():
            preds = self.model(x)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        forward_ms = (time.perf_counter() - t0) * 1000
        pred = preds[0] if isinstance(preds, list | tuple) else preds
        end2end = getattr(self.model, "end2end", False)
        out: list[list[Detection]] = []
        for i, (im, p) in enumerate(zip(images, per_image, strict=True)):
            det = nms.non_max_suppression(pred[i : i + 1], p.conf, p.iou, max_det=p.max_det, end2end=end2end)[0]
            det = det.detach().float().cpu()
            if len(det):
                det[:, :4] = ops.scale_boxes(x.shape[2:], det[:, :4], im.shape)
            out.append(
                [
                    Detection(
                        int(c), self.names.get(int(c), str(int(c))), float(s), float(a), float(b), float(cc), float(d)
                    )
                    for a, b, cc, d, s, c in det[:, :6].tolist()
                ]
            )
        return out, forward_ms
