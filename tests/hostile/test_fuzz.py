"""Item 10: atheris over image decoding, body parsing, credential parsing and split limits.

Each target (tests/hostile/fuzz_targets.py) runs in its own process from a seed corpus written
here, for a bounded number of inputs (`YT_FUZZ_RUNS`, `YT_FUZZ_SECONDS` for more) and a fixed
libFuzzer seed; any uncaught exception, assertion, timeout or memory blow-up fails the test with
libFuzzer's report and the crashing input saved under the test's temporary folder.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SEED = 20261129
# inputs per target in `make test`: enough for the mutator to reach past the seeds' headers
RUNS = {"image": 4000, "body": 4000, "credential": 60000, "limits": 60000}


def _image(fmt: str, mode: str = "RGB", size: tuple[int, int] = (12, 9), **save: object) -> bytes:
    buf = io.BytesIO()
    img = Image.new(mode, size)
    for x in range(size[0]):  # not flat: the encoders keep their real structure
        img.putpixel((x, x % size[1]), (x * 20) % 256 if mode in ("L", "P", "1") else ((x * 20) % 256, 40, 200))
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def image_seeds() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the decoder applies EXIF orientation
    return {
        "jpeg": _image("JPEG"),
        "jpeg-progressive": _image("JPEG", progressive=True, quality=50),
        "jpeg-gray": _image("JPEG", "L"),
        "jpeg-exif": _image("JPEG", exif=exif.tobytes()),
        "png": _image("PNG"),
        "png-interlaced": _image("PNG", interlace=1),
        "png-palette": _image("PNG", "P"),
        "png-rgba": _image("PNG", "RGBA"),
        "png-1bit": _image("PNG", "1"),
        "webp": _image("WEBP"),
        "webp-lossless": _image("WEBP", lossless=True),
        "bmp": _image("BMP"),
        "bmp-palette": _image("BMP", "P"),
    }


def corpus(target: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    images = image_seeds()
    if target == "image":
        seeds = dict(images)
    elif target == "body":
        # the harness reads one byte for the content type (0 raw, 1 JSON, 2 multipart), then the body
        jpeg = images["jpeg"]
        multipart = (
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + jpeg + b"\r\n--b--\r\n"
        )
        seeds = {
            "raw": b"\x00" + jpeg,
            "json": b"\x01" + json.dumps({"images": [base64.b64encode(images["png"]).decode()]}).encode(),
            "multipart": b"\x02" + multipart,
            # regression: a find of this target (the stdlib email parser raised IndexError on it)
            "found-indexerror": (Path(__file__).parent / "data" / "body-multipart-indexerror.bin").read_bytes(),
        }
    else:  # structured targets: libFuzzer starts from small random inputs
        seeds = {"zero": b"\x00" * 16, "mid": bytes(range(64))}
    for name, data in seeds.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("target", list(RUNS))
def test_given_fuzzed_input_then_every_outcome_is_a_result_or_a_table_error(target: str, tmp_path: Path) -> None:
    runs = int(os.environ.get("YT_FUZZ_RUNS", RUNS[target]))
    seconds = int(os.environ.get("YT_FUZZ_SECONDS", "120"))
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    cmd = [
        sys.executable, "-m", "tests.hostile.fuzz_targets", target, str(corpus(target, tmp_path / "corpus")),
        f"-runs={runs}", f"-max_total_time={seconds}", f"-seed={SEED}", "-timeout=10", "-rss_limit_mb=2048",
        f"-artifact_prefix={artifacts}/", "-print_final_stats=1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120, env=env, check=False)
    report = done.stderr + done.stdout
    assert done.returncode == 0, f"{target}: libFuzzer found a crash ({list(artifacts.iterdir())}):\n{report[-6000:]}"
    assert not list(artifacts.iterdir())
    ran = int(re.search(r"Done (\d+) runs in (\d+) second", report).group(1))  # type: ignore[union-attr]
    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", report)[-1]
    assert ran >= min(runs, 1000), report[-3000:]  # it really ran
    print(json.dumps({"hostile": "fuzz", "target": target, "runs": ran, "seed": SEED, "coverage_edges": int(cov[0]),
                      "corpus": int(cov[2]), "crashes": 0}))  # fmt: skip
