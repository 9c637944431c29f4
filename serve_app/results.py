"""Detection results and inference parameters: plain values shared by the ingress and the engine.

Kept apart from `engine` so that the ingress never imports torch or ultralytics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Detection:
    class_id: int
    class_name: str
    confidence: float
    x1: float
    y1: float
    x2: float
    y2: float

    def to_json(self) -> dict[str, Any]:
        return {
            "class_id": self.class_id,
            "class_name": self.class_name,
            "confidence": round(self.confidence, 5),
            "box": {"x1": round(self.x1, 2), "y1": round(self.y1, 2), "x2": round(self.x2, 2), "y2": round(self.y2, 2)},
        }


@dataclass(frozen=True, slots=True)
class InferenceParams:
    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
