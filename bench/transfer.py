"""What the ingress should send a detector: decoded pixels, the encoded bytes or the letterboxed
tensor, timed end to end over a real Serve handle call (JSON lines; the last line is the summary).

An ingress-like replica (`Front`) calls a detector-like replica (`Sink`) through its Serve handle,
with one 640x480 JPEG, in each of these ways (the ingress always decodes once: it validates every
image before any charge):

    pixels       Front: decode               → RGB uint8 HxWx3   → Sink: letterbox, to CHW float
    encoded      Front: decode (validation)  → the JPEG bytes    → Sink: decode again, letterbox, to CHW float
    letterboxed  Front: decode, letterbox    → uint8 letterbox   → Sink: to CHW float
    tensor       Front: decode, letterbox, CHW float32 / 255 → the tensor → Sink: nothing

The letterbox is the engine's (ultralytics `LetterBox(auto=True)`, stride 32) at `--imgsz`; the
to-float step is what `YoloEngine` does before the forward pass (on a GPU it runs on the device).
No model runs: this is the transfer and the work around it. Front times its own steps and each
call; calls run one at a time, then `--concurrency` at once from the same Front replica.

    python -m bench.transfer [--calls 300] [--concurrency 8] [--imgsz 640,320]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any, cast

from serve_app import launcher  # neither Ray nor ultralytics

if __name__ == "__main__":  # run as a script: the rules before Ray and ultralytics, imported below, read them
    launcher.apply_environment()

import numpy as np
import ray
import torch
from PIL import Image
from ray import serve
from ultralytics.data.augment import LetterBox

from bench.loads import pct
from serve_app.app import deployment
from serve_app.demo.synth import render
from serve_app.imaging import decode_image

MODES = ("pixels", "encoded", "letterboxed", "tensor")


def photo_jpeg(width: int = 640, height: int = 480, quality: int = 95) -> bytes:
    """A generated scene with sensor-like noise, so that it compresses like a camera photo (about the
    size of the 227 KB 640x480 photo measured in issue 12)."""
    img = np.asarray(render(99, "transfer", 0, width)[0].convert("RGB"), dtype=np.int16)[:height]
    noise = np.random.default_rng(7).normal(0, 20, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def to_chw_float(boxed: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(boxed).permute(2, 0, 1).float().div_(255)


def letterboxer(imgsz: int) -> Callable[[np.ndarray], np.ndarray]:
    """The engine's letterbox (`YoloEngine`: ultralytics `LetterBox(auto=True)`, stride 32)."""
    box = LetterBox((imgsz, imgsz), auto=True, stride=32)
    return lambda pixels: cast(np.ndarray, box(image=pixels))


@serve.deployment(name="Sink", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class Sink:
    """The detector's side: whatever is left to do before the forward pass."""

    def __init__(self, imgsz: int) -> None:
        self.letterbox = letterboxer(imgsz)

    async def take(self, mode: str, payload: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        if mode == "pixels":
            x = to_chw_float(self.letterbox(payload))
        elif mode == "encoded":
            x = to_chw_float(self.letterbox(decode_image(payload).pixels))
        elif mode == "letterboxed":
            x = to_chw_float(payload)
        else:
            x = torch.from_numpy(payload)
        return {"shape": list(x.shape), "sink_ms": (time.perf_counter() - t0) * 1000}


@serve.deployment(name="Front", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class Front:
    """The ingress's side: decode (always), then prepare the payload of `mode` and call the sink."""

    def __init__(self, sink: Any, imgsz: int) -> None:
        self.sink = sink
        self.letterbox = letterboxer(imgsz)

    def prepare(self, mode: str, jpeg: bytes) -> Any:
        pixels = decode_image(jpeg).pixels
        if mode == "pixels":
            return pixels
        if mode == "encoded":
            return jpeg
        boxed = self.letterbox(pixels)
        if mode == "letterboxed":
            return boxed
        return np.ascontiguousarray(boxed.transpose(2, 0, 1), dtype=np.float32) / np.float32(255)

    async def one(self, mode: str, jpeg: bytes) -> tuple[float, float, float, int]:
        t0 = time.perf_counter()
        payload = self.prepare(mode, jpeg)
        t1 = time.perf_counter()
        out = await self.sink.take.remote(mode, payload)
        t2 = time.perf_counter()
        size = len(payload) if isinstance(payload, bytes) else int(payload.nbytes)
        return (t1 - t0) * 1000, (t2 - t1) * 1000, float(out["sink_ms"]), size

    async def run(self, mode: str, jpeg: bytes, calls: int, concurrency: int) -> dict[str, Any]:
        for _ in range(5):
            await self.one(mode, jpeg)
        rows = [await self.one(mode, jpeg) for _ in range(calls)]
        front, call, sink = ([r[i] for r in rows] for i in range(3))
        total = [f + c for f, c in zip(front, call, strict=True)]
        t0 = time.perf_counter()
        per_worker = max(1, calls // concurrency)

        async def worker() -> None:
            for _ in range(per_worker):
                await self.one(mode, jpeg)

        await asyncio.gather(*[worker() for _ in range(concurrency)])
        rate = per_worker * concurrency / (time.perf_counter() - t0)
        return {
            "payload_bytes": rows[0][3],
            "front_p50_ms": round(statistics.median(front), 3),
            "call_p50_ms": round(statistics.median(call), 3),
            "sink_p50_ms": round(statistics.median(sink), 3),
            "end_to_end_p50_ms": round(statistics.median(total), 3),
            "end_to_end_p99_ms": round(pct(total, 0.99), 3),
            "calls_per_s_concurrent": round(rate, 1),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--imgsz", default="640,320", help="letterbox sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=2, help="each mode this many times, order rotating")
    a = ap.parse_args()
    jpeg = photo_jpeg()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        for imgsz in (int(s) for s in a.imgsz.split(",")):
            app = deployment(Front).bind(deployment(Sink).bind(imgsz), imgsz)
            handle = serve.run(app, name=f"transfer{imgsz}", route_prefix=None)
            for r in range(a.rounds):
                for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                    row = handle.run.remote(mode, jpeg, a.calls, a.concurrency).result(timeout_s=300)
                    results.setdefault(str(imgsz), {}).setdefault(mode, []).append(row)
                    line = {"bench": "transfer", "imgsz": imgsz, "mode": mode, "round": r, **row}
                    print(json.dumps(line), flush=True)
            serve.delete(f"transfer{imgsz}")
        summary: dict[str, Any] = {"bench": "transfer", "summary": True, "jpeg_bytes": len(jpeg), "image": "640x480"}
        for size, modes in results.items():
            summary[f"imgsz_{size}"] = {
                mode: {
                    "payload_bytes": rows[0]["payload_bytes"],
                    "end_to_end_p50_ms": round(statistics.median(x["end_to_end_p50_ms"] for x in rows), 3),
                    "front_p50_ms": round(statistics.median(x["front_p50_ms"] for x in rows), 3),
                    "sink_p50_ms": round(statistics.median(x["sink_p50_ms"] for x in rows), 3),
                    "calls_per_s_concurrent": round(statistics.median(x["calls_per_s_concurrent"] for x in rows), 1),
                }
                for mode, rows in modes.items()
            }
        summary["serve_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_USE_GRPC")}
        summary["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__}
        print(json.dumps(summary), flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
