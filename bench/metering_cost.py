"""The ingress's metering work per request, in-process, without Ray or HTTP (JSON lines; the last
line is the summary).

What `bench/serving.py`'s overhead (metered - unmetered) is made of inside the ingress replica:
the same `IngressSteps` the Ingress deployment runs (verify, decode, price, admit from a real
`LeaseHolder` over the in-process ledger, settle later), with a detector that answers at once,
against the unmetered baseline's work on the same images (decode, detector, result body). The
pieces are timed on their own too: the credential check (the HTTP route runs it twice: once
before reading the body, once in the steps), the body hash, the admission and settlement through
the `Meter`, the Prometheus recordings of the Ingress's `on_admit` callback, and the detector call
bounded by `timeout_s` (`asyncio.wait_for`) against a plain await of the same instant answer.

    python -m bench.metering_cost [--requests 3000]
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
from collections.abc import Awaitable, Callable
from typing import Any

from ledger.client.fake import FakeLedger
from ledger.client.holder import LeaseHolder
from ledger.core.entities import Admission, Decision, Settlement, TokenSpec
from serve_app.answer import result_body
from serve_app.config import DEMO_WEIGHTS, AppArgs, ModelSpec
from serve_app.demo.synth import render
from serve_app.imaging import decode_image
from serve_app.ingress_steps import DetectCall, IngressSteps, body_hash, new_request_id
from serve_app.metering import Meter
from serve_app.metrics import IngressMetrics
from serve_app.results import InferenceParams


class Instant:
    """A detector handle that answers at once (`detect.remote(...)` is awaitable and cancellable)."""

    def __init__(self) -> None:
        self.detect = self

    def remote(self, pixels: list[Any], params: InferenceParams, key: str | None = None, service: Any = None) -> Any:
        return _Answer(len(pixels))


class _Answer:
    def __init__(self, n: int) -> None:
        self.n = n

    def __await__(self) -> Any:
        return self._value().__await__()

    async def _value(self) -> dict[str, Any]:
        return {"detections": [[] for _ in range(self.n)], "gpu_ms": 0.0}

    def cancel(self) -> None:
        pass


async def per_call_us(fn: Callable[[int], Awaitable[Any]], n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await fn(i)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def stats_us(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"p50_us": round(statistics.median(s), 1), "p99_us": round(s[int(len(s) * 0.99) - 1], 1)}


async def run(n: int) -> dict[str, Any]:
    images = []
    for i in range(32):
        buf = io.BytesIO()
        render(99, "bench", i, 320)[0].save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    ledger = FakeLedger()
    try:
        cred = "Bearer " + ledger.create_package(TokenSpec("cost", 10**9)).credential
        metrics = IngressMetrics()

        def on_admit(d: Decision, model: str, package: str, local: bool) -> None:  # what Ingress._admitted does
            metrics.admission(d.code.value, model, package, local)
            if d.admitted:
                metrics.units_used(d.units, model, package)

        holder = LeaseHolder(ledger, "bench-cost", on_admit=on_admit)
        args = AppArgs(models=[ModelSpec(name="parts", version="1", weights=DEMO_WEIGHTS, imgsz=320)])
        steps = IngressSteps(args, ledger, Meter(holder), {"parts@1": Instant()})
        spec = steps.resolve_model(None)
        detector = Instant()

        def call(i: int) -> DetectCall:
            return DetectCall(new_request_id(), cred, [images[i % 32]], None, InferenceParams(), "127.0.0.1")

        async def metered(i: int) -> None:
            await steps.verify(cred)  # the route's check before it reads the body
            await steps.detect(call(i))

        async def unmetered(i: int) -> None:  # bench/baseline.py's work
            pixels = [decode_image(images[i % 32]).pixels]
            result = await detector.detect.remote(pixels, InferenceParams())
            sizes = [(p.shape[1], p.shape[0]) for p in pixels]
            result_body("baseline", spec.name, spec.version, sizes, result["detections"])

        async def verify(i: int) -> None:
            await steps.verify(cred)

        async def hashing(i: int) -> None:
            body_hash(call(i), spec)

        claims = await steps.verify(cred)

        pixels = [decode_image(images[0]).pixels]

        async def infer_bounded(i: int) -> None:  # the steps' detector call, bounded by the version's timeout_s
            await steps.infer(spec, pixels, InferenceParams(), None)

        async def infer_plain(i: int) -> None:  # the baseline's
            await detector.detect.remote(pixels, InferenceParams())

        decisions: list[Decision] = []

        async def admit_settle(i: int) -> None:
            a = Admission(new_request_id(), claims.sub, claims.jti, 1, spec.key, "127.0.0.1", root_id=claims.pkg)
            decisions.append(await steps.meter.admit(a))
            steps.meter.settle_later(Settlement(a.request_id, a.token_id, True, root_id=a.root_id))

        for fn in (metered, unmetered, admit_settle):  # warm-up: keys, the first lease, imports
            await per_call_us(fn, 200)
        fns = {"metered": metered, "unmetered": unmetered, "verify": verify, "body_hash": hashing}
        fns |= {"admit_settle": admit_settle, "infer_bounded": infer_bounded, "infer_plain": infer_plain}
        rows: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(10):  # interleaved slices
            for name, fn in fns.items():
                rows[name] += await per_call_us(fn, n // 10)
                await asyncio.sleep(0.01)  # let the holder's report loop run
        ok = decisions[-1]
        t0 = time.perf_counter()
        for _ in range(n):
            on_admit(ok, spec.key, claims.pkg, True)
        metrics_us = (time.perf_counter() - t0) / n * 1e6
        await holder.close()
        out = {k: stats_us(v) for k, v in rows.items()}
        out["on_admit_metrics"] = {"mean_us": round(metrics_us, 1)}
        out["holder"] = {"local": holder.stats.local, "waited": holder.stats.waited, "strict": holder.stats.strict}
        return out
    finally:
        ledger.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    a = ap.parse_args()
    out = asyncio.run(run(a.requests))
    for k, v in out.items():
        print(json.dumps({"bench": "metering_cost", "measure": k, **v}), flush=True)
    summary = {
        "bench": "metering_cost",
        "summary": True,
        "requests_each": a.requests,
        "metered_minus_unmetered_p50_us": round(out["metered"]["p50_us"] - out["unmetered"]["p50_us"], 1),
        **{f"{k}_p50_us": v["p50_us"] for k, v in out.items() if "p50_us" in v},
        "on_admit_metrics_us": out["on_admit_metrics"]["mean_us"],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
