"""YoloEngine: one ultralytics model version, batched inference, no Ray.

Preprocessing is ultralytics' `predict()`'s, so that a served image gets exactly the boxes
`YOLO(weights).predict(path, imgsz=...)` gives for the same file:

* `imgsz` is rounded UP to a multiple of the model's stride (`check_imgsz`, as predict does);
* each image is letterboxed on its own to the minimal stride-multiple rectangle whose long side
  is `imgsz` (`LetterBox(auto=True)`, predict's rule for PyTorch and dynamic-shape exports),
  not to an `imgsz` square: a 1280 x 720 photo at 640 runs as 640 x 384;
* images are RGB uint8 (`serve_app.imaging` applies EXIF orientation and converts grayscale and
  alpha to RGB, which is what ultralytics' file loader does too), padded with 114, scaled to [0, 1];
* precision: FP32, or FP16 on CUDA when `half` (predict's `quantize=16`).

Batching: images whose letterboxed shapes are equal share one forward pass (a camera stream has
one shape, so it batches fully); each other shape is its own group in the same call, and groups
larger than `max_batch` are split. Results come back in input order.

Backends (every exported artifact has dynamic batch, height and width, and is cached beside the
weights under a versioned name that encodes what it depends on, so an artifact exported by an
older engine, e.g. a static square one, is never picked up):
* `torch`    the .pt file; CPU (FP32) or CUDA (FP16 when `half`).
* `onnx`     ONNX Runtime; exported once from the .pt.
* `tensorrt` a TensorRT engine exported through ultralytics; its optimisation profile is
             min 1x3x32x32, opt max_batch x 3 x imgsz x imgsz, max max_batch x 3 x 2imgsz x 2imgsz
             (ultralytics' `onnx2engine` for `dynamic=True, batch=max_batch`), which holds every
             rectangular letterbox this engine makes (each side a stride multiple in
             [stride, imgsz]) in chunks of at most `max_batch`. Needs the `tensorrt` package and
             a CUDA GPU, otherwise `EngineUnavailable` says which is missing.
There is never a silent fallback to another backend.

    EngineError
    ├── ModelFileMissing    the weights file does not exist
    └── EngineUnavailable   the backend cannot run here (no GPU, package missing, export failed)
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, cast

os.environ.setdefault("YOLO_OFFLINE", "1")  # before ultralytics reads its settings: never download

import numpy as np
import torch
from ultralytics.data.augment import LetterBox
from ultralytics.models import YOLO
from ultralytics.nn.autobackend import AutoBackend
from ultralytics.utils import nms, ops

from serve_app.results import Detection, InferenceParams

DEFAULT_PARAMS = InferenceParams()
BACKENDS = ("torch", "onnx", "tensorrt")
# bump when the way artifacts are exported changes: older cached files then stop matching
ARTIFACT_VERSION = 2
_EXPORT_LOCK = threading.Lock()


class EngineError(Exception):
    """Base of the engine's exceptions."""


class ModelFileMissing(EngineError):
    """The configured weights file does not exist; the message names the path."""


class EngineUnavailable(EngineError):
    """The requested backend cannot run here (no GPU, package missing, export failed)."""


def artifact_path(weights: Path, backend: str, *, imgsz: int, half: bool, max_batch: int) -> Path:
    """Where the exported artifact of `weights` for `backend` is cached (the .pt itself for torch).

    The name carries the artifact version and every export setting the file depends on: the
    ONNX graph has dynamic shapes (only its precision matters); a TensorRT engine is built for
    one shape profile and precision.
    """
    if backend == "torch":
        return weights
    precision = "fp16" if half else "fp32"
    if backend == "onnx":
        return weights.with_name(f"{weights.stem}.yt{ARTIFACT_VERSION}.dyn.{precision}.onnx")
    return weights.with_name(f"{weights.stem}.yt{ARTIFACT_VERSION}.{imgsz}px.b{max_batch}.{precision}.engine")


def export_args(backend: str, *, imgsz: int, half: bool, max_batch: int, device: str) -> dict[str, Any]:
    """`YOLO.export` arguments of an artifact. Always dynamic in batch, height and width, so that
    rectangular letterboxes of any size run. For TensorRT, `batch` is the optimisation profile's
    largest batch: ultralytics' `onnx2engine` builds min 1x3x32x32, opt batch x 3 x imgsz x imgsz,
    max batch x 3 x 2imgsz x 2imgsz, which holds every letterbox the engine makes."""
    tensorrt = backend == "tensorrt"
    return {
        "format": "engine" if tensorrt else "onnx",
        "imgsz": imgsz,
        "dynamic": True,
        "batch": max_batch if tensorrt else 1,  # ONNX: the batch axis is dynamic, export at 1
        "quantize": 16 if half else None,
        "device": device if tensorrt else "cpu",
        "simplify": False,
        "verbose": False,
    }


def round_to_stride(imgsz: int, stride: int) -> int:
    """predict()'s `check_imgsz`: the size rounded UP to a multiple of the stride, at least one stride."""
    return max(math.ceil(imgsz / stride) * stride, stride)


class YoloEngine:
    """Thread-compatible for `detect` calls made one at a time (a Serve replica batches them)."""

    def __init__(
        self,
        weights: Path,
        *,
        backend: str = "torch",
        device: str = "cpu",
        half: bool = False,
        imgsz: int = 640,
        max_batch: int = 32,
    ) -> None:
        if backend not in BACKENDS:
            raise EngineUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        weights = Path(weights)
        if not weights.is_file():
            raise ModelFileMissing(f"weights file not found: {weights.resolve()}")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.weights = weights
        self.backend_name = backend
        self.device = torch.device(device)
        if half and self.device.type != "cuda":
            raise EngineUnavailable("FP16 needs a CUDA device")
        self.half = half
        self.max_batch = max_batch
        self.imgsz = int(imgsz)  # rounded to the stride below, once the model's stride is known
        self.model = self._load(force_export=False)
        if backend != "torch" and not self.dynamic:  # only a file put there by hand: export afresh, once
            self.model = self._load(force_export=True)
            if not self.dynamic:
                raise EngineUnavailable(f"the {backend} export of {weights} does not take dynamic shapes")
        self.names: dict[int, str] = {int(k): str(v) for k, v in self.model.names.items()}
        self.stride = int(self.model.stride)
        self.imgsz = round_to_stride(self.imgsz, self.stride)
        # predict(): the minimal rectangle (auto=True) for PyTorch models and dynamic-shape exports
        self.letterbox = LetterBox((self.imgsz, self.imgsz), auto=True, stride=self.stride)
        self.model.warmup(imgsz=(1, 3, self.imgsz, self.imgsz))

    @property
    def dynamic(self) -> bool:
        """Whether the loaded model takes any input shape (always, for torch)."""
        return self.model.format == "pt" or bool(getattr(self.model, "dynamic", False))

    def _load(self, *, force_export: bool) -> AutoBackend:
        artifact = self._artifact(force_export=force_export)
        model: AutoBackend = AutoBackend(str(artifact), device=self.device, fp16=self.half, fuse=True, verbose=False)
        return model

    def _artifact(self, *, force_export: bool) -> Path:
        backend, weights = self.backend_name, self.weights
        if backend == "torch":
            return weights
        if backend == "tensorrt":
            if not torch.cuda.is_available():
                raise EngineUnavailable("the tensorrt backend needs a CUDA GPU; none is visible")
            if importlib.util.find_spec("tensorrt") is None:
                raise EngineUnavailable("the tensorrt backend needs `pip install yolo-tokens[tensorrt]`")
        # the export's own size must be a stride multiple; 32 is every YOLO detector's smallest max stride
        imgsz = round_to_stride(self.imgsz, 32)
        target = artifact_path(weights, backend, imgsz=imgsz, half=self.half, max_batch=self.max_batch)
        with _EXPORT_LOCK:
            if force_export or not target.is_file() or target.stat().st_mtime < weights.stat().st_mtime:
                self._export(target, imgsz)
        return target

    def _export(self, target: Path, imgsz: int) -> None:
        """Export in a private folder, then move into place in one step: other processes (replicas
        sharing the weights folder) never load a half-written file, and no file of the user's named
        like ultralytics' default (`parts.onnx`) is overwritten."""
        backend = self.backend_name
        with tempfile.TemporaryDirectory(prefix=".export-", dir=target.parent) as tmp:
            source = Path(tmp) / self.weights.name
            shutil.copyfile(self.weights, source)
            try:
                args = export_args(
                    backend, imgsz=imgsz, half=self.half, max_batch=self.max_batch, device=str(self.device)
                )
                out = YOLO(str(source)).export(**args)
            except Exception as exc:  # export failures are many and varied: report, never fall back
                raise EngineUnavailable(f"{backend} export of {self.weights} failed: {exc}") from exc
            os.replace(out, target)

    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is letterboxed to: predict()'s rectangle."""
        r = min(self.imgsz / height, self.imgsz / width)
        h, w = max(round(height * r), 1), max(round(width * r), 1)
        return h + (self.imgsz - h) % self.stride, w + (self.imgsz - w) % self.stride

    def detect(
        self, images: list[np.ndarray], params: InferenceParams | list[InferenceParams] = DEFAULT_PARAMS
    ) -> tuple[list[list[Detection]], float]:
        """RGB uint8 images (H, W, 3) of any sizes → detections per image in input order (original
        pixels), and the forward ms summed over the passes.

        Images with the same letterboxed shape share a forward pass (at most `max_batch` images
        each); NMS per image with that image's params.
        """
        if not images:
            return [], 0.0
        per_image = params if isinstance(params, list) else [params] * len(images)
        if len(per_image) != len(images):
            raise ValueError(f"{len(images)} images but {len(per_image)} params")
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
        return out, forward_ms

    def _run(
        self,
        chunk: list[int],
        boxed: list[np.ndarray],
        images: list[np.ndarray],
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
