"""Serving benchmarks over real HTTP on 127.0.0.1 (JSON lines; the last line is the summary).

One Ray instance runs three apps side by side: the metered product app (`serve_app.app.build_app`),
the unmetered baseline (`bench/baseline.py`: the same hops, ingress → detector, the same body
parser, decoder and Detector code, no verify/admit/settle) and a bare Serve echo of the same body.

* throughput: metered and unmetered images/s at concurrency C, in interleaved rounds (the order
  rotates each round); `metered_vs_unmetered` is their ratio, `efficiency` the metered figure over
  the same engine in-process on the same images with the same batch size, measured in a slice after
  each round (same run, same stretch of time);
* latency: metered, unmetered and echo requests interleaved one by one at concurrency 1;
  `overhead_p50_ms`/`overhead_p99_ms` = metered - unmetered; `proxy_echo_p50_ms` is the proxy's and
  the body's share; the metered answers' `timing_ms` give decode / admit / infer inside the ingress;
* `local_admit_share`: the ingress replicas' lease holders (`Ingress.stats()`), admissions served
  from a lease without waiting (local / (local + waited + strict)), over a steady window of metered
  load alone after a warm-up, on a token with a large allocation and no rate limit; the same share
  over the interleaved rounds (where the metered side pauses while the other runs) beside it.

Serve's own levers come from the environment of this process (Ray's processes inherit it), e.g.
`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`, `RAY_SERVE_USE_GRPC_BY_DEFAULT=1`; they are recorded in the
summary (`serve_env`). `--ingress-max-ongoing` sets both ingresses' `max_ongoing_requests`;
`--direct` sends requests to the ingress replicas' own ports (Serve's direct ingress) instead of the proxy.

`--stream` (issue 22) adds two more apps on a fake engine (no model time: what is measured is the
serving path), metered (the product's graph) and unmetered (`bench/baseline.py`), and measures on ONE
connection each (bench/streams.py): frames/s one HTTP request per frame, over a WebSocket stream and a
gRPC stream (at most the service's window of 8 frames unanswered), and gRPC unary `Detect` one after
the other; `stream_vs_requests` = WebSocket stream frames/s over HTTP one-request-per-frame frames/s;
`stream_frame_overhead_p50_ms` = the p50 per-frame latency of the metered stream minus the unmetered
one, both sessions open side by side, one frame at a time on each in turn.

    python -m bench.serving [--concurrency 8] [--seconds 5] [--rounds 4] [--overhead-requests 200]
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
import threading
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from serve_app import launcher  # neither Ray nor ultralytics

if __name__ == "__main__":  # run as a script: the rules before Ray and ultralytics, imported below, read them
    launcher.apply_environment()

import httpx
import ray
import torch
from ray import serve
from ray.serve import Application

import serve_app
from bench.baseline import build_baseline_app, build_echo_app
from bench.loads import Tally, interleaved_rounds, interleaved_singles, latency_summary, pct
from ledger.client.service import attach
from ledger.core.entities import TokenSpec
from serve_app.app import build_app
from serve_app.config import DEMO_WEIGHTS, AppArgs, Autoscaling, ModelSpec
from serve_app.demo.synth import render
from serve_app.engine.backends import TorchEngine
from serve_app.imaging import decode_image
from serve_app.results import InferenceParams

PORT = 8130
T = TypeVar("T")
APPS = {"metered": "/", "unmetered": "/baseline", "echo": "/echo"}
GOALS = {  # issue 12 §5, this 2-core machine
    "overhead_p50_ms": ("<=", 0.5),
    "overhead_p99_ms": ("<=", 3.0),
    "local_admit_share": (">=", 0.99),
    "metered_vs_unmetered": (">=", 0.95),
    "efficiency": (">=", 0.8),
    # issue 22 §4 (--stream)
    "stream_vs_requests": (">=", 5.0),
    "stream_frame_overhead_p50_ms": ("<=", 0.3),
}
GRPC_PORT = 9130
STREAM_APPS = {"stream_metered": "/sm", "stream_unmetered": "/su"}


def emit(measure: str, **fields: Any) -> None:
    print(json.dumps({"bench": "serving", "measure": measure, **fields}), flush=True)


def serve_env() -> dict[str, str]:
    """Serve's settings from this environment (the levers under test)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_") and k != launcher.CALLBACK_VAR}


class EngineMeter:
    """The same engine in this process, on the same images, same batch size; measured in slices
    between the HTTP rounds (the Serve replicas idle meanwhile), so that `efficiency` compares
    figures taken over the same stretch of this shared machine's time."""

    def __init__(self, images: list[bytes], batch: int) -> None:
        self.engine = TorchEngine(DEMO_WEIGHTS, imgsz=320)
        self.decoded = [decode_image(b).pixels for b in images]
        self.batch = batch
        self.images = 0
        self.seconds = 0.0
        self.engine.detect(self.decoded[:batch])

    def run(self, seconds: float) -> None:
        n, t0, i = 0, time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            chunk = [self.decoded[(i + k) % len(self.decoded)] for k in range(self.batch)]
            self.engine.detect(chunk, InferenceParams())
            n += self.batch
            i += self.batch
        self.images += n
        self.seconds += time.perf_counter() - t0

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")


def with_options(app: Application, **options: Any) -> Application:
    """`app` with Serve options of its ingress deployment replaced (a lever under test)."""
    return Application(app._bound_deployment.options(**options)) if options else app


class HandleLoop:
    """An event loop on its own thread for the driver's Serve handle calls: with
    RAY_SERVE_THROUGHPUT_OPTIMIZED a handle's router runs on the loop that first used it, which
    must keep running for the handle's lifetime (`asyncio.run` closes its loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="handles").start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


def ingress_stats(loop: HandleLoop) -> dict[str, dict[str, Any]] | None:
    """The metered ingress replicas' lease-holder counters, by holder (None: this code has no
    `Ingress.stats`, i.e. before issue 12)."""

    async def ask() -> dict[str, dict[str, Any]] | None:
        handle = serve.get_deployment_handle("Ingress", app_name="metered")
        seen: dict[str, dict[str, Any]] = {}
        try:
            for _ in range(8):  # routed to some replica each time: enough calls reach every one of a few
                s = await asyncio.wait_for(handle.stats.remote(), 30)
                seen[s["holder"]] = s
        except (AttributeError, ray.exceptions.RayError, ray.serve.exceptions.RayServeException):
            return None
        return seen

    return loop.run(ask())


def admit_share(before: dict[str, dict[str, Any]] | None, after: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    if before is None or after is None:
        return {"local_admit_share": None}
    d = {k: sum(a[k] - before.get(h, {}).get(k, 0) for h, a in after.items()) for k in ("local", "waited", "strict")}
    n = sum(d.values())
    return {"local_admit_share": round(d["local"] / n, 4) if n else None, **d, "replicas": len(after)}


def direct_urls() -> dict[str, str]:
    """Each app's ingress replica port (Serve's direct ingress), from the controller's target groups."""
    client = serve.context._get_global_client()
    assert client is not None, "Serve is running"
    controller = client._controller
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        groups = ray.get(controller.get_target_groups.remote())
        found = {}
        for g in groups:
            for name, prefix in APPS.items():
                if g.app_name == name and g.targets and str(g.protocol).upper().endswith("HTTP"):
                    t = g.targets[0]
                    found[name] = f"http://{t.ip}:{t.port}{prefix.rstrip('/')}"
        if len(found) == len(APPS):
            return found
        time.sleep(1)
    raise RuntimeError(f"no direct ingress targets for every app: {groups!r}")


def request_id_source(url: str, headers: dict[str, str], body: bytes) -> str:
    """ "serve" when the ingress used Serve's request id (the proxy middleware marked the request, so a
    redelivery is charged once), "drawn" when it drew its own (the middleware did not run)."""
    r = httpx.post(url, content=body, headers=headers, timeout=60)
    return "serve" if "-" in r.json()["request_id"] else "drawn"


def bench_images(n: int, size: int) -> list[bytes]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        render(99, "bench", i, size)[0].save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def goals(summary: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, (op, bound) in GOALS.items():
        v = summary.get(key)
        if v is None:
            out[key] = "not measured"
        else:
            out[key] = "met" if (v <= bound if op == "<=" else v >= bound) else "missed"
    return out


def stream_measures(args: AppArgs, lever: dict[str, Any], cred: str, images: list[bytes], n: int) -> dict[str, Any]:
    """The frame-stream measures on the fake engine (see the module docstring); emits each, returns
    the summary's keys."""
    from bench import streams
    from serve_app.engine.fake import FakeEngine
    from tests.hostile.lease_cluster import fake_app

    engines = {"torch": FakeEngine}
    # no model time and no CPU reserved for it: what these apps measure is the serving path
    args = args.model_copy(update={"models": [m.model_copy(update={"num_cpus": 0}) for m in args.models]})
    serve.run(fake_app(args, engines=engines), name="stream_metered", route_prefix=STREAM_APPS["stream_metered"])
    serve.run(build_baseline_app(args, lever, engines), name="stream_unmetered",
              route_prefix=STREAM_APPS["stream_unmetered"])  # fmt: skip
    base = f"127.0.0.1:{PORT}"
    http_url = f"http://{base}{STREAM_APPS['stream_metered']}/v1/detect"
    ws = {k: f"ws://{base}{p}/v1/detect/stream" for k, p in STREAM_APPS.items()}
    headers = {"Authorization": f"Bearer {cred}", "Content-Type": "image/jpeg"}
    md = [("authorization", f"Bearer {cred}"), ("application", "stream_metered")]
    target = f"127.0.0.1:{GRPC_PORT}"
    window = args.limits.stream_window
    # warm-up: every path once, off the clock
    asyncio.run(streams.http_one_per_frame(http_url, headers, images, 20))
    asyncio.run(streams.ws_stream(ws["stream_metered"], cred, images, 40, window))
    asyncio.run(streams.grpc_stream(target, md, images, 40, window))
    asyncio.run(streams.grpc_unary(target, md, images, 20))
    asyncio.run(streams.lockstep_pair(ws, cred, images, 20))
    runs = {}
    for name, load in (
        ("http_one_request_per_frame", lambda: streams.http_one_per_frame(http_url, headers, images, n)),
        ("websocket_stream", lambda: streams.ws_stream(ws["stream_metered"], cred, images, n, window)),
        ("grpc_stream", lambda: streams.grpc_stream(target, md, images, n, window)),
        ("grpc_unary", lambda: streams.grpc_unary(target, md, images, n)),
    ):
        runs[name] = asyncio.run(load()).summary()
        emit(f"stream_{name}", engine="fake", connections=1, window=window, **runs[name])
    lat = asyncio.run(streams.lockstep_pair(ws, cred, images, n))
    pair = {
        "metered": latency_summary(lat["stream_metered"]),
        "unmetered": latency_summary(lat["stream_unmetered"]),
        "overhead_p50_ms": round((pct(lat["stream_metered"], 0.5) - pct(lat["stream_unmetered"], 0.5)) * 1000, 3),
        "overhead_paired_median_ms": round(statistics.median(
            m - u for m, u in zip(lat["stream_metered"], lat["stream_unmetered"], strict=True)) * 1000, 3),
    }  # fmt: skip
    emit("stream_frame_lockstep", engine="fake", frames_each=n, **pair)
    http_fps = runs["http_one_request_per_frame"]["frames_per_s"]
    return {
        "stream_engine": "fake",
        "stream_frames_per_s": runs["websocket_stream"]["frames_per_s"],
        "grpc_stream_frames_per_s": runs["grpc_stream"]["frames_per_s"],
        "http_one_request_per_frame_per_s": http_fps,
        "grpc_unary_per_s": runs["grpc_unary"]["frames_per_s"],
        "stream_vs_requests": round(runs["websocket_stream"]["frames_per_s"] / http_fps, 2) if http_fps else None,
        "grpc_stream_vs_requests": round(runs["grpc_stream"]["frames_per_s"] / http_fps, 2) if http_fps else None,
        "grpc_unary_vs_http": round(runs["grpc_unary"]["frames_per_s"] / http_fps, 3) if http_fps else None,
        "grpc_unary_p50_ms": runs["grpc_unary"]["p50_ms"],
        "http_one_request_per_frame_p50_ms": runs["http_one_request_per_frame"]["p50_ms"],
        "stream_frame_overhead_p50_ms": pair["overhead_p50_ms"],
        "stream_frame_overhead_paired_median_ms": pair["overhead_paired_median_ms"],
        "stream_frame_p50_ms": pair["metered"]["p50_ms"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0, help="per target per throughput round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup-s", type=float, default=5.0)
    ap.add_argument("--steady-s", type=float, default=10.0, help="metered load alone, for local_admit_share")
    ap.add_argument("--overhead-requests", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--replica-cpus", type=float, default=float(os.cpu_count() or 1))
    ap.add_argument("--ingress-max-ongoing", type=int, default=None)
    ap.add_argument("--direct", action="store_true", help="hit the ingress replicas' own ports (direct ingress)")
    ap.add_argument("--stream", action="store_true", help="add the frame-stream measures (fake engine)")
    ap.add_argument("--stream-frames", type=int, default=400, help="frames per stream measure")
    ap.add_argument("--stream-only", action="store_true", help="only the frame-stream measures")
    a = ap.parse_args()
    images = bench_images(32, 320)
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
    args = AppArgs(
        database_url=f"sqlite:///{tmp / 'ledger.db'}",
        data_dir=tmp,
        models=[model],
        ledger_name=f"bench-{uuid.uuid4().hex[:6]}",
        namespace="yt-bench",
    )
    lever = {"max_ongoing_requests": a.ingress_max_ongoing} if a.ingress_max_ongoing else {}
    # logical CPUs: both apps' replicas must fit; the physical cores are what they share
    ray.init(
        address="local",
        num_cpus=int(2 * a.replica_cpus + 2 + (2 if a.stream or a.stream_only else 0)),
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    handles = HandleLoop()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": PORT}, grpc_options=launcher.grpc_options(GRPC_PORT))
        serve.run(with_options(build_app(args), **lever), name="metered", route_prefix=APPS["metered"])
        serve.run(build_baseline_app(args, lever), name="unmetered", route_prefix=APPS["unmetered"])
        serve.run(build_echo_app(), name="echo", route_prefix=APPS["echo"])
        ledger = attach(args.ledger_settings())  # build_app launched it
        cred = ledger.create_package(TokenSpec("bench", 10**9)).credential  # large, no rate limit
        headers = {"Authorization": f"Bearer {cred}", "Content-Type": "image/jpeg"}
        if a.direct:
            base = direct_urls()
            urls = {k: v + ("" if k == "echo" else "/v1/detect") for k, v in base.items()}
        else:
            urls = {k: f"http://127.0.0.1:{PORT}{p.rstrip('/')}" + ("" if k == "echo" else "/v1/detect")
                    for k, p in APPS.items()}  # fmt: skip
        detect_urls = {k: urls[k] for k in ("metered", "unmetered")}
        if a.stream_only:  # the stream measures alone (a quick look; the goals want the whole run)
            print(json.dumps({"bench": "serving", "summary": True, "stream_only": True, "serve_env": serve_env(),
                              **stream_measures(args, lever, cred, images, a.stream_frames)}), flush=True)  # fmt: skip
            return
        asyncio.run(interleaved_rounds(detect_urls, headers, images, a.concurrency, a.warmup_s, 1))  # warm-up
        asyncio.run(interleaved_singles(urls, headers, images, 5))
        request_ids = request_id_source(urls["metered"], headers, images[0])
        # steady state: the metered app alone under constant load, after the warm-up
        before = ingress_stats(handles)
        steady = asyncio.run(
            interleaved_rounds({"metered": urls["metered"]}, headers, images, a.concurrency, a.steady_s, 1)
        )
        share = admit_share(before, ingress_stats(handles))
        emit("lease_admissions", window="steady", **share, **steady["metered"].summary())
        # interleaved rounds: each side idles while the other runs, so a lease restarts after a pause
        before = ingress_stats(handles)
        engine = EngineMeter(images, a.batch)
        rounds = {k: Tally() for k in detect_urls}
        for r in range(a.rounds):
            order = list(detect_urls)[r % 2 :] + list(detect_urls)[: r % 2]
            one = asyncio.run(
                interleaved_rounds({k: detect_urls[k] for k in order}, headers, images, a.concurrency, a.seconds, 1)
            )
            for k, t in one.items():
                rounds[k].add(t)
            engine.run(a.seconds)
        share_rounds = admit_share(before, ingress_stats(handles))
        emit("lease_admissions", window="interleaved_rounds", **share_rounds)
        http = {k: t.summary() for k, t in rounds.items()}
        for k, s in http.items():
            emit(f"http_{k}", concurrency=a.concurrency, rounds=a.rounds, **s)
        lat, timings = asyncio.run(interleaved_singles(urls, headers, images, a.overhead_requests))
        lats = {k: latency_summary(v) for k, v in lat.items()}
        parts = {f"{k}_p50_ms": round(pct([t[k] for t in timings if k in t], 0.5), 2)
                 for k in sorted({k for t in timings for k in t})}  # fmt: skip
        ovh = {
            "overhead_p50_ms": round((pct(lat["metered"], 0.5) - pct(lat["unmetered"], 0.5)) * 1000, 2),
            "overhead_p99_ms": round((pct(lat["metered"], 0.99) - pct(lat["unmetered"], 0.99)) * 1000, 2),
            # the median of the per-pair differences (same image, sent one right after the other)
            "overhead_paired_median_ms": round(
                statistics.median(m - u for m, u in zip(lat["metered"], lat["unmetered"], strict=True)) * 1000, 2
            ),
        }
        emit("latency_c1", requests_each=a.overhead_requests, **lats, metered_timing_ms=parts, **ovh)
        eng = engine.rate
        emit(
            "engine_in_process",
            batch=a.batch,
            torch_threads=torch.get_num_threads(),
            images_per_s=round(eng, 2),
            seconds=round(engine.seconds, 2),
        )
        m, u = http["metered"]["images_per_s"], http["unmetered"]["images_per_s"]
        summary: dict[str, Any] = {
            "bench": "serving",
            "summary": True,
            "model": "parts@1",
            "imgsz": 320,
            "device": "cpu",
            "concurrency": a.concurrency,
            "replica_cpus": a.replica_cpus,
            "http_images_per_s": m,
            "unmetered_images_per_s": u,
            "engine_images_per_s": round(eng, 1),
            "efficiency": round(m / eng, 3),
            "metered_vs_unmetered": round(m / u, 3) if u else None,
            "local_admit_share": share["local_admit_share"],
            "local_admit_share_interleaved": share_rounds["local_admit_share"],
            "overhead_p50_ms": ovh["overhead_p50_ms"],
            "overhead_p99_ms": ovh["overhead_p99_ms"],
            "overhead_paired_median_ms": ovh["overhead_paired_median_ms"],
            "metered_p50_ms": lats["metered"]["p50_ms"],
            "unmetered_p50_ms": lats["unmetered"]["p50_ms"],
            "proxy_echo_p50_ms": lats["echo"]["p50_ms"],
            "proxy_echo_p99_ms": lats["echo"]["p99_ms"],
            "metered_timing_p50_ms": parts,
            "path": "direct" if a.direct else "proxy",
            "request_ids": request_ids,
            "ingress_max_ongoing": a.ingress_max_ongoing,
            "serve_env": serve_env(),
            "code": str(Path(serve_app.__file__).resolve().parent.parent),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
                        "platform": platform.platform()},
        }  # fmt: skip
        if a.stream:
            summary |= stream_measures(args, lever, cred, images, a.stream_frames)
        summary["goals"] = goals(summary)
        print(json.dumps(summary), flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
