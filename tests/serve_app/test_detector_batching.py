"""The Detector shell's batching, on a FakeEngine and without Ray: the calls `@serve.batch`
merged share one engine call (grouped by letterboxed shape across calls), and each call gets
back its own detections, in order. The real shell under Serve: test_served_shapes.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serve_app.config import DEMO_WEIGHTS, ModelSpec
from serve_app.detector_deployment import Detector
from serve_app.engine.batching import Call, merge_calls, split_result
from serve_app.engine.fake import FAKE_PASS_MS, FakeEngine
from serve_app.engine.protocol import BatchResult
from serve_app.results import InferenceParams


def frame(w: int, h: int, value: int) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def test_given_calls_of_mixed_shapes_then_one_engine_call_groups_them_and_each_call_gets_its_own() -> None:
    # given: three callers, each with its own conf; shapes interleaved across callers
    engine = FakeEngine(Path("fake.pt"), imgsz=320, max_batch=2)
    calls: list[Call] = [
        ([frame(1280, 720, 1), frame(640, 640, 2)], InferenceParams(conf=0.5)),
        ([frame(1280, 720, 3)], InferenceParams(conf=0.8)),
        ([frame(1280, 720, 4), frame(1280, 720, 5), frame(640, 640, 6)], InferenceParams(conf=0.1)),
    ]
    # when
    images, params = merge_calls(calls)
    replies = split_result(calls, engine.detect(images, params), total_ms=7.0)
    # then: one pass per letterboxed shape across the callers, split at max_batch
    assert sorted(engine.passes) == [(2, 192, 320), (2, 192, 320), (2, 320, 320)]
    assert len(replies) == 3
    for (ims, p), reply in zip(calls, replies, strict=True):
        alone = FakeEngine(Path("fake.pt"), imgsz=320).detect(ims, p).detections
        assert reply["detections"] == alone  # its own images, its own params, in order
        assert reply["batch_images"] == 6 and reply["infer_ms"] == 7.0
    # the forward time is shared by image count
    assert [r["gpu_ms"] for r in replies] == pytest.approx([3 * FAKE_PASS_MS * k / 6 for k in (2, 1, 3)])


def test_given_a_result_of_the_wrong_length_then_split_refuses() -> None:
    calls: list[Call] = [([frame(32, 32, 0)], InferenceParams())]
    with pytest.raises(ValueError, match="1 images but 0 detection lists"):
        split_result(calls, BatchResult([], 0.0), total_ms=1.0)


def test_given_a_spec_then_the_shell_takes_its_engine_from_the_registry_by_backend() -> None:
    spec = ModelSpec(name="parts", weights=DEMO_WEIGHTS, backend="onnx", imgsz=300, max_batch_size=5)
    shell = Detector.func_or_class(spec, "key", engines={"onnx": FakeEngine})  # the class Serve would run
    assert isinstance(shell.engine, FakeEngine)
    assert (shell.engine.imgsz, shell.engine.max_batch, shell.engine.device) == (320, 5, "cpu")


def test_given_a_missing_weights_file_then_the_shell_fails_naming_the_path(tmp_path: Path) -> None:
    spec = ModelSpec(name="parts", weights=tmp_path / "gone.pt")
    with pytest.raises(FileNotFoundError, match=r"gone\.pt"):
        Detector.func_or_class(spec, "key", engines={"torch": FakeEngine})
