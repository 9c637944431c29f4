"""The 200 body and the usage headers of a detection (DESIGN §5), built in one place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ledger import Decision
from serve_app.results import Detection


def result_body(
    request_id: str,
    model_name: str,
    model_version: str,
    sizes: Sequence[tuple[int, int]],
    detections: Sequence[Sequence[Detection]],
) -> dict[str, Any]:
    """`{request_id, model, images: [{width, height, detections}]}`; usage and timing are added by the caller."""
    return {
        "request_id": request_id,
        "model": {"name": model_name, "version": model_version},
        "images": [
            {"width": w, "height": h, "detections": [d.to_json() for d in dets]}
            for (w, h), dets in zip(sizes, detections, strict=True)
        ],
    }


def usage_headers(d: Decision) -> dict[str, str]:
    h = {"X-Quota-Remaining": str(d.remaining)}
    if d.rate_limit is not None:
        h["X-RateLimit-Limit"] = f"{d.rate_limit:g}"
        h["X-RateLimit-Remaining"] = str(d.rate_remaining if d.rate_remaining is not None else 0)
    return h
