"""`yolo-tokens stream VIDEO --fps N [--grpc]` against the live service, on a video file written here
with OpenCV from the demo's synthetic parts: per-frame JSON lines in order, an annotated video with as
many frames, and exactly the answered frames charged."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from ledger.core.entities import TokenSpec
from serve_app.cli import main
from serve_app.demo.synth import render
from tests.hostile.lease_helpers import wait_until
from tests.serve_app.conftest import GRPC_PORT, LiveApp

pytestmark = pytest.mark.ray

FRAMES = 24


def video(path: Path, n: int = FRAMES, size: tuple[int, int] = (320, 240)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 15.0, size)
    for i in range(n):
        img, _ = render(5, "stream", i, max(size))
        rgb = np.asarray(img.convert("RGB").resize(size))
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def frame_count(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


@pytest.mark.parametrize("transport", ["websocket", "grpc"])
def test_given_a_video_file_when_streamed_then_every_frame_is_answered_in_order_and_charged(
    live_app: LiveApp, tmp_path: Path, capsys: pytest.CaptureFixture[str], transport: str
) -> None:
    made = live_app.ledger.create_package(TokenSpec.build(f"stream-{time.monotonic_ns()}", 1000))
    src = video(tmp_path / "line.avi")
    out = tmp_path / "annotated.avi"
    argv = ["stream", str(src), "--fps", "10", "--url", live_app.url, "--token", made.credential,
            "--model", "parts@1", "--out-video", str(out), "--json"]  # fmt: skip
    if transport == "grpc":
        argv += ["--grpc", "--grpc-target", f"127.0.0.1:{GRPC_PORT}"]
    code = main(argv)
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines() if line.strip()]
    summary = json.loads(captured.err.strip().splitlines()[-1])
    assert [r["seq"] for r in rows] == list(range(FRAMES))
    answered = [r for r in rows if "result" in r]
    # 10 frames/s on a CPU model: none should be dropped, but a dropped frame is model_busy, unpaid
    assert {r["error"]["code"] for r in rows if "error" in r} <= {"model_busy"}
    assert code == (0 if len(answered) == FRAMES else 1)
    assert all(r["result"]["model"] == {"name": "parts", "version": "1"} for r in answered)
    assert all(r["result"]["images"][0]["width"] == 320 for r in answered)
    assert summary["answered"] == len(answered) and summary["units"] == len(answered)
    assert frame_count(out) == FRAMES
    wait_until(lambda: live_app.ledger.token(made.token.id).used, lambda u: u == len(answered), 30, "charged")


def test_given_no_such_video_then_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stream", str(tmp_path / "none.mp4"), "--token", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
