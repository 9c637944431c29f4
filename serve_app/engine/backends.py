"""The YOLO backends, one class each; they differ only in the file AutoBackend loads.

* `torch`    the .pt file; CPU (FP32) or CUDA (FP16 when `half`).
* `onnx`     ONNX Runtime; exported once from the .pt (`serve_app.engine.exports`).
* `tensorrt` a TensorRT engine exported through ultralytics, its profile holding every letterbox
             the engine makes. Needs the `tensorrt` package and a CUDA GPU, otherwise
             `EngineUnavailable` says which is missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from serve_app.engine.errors import EngineUnavailable
from serve_app.engine.exports import artifact_path, ensure_artifact, export_args
from serve_app.engine.letterbox import round_to_stride
from serve_app.engine.yolo import YoloEngine


class TorchEngine(YoloEngine):
    backend = "torch"

    def _artifact(self, *, force_export: bool) -> Path:
        return self.weights


class ExportedEngine(YoloEngine):
    """A backend that loads an artifact exported from the .pt, cached beside it."""

    def _check_runtime(self) -> None:
        """`EngineUnavailable` when this backend cannot run here; before any export is tried."""

    def _artifact(self, *, force_export: bool) -> Path:
        self._check_runtime()
        # the export's own size must be a stride multiple; 32 is every YOLO detector's smallest max stride
        imgsz = round_to_stride(self.imgsz, 32)
        target = artifact_path(self.weights, self.backend, imgsz=imgsz, half=self.half, max_batch=self.max_batch)
        args = export_args(self.backend, imgsz=imgsz, half=self.half, max_batch=self.max_batch, device=str(self.device))
        return ensure_artifact(self.weights, target, self.backend, args, force=force_export)


class OnnxEngine(ExportedEngine):
    backend = "onnx"


class TensorRTEngine(ExportedEngine):
    backend = "tensorrt"

    def _check_runtime(self) -> None:
        if not torch.cuda.is_available():
            raise EngineUnavailable("the tensorrt backend needs a CUDA GPU; none is visible")
        if importlib.util.find_spec("tensorrt") is None:
            raise EngineUnavailable("the tensorrt backend needs `pip install yolo-tokens[tensorrt]`")
