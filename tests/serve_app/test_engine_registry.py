"""The backend registry: every configurable backend has an engine, an unknown one is a clear
config error, and the fake keeps the protocol."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from pydantic import ValidationError

from serve_app.config import DEMO_WEIGHTS, ModelSpec
from serve_app.engine.backends import OnnxEngine, TensorRTEngine, TorchEngine
from serve_app.engine.errors import EngineError, UnknownBackend
from serve_app.engine.fake import FakeEngine
from serve_app.engine.protocol import Backend, Engine, EngineFactory
from serve_app.engine.registry import BACKENDS, create_engine
from serve_app.results import InferenceParams


def test_the_registry_holds_the_three_backends_and_exactly_the_configurable_names() -> None:
    assert dict(BACKENDS) == {"torch": TorchEngine, "onnx": OnnxEngine, "tensorrt": TensorRTEngine}
    assert set(BACKENDS) == set(get_args(Backend))  # what ModelSpec accepts is what the registry builds


def test_the_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        BACKENDS["fake"] = FakeEngine  # type: ignore[index]


def test_given_an_unknown_backend_then_create_engine_names_the_choices() -> None:
    with pytest.raises(UnknownBackend, match=r"unknown backend 'openvino'; choose one of torch, onnx, tensorrt"):
        create_engine("openvino", DEMO_WEIGHTS)
    assert issubclass(UnknownBackend, EngineError)


def test_given_an_unknown_backend_in_the_config_then_validation_fails_naming_the_choices() -> None:
    with pytest.raises(ValidationError, match=r"(?s)backend.*'torch', 'onnx' or 'tensorrt'"):
        ModelSpec(name="parts", weights=DEMO_WEIGHTS, backend="openvino")  # type: ignore[arg-type]


def test_given_a_registry_passed_in_then_its_factory_builds_the_engine(tmp_path: Path) -> None:
    registry: dict[str, EngineFactory] = {"torch": FakeEngine}
    engine = create_engine("torch", tmp_path / "any.pt", imgsz=300, max_batch=4, registry=registry)
    assert isinstance(engine, FakeEngine)
    assert (engine.imgsz, engine.max_batch) == (320, 4)  # rounded up to the stride, like the real ones
    with pytest.raises(UnknownBackend, match=r"choose one of torch$"):
        create_engine("onnx", tmp_path / "any.pt", registry=registry)


def test_given_the_fake_engine_then_it_keeps_the_protocol_contract() -> None:
    engine: Engine = FakeEngine(Path("fake.pt"), imgsz=320, max_batch=2)
    images = [np.full((720, 1280, 3), 10, np.uint8), np.full((64, 64, 3), 200, np.uint8)]
    # one params for all, or one per image; a mismatch is refused
    same = engine.detect(images, InferenceParams(conf=0.5))
    each = engine.detect(images, [InferenceParams(conf=0.5), InferenceParams(conf=0.5)])
    assert same == each
    with pytest.raises(ValueError, match="2 images but 1 params"):
        engine.detect(images, [InferenceParams()])
    # deterministic, filtered by each image's own conf and max_det, boxes inside the image
    dets, forward_ms = engine.detect(images, [InferenceParams(conf=0.5), InferenceParams(conf=0.1, max_det=1)])
    assert [[d.confidence for d in x] for x in dets] == [[0.9, 0.6], [0.9]]
    assert all(0 <= d.x1 < d.x2 <= 1280 and 0 <= d.y1 < d.y2 <= 720 for d in dets[0])
    assert all(d.class_name == engine.names[d.class_id] for x in dets for d in x)
    assert forward_ms > 0
    assert engine.detect([]) == ([], 0.0)
