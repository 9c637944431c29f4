"""StreamClient, behind `yolo-tokens stream VIDEO|DIR --fps N [--grpc]`: a camera-like client of a
running service's frame stream, paid with a token (one session, every frame charged on its own).

    VIDEO (OpenCV) or DIR of images (sorted) ──► one frame every 1/fps s over ONE connection:
        WebSocket /v1/detect/stream (default), or gRPC DetectStream (--grpc)
    ◄── per-frame JSON lines on stdout `{"seq", "latency_ms", "result"|"error"}`, in order; a live
        progress line on stderr (frames, fps, p50 latency, refused); --out-video writes the frames
        with their boxes drawn (a refused frame is written as it was)

A refused frame (rate_limited, model_busy: the service keeps its connection) is dropped, as a camera
would: the stream goes on. A session the service ends (its credential revoked, expired, invalid)
stops sending. Exit 0 when every frame was answered with a result, 1 otherwise, 2 on bad usage.
No Ray here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from serve_app.detect_client import COLORS, IMAGE_SUFFIXES

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})


@dataclass
class StreamOptions:
    url: str  # the service's HTTP URL (the WebSocket route is on it)
    credential: str
    fps: float = 15.0  # 0: as fast as the service answers (at most `window` frames unanswered)
    model: str | None = None
    conf: float = 0.25
    iou: float = 0.7
    grpc_target: str | None = None  # host:port of the gRPC proxy: use gRPC instead of the WebSocket
    window: int = 8  # frames sent and not yet answered, at most (the service's own window is 8 by default)
    max_frames: int | None = None
    jpeg_quality: int = 90
    progress: bool = True


@dataclass
class StreamSummary:
    frames: int = 0
    answered: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    units: int = 0
    detections: int = 0
    seconds: float = 0.0
    p50_ms: float | None = None
    ended_by: str | None = None  # the code that ended the session, if the service ended it

    @property
    def fps(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0


def open_frames(target: Path, max_frames: int | None = None) -> tuple[Iterator[np.ndarray], float | None]:
    """The frames of a video file, or of the images of a folder (sorted by path), as BGR arrays,
    and the video's own frame rate (None for a folder). `FileNotFoundError`/`ValueError` when there
    is nothing to read."""
    if target.is_dir():
        files = sorted(p for p in target.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"no image files ({' '.join(sorted(IMAGE_SUFFIXES))}) under {target}")

        def images() -> Iterator[np.ndarray]:
            for i, p in enumerate(files):
                if max_frames is not None and i >= max_frames:
                    return
                img = cv2.imread(str(p), cv2.IMREAD_COLOR)
                if img is not None:
                    yield img

        return images(), None
    if not target.is_file():
        raise FileNotFoundError(f"{target} does not exist")
    cap = cv2.VideoCapture(str(target))
    if not cap.isOpened():
        raise ValueError(f"OpenCV cannot read {target} as a video")
    rate = cap.get(cv2.CAP_PROP_FPS) or None

    def frames() -> Iterator[np.ndarray]:
        n = 0
        try:
            while max_frames is None or n < max_frames:
                ok, img = cap.read()
                if not ok:
                    return
                n += 1
                yield img
        finally:
            cap.release()

    return frames(), rate


def draw(img: np.ndarray, result: dict[str, Any]) -> np.ndarray:
    out = img.copy()
    for d in result["images"][0]["detections"]:
        b = d["box"]
        color = COLORS[int(d["class_id"]) % len(COLORS)][::-1]  # RGB -> BGR
        p1, p2 = (round(b["x1"]), round(b["y1"])), (round(b["x2"]), round(b["y2"]))
        cv2.rectangle(out, p1, p2, color, 2)
        label = f"{d['class_name']} {d['confidence']:.2f}"
        cv2.putText(out, label, (p1[0], max(12, p1[1] - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1, cv2.LINE_AA)
    return out


class StreamClient:
    """One session; `run(frames, sink)` returns its summary."""

    def __init__(self, opts: StreamOptions, video_out: Path | None = None, video_fps: float | None = None) -> None:
        if opts.fps < 0 or opts.window < 1:
            raise ValueError("fps must be >= 0 and window >= 1")
        self.opts = opts
        self.video_out = video_out
        self.video_fps = video_fps or opts.fps or 15.0
        self.writer: Any = None

    def run(self, frames: Iterator[np.ndarray], sink: IO[str]) -> StreamSummary:
        return asyncio.run(self._run(frames, sink))

    async def _run(self, frames: Iterator[np.ndarray], sink: IO[str]) -> StreamSummary:
        s = StreamSummary()
        sent: dict[int, tuple[float, np.ndarray]] = {}
        credit = asyncio.Semaphore(self.opts.window)
        lat: list[float] = []
        t0 = time.monotonic()
        done_sending = asyncio.Event()

        async def outgoing() -> AsyncIterator[tuple[int, bytes]]:
            for seq, img in enumerate(frames):
                if self.opts.fps > 0:
                    await asyncio.sleep(max(0.0, t0 + seq / self.opts.fps - time.monotonic()))
                await credit.acquire()
                ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, self.opts.jpeg_quality])
                if not ok:
                    raise ValueError(f"frame {seq} could not be encoded as JPEG")
                sent[seq] = (time.monotonic(), img)
                s.frames += 1
                yield seq, buf.tobytes()
            done_sending.set()

        def answered(seq: int, row: dict[str, Any]) -> None:
            at, img = sent.pop(seq, (time.monotonic(), None))
            credit.release()
            ms = (time.monotonic() - at) * 1000
            lat.append(ms)
            row = {"seq": seq, "latency_ms": round(ms, 2), **row}
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            if "result" in row:
                s.answered += 1
                s.units += int(row["result"]["usage"]["units"])
                s.detections += sum(len(i["detections"]) for i in row["result"]["images"])
            else:
                code = str(row["error"]["code"])
                s.refused[code] = s.refused.get(code, 0) + 1
            if img is not None:
                self._write(draw(img, row["result"]) if "result" in row else img)
            self._progress(s, lat, t0)

        try:
            if self.opts.grpc_target:
                await self._grpc(outgoing(), answered, done_sending, sent, s)
            else:
                await self._websocket(outgoing(), answered, done_sending, sent, s)
        finally:
            if self.writer is not None:
                self.writer.release()
            if self.opts.progress:
                sys.stderr.write("\n")
        s.seconds = time.monotonic() - t0
        s.p50_ms = round(statistics.median(lat), 2) if lat else None
        return s

    def _write(self, img: np.ndarray) -> None:
        if self.video_out is None:
            return
        if self.writer is None:
            h, w = img.shape[:2]
            fourcc = cv2.VideoWriter.fourcc(*("mp4v" if self.video_out.suffix.lower() == ".mp4" else "MJPG"))
            self.writer = cv2.VideoWriter(str(self.video_out), fourcc, self.video_fps, (w, h))
        self.writer.write(img)

    def _progress(self, s: StreamSummary, lat: list[float], t0: float) -> None:
        if not self.opts.progress:
            return
        el = max(time.monotonic() - t0, 1e-9)
        p50 = statistics.median(lat[-200:]) if lat else 0.0
        refused = sum(s.refused.values())
        sys.stderr.write(
            f"\rframes {s.frames}  answered {s.answered}  {s.answered / el:5.1f} fps  "
            f"p50 {p50:6.1f} ms  refused {refused}   "
        )
        sys.stderr.flush()

    async def _websocket(
        self, outgoing: Any, answered: Any, done: asyncio.Event, sent: dict[int, Any], s: StreamSummary
    ) -> None:
        from urllib.parse import urlencode

        import websockets

        params = {"conf": self.opts.conf, "iou": self.opts.iou} | (
            {"model": self.opts.model} if self.opts.model else {}
        )
        url = self.opts.url.rstrip("/").replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        url = f"{url}/v1/detect/stream?{urlencode(params)}"
        headers = {"Authorization": f"Bearer {self.opts.credential}"}
        async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:

            async def send_all() -> None:
                async for _seq, data in outgoing:
                    await ws.send(data)

            sender = asyncio.ensure_future(send_all())
            try:
                while not (done.is_set() and not sent):
                    try:
                        msg = json.loads(await ws.recv())
                    except websockets.ConnectionClosed as closed:
                        if closed.rcvd is not None and closed.rcvd.code == 1008:
                            s.ended_by = closed.rcvd.reason or "closed"
                        break
                    if "seq" not in msg:  # the session's own error (its last message before closing)
                        s.ended_by = str(msg.get("error", {}).get("code", "closed"))
                        continue
                    answered(int(msg["seq"]), {k: v for k, v in msg.items() if k != "seq"})
                    if sender.done() and sender.exception() is not None:
                        break
            finally:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender

    async def _grpc(
        self, outgoing: Any, answered: Any, done: asyncio.Event, sent: dict[int, Any], s: StreamSummary
    ) -> None:
        import grpc

        from serve_app.grpc_api import body_of, error_of
        from serve_app.launcher import APP_NAME
        from serve_app.proto.yolo_tokens.v1 import detect_pb2 as pb
        from serve_app.proto.yolo_tokens.v1 import detect_pb2_grpc as rpc

        async def frames() -> AsyncIterator[pb.Frame]:
            async for seq, data in outgoing:
                yield pb.Frame(image=data, seq=seq, model=self.opts.model or "", conf=self.opts.conf, iou=self.opts.iou)

        md = [("authorization", f"Bearer {self.opts.credential}"), ("application", APP_NAME)]
        assert self.opts.grpc_target is not None
        async with grpc.aio.insecure_channel(self.opts.grpc_target) as channel:
            call = rpc.DetectServiceStub(channel).DetectStream(frames(), metadata=md)
            try:
                async for r in call:
                    if r.HasField("result"):
                        answered(int(r.seq), {"result": body_of(r.result)})
                    elif r.ends_session and r.seq not in sent:
                        s.ended_by = r.error.code
                    else:
                        err = {"code": r.error.code, "message": r.error.message}
                        if r.error.retry_after_s:
                            err["retry_after"] = r.error.retry_after_s
                        answered(int(r.seq), {"error": err})
                        if r.ends_session:
                            s.ended_by = r.error.code
                    if done.is_set() and not sent:
                        break
            except grpc.aio.AioRpcError as exc:
                s.ended_by = error_of(exc.trailing_metadata() or ()).get("code") or exc.code().name.lower()
            finally:
                call.cancel()


def summary_line(s: StreamSummary, out: Path | None) -> str:
    refused = ", ".join(f"{k} {v}" for k, v in sorted(s.refused.items()))
    return (
        f"{s.answered}/{s.frames} frames answered in {s.seconds:.1f} s ({s.fps:.1f} fps"
        + (f", p50 {s.p50_ms:.1f} ms" if s.p50_ms is not None else "")
        + f"), {s.detections} detections, {s.units} units charged"
        + (f"; refused: {refused}" if refused else "")
        + (f"; the service ended the session: {s.ended_by}" if s.ended_by else "")
        + (f"; annotated video in {out}" if out is not None else "")
    )
