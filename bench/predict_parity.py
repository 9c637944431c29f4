"""Served preprocessing vs ultralytics' `predict()`: per image, backend and imgsz, how far the
engine's detections are from `YOLO(weights).predict(path)` on the same file.

Builds a corpus of image files of many shapes and kinds (generated part scenes, grayscale,
EXIF-rotated, alpha PNG, ultralytics' bundled photos), decodes each with the service's own
`decode_image`, runs every image of the corpus through ONE `YoloEngine.detect` call (so the
mixed-shape grouping is exercised), and matches each detection to predict()'s on the file path:

    python -m bench.predict_parity --imgsz 320 640 --backends torch onnx
    python -m bench.predict_parity --letterbox square   # the engine's old square letterbox, for comparison

Prints one JSON object per (image, backend, imgsz) and a summary last. No Ray.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_app import launcher  # neither Ray nor ultralytics

if __name__ == "__main__":  # run as a script: the rules before Ray and ultralytics, imported below, read them
    launcher.apply_environment()

import numpy as np
import ultralytics
from PIL import Image
from ultralytics import YOLO
from ultralytics.data.augment import LetterBox
from ultralytics.utils import LOGGER

from serve_app.config import DEMO_WEIGHTS
from serve_app.demo.synth import scene
from serve_app.engine.registry import create_engine
from serve_app.engine.yolo import YoloEngine
from serve_app.imaging import decode_image
from serve_app.results import Detection, InferenceParams

ASSETS = Path(ultralytics.__file__).resolve().parent / "assets"
EXIF_ORIENTATION = 0x0112


def _save(img: Image.Image, path: Path, **kw: Any) -> Path:
    img.save(path, **kw)
    return path


def write_corpus(out: Path) -> list[Path]:
    """Image files of different shapes (width x height in the names, as displayed) and kinds."""
    out.mkdir(parents=True, exist_ok=True)
    files = [
        _save(scene(5, "parity", 0, 1080, 810), out / "scene_1080x810.jpg", quality=92),
        _save(scene(5, "parity", 1, 810, 1080), out / "scene_810x1080.png"),
        _save(scene(5, "parity", 2, 1280, 720), out / "scene_1280x720.jpg", quality=92),
        _save(scene(5, "parity", 3, 640, 640, tiles=1), out / "scene_640x640.jpg", quality=92),
        _save(scene(5, "parity", 4, 4000, 3000), out / "scene_4000x3000.jpg", quality=90),
        _save(scene(5, "parity", 5, 333, 1000, tiles=3), out / "scene_333x1000.png"),
        _save(scene(5, "parity", 6, 1000, 333, tiles=3), out / "scene_1000x333.jpg", quality=92),
        _save(scene(5, "parity", 7, 240, 180, tiles=1), out / "scene_240x180.jpg", quality=92),
        _save(scene(5, "parity", 8, 960, 540).convert("L"), out / "gray_960x540.jpg", quality=92),
    ]
    # stored 1200 x 700, EXIF Orientation 6 ("rotate 90° clockwise to display"): shown 700 x 1200
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    files.append(_save(scene(5, "parity", 9, 1200, 700), out / "exif6_700x1200.jpg", quality=92, exif=exif))
    rgba = np.asarray(scene(5, "parity", 10, 900, 600).convert("RGBA")).copy()
    rgba[:, :150, 3] = 0  # fully transparent band (its RGB stays stored: both decoders keep it)
    rgba[:, 150:300, 3] = 128
    files.append(_save(Image.fromarray(rgba, "RGBA"), out / "alpha_900x600.png"))
    for name in ("bus.jpg", "zidane.jpg"):  # real photos: 810 x 1080 and 1280 x 720
        shutil.copyfile(ASSETS / name, out / name)
        files.append(out / name)
    return files


@dataclass(frozen=True, slots=True)
class Parity:
    """How one image's served detections compare with predict()'s."""

    ours: int
    reference: int
    compared: int  # matched pairs with the same class
    max_box_px: float  # largest coordinate difference over matched pairs
    max_conf: float  # largest confidence difference over matched pairs

    def within(self, box_px: float = 1.0, conf: float = 0.01) -> bool:
        return self.ours == self.reference == self.compared and self.max_box_px <= box_px and self.max_conf <= conf


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference(model: YOLO, path: Path, imgsz: int, params: InferenceParams) -> list[Detection]:
    """predict() reading the file itself (its own decoder, EXIF handling and colour order)."""
    r = model.predict(str(path), imgsz=imgsz, conf=params.conf, iou=params.iou, max_det=params.max_det, verbose=False)
    r = r[0]
    return [
        Detection(int(c), r.names[int(c)], float(s), *map(float, xyxy))
        for xyxy, s, c in zip(r.boxes.xyxy.tolist(), r.boxes.conf.tolist(), r.boxes.cls.tolist(), strict=True)
    ]


def compare(ours: list[Detection], ref: list[Detection]) -> Parity:
    """Pair detections one to one, same class, highest IoU first; report the worst differences."""
    pairs = sorted(
        (
            (iou((a.x1, a.y1, a.x2, a.y2), (b.x1, b.y1, b.x2, b.y2)), i, j)
            for i, a in enumerate(ours)
            for j, b in enumerate(ref)
            if a.class_id == b.class_id
        ),
        reverse=True,
    )
    used_a: set[int] = set()
    used_b: set[int] = set()
    box = conf = 0.0
    for overlap, i, j in pairs:
        if overlap <= 0 or i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        a, b = ours[i], ref[j]
        box = max(box, *(abs(p - q) for p, q in zip((a.x1, a.y1, a.x2, a.y2), (b.x1, b.y1, b.x2, b.y2), strict=True)))
        conf = max(conf, abs(a.confidence - b.confidence))
    return Parity(len(ours), len(ref), len(used_a), box, conf)


def _sig(x: float) -> float:
    return float(f"{x:.3g}")


def decode_file(path: Path) -> np.ndarray:
    """The service's decoder on the file's bytes: RGB uint8, EXIF orientation applied."""
    return decode_image(path.read_bytes()).pixels


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--weights", type=Path, default=DEMO_WEIGHTS)
    ap.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    ap.add_argument("--backends", nargs="+", default=["torch", "onnx"])
    ap.add_argument("--letterbox", choices=["predict", "square"], default="predict")
    a = ap.parse_args()
    LOGGER.setLevel(logging.WARNING)  # ultralytics logs exports to stdout, which carries the JSON
    work = Path(tempfile.mkdtemp(prefix="parity-"))
    weights = work / a.weights.name  # exports land here, not beside the shipped weights
    shutil.copyfile(a.weights, weights)
    files = write_corpus(work / "corpus")
    images = [decode_file(p) for p in files]
    params = InferenceParams()
    model = YOLO(str(weights))
    totals: dict[str, Any] = {}
    for imgsz in a.imgsz:
        refs = [reference(model, p, imgsz, params) for p in files]
        for backend in a.backends:
            engine = create_engine(backend, weights, imgsz=imgsz)
            assert isinstance(engine, YoloEngine)  # the YOLO backends: their letterbox is swapped below
            if a.letterbox == "square":  # what the engine did before it followed predict()
                engine.letterbox = LetterBox((engine.imgsz, engine.imgsz), auto=False, stride=engine.stride)
            t0 = time.perf_counter()
            dets, forward_ms = engine.detect(images, params)
            wall_ms = (time.perf_counter() - t0) * 1000
            key = f"{backend}@{imgsz}"
            tot = totals.setdefault(key, {"compared": 0, "max_box_px": 0.0, "max_conf": 0.0, "all_within": True})
            for path, im, ours, ref in zip(files, images, dets, refs, strict=True):
                p = compare(ours, ref)
                h, w = im.shape[:2]
                row = {
                    "bench": "predict_parity",
                    "image": path.name,
                    "width": w,
                    "height": h,
                    "input": list(engine.input_shape(h, w)) if a.letterbox == "predict" else [imgsz, imgsz],
                    "backend": backend,
                    "imgsz": imgsz,
                    "letterbox": a.letterbox,
                    "ours": p.ours,
                    "predict": p.reference,
                    "compared": p.compared,
                    "max_box_px": _sig(p.max_box_px),
                    "max_conf": _sig(p.max_conf),
                    "within_1px_0.01": p.within(),
                }
                print(json.dumps(row), flush=True)
                tot["compared"] += p.compared
                tot["max_box_px"] = max(tot["max_box_px"], p.max_box_px)
                tot["max_conf"] = max(tot["max_conf"], p.max_conf)
                tot["all_within"] &= p.within()
            tot["max_box_px"], tot["max_conf"] = _sig(tot["max_box_px"]), _sig(tot["max_conf"])
            tot["detect_ms"] = round(wall_ms, 1)
            tot["forward_ms"] = round(forward_ms, 1)
    print(
        json.dumps(
            {
                "bench": "predict_parity",
                "summary": True,
                "letterbox": a.letterbox,
                "images": len(files),
                "ultralytics": ultralytics.__version__,
                "by_backend": totals,
            }
        ),
        flush=True,
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
