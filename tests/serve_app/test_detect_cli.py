"""`yolo-tokens detect FILE|DIR` against the live service: JSON lines, annotated copies, retries, stops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ledger.core.entities import TokenSpec
from serve_app.cli import main
from serve_app.demo.synth import render
from tests.serve_app.conftest import LiveApp

pytestmark = pytest.mark.ray


def credential(app: LiveApp, units: int, **limits: object) -> tuple[str, str]:
    out = app.ledger.create_package(TokenSpec.build(f"cli-{time.monotonic_ns()}", units, **limits))
    return out.token.id, out.credential


def image_folder(root: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        img, _ = render(77, "cli", i, 320)
        p = root / ("sub" if i % 2 else "") / f"img{i}.{'png' if i % 2 else 'jpg'}"
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p)
        paths.append(p)
    return paths


def rows(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_given_a_folder_then_json_lines_in_file_order_annotated_copies_and_bad_files_not_charged(
    live_app: LiveApp, tmp_path: Path
) -> None:
    tid, cred = credential(live_app, 10)
    src = tmp_path / "in"
    good = image_folder(src, 3)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (src / "notes.txt").write_text("not an image, not sent")
    out = tmp_path / "out"
    code = main(["detect", str(src), "--url", live_app.url, "--token", cred, "--out", str(out), "--no-progress"])
    assert code == 1  # one file failed
    got = rows(out / "detections.jsonl")
    assert [Path(str(r["file"])).name for r in got] == ["broken.jpg", "img0.jpg", "img2.jpg", "img1.png"]
    assert got[0]["error"]["code"] == "invalid_image", got  # type: ignore[index]
    assert all(r.get("detections") for r in got[1:]), got
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg")) == [
        "img0.annotated.jpg",
        "img2.annotated.jpg",
        "sub/img1.png.annotated.jpg",
    ]
    with Image.open(out / "sub/img1.png.annotated.jpg") as im:
        assert im.size == Image.open(good[1]).size
    assert live_app.ledger.token(tid).used == 3


def test_given_quota_for_two_then_two_detected_and_the_rest_not_sent(live_app: LiveApp, tmp_path: Path) -> None:
    tid, cred = credential(live_app, 2)
    image_folder(tmp_path / "in", 5)
    env = {**os.environ, "YT_TOKEN": cred}
    r = subprocess.run(
        [sys.executable, "-m", "serve_app.cli", "detect", str(tmp_path / "in"), "--url", live_app.url,
         "--concurrency", "1", "--json"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(got) == 5
    codes = [g.get("error", {}).get("code") for g in got]
    assert codes == [None, None, "quota_exhausted", "not_sent", "not_sent"]
    summary = json.loads(r.stderr.strip().splitlines()[-1])
    assert summary["succeeded"] == 2 and summary["stopped_by"] == "quota_exhausted" and summary["remaining"] == 0
    assert live_app.ledger.token(tid).used == 2


def test_given_a_tight_rate_limit_then_it_waits_for_retry_after_and_every_image_is_detected_once(
    live_app: LiveApp, tmp_path: Path
) -> None:
    tid, cred = credential(live_app, 10, rate="2/s:1")
    image_folder(tmp_path / "in", 4)
    code = main(
        ["detect", str(tmp_path / "in"), "--url", live_app.url, "--token", cred, "--out", str(tmp_path / "o"),
         "--concurrency", "4", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert all("detections" in r for r in rows(tmp_path / "o" / "detections.jsonl"))
    assert live_app.ledger.token(tid).used == 4


def test_given_no_credential_or_no_images_then_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("YT_TOKEN", raising=False)
    assert main(["detect", str(tmp_path)]) == 2
    assert main(["detect", str(tmp_path), "--token", "x"]) == 2
    assert main(["detect", str(tmp_path / "missing.jpg"), "--token", "x"]) == 2
