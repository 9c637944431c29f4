"""The overhead benchmark's unmetered baseline: the same hops as the product, no token check.

    BaselineIngress (FastAPI: body, decode) ─► Detector[parts@1]

It reuses the product's body parser, decoder and Detector deployment, and has the same Serve hops
as the metered path (ingress → detector: since issue 12 there is no middle replica), so that
metered minus baseline is exactly what verify, admit and settle cost. It is a separate app built
only here: the production app (`serve_app.app.build_app`) has no unmetered path.
"""

# No `from __future__ import annotations`: FastAPI resolves route annotations at runtime (see serve_app/ingress.py).

import json
import secrets
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from serve_app.answer import result_body
from serve_app.app import deployment
from serve_app.config import AppArgs
from serve_app.detector_deployment import Detector
from serve_app.engine.registry import BACKENDS
from serve_app.errors import ApiError
from serve_app.http import images_from_body, read_body
from serve_app.imaging import ImageLimits, decode_image
from serve_app.ingress_steps import DetectOutcome, Held
from serve_app.results import InferenceParams
from serve_app.streams import FrameIn, FrameOut, FrameSession

api = FastAPI(title="yolo-tokens unmetered baseline (benchmarks only)")


class UnmeteredFrames:
    """A `FrameWork` without the ledger: decode and detect only (defined before the ingress: the
    methods Serve rebinds for @serve.ingress see only the globals defined before the class)."""

    def __init__(self, ingress: Any) -> None:
        self.ingress = ingress

    async def open(self, credential: str | None) -> None:
        return None

    async def held(self, frame: FrameIn, request_id: str) -> Held:
        ing = self.ingress
        image = decode_image(frame.image, ing.limits)
        result = await ing.detector.detect.remote([image.pixels], frame.params, key=ing.key)
        body = result_body(
            request_id, ing.spec.name, ing.spec.version, [(image.width, image.height)], result["detections"]
        )
        return Held(DetectOutcome(body))

    async def commit(self, held: Held) -> None:
        return None

    def recheck(self, held: Held) -> ApiError | None:
        return None

    def release(self, held: Held) -> None:
        return None


@serve.deployment(name="BaselineIngress", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
@serve.ingress(api)
class BaselineIngress:
    def __init__(self, detector: Any, args: AppArgs, key: str) -> None:
        self.detector = detector
        self.key = key
        self.args = args
        self.spec = args.models[0]
        self.limits = ImageLimits(max_bytes=args.limits.max_body_bytes, max_pixels=args.limits.max_pixels)

    @api.post("/v1/detect")
    async def detect(self, request: Request) -> JSONResponse:
        body = await read_body(request, self.args.limits.max_body_bytes)
        blobs = images_from_body(request.headers.get("content-type", ""), body, self.args.limits.max_images)
        images = [decode_image(b, self.limits) for b in blobs]
        result = await self.detector.detect.remote([i.pixels for i in images], InferenceParams(), key=self.key)
        sizes = [(i.width, i.height) for i in images]
        return JSONResponse(result_body("baseline", self.spec.name, self.spec.version, sizes, result["detections"]))

    @api.websocket("/v1/detect/stream")
    async def stream(self, websocket: WebSocket) -> None:
        """The product's frame stream (the same `FrameSession`, window and JSON), each frame decoded
        and detected, nothing verified, admitted or settled: metered minus this is the metering of a
        stream frame."""
        await websocket.accept()
        session = FrameSession(UnmeteredFrames(self), self.args.limits.stream_window, self.args.limits.stream_unsent)
        await session.open(None)

        async def frames() -> Any:
            seq = 0
            while (msg := await websocket.receive())["type"] != "websocket.disconnect":
                yield FrameIn(seq, msg.get("bytes") or b"")
                seq += 1

        async def send(out: FrameOut) -> None:
            await websocket.send_text(json.dumps(out.to_json()))

        try:
            await session.run(frames(), send)
        except (WebSocketDisconnect, RuntimeError):
            return


def build_baseline_app(
    args: AppArgs, ingress_options: dict[str, Any] | None = None, engines: dict[str, Any] | None = None
) -> Application:
    """`ingress_options`: Serve options of the baseline ingress (the same as the metered ingress's,
    so that a lever like `max_ongoing_requests` applies to both sides of the comparison); `engines`:
    the detectors' backend registry (a fake engine for the stream benchmark)."""
    spec = args.models[0]
    key = secrets.token_hex(16)  # the baseline's own detector, answering its own ingress only
    detector = deployment(Detector).options(**spec.deployment_options()).bind(spec, key, None, engines or BACKENDS)
    options = {"max_ongoing_requests": args.ingress_max_ongoing, **(ingress_options or {})}  # as the metered ingress
    return deployment(BaselineIngress).options(**options).bind(detector, args, key)


@serve.deployment(name="Echo", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class Echo:
    """A bare Serve HTTP deployment that reads the body and answers its length: the proxy's and
    the body's share of a request (no FastAPI, no decode, no model)."""

    async def __call__(self, request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}


def build_echo_app() -> Application:
    return deployment(Echo).bind()
