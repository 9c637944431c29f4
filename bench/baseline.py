"""The overhead benchmark's unmetered baseline: the same hops as the product, no token check.

    BaselineIngress (FastAPI: body, decode) ─► Detector[parts@1]

It reuses the product's body parser, decoder and Detector deployment, and has the same Serve hops
as the metered path (ingress → detector: since issue 12 there is no middle replica), so that
metered minus baseline is exactly what verify, admit and settle cost. It is a separate app built
only here: the production app (`serve_app.app.build_app`) has no unmetered path.
"""

# No `from __future__ import annotations`: FastAPI resolves route annotations at runtime (see serve_app/ingress.py).

import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from serve_app.answer import result_body
from serve_app.app import deployment
from serve_app.config import AppArgs
from serve_app.detector_deployment import Detector
from serve_app.http import images_from_body, read_body
from serve_app.imaging import ImageLimits, decode_image
from serve_app.results import InferenceParams

api = FastAPI(title="yolo-tokens unmetered baseline (benchmarks only)")


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


def build_baseline_app(args: AppArgs, ingress_options: dict[str, Any] | None = None) -> Application:
    """`ingress_options`: Serve options of the baseline ingress (the same as the metered ingress's,
    so that a lever like `max_ongoing_requests` applies to both sides of the comparison)."""
    spec = args.models[0]
    key = secrets.token_hex(16)  # the baseline's own detector, answering its own ingress only
    detector = deployment(Detector).options(**spec.deployment_options()).bind(spec, key)
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
