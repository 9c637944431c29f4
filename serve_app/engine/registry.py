"""The backend registry: a model version's `backend` name -> the factory of its engine.

A new backend is one class (an `EngineFactory` building an `Engine`) and one entry here, plus
its name in `serve_app.engine.protocol.Backend` (what the config accepts; a test checks both
agree). The registry is read-only; a caller that wants other engines (a test's `FakeEngine`)
passes its own mapping in.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from serve_app.engine.backends import OnnxEngine, TensorRTEngine, TorchEngine
from serve_app.engine.errors import UnknownBackend
from serve_app.engine.protocol import Engine, EngineFactory

BACKENDS: Mapping[str, EngineFactory] = MappingProxyType(
    {
        "torch": TorchEngine,
        "onnx": OnnxEngine,
        "tensorrt": TensorRTEngine,
    }
)


def create_engine(
    backend: str,
    weights: Path,
    *,
    device: str = "cpu",
    half: bool = False,
    imgsz: int = 640,
    max_batch: int = 32,
    registry: Mapping[str, EngineFactory] = BACKENDS,
) -> Engine:
    """The `backend` engine of `weights`. `UnknownBackend` (naming the choices) when `registry` has
    no such backend; the factory's own errors (`ModelFileMissing`, `EngineUnavailable`) otherwise."""
    factory = registry.get(backend)
    if factory is None:
        raise UnknownBackend(f"unknown backend {backend!r}; choose one of {', '.join(registry)}")
    return factory(weights, device=device, half=half, imgsz=imgsz, max_batch=max_batch)
