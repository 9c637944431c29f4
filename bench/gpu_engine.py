"""Engine throughput without Ray, by backend and batch size: images/s of a YOLOv8s-sized model.

Runs on a GPU machine from one prepared call (no downloads: the model is built from the
yaml shipped in ultralytics with random weights, which costs the same FLOPs as trained ones):

    python -m bench.gpu_engine --imgsz 640 --batches 1 8 32 64 128 --backends torch tensorrt
    python -m bench.gpu_engine --frame 1280x720 ...   # camera frames: letterboxed to 384 x 640, as predict() does

Prints one JSON object per (backend, batch) and a summary last. A backend that cannot run
here (no GPU, no tensorrt) is reported with its reason, never silently replaced.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from serve_app import launcher  # neither Ray nor ultralytics

if __name__ == "__main__":  # run as a script: the rules before Ray and ultralytics, imported below, read them
    launcher.apply_environment()

import numpy as np
import torch
from ultralytics import YOLO

from serve_app.engine import EngineError
from serve_app.engine.registry import create_engine
from serve_app.results import InferenceParams


def build_weights(arch: str, out: Path) -> Path:
    model = YOLO(arch)
    path = out / f"{Path(arch).stem}.pt"
    model.save(str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="yolov8s.yaml")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--backends", nargs="+", default=["torch", "tensorrt"])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--frame", default=None, help="WIDTHxHEIGHT of the frames; default imgsz x imgsz")
    a = ap.parse_args()
    width, height = (int(v) for v in a.frame.lower().split("x")) if a.frame else (a.imgsz, a.imgsz)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    weights = build_weights(a.arch, work)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (height, width, 3), dtype=np.uint8) for _ in range(max(a.batches))]
    best: dict[str, float] = {}
    for backend in a.backends:
        try:
            # max_batch: each measured batch is one forward pass (and the TensorRT profile's largest batch)
            engine = create_engine(backend, weights, device=device, half=cuda, imgsz=a.imgsz, max_batch=max(a.batches))
        except EngineError as exc:
            print(json.dumps({"bench": "gpu_engine", "backend": backend, "skipped": str(exc)}), flush=True)
            continue
        for batch in a.batches:
            images = frames[:batch]
            engine.detect(images, InferenceParams(conf=0.25))  # warm-up (and TensorRT profile)
            n, t0 = 0, time.perf_counter()
            forward_s = 0.0
            while time.perf_counter() - t0 < a.seconds:
                _, fwd_ms = engine.detect(images, InferenceParams(conf=0.25))
                forward_s += fwd_ms / 1000
                n += batch
            elapsed = time.perf_counter() - t0
            row = {
                "bench": "gpu_engine",
                "backend": backend,
                "device": device,
                "half": cuda,
                "arch": a.arch,
                "imgsz": a.imgsz,
                "frame": f"{width}x{height}",
                "input": "x".join(map(str, engine.input_shape(height, width))),
                "batch": batch,
                "images": n,
                "images_per_s": round(n / elapsed, 1),
                "forward_images_per_s": round(n / forward_s, 1) if forward_s else None,
            }
            print(json.dumps(row), flush=True)
            best[backend] = max(best.get(backend, 0.0), row["images_per_s"])
    print(
        json.dumps(
            {
                "bench": "gpu_engine",
                "summary": True,
                "device": device,
                "gpu": torch.cuda.get_device_name(0) if cuda else None,
                "best_images_per_s": best,
                "torch": torch.__version__,
                "python": platform.python_version(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
