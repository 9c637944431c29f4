"""Photos of any shape through the served graph: each image's detections equal ultralytics'
`predict()` on the same file (box within 1 px, confidence within 0.01, same class), whether the
shapes arrive in one multipart request, in one handle call, or as concurrent requests that the
Detector batches together."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from ultralytics import YOLO

from bench.predict_parity import compare, decode_file, reference, write_corpus
from ledger import Service
from ledger.core.entities import TokenSpec
from serve_app.config import DEMO_WEIGHTS
from serve_app.results import Detection, InferenceParams
from tests.serve_app.conftest import LiveApp

pytestmark = pytest.mark.ray

IMGSZ = 320  # the live app's parts@1
# one multipart body under the live app's 2 MB limit, shapes (width x height) all different
BUNDLE = (
    "scene_1080x810.jpg",
    "scene_1280x720.jpg",
    "scene_640x640.jpg",
    "scene_333x1000.png",
    "scene_1000x333.jpg",
    "scene_240x180.jpg",
    "gray_960x540.jpg",
    "exif6_700x1200.jpg",
    "bus.jpg",
    "zidane.jpg",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {p.name: p for p in write_corpus(tmp_path_factory.mktemp("served-corpus"))}


@pytest.fixture(scope="module")
def predicted(corpus: dict[str, Path]) -> dict[str, list[Detection]]:
    model = YOLO(str(DEMO_WEIGHTS))
    return {name: reference(model, path, IMGSZ, InferenceParams()) for name, path in corpus.items()}


@pytest.fixture
def credential(live_app: LiveApp) -> Iterator[tuple[str, str]]:
    out = live_app.ledger.create_package(TokenSpec.build(f"shapes-{time.monotonic_ns()}", 100))
    yield out.token.id, out.credential


def used_once_reported(app: LiveApp, token_id: str, expected: int) -> int:
    """The token's `used` once the ingress replicas reported `expected` units (they admit from
    their leases and report every ~100 ms), or whatever it is at the deadline."""
    deadline = time.monotonic() + 30
    while (used := app.ledger.token(token_id).used) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return int(used)


def mime(name: str) -> str:
    return "image/png" if name.endswith(".png") else "image/jpeg"


def served(image: dict[str, Any]) -> list[Detection]:
    return [
        Detection(
            d["class_id"],
            d["class_name"],
            d["confidence"],
            d["box"]["x1"],
            d["box"]["y1"],
            d["box"]["x2"],
            d["box"]["y2"],
        )
        for d in image["detections"]
    ]


def check(names: list[str], images: list[dict[str, Any]], predicted: dict[str, list[Detection]]) -> int:
    """Every served image equals predict() on its file; returns the number of boxes compared."""
    assert len(images) == len(names)
    compared = 0
    for name, image in zip(names, images, strict=True):
        parity = compare(served(image), predicted[name])
        assert parity.within(box_px=1.0, conf=0.01), f"{name}: {parity}"
        compared += parity.compared
    return compared


def test_given_photos_of_different_shapes_in_one_multipart_request_then_each_equals_predict(
    live_app: LiveApp, corpus: dict[str, Path], predicted: dict[str, list[Detection]], credential: tuple[str, str]
) -> None:
    tid, cred = credential
    files = [("image", (name, corpus[name].read_bytes(), mime(name))) for name in BUNDLE]
    r = httpx.post(f"{live_app.url}/v1/detect", files=files, headers={"Authorization": f"Bearer {cred}"}, timeout=300)
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert [(im["width"], im["height"]) for im in images][7] == (700, 1200)  # EXIF orientation applied
    assert check(list(BUNDLE), images, predicted) >= 20
    assert used_once_reported(live_app, tid, len(BUNDLE)) == len(BUNDLE)


def test_given_photos_of_different_shapes_in_one_handle_call_then_each_equals_predict(
    live_app: LiveApp, corpus: dict[str, Path], predicted: dict[str, list[Detection]], credential: tuple[str, str]
) -> None:
    from ray import serve

    _, cred = credential
    handle = serve.get_app_handle("yolo-tokens")
    body = handle.detect.remote(token=cred, images=[corpus[n].read_bytes() for n in BUNDLE]).result(timeout_s=300)
    assert check(list(BUNDLE), body["images"], predicted) >= 20


def test_given_concurrent_requests_of_different_shapes_then_each_equals_predict(
    live_app: LiveApp, corpus: dict[str, Path], predicted: dict[str, list[Detection]], credential: tuple[str, str]
) -> None:
    # every file of the corpus (4000 x 3000 and the alpha PNG included) as its own request, all at
    # once: the Detector's batches mix shapes, which the engine runs as one pass per shape
    tid, cred = credential
    names = sorted(corpus)

    def post(name: str) -> dict[str, Any]:
        r = httpx.post(
            f"{live_app.url}/v1/detect",
            content=corpus[name].read_bytes(),
            headers={"Authorization": f"Bearer {cred}", "Content-Type": mime(name)},
            timeout=300,
        )
        assert r.status_code == 200, f"{name}: {r.text}"
        image: dict[str, Any] = r.json()["images"][0]
        return image

    with ThreadPoolExecutor(len(names)) as pool:
        images = list(pool.map(post, names))
    assert check(names, images, predicted) >= 40
    assert used_once_reported(live_app, tid, len(names)) == len(names)


def test_given_concurrent_calls_of_different_shapes_at_the_detector_then_batches_mix_shapes_and_each_equals_predict(
    live_app: LiveApp, corpus: dict[str, Path], predicted: dict[str, list[Detection]]
) -> None:
    # the Detector deployment itself (no charge: it sits behind the token check and answers the
    # ingress's key only, which the test derives as the ingress does), so that the batch each call
    # landed in can be seen
    from ray import serve

    from serve_app.app import APP_NAME
    from serve_app.surface import DETECTOR_KEY

    spec = next(m for m in live_app.args.models if m.key == "parts@1")
    # by reference, as the ingress sends pixels past 3 MiB: a replica's gRPC server takes 4 MiB at most
    detector = serve.get_deployment_handle(spec.deployment_name, APP_NAME).options(_by_reference=True)
    names = sorted(corpus) * 2
    pixels = {name: decode_file(path) for name, path in corpus.items()}
    key = live_app.ledger.capability.derive(DETECTOR_KEY)
    # three tenants at two priority levels: the scheduler orders and shares, the answers stay exact
    tenants = [
        Service("pro", 1, 2.0, "pkg-a", 2.0, "team-a", 2.0),
        Service("basic", 0, 1.0, "pkg-b", 1.0, "team-b", 1.0),
        Service("enterprise", 2, 4.0, "pkg-c", 4.0, "team-c", 4.0),
    ]
    responses = [
        detector.detect.remote([pixels[n]], InferenceParams(), key=key, service=tenants[i % 3])
        for i, n in enumerate(names)
    ]
    results = [r.result(timeout_s=300) for r in responses]
    assert max(r["batch_images"] for r in results) > 1  # some calls were batched together
    compared = 0
    for name, result in zip(names, results, strict=True):
        parity = compare(result["detections"][0], predicted[name])
        assert parity.within(box_px=1.0, conf=0.01), f"{name}: {parity}"
        compared += parity.compared
    assert compared >= 40
