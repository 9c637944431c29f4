"""DetectClient, behind `yolo-tokens detect FILE|DIR`: send images to a running service over HTTP,
paid with a token.

    files (FILE, or DIR recursed, sorted) ──► POST /v1/detect, one image per request,
                                              `--concurrency` in flight
         each request carries Idempotency-Key `detect-<run id>-<index>`, so a retry after a
         dropped connection or a 503 is charged at most once
    ◄── JSON lines (stdout or --out DIR/detections.jsonl) and, with --out, annotated copies

Retried: transport errors and 503 (backoff, same key), 429 `rate_limited` and 503 `model_busy`
(after Retry-After).
Fatal, the rest is not sent: 401, 403, 404 `unknown_model`, 429 `quota_exhausted`.
Anything else (a bad image: 400/413/415) fails that file only. Exit 0 when every file
succeeded, 1 otherwise. No Ray here: this is a plain HTTP client.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
RETRY_AFTER = frozenset({"rate_limited", "model_busy"})  # refusals that say when to come back
FATAL = frozenset(
    {
        "missing_token",
        "invalid_token",
        "expired_token",
        "revoked_token",
        "model_not_allowed",
        "ip_not_allowed",
        "forbidden",
        "unknown_model",
        "quota_exhausted",
    }
)
COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


@dataclass
class DetectOptions:
    url: str
    credential: str
    model: str | None = None
    conf: float = 0.25
    iou: float = 0.7
    concurrency: int = 4
    retries: int = 5
    timeout_s: float = 120.0
    out_dir: Path | None = None
    progress: bool = True


@dataclass
class Outcome:
    file: str
    body: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    attempts: int = 0

    def row(self) -> dict[str, Any]:
        if self.body is None:
            return {"file": self.file, "error": self.error}
        image = self.body["images"][0]
        return {
            "file": self.file,
            "request_id": self.body["request_id"],
            "model": self.body["model"],
            "width": image["width"],
            "height": image["height"],
            "detections": image["detections"],
        }


@dataclass
class Summary:
    files: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    detections: int = 0
    units: int = 0
    remaining: int | None = None
    stopped_by: str | None = None
    per_class: dict[str, int] = field(default_factory=dict)


def output_name(path: Path, root: Path) -> Path:
    """Where the annotated copy (a JPEG) of `path` goes under --out: its place under `root`, named
    `a.annotated.jpg` for `a.jpg` (`.jpeg` kept), `a.png.annotated.jpg` for other formats, so that
    `a.png`, `a.jpg` and `a.jpeg` never collide."""
    rel = path.relative_to(root) if root.is_dir() else Path(path.name)
    if rel.suffix.lower() in (".jpg", ".jpeg"):
        return rel.with_name(f"{rel.stem}.annotated{rel.suffix}")
    return rel.with_name(f"{rel.name}.annotated.jpg")


def find_images(target: Path) -> list[Path]:
    """FILE itself, or every image file under DIR in sorted order."""
    if target.is_file():
        return [target]
    if target.is_dir():
        return sorted(p for p in target.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    raise FileNotFoundError(f"{target} is neither a file nor a directory")


class DetectClient:
    """Sends files to /v1/detect with retries that never charge twice."""

    def __init__(self, opts: DetectOptions, root: Path) -> None:
        self.opts = opts
        self.root = root  # the FILE or DIR given: annotated copies keep their place under it
        self.run_id = uuid.uuid4().hex[:16]
        self.stop = threading.Event()
        self.stop_reason: str | None = None
        self.client = httpx.Client(
            base_url=opts.url.rstrip("/"),
            timeout=opts.timeout_s,
            headers={"Authorization": f"Bearer {opts.credential}", "Content-Type": "application/octet-stream"},
        )

    def close(self) -> None:
        self.client.close()

    def one(self, index: int, path: Path) -> Outcome:
        out = Outcome(str(path))
        if self.stop.is_set():
            out.error = {"code": "not_sent", "message": f"not sent: stopped by {self.stop_reason}"}
            return out
        try:
            data = path.read_bytes()
        except OSError as e:
            out.error = {"code": "unreadable_file", "message": str(e)}
            return out
        params: dict[str, Any] = {"conf": self.opts.conf, "iou": self.opts.iou}
        if self.opts.model:
            params["model"] = self.opts.model
        headers = {"Idempotency-Key": f"detect-{self.run_id}-{index}"}
        delay = 0.5
        while True:
            out.attempts += 1
            try:
                r = self.client.post("/v1/detect", content=data, params=params, headers=headers)
            except httpx.TransportError as e:
                if out.attempts > self.opts.retries:
                    out.error = {"code": "transport_error", "message": str(e) or type(e).__name__}
                    return out
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
                continue
            if r.status_code == 200:
                out.body = r.json()
                return out
            err = _error_of(r)
            code = err.get("code", "")
            retry = (code == "rate_limited" or r.status_code == 503) and out.attempts <= self.opts.retries
            if retry:
                # rate_limited and model_busy say when to come back; other 503s back off
                wait = float(r.headers.get("Retry-After", delay)) if code in RETRY_AFTER else delay
                time.sleep(min(max(wait, 0.05), 60.0))
                delay = min(delay * 2, 8.0)
                continue
            if code in FATAL:
                self.stop_reason = self.stop_reason or code
                self.stop.set()
            out.error = err
            return out

    def run(self, files: list[Path], sink: IO[str]) -> Summary:
        """Detect every file; write one JSON line per file to `sink` in file order."""
        summary = Summary(files=len(files))
        outcomes: dict[int, Outcome] = {}
        next_row = 0
        bar = tqdm(total=len(files), unit="img", disable=not self.opts.progress, file=sys.stderr)
        with ThreadPoolExecutor(max_workers=max(1, self.opts.concurrency)) as pool:
            futures = {pool.submit(self.one, i, p): i for i, p in enumerate(files)}
            for fut in as_completed(futures):
                i = futures[fut]
                outcomes[i] = fut.result()
                self._account(summary, outcomes[i], files[i])
                bar.update(1)
                bar.set_postfix(ok=summary.succeeded, failed=summary.failed + summary.skipped, refresh=False)
                while next_row in outcomes:  # stream rows in file order as they become ready
                    sink.write(json.dumps(outcomes.pop(next_row).row()) + "\n")
                    next_row += 1
                sink.flush()
        bar.close()
        summary.stopped_by = self.stop_reason
        return summary

    def _account(self, summary: Summary, out: Outcome, path: Path) -> None:
        if out.body is None:
            if out.error and out.error.get("code") == "not_sent":
                summary.skipped += 1
            else:
                summary.failed += 1
            return
        summary.succeeded += 1
        usage = out.body["usage"]
        summary.units += int(usage["units"])
        remaining = int(usage["remaining"])
        summary.remaining = remaining if summary.remaining is None else min(summary.remaining, remaining)
        dets = out.body["images"][0]["detections"]
        summary.detections += len(dets)
        for d in dets:
            summary.per_class[d["class_name"]] = summary.per_class.get(d["class_name"], 0) + 1
        if self.opts.out_dir is not None:
            annotate(path, dets, self.opts.out_dir / output_name(path, self.root))


def annotate(src: Path, detections: list[dict[str, Any]], dest: Path) -> None:
    """A JPEG copy of `src` (EXIF orientation applied, as the service sees it) with boxes and labels."""
    with Image.open(src) as im:
        img = ImageOps.exif_transpose(im).convert("RGB")
    draw = ImageDraw.Draw(img)
    width = max(2, round(max(img.size) / 320))
    for d in detections:
        b = d["box"]
        color = COLORS[int(d["class_id"]) % len(COLORS)]
        draw.rectangle((b["x1"], b["y1"], b["x2"], b["y2"]), outline=color, width=width)
        label = f"{d['class_name']} {d['confidence']:.2f}"
        left, top, right, bottom = draw.textbbox((b["x1"], b["y1"]), label)
        h = bottom - top
        y = b["y1"] - h - 2 if b["y1"] - h - 2 >= 0 else b["y1"]
        draw.rectangle((b["x1"], y, b["x1"] + (right - left) + 4, y + h + 2), fill=color)
        draw.text((b["x1"] + 2, y), label, fill=(255, 255, 255))
    dest.parent.mkdir(parents=True, exist_ok=True)
    img.save(dest, format="JPEG", quality=90)


def _error_of(r: httpx.Response) -> dict[str, Any]:
    try:
        err = r.json()["error"]
        if isinstance(err, dict):
            return {"status": r.status_code, **err}
    except (ValueError, KeyError, TypeError):
        pass
    return {"status": r.status_code, "code": f"http_{r.status_code}", "message": r.text[:200]}
