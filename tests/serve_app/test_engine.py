"""The YOLO backends (serve_app.engine) against ultralytics' own predict() (on arrays, and on files
of any shape read by predict itself), their batching by letterboxed shape, and their exported
artifacts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from ultralytics import YOLO
from ultralytics.data.augment import LetterBox
from ultralytics.nn.autobackend import AutoBackend
from ultralytics.utils.checks import check_imgsz

from bench.predict_parity import compare, decode_file, iou, reference, write_corpus
from serve_app.config import DEMO_WEIGHTS
from serve_app.demo.synth import render, scene
from serve_app.engine.backends import OnnxEngine, TensorRTEngine, TorchEngine
from serve_app.engine.errors import EngineUnavailable, ModelFileMissing
from serve_app.engine.exports import artifact_path, export_args
from serve_app.engine.letterbox import round_to_stride
from serve_app.engine.registry import create_engine
from serve_app.engine.yolo import YoloEngine
from serve_app.results import Detection, InferenceParams


@pytest.fixture(scope="module")
def engine() -> YoloEngine:
    return TorchEngine(DEMO_WEIGHTS, imgsz=320)


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
        TorchEngine(DEMO_WEIGHTS.with_name("nope.pt"))


def test_given_tensorrt_without_a_gpu_then_a_clear_error_and_no_fallback() -> None:
    with pytest.raises(EngineUnavailable, match="CUDA"):
        TensorRTEngine(DEMO_WEIGHTS)


def test_given_the_onnx_backend_then_it_is_exported_once_beside_the_weights_and_agrees_with_torch(
    tmp_path: Path, engine: YoloEngine
) -> None:
    weights = tmp_path / "parts.pt"
    shutil.copy(DEMO_WEIGHTS, weights)
    onnx_engine = OnnxEngine(weights, imgsz=320)
    exported = artifact_path(weights, "onnx", imgsz=320, half=False, max_batch=onnx_engine.max_batch)
    assert exported.is_file() and exported.parent == weights.parent
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([weights.name, exported.name])  # no leftovers
    stamp = exported.stat().st_mtime
    OnnxEngine(weights, imgsz=320)  # cached: not exported again
    assert exported.stat().st_mtime == stamp
    images = [np.asarray(render(21, "onnx", i, 320)[0]) for i in range(3)]
    for a, b in zip(onnx_engine.detect(images)[0], engine.detect(images)[0], strict=True):
        assert [d.class_id for d in a] == [d.class_id for d in b]
        for p, q in zip(a, b, strict=True):
            assert np.allclose([p.x1, p.y1, p.x2, p.y2], [q.x1, q.y1, q.x2, q.y2], atol=1.0)
            assert abs(p.confidence - q.confidence) <= 0.01


# --- parity with predict() on photos of any shape (issue 10) ---------------------------------

PARITY_SIZES = (320, 640)
REQUIRED_SHAPES = {(1080, 810), (810, 1080), (1280, 720), (640, 640), (4000, 3000), (333, 1000)}  # width x height


@pytest.fixture(scope="module")
def private_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo weights: exports land beside it, never beside the shipped file."""
    weights = tmp_path_factory.mktemp("weights") / "parts.pt"
    shutil.copy(DEMO_WEIGHTS, weights)
    return weights


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def predicted(corpus: list[Path], private_weights: Path) -> dict[int, list[list[Detection]]]:
    """predict() reading each file itself, per imgsz."""
    model = YOLO(str(private_weights))
    return {imgsz: [reference(model, p, imgsz, InferenceParams()) for p in corpus] for imgsz in PARITY_SIZES}


def test_given_the_corpus_then_it_holds_the_shapes_and_kinds_of_the_issue(corpus: list[Path]) -> None:
    shapes = {p.name: decode_file(p).shape for p in corpus}
    assert {(w, h) for h, w, _ in shapes.values()} >= REQUIRED_SHAPES
    assert shapes["exif6_700x1200.jpg"] == (1200, 700, 3)  # stored 1200 x 700, shown rotated
    with Image.open(corpus[0].parent / "exif6_700x1200.jpg") as im:
        assert im.size == (1200, 700) and im.getexif()[0x0112] == 6
    with Image.open(corpus[0].parent / "gray_960x540.jpg") as im:
        assert im.mode == "L"
    with Image.open(corpus[0].parent / "alpha_900x600.png") as im:
        assert im.mode == "RGBA"
    assert {"bus.jpg", "zidane.jpg"} <= set(shapes)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_given_photos_of_any_shape_in_one_call_then_detections_equal_predict_on_the_same_file(
    backend: str, corpus: list[Path], private_weights: Path, predicted: dict[int, list[list[Detection]]]
) -> None:
    # given: every file decoded by the service's own decoder, all shapes in ONE detect call
    images = [decode_file(p) for p in corpus]
    compared = 0
    for imgsz in PARITY_SIZES:
        engine = create_engine(backend, private_weights, imgsz=imgsz)
        # when
        ours, forward_ms = engine.detect(images)
        # then: per image, same count and classes, boxes within 1 px, confidences within 0.01
        assert forward_ms > 0
        for path, mine, ref in zip(corpus, ours, predicted[imgsz], strict=True):
            parity = compare(mine, ref)
            assert parity.within(box_px=1.0, conf=0.01), f"{backend}@{imgsz} {path.name}: {parity}"
            compared += parity.compared
    assert compared >= 40, compared  # never passes on empty results


def test_given_an_exif_rotated_jpeg_then_predict_reads_it_upright_like_the_service(
    corpus: list[Path], private_weights: Path
) -> None:
    path = corpus[0].parent / "exif6_700x1200.jpg"
    ref = YOLO(str(private_weights)).predict(str(path), imgsz=320, verbose=False)[0]
    assert tuple(ref.orig_shape) == decode_file(path).shape[:2] == (1200, 700)


def test_given_the_old_square_letterbox_then_the_parity_check_catches_it(
    corpus: list[Path], private_weights: Path, predicted: dict[int, list[list[Detection]]]
) -> None:
    engine = TorchEngine(private_weights, imgsz=640)
    engine.letterbox = LetterBox((640, 640), auto=False, stride=engine.stride)  # the engine before issue 10
    ours, _ = engine.detect([decode_file(p) for p in corpus])
    failing = [
        p.name for p, mine, ref in zip(corpus, ours, predicted[640], strict=True) if not compare(mine, ref).within()
    ]
    assert "bus.jpg" in failing and len(failing) >= len(corpus) // 2, failing


def test_given_an_imgsz_off_the_stride_then_it_rounds_up_like_predict(
    corpus: list[Path], private_weights: Path
) -> None:
    for size in (1, 31, 32, 33, 300, 320, 330, 641, 1000):
        assert round_to_stride(size, 32) == check_imgsz(size, stride=32)
    engine = TorchEngine(private_weights, imgsz=300)
    assert engine.imgsz == 320
    model = YOLO(str(private_weights))
    files = [corpus[0].parent / n for n in ("scene_1280x720.jpg", "scene_333x1000.png", "bus.jpg")]
    ours, _ = engine.detect([decode_file(p) for p in files])
    for path, mine in zip(files, ours, strict=True):
        parity = compare(mine, reference(model, path, 300, InferenceParams()))
        assert parity.within(), f"{path.name}: {parity}"


class PassRecorder:
    """Wraps a loaded model and records the input shape of each forward pass."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.passes: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> Any:
        self.passes.append(tuple(x.shape))
        return self.model(x)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def test_given_mixed_shapes_then_one_pass_per_shape_and_results_in_input_order(
    engine: YoloEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given: three shapes interleaved, each image with its own conf
    sizes = [(1280, 720), (640, 640), (1280, 720), (333, 1000), (640, 640), (1280, 720)]
    images = [np.asarray(scene(3, "mixed", i, w, h)) for i, (w, h) in enumerate(sizes)]
    params = [InferenceParams(conf=0.2 + 0.05 * (i % 3)) for i in range(len(images))]
    single = [engine.detect([im], p)[0][0] for im, p in zip(images, params, strict=True)]
    recorder = PassRecorder(engine.model)
    monkeypatch.setattr(engine, "model", recorder)
    # when
    batched, forward_ms = engine.detect(images, params)
    # then: one pass per letterboxed shape, and each image's detections are its own, in order
    assert sorted(recorder.passes) == sorted([(3, 3, 192, 320), (2, 3, 320, 320), (1, 3, 320, 128)])
    assert forward_ms > 0
    assert sum(len(d) for d in batched) > 0
    for a, b in zip(batched, single, strict=True):
        assert [d.class_id for d in a] == [d.class_id for d in b]
        for p, q in zip(a, b, strict=True):
            assert np.allclose([p.x1, p.y1, p.x2, p.y2], [q.x1, q.y1, q.x2, q.y2], atol=1e-3)


def test_given_more_images_of_one_shape_than_max_batch_then_passes_are_split(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = TorchEngine(DEMO_WEIGHTS, imgsz=320, max_batch=2)
    images = [np.asarray(scene(4, "stream", i, 1280, 720)) for i in range(5)]  # a camera stream: one shape
    whole, _ = TorchEngine(DEMO_WEIGHTS, imgsz=320).detect(images)
    recorder = PassRecorder(engine.model)
    monkeypatch.setattr(engine, "model", recorder)
    split, _ = engine.detect(images)
    assert [s[0] for s in recorder.passes] == [2, 2, 1]
    assert [[d.class_id for d in x] for x in split] == [[d.class_id for d in x] for x in whole]


@pytest.mark.parametrize("imgsz", [320, 640])
def test_given_any_image_size_then_the_letterbox_fits_the_tensorrt_profile(imgsz: int) -> None:
    # TensorRT cannot run here (no GPU): this pins the engine's half of the contract. ultralytics'
    # onnx2engine builds min 1x3x32x32, max batch x 3 x 2imgsz x 2imgsz for a dynamic export.
    engine = TorchEngine(DEMO_WEIGHTS, imgsz=imgsz)
    args = export_args("tensorrt", imgsz=imgsz, half=True, max_batch=16, device="cuda:0")
    assert args["dynamic"] is True and args["batch"] == 16 and args["imgsz"] == imgsz and args["quantize"] == 16
    sides = [1, 2, 17, 31, 180, 333, 640, 641, 1000, 3000, 16384]
    for h in sides:
        for w in sides:
            shape = engine.input_shape(h, w)
            assert shape == engine.letterbox(image=np.zeros((h, w, 3), np.uint8)).shape[:2]
            assert all(32 <= s <= imgsz and s % engine.stride == 0 for s in shape), (h, w, shape)
            assert imgsz in shape  # the long side is imgsz, like predict()


def test_given_stale_artifacts_then_a_dynamic_one_is_exported_under_the_versioned_name(tmp_path: Path) -> None:
    weights = tmp_path / "parts.pt"
    shutil.copy(DEMO_WEIGHTS, weights)
    # an old engine's cache file: not the versioned name, so never loaded (this one is not even ONNX)
    weights.with_suffix(".onnx").write_bytes(b"an old static export")
    # a static square export sitting at the versioned name, newer than the weights
    target = artifact_path(weights, "onnx", imgsz=320, half=False, max_batch=32)
    static = Path(YOLO(str(weights)).export(format="onnx", imgsz=320, dynamic=False, verbose=False))
    static.replace(target)
    weights.with_suffix(".onnx").write_bytes(b"an old static export")  # the export above overwrote it
    assert not AutoBackend(str(target), verbose=False).dynamic  # given: really a static artifact
    engine = OnnxEngine(weights, imgsz=320)
    assert engine.dynamic
    assert weights.with_suffix(".onnx").read_bytes() == b"an old static export"
    dets, _ = engine.detect([np.asarray(scene(6, "stale", 0, 1280, 720))])
    assert engine.input_shape(720, 1280) == (192, 320)
    assert isinstance(dets[0], list)
