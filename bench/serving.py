"""Serving benchmarks over real HTTP on 127.0.0.1 (JSON lines; the last line is the summary).

* efficiency: images/s end to end at concurrency C through the metered app, divided by the
  same engine in-process on the same images with the same batch size, measured in this run.
* overhead: per-request latency of the metered app minus an unmetered baseline app
  (`bench/baseline.py`: same body parser, decoder, detector code and number of Serve hops, no
  token check, admission or settlement), interleaved request by request at concurrency 1, same run.

    python -m bench.serving [--concurrency 8] [--seconds 20] [--overhead-requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from serve_app import launcher  # neither Ray nor ultralytics

if __name__ == "__main__":  # run as a script: the rules before Ray and ultralytics, imported below, read them
    launcher.apply_environment()

import httpx
import ray
import torch
from ray import serve

from bench.baseline import build_baseline_app
from ledger.entities import TokenSpec
from ledger.service import attach
from serve_app.app import build_app
from serve_app.config import DEMO_WEIGHTS, AppArgs, Autoscaling, ModelSpec
from serve_app.demo.synth import render
from serve_app.engine.backends import TorchEngine
from serve_app.imaging import decode_image
from serve_app.results import InferenceParams

PORT = 8130


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


def engine_rate(images: list[bytes], batch: int, seconds: float) -> float:
    engine = TorchEngine(DEMO_WEIGHTS, imgsz=320)
    decoded = [decode_image(b).pixels for b in images]
    engine.detect(decoded[:batch])
    n, t0, i = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        chunk = [decoded[(i + k) % len(decoded)] for k in range(batch)]
        engine.detect(chunk, InferenceParams())
        n += batch
        i += batch
    return n / (time.perf_counter() - t0)


async def http_load(
    url: str, headers: dict[str, str], images: list[bytes], concurrency: int, seconds: float
) -> dict[str, Any]:
    lat: list[float] = []
    codes: dict[int, int] = {}
    async with httpx.AsyncClient(timeout=120) as client:
        stop = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await client.post(url, content=images[i % len(images)], headers=headers)
                lat.append(time.perf_counter() - t0)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*[worker(w) for w in range(concurrency)])
        elapsed = time.perf_counter() - t0
    ok = codes.get(200, 0)
    return {
        "requests": len(lat),
        "codes": codes,
        "images_per_s": ok / elapsed,
        "p50_ms": pct(lat, 0.5) * 1000,
        "p99_ms": pct(lat, 0.99) * 1000,
    }


async def overhead(metered: str, baseline: str, headers: dict[str, str], images: list[bytes], n: int) -> dict[str, Any]:
    m, b = [], []
    async with httpx.AsyncClient(timeout=120) as client:
        for i in range(n):
            for url, sink in ((metered, m), (baseline, b)) if i % 2 == 0 else ((baseline, b), (metered, m)):
                t0 = time.perf_counter()
                r = await client.post(url, content=images[i % len(images)], headers=headers)
                sink.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
    return {
        "metered_p50_ms": pct(m, 0.5) * 1000,
        "metered_p99_ms": pct(m, 0.99) * 1000,
        "baseline_p50_ms": pct(b, 0.5) * 1000,
        "baseline_p99_ms": pct(b, 0.99) * 1000,
        "overhead_p50_ms": (pct(m, 0.5) - pct(b, 0.5)) * 1000,
        "overhead_p99_ms": (pct(m, 0.99) - pct(b, 0.99)) * 1000,
        "overhead_mean_ms": (statistics.mean(m) - statistics.mean(b)) * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--overhead-requests", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--replica-cpus", type=float, default=float(os.cpu_count() or 1))
    a = ap.parse_args()
    images = []
    for i in range(32):
        buf = io.BytesIO()
        render(99, "bench", i, 320)[0].save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    tmp = Path(tempfile.mkdtemp(prefix="yt-serving-"))
    model = ModelSpec(
        name="parts",
        version="1",
        weights=DEMO_WEIGHTS,
        imgsz=320,
        max_batch_size=a.batch,
        # the replica gets as many CPUs (so torch threads: Ray sets OMP_NUM_THREADS from num_cpus)
        # as the in-process engine has, so that the ratio measures serving, not thread counts
        num_cpus=a.replica_cpus,
        autoscaling=Autoscaling(min_replicas=1, max_replicas=1),
    )
    common = {
        "database_url": f"sqlite:///{tmp / 'ledger.db'}",
        "data_dir": tmp,
        "models": [model],
        "ledger_name": f"bench-{uuid.uuid4().hex[:6]}",
        "namespace": "yt-bench",
    }
    # logical CPUs: both apps' replicas must fit; the physical cores are what they share
    ray.init(address="local", num_cpus=int(2 * a.replica_cpus + 2), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        args = AppArgs(**common)
        serve.run(build_app(args), name="metered", route_prefix="/")
        serve.run(build_baseline_app(args), name="baseline", route_prefix="/baseline")
        ledger = attach(args.ledger_settings())  # build_app launched it
        cred = ledger.create_package(TokenSpec("bench", 10**9)).credential
        headers = {"Authorization": f"Bearer {cred}", "Content-Type": "image/jpeg"}
        metered, baseline = f"http://127.0.0.1:{PORT}/v1/detect", f"http://127.0.0.1:{PORT}/baseline/v1/detect"
        asyncio.run(http_load(metered, headers, images, a.concurrency, 3))  # warm-up
        asyncio.run(http_load(baseline, headers, images, a.concurrency, 3))
        http = asyncio.run(http_load(metered, headers, images, a.concurrency, a.seconds))
        print(json.dumps({"bench": "serving", "measure": "http", "concurrency": a.concurrency, **http}), flush=True)
        serve.delete("baseline")  # the engine measurement below gets the CPU the baseline replica held
        eng = engine_rate(images, a.batch, a.seconds)
        print(
            json.dumps(
                {
                    "bench": "serving",
                    "measure": "engine_in_process",
                    "batch": a.batch,
                    "torch_threads": torch.get_num_threads(),
                    "images_per_s": eng,
                }
            ),
            flush=True,
        )
        serve.run(build_baseline_app(args), name="baseline", route_prefix="/baseline")
        ovh = asyncio.run(overhead(metered, baseline, headers, images, a.overhead_requests))
        print(json.dumps({"bench": "serving", "measure": "overhead", **ovh}), flush=True)
        print(
            json.dumps(
                {
                    "bench": "serving",
                    "summary": True,
                    "model": "parts@1",
                    "imgsz": 320,
                    "device": "cpu",
                    "concurrency": a.concurrency,
                    "replica_cpus": a.replica_cpus,
                    "http_images_per_s": round(http["images_per_s"], 1),
                    "engine_images_per_s": round(eng, 1),
                    "efficiency": round(http["images_per_s"] / eng, 3),
                    "overhead_p50_ms": round(ovh["overhead_p50_ms"], 2),
                    "overhead_p99_ms": round(ovh["overhead_p99_ms"], 2),
                    "machine": {
                        "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "platform": platform.platform(),
                    },
                }
            ),
            flush=True,
        )
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
