"""YoloEngine against ultralytics' own predict(), and against generated images with known boxes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from ultralytics import YOLO

from serve_app.config import DEMO_WEIGHTS
from serve_app.demo.synth import render
from serve_app.engine import EngineUnavailable, ModelFileMissing, YoloEngine
from serve_app.results import InferenceParams


@pytest.fixture(scope="module")
def engine() -> YoloEngine:
    return YoloEngine(DEMO_WEIGHTS, imgsz=320)


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_given_the_same_images_then_engine_equals_ultralytics_predict(engine: YoloEngine) -> None:
    model = YOLO(str(DEMO_WEIGHTS))
    images = [np.asarray(render(7, "check", i, size)[0]) for i, size in enumerate([320, 320, 480, 256])]
    ours, _ = engine.detect(images, InferenceParams(conf=0.25, iou=0.7))
    compared = 0
    for im, dets in zip(images, ours, strict=True):
        ref = model.predict(im[..., ::-1].copy(), imgsz=320, conf=0.25, iou=0.7, device="cpu", verbose=False)[0]
        ref_boxes = ref.boxes.xyxy.numpy().tolist()
        ref_cls = ref.boxes.cls.numpy().astype(int).tolist()
        ref_conf = ref.boxes.conf.numpy().tolist()
        assert len(dets) == len(ref_boxes)
        for d in dets:  # match each of ours to the reference box of the same class with the highest IoU
            j = max(
                range(len(ref_boxes)),
                key=lambda k: iou((d.x1, d.y1, d.x2, d.y2), tuple(ref_boxes[k])) if ref_cls[k] == d.class_id else -1.0,
            )
            assert ref_cls[j] == d.class_id
            assert np.allclose([d.x1, d.y1, d.x2, d.y2], ref_boxes[j], atol=1.0)
            assert abs(d.confidence - ref_conf[j]) <= 0.01
            compared += 1
    assert compared > 0


def test_given_a_batch_then_results_equal_one_by_one(engine: YoloEngine) -> None:
    images = [np.asarray(render(9, "batch", i, 320)[0]) for i in range(3)]
    batched, _ = engine.detect(images)
    single = [engine.detect([im])[0][0] for im in images]
    for a, b in zip(batched, single, strict=True):
        assert [(d.class_id, round(d.x1), round(d.y1)) for d in a] == [
            (d.class_id, round(d.x1), round(d.y1)) for d in b
        ]


def test_given_a_missing_weights_file_then_the_error_names_the_path(tmp_path: object) -> None:
    with pytest.raises(ModelFileMissing, match=r"nope\.pt"):
        YoloEngine(DEMO_WEIGHTS.with_name("nope.pt"))


def test_given_tensorrt_without_a_gpu_then_a_clear_error_and_no_fallback() -> None:
    with pytest.raises(EngineUnavailable, match="CUDA"):
        YoloEngine(DEMO_WEIGHTS, backend="tensorrt")


def test_given_the_onnx_backend_then_it_is_exported_once_beside_the_weights_and_agrees_with_torch(
    tmp_path: Path, engine: YoloEngine
) -> None:
    weights = tmp_path / "parts.pt"
    shutil.copy(DEMO_WEIGHTS, weights)
    onnx_engine = YoloEngine(weights, backend="onnx", imgsz=320)
    exported = weights.with_suffix(".onnx")
    assert exported.is_file()
    stamp = exported.stat().st_mtime
    YoloEngine(weights, backend="onnx", imgsz=320)  # cached: not exported again
    assert exported.stat().st_mtime == stamp
    images = [np.asarray(render(21, "onnx", i, 320)[0]) for i in range(3)]
    for a, b in zip(onnx_engine.detect(images)[0], engine.detect(images)[0], strict=True):
        assert [d.class_id for d in a] == [d.class_id for d in b]
        for p, q in zip(a, b, strict=True):
            assert np.allclose([p.x1, p.y1, p.x2, p.y2], [q.x1, q.y1, q.x2, q.y2], atol=1.0)
            assert abs(p.confidence - q.confidence) <= 0.01
