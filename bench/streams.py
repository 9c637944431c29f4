"""Frame-stream loads of `bench/serving.py --stream` (issue 22): one connection each, on loopback.

* `http_one_per_frame`: one HTTP connection, one POST per frame, one after the other (what a camera
  does without a stream);
* `ws_stream` / `grpc_stream`: one WebSocket / gRPC `DetectStream` session, at most `window` frames
  unanswered (the service's own window), as fast as answers come;
* `grpc_unary`: one gRPC channel, one `Detect` per frame, one after the other;
* `lockstep_pair`: two WebSocket sessions (metered, unmetered) open side by side, one frame at a time
  on each in turn: the per-frame latency of each, paired.

Every load counts answers by outcome; a refused frame is never counted as served.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import websockets

from bench.loads import pct
from serve_app.proto.yolo_tokens.v1 import detect_pb2 as pb
from serve_app.proto.yolo_tokens.v1 import detect_pb2_grpc as rpc


@dataclass
class Run:
    frames: int = 0
    served: int = 0
    seconds: float = 0.0
    lat_s: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "served": self.served,
            "outcomes": dict(self.outcomes),
            "seconds": round(self.seconds, 3),
            "frames_per_s": round(self.served / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(pct(self.lat_s, 0.5) * 1000, 2),
            "p99_ms": round(pct(self.lat_s, 0.99) * 1000, 2),
        }


async def http_one_per_frame(url: str, headers: dict[str, str], frames: list[bytes], n: int) -> Run:
    run = Run()
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=1)) as client:
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            r = await client.post(url, content=frames[i % len(frames)], headers=headers)
            run.lat_s.append(time.perf_counter() - t)
            run.frames += 1
            ok = r.status_code == 200
            run.served += ok
            run.outcomes["ok" if ok else r.json()["error"]["code"]] += 1
        run.seconds = time.perf_counter() - t0
    return run


async def ws_stream(url: str, credential: str, frames: list[bytes], n: int, window: int) -> Run:
    run = Run()
    sent: dict[int, float] = {}
    credit = asyncio.Semaphore(window)
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {credential}"}) as ws:

        async def sender() -> None:
            for i in range(n):
                await credit.acquire()
                sent[i] = time.perf_counter()
                await ws.send(frames[i % len(frames)])

        t0 = time.perf_counter()
        task = asyncio.ensure_future(sender())
        for _ in range(n):
            msg = json.loads(await ws.recv())
            run.lat_s.append(time.perf_counter() - sent.pop(msg["seq"]))
            credit.release()
            run.frames += 1
            ok = "result" in msg
            run.served += ok
            run.outcomes["ok" if ok else msg["error"]["code"]] += 1
        run.seconds = time.perf_counter() - t0
        await task
    return run


async def grpc_stream(target: str, metadata: list[tuple[str, str]], frames: list[bytes], n: int, window: int) -> Run:
    run = Run()
    sent: dict[int, float] = {}
    credit = asyncio.Semaphore(window)

    async def outgoing() -> AsyncIterator[pb.Frame]:
        for i in range(n):
            await credit.acquire()
            sent[i] = time.perf_counter()
            yield pb.Frame(image=frames[i % len(frames)], seq=i)

    async with grpc.aio.insecure_channel(target) as channel:
        t0 = time.perf_counter()
        call = rpc.DetectServiceStub(channel).DetectStream(outgoing(), metadata=metadata)
        async for r in call:
            run.lat_s.append(time.perf_counter() - sent.pop(r.seq))
            credit.release()
            run.frames += 1
            ok = r.HasField("result")
            run.served += ok
            run.outcomes["ok" if ok else r.error.code] += 1
        run.seconds = time.perf_counter() - t0
    return run


async def grpc_unary(target: str, metadata: list[tuple[str, str]], frames: list[bytes], n: int) -> Run:
    run = Run()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rpc.DetectServiceStub(channel)
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            try:
                await stub.Detect(pb.DetectRequest(images=[frames[i % len(frames)]]), metadata=metadata)
                run.served += 1
                run.outcomes["ok"] += 1
            except grpc.aio.AioRpcError as exc:
                run.outcomes[exc.code().name] += 1
            run.lat_s.append(time.perf_counter() - t)
            run.frames += 1
        run.seconds = time.perf_counter() - t0
    return run


async def lockstep_pair(urls: dict[str, str], credential: str, frames: list[bytes], n: int) -> dict[str, list[float]]:
    """One frame at a time on each session in turn (rotating order): per-frame latency (s) of each."""
    lat: dict[str, list[float]] = {k: [] for k in urls}
    headers = {"Authorization": f"Bearer {credential}"}
    conns = {k: await websockets.connect(u, additional_headers=headers) for k, u in urls.items()}
    try:
        names = list(urls)
        for i in range(n):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                ws = conns[name]
                t = time.perf_counter()
                await ws.send(frames[i % len(frames)])
                msg = json.loads(await ws.recv())
                lat[name].append(time.perf_counter() - t)
                if "result" not in msg:
                    raise RuntimeError(f"{name}: frame {i} refused: {msg}")
    finally:
        for ws in conns.values():
            await ws.close()
    return lat
