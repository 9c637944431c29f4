"""What the served graph detects: recall on generated images with known boxes, and equality with predict()."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from ultralytics import YOLO

from bench.predict_parity import iou
from ledger.core.entities import TokenSpec
from serve_app.config import DEMO_WEIGHTS
from serve_app.demo.synth import render
from tests.serve_app.conftest import LiveApp

pytestmark = pytest.mark.ray

N_IMAGES = 30


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # lossless: the replica sees exactly the pixels predict() sees
    return buf.getvalue()


def test_given_generated_images_with_known_boxes_then_served_recall_is_at_least_0_9_and_equals_predict(
    live_app: LiveApp,
) -> None:
    # exactly one unit per image, spent to the last one through whichever ingress replicas Serve picks
    out = live_app.ledger.create_package(TokenSpec.build(f"acc-{time.monotonic_ns()}", N_IMAGES))
    headers = {"Authorization": f"Bearer {out.credential}", "Content-Type": "image/png"}
    model = YOLO(str(DEMO_WEIGHTS))
    truths = found = compared = 0
    for i in range(N_IMAGES):
        img, boxes = render(4242, "recall", i, 320)  # a seed and split the training set never used
        r = httpx.post(f"{live_app.url}/v1/detect", content=png(img), headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        served = [
            (d["class_id"], (d["box"]["x1"], d["box"]["y1"], d["box"]["x2"], d["box"]["y2"]), d["confidence"])
            for d in r.json()["images"][0]["detections"]
        ]
        truths += len(boxes)
        for b in boxes:
            found += any(c == b.cls and iou(xyxy, (b.x1, b.y1, b.x2, b.y2)) >= 0.5 for c, xyxy, _ in served)

        ref = model.predict(np.asarray(img)[..., ::-1].copy(), imgsz=320, conf=0.25, device="cpu", verbose=False)[0]
        ref_boxes = ref.boxes.xyxy.numpy().tolist()
        ref_cls = ref.boxes.cls.numpy().astype(int).tolist()
        ref_conf = ref.boxes.conf.numpy().tolist()
        assert len(served) == len(ref_boxes)
        for c, xyxy, conf in served:
            j = max(range(len(ref_boxes)), key=lambda k: iou(xyxy, tuple(ref_boxes[k])) if ref_cls[k] == c else -1.0)
            assert ref_cls[j] == c
            assert np.allclose(xyxy, ref_boxes[j], atol=1.0)
            assert abs(conf - ref_conf[j]) <= 0.01
            compared += 1
    assert compared > 0
    assert truths > 0 and found / truths >= 0.9, f"recall {found}/{truths}"
    deadline = time.monotonic() + 30  # each replica reports its admissions within ~100 ms
    while (used := live_app.ledger.token(out.token.id).used) < N_IMAGES and time.monotonic() < deadline:
        time.sleep(0.1)
    assert used == N_IMAGES
