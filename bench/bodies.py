"""Multipart body parsing: the ingress's bounded parser against the stdlib `email` parser it
replaced, side by side on the same bodies (JSON lines; the last line is the summary).

The parse runs on the ingress replica's event loop before any charge, so its time is time every
other request on that replica waits. Hostile bodies are refused (400) by the new parser; the
stdlib parser's time is what they cost before the fix.

    python -m bench.bodies [--repeat 3] [--mb 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP

from serve_app.errors import ApiError
from serve_app.http import images_from_body

CTYPE = "multipart/form-data; boundary=b"


def stdlib_images(content_type: str, body: bytes) -> list[bytes]:
    """The code this replaced (serve_app/http.py before the fuzzing fix)."""
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    out = []
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") == "image":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                out.append(payload)
    return out


def bodies(mb: float) -> dict[str, bytes]:
    size = int(mb * 1024 * 1024)
    image = os.urandom(size // 2).replace(b"\r\n--b", b"\r\n--c")
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    return {
        "one image": part + image + b"\r\n--b--\r\n",
        "16 images": b"".join(part + image[: size // 32] + b"\r\n" for _ in range(16)) + b"--b--\r\n",
        "tiny parts (hostile)": b"--b\r\n\r\nx\r\n" * (size // 10) + b"--b--\r\n",
    }


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, str]:
    times, outcome = [], ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        try:
            out = fn()
            outcome = f"{len(out)} images" if isinstance(out, list) else "ok"
        except ApiError as exc:
            outcome = f"400 {exc.code}"
        times.append(time.perf_counter() - t0)
    return statistics.median(times), outcome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mb", type=float, default=2.0, help="body size (the live test app's body limit is 2 MB)")
    a = ap.parse_args()
    rows = []
    for name, body in bodies(a.mb).items():
        new_s, new_out = timed(lambda body=body: images_from_body(CTYPE, body, 16), a.repeat)
        old_s, old_out = timed(lambda body=body: stdlib_images(CTYPE, body), a.repeat)
        row = {
            "body": name,
            "bytes": len(body),
            "bounded_s": round(new_s, 5),
            "bounded": new_out,
            "stdlib_email_s": round(old_s, 5),
            "stdlib_email": old_out,
            "stdlib_over_bounded": round(old_s / new_s, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    machine = f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(json.dumps({"summary": "bodies", "machine": machine, "repeat": a.repeat, "mb": a.mb, "rows": rows}))


if __name__ == "__main__":
    main()
