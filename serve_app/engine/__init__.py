"""The pure engine layer: model backends behind one protocol, no Ray (DESIGN §2).

    protocol.py   `Engine` (what a Detector replica needs), `EngineFactory`, `BatchResult`, `Backend`
    registry.py   `BACKENDS` (backend name -> factory) and `create_engine`
    backends.py   `TorchEngine`, `OnnxEngine`, `TensorRTEngine`: ultralytics YOLO, one class per backend
    yolo.py       `YoloEngine`: what the YOLO backends share (predict()'s preprocessing, batching by shape)
    exports.py    versioned ONNX / TensorRT artifacts exported from the .pt weights
    letterbox.py  predict()'s input-size arithmetic (pure)
    batching.py   how a replica's batched calls share one `Engine.detect` (pure)
    fake.py       `FakeEngine`: deterministic, instant, for unit tests of what sits on an engine
    errors.py     the exception tree:

    EngineError
    ├── ModelFileMissing    the weights file does not exist
    ├── EngineUnavailable   the backend cannot run here (no GPU, package missing, export failed)
    └── UnknownBackend      the configured backend is not in the registry

A new backend is one class implementing `Engine` (constructed as `EngineFactory` says) and one
entry in `registry.BACKENDS` (plus its name in `protocol.Backend`, which the config accepts).
Importing this package does not import torch or ultralytics; `registry` and the backends do.
"""

from __future__ import annotations

# YOLO_OFFLINE (ultralytics never downloads) is the launcher's rule (serve_app.launcher); the
# Detector's replicas also get it from their runtime environment (config.ModelSpec)
from serve_app.engine.errors import EngineError, EngineUnavailable, ModelFileMissing, UnknownBackend
from serve_app.engine.protocol import Backend, BatchResult, Engine, EngineFactory

__all__ = [
    "Backend",
    "BatchResult",
    "Engine",
    "EngineError",
    "EngineFactory",
    "EngineUnavailable",
    "ModelFileMissing",
    "UnknownBackend",
]
