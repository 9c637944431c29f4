"""The overhead benchmark's unmetered baseline: the same hops as the product, no token check.

    BaselineIngress (FastAPI: body, decode) ─► BaselineRouter ─► Detector[parts@1]

It reuses the product's body parser, decoder and Detector deployment, and has the same number
of Serve hops as the metered path (ingress → gate → detector), so that metered minus baseline is
what the token check, admission and settlement cost. It is a separate app built only here:
the production app (`serve_app.app.build_app`) has no unmetered path.
"""

# No `from __future__ import annotations`: FastAPI resolves route annotations at runtime (see serve_app/ingress.py).

from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from serve_app.answer import result_body
from serve_app.config import AppArgs
from serve_app.detector_deployment import Detector
from serve_app.http import images_from_body, read_body
from serve_app.imaging import ImageLimits, decode_image
from serve_app.results import InferenceParams

api = FastAPI(title="yolo-tokens unmetered baseline (benchmarks only)")


@serve.deployment(name="BaselineRouter", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
class BaselineRouter:
    def __init__(self, detector: Any) -> None:
        self.detector = detector

    async def detect(self, pixels: list[np.ndarray], params: InferenceParams) -> dict[str, Any]:
        result: dict[str, Any] = await self.detector.detect.remote(pixels, params)
        return result


@serve.deployment(name="BaselineIngress", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
@serve.ingress(api)
class BaselineIngress:
    def __init__(self, router: Any, args: AppArgs) -> None:
        self.router = router
        self.args = args
        self.spec = args.models[0]
        self.limits = ImageLimits(max_bytes=args.limits.max_body_bytes, max_pixels=args.limits.max_pixels)

    @api.post("/v1/detect")
    async def detect(self, request: Request) -> JSONResponse:
        body = await read_body(request, self.args.limits.max_body_bytes)
        blobs = images_from_body(request.headers.get("content-type", ""), body, self.args.limits.max_images)
        images = [decode_image(b, self.limits) for b in blobs]
        result = await self.router.detect.remote([i.pixels for i in images], InferenceParams())
        sizes = [(i.width, i.height) for i in images]
        return JSONResponse(result_body("baseline", self.spec.name, self.spec.version, sizes, result["detections"]))


def build_baseline_app(args: AppArgs) -> Application:
    spec = args.models[0]
    detector = Detector.options(**spec.deployment_options()).bind(spec)
    return BaselineIngress.bind(BaselineRouter.bind(detector), args)
