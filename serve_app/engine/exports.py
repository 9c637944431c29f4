"""Exported artifacts of a .pt file (ONNX, TensorRT), cached beside the weights.

Every artifact has dynamic batch, height and width, and is cached under a versioned name that
encodes what it depends on, so an artifact exported by an older engine (e.g. a static square one)
is never picked up. A TensorRT engine's optimisation profile is min 1x3x32x32, opt
max_batch x 3 x imgsz x imgsz, max max_batch x 3 x 2imgsz x 2imgsz (ultralytics' `onnx2engine`
for `dynamic=True, batch=max_batch`), which holds every rectangular letterbox the engine makes
(each side a stride multiple in [stride, imgsz]) in chunks of at most `max_batch`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from ultralytics.models import YOLO

from serve_app.engine.errors import EngineUnavailable

# bump when the way artifacts are exported changes: older cached files then stop matching
ARTIFACT_VERSION = 2
_EXPORT_LOCK = threading.Lock()  # one export at a time in this process (replicas sharing a folder: os.replace)


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


def ensure_artifact(weights: Path, target: Path, backend: str, args: dict[str, Any], *, force: bool) -> Path:
    """`target`, exported from `weights` for `backend` with `args` unless it is there and not older than the
    weights (or `force`). `EngineUnavailable` when the export fails: never a fallback."""
    with _EXPORT_LOCK:
        if force or not target.is_file() or target.stat().st_mtime < weights.stat().st_mtime:
            _export(weights, target, backend, args)
    return target


def _export(weights: Path, target: Path, backend: str, args: dict[str, Any]) -> None:
    """Export in a private folder, then move into place in one step: other processes (replicas
    sharing the weights folder) never load a half-written file, and no file of the user's named
    like ultralytics' default (`parts.onnx`) is overwritten."""
    with tempfile.TemporaryDirectory(prefix=".export-", dir=target.parent) as tmp:
        source = Path(tmp) / weights.name
        shutil.copyfile(weights, source)
        try:
            out = YOLO(str(source)).export(**args)
        except Exception as exc:  # export failures are many and varied: report, never fall back
            raise EngineUnavailable(f"{backend} export of {weights} failed: {exc}") from exc
        os.replace(out, target)
