"""The handle API from a separate Ray driver process: same checks and accounting as HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import ray

from ledger.core.entities import TokenSpec
from tests.serve_app.conftest import LiveApp

pytestmark = pytest.mark.ray

DRIVER = textwrap.dedent("""
    import io, json, sys
    import ray
    from ray import serve
    from PIL import Image
    from serve_app.demo.synth import render
    address, token = sys.argv[1], sys.argv[2]
    ray.init(address=address, log_to_driver=False)
    handle = serve.get_app_handle("yolo-tokens")
    images = []
    for i in range(3):
        buf = io.BytesIO()
        render(11, "driver", i, 320)[0].save(buf, format="JPEG")
        images.append(buf.getvalue())
    out = {"batch": handle.detect.remote(token=token, images=images).result()}
    out["again"] = handle.detect.remote(token=token, images=images[:1], request_id="job-7").result()
    out["replay"] = handle.detect.remote(token=token, images=images[:1], request_id="job-7").result()
    try:
        handle.detect.remote(token=token, images=images[:1], model="nosuch").result()
    except Exception as exc:
        out["denied"] = [getattr(exc, "code", None), getattr(exc, "status", None)]
    # handles go over gRPC (RAY_SERVE_USE_GRPC_BY_DEFAULT): a photo whose pixels pass a replica's
    # 4 MiB gRPC message reaches the detector through the object store, and a body past the app's
    # limit is payload_too_large, not a gRPC transport error
    import numpy as np
    buf = io.BytesIO()
    noise = np.random.default_rng(3).integers(0, 255, (1200, 1600, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG", quality=60)
    big = handle.detect.remote(token=token, images=[buf.getvalue()]).result()
    out["big"] = [len(buf.getvalue()), big["images"][0]["width"]]
    try:
        handle.detect.remote(token=token, images=[bytes([255, 216, 255]) + bytes(5 * 1024 * 1024)]).result()
    except Exception as exc:
        out["too_large"] = getattr(exc, "code", repr(exc)[:200])
    print("RESULT " + json.dumps(out))
""")


def test_given_a_ray_job_when_it_detects_through_the_handle_then_usage_is_charged(live_app: LiveApp) -> None:
    pkg = live_app.ledger.create_package(TokenSpec("job", 10))
    tid = pkg.token.id
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, ray.get_runtime_context().gcs_address, pkg.credential],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert len(out["batch"]["images"]) == 3
    assert out["batch"]["usage"]["units"] == 3
    assert sum(len(im["detections"]) for im in out["batch"]["images"]) > 0
    assert out["replay"]["request_id"] == out["again"]["request_id"]  # request_id is the idempotency key
    assert out["denied"] == ["unknown_model", 404]
    assert out["big"][1] == 1600 and out["big"][0] < live_app.args.limits.max_body_bytes
    assert out["too_large"] == "payload_too_large"
    assert live_app.ledger.token(tid).used == 5
