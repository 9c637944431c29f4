"""Item 9: hostile bodies and images get a 4xx quickly, cost nothing, and leave the replicas serving
with bounded memory."""

from __future__ import annotations

import io
import json
import socket
import struct
import time
import zlib
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from ledger.core.entities import TokenSpec
from tests.hostile.conftest import replica_pids
from tests.serve_app.conftest import LiveApp, jpeg

pytestmark = pytest.mark.ray


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 50_000) -> bytes:
    """A VALID 1-bit grey PNG of side x side pixels (2.5 G pixels), a few hundred KB compressed."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    rows_per_chunk = 512
    parts = [comp.compress(row * min(rows_per_chunk, side - i)) for i in range(0, side, rows_per_chunk)]
    idat = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def replica_rss(name: str) -> dict[int, int]:
    """RSS of each live replica process of a deployment (Ray titles them `ray::ServeReplica:<app>:<name>`)."""
    out = {pid: psutil.Process(pid).memory_info().rss for pid in replica_pids("yolo-tokens", name)}
    assert out, f"no {name} replica process found"
    return out


def test_given_hostile_bodies_then_4xx_no_charge_bounded_memory_and_still_serving(live_app: LiveApp) -> None:
    pkg = live_app.ledger.create_package(TokenSpec.build(f"bodies-{time.monotonic_ns()}", 100))
    tid, cred = pkg.token.id, pkg.credential
    auth = {"Authorization": f"Bearer {cred}"}
    url = f"{live_app.url}/v1/detect"
    before = {n: replica_rss(n) for n in ("Ingress", "Detector-parts-1")}
    good = jpeg()
    truncated = good[: len(good) // 2]
    corrupt = good[:200] + bytes(b ^ 0x5A for b in good[200:600]) + good[600:]
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    multipart = "multipart/form-data; boundary=b"
    # the body fuzz target's first find: this multipart body made the stdlib email parser raise
    # IndexError (a 500); its first byte is the harness's content-type selector
    fuzz_find = (Path(__file__).parent / "data" / "body-multipart-indexerror.bin").read_bytes()[1:]
    typed_cases = {  # body, content type, expected status and code
        "1.9 MB of tiny multipart parts": (b"--b\r\n\r\nx\r\n" * 190_000 + b"--b--\r\n", multipart, 400),
        "multipart that crashed the email parser": (fuzz_find, multipart, 400),
        "JSON nested 5,000 deep": (b"[" * 5000 + b"]" * 5000, "application/json", 400),
    }
    cases = {
        "100 MB body": (b"\x00" * (100 * 1024 * 1024), 413, "payload_too_large"),
        "50k x 50k PNG bomb": (png_bomb(), 413, "image_too_large"),
        "truncated JPEG": (truncated, 400, "invalid_image"),
        "corrupt JPEG": (corrupt, 400, "invalid_image"),
        "zero bytes": (b"", 400, "invalid_image"),
        "wrong magic (GIF)": (buf.getvalue(), 415, "unsupported_media_type"),
        "text": (b"hello, world" * 10, 415, "unsupported_media_type"),
    }
    timings = {}
    for name, (body, status, code) in cases.items():
        t0 = time.perf_counter()
        r = httpx.post(url, content=body, headers={**auth, "Content-Type": "image/jpeg"}, timeout=30)
        timings[name] = round(time.perf_counter() - t0, 3)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (name, r.text)
    for name, (body, ctype, status) in typed_cases.items():
        t0 = time.perf_counter()
        r = httpx.post(url, content=body, headers={**auth, "Content-Type": ctype}, timeout=30)
        timings[name] = round(time.perf_counter() - t0, 3)
        assert (r.status_code, r.json()["error"]["code"]) == (status, "invalid_request"), (name, r.text)

    # a lying Content-Length: 1 MB declared, 10 bytes sent, then the client goes away
    with socket.create_connection(("127.0.0.1", int(live_app.url.rsplit(":", 1)[1]))) as s:
        s.sendall(
            b"POST /v1/detect HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + cred.encode()
            + b"\r\nContent-Type: image/jpeg\r\nContent-Length: 1048576\r\n\r\n" + b"\xff\xd8\xff" + b"\x00" * 7
        )  # fmt: skip
        s.shutdown(socket.SHUT_WR)
        s.settimeout(30)
        try:
            reply = s.recv(4096)  # a 4xx, or the server simply closes: never a 5xx
        except TimeoutError:
            reply = b""
        assert not reply.startswith(b"HTTP/1.1 5"), reply[:200]

    ok = httpx.post(url, content=good, headers={**auth, "Content-Type": "image/jpeg"}, timeout=60)
    assert ok.status_code == 200, ok.text  # still serving
    deadline = time.monotonic() + 30  # admitted from a replica's lease: charged at its next report
    while (used := live_app.ledger.token(tid).used) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert used == 1  # only the good request cost anything
    after = {n: replica_rss(n) for n in before}
    growth = {n: max((after[n].get(pid, 0) - rss) for pid, rss in before[n].items()) for n in before}
    assert all(g < 100 * 1024 * 1024 for g in growth.values()), growth
    print(
        json.dumps(
            {
                "hostile": "bodies",
                "seconds": timings,
                "rss_growth_mb": {n: round(g / 2**20, 1) for n, g in growth.items()},
            }
        )
    )
