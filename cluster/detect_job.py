"""A Ray job that detects through the running service's handle (README: "From a Ray job").

    export RAY_AUTH_MODE=token
    umask 077; printf %s "$TOKEN" > ~/.yt-token                  # the credential in a file, not in argv
    ray job submit --address http://127.0.0.1:8265 --working-dir cluster -- \
        python detect_job.py --token-file ~/.yt-token /abs/path/part.jpg
    # or as a driver of your own:  YT_TOKEN=... python cluster/detect_job.py --address 127.0.0.1:6380 part.jpg

The credential comes from `--token-file` or `$YT_TOKEN`: a job's entrypoint is logged and listed by
`ray job list`, so `--token` on the command line (still accepted) puts it there.

Prints one JSON line per image file with its detections and the units charged. Same checks and
accounting as HTTP; `--request-id` makes a retry free (the handle's idempotency key).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import ray
from ray import serve

from serve_app import launcher


def main() -> int:
    # a driver of a cluster that may span machines (local=False): the node address and token auth
    # are Ray's to find, so nothing Ray reads when imported changes here
    launcher.apply_environment(local=False)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"), help="Ray cluster (GCS) address")
    ap.add_argument("--token-file", type=Path, help="a file holding the credential (the job's entrypoint is logged)")
    ap.add_argument(
        "--token", default=os.environ.get("YT_TOKEN"), help="credential (default: $YT_TOKEN); prefer --token-file"
    )
    ap.add_argument("--model", default=None, help="name or name@version")
    ap.add_argument("--request-id", default=None, help="idempotency key of the call")
    a = ap.parse_args()
    if a.token_file is not None:
        try:
            a.token = a.token_file.expanduser().read_text().strip()
        except OSError as exc:
            print(f"error: cannot read --token-file {a.token_file}: {exc.strerror}", file=sys.stderr)
            return 2
    if not a.token:
        print("error: give --token-file, $YT_TOKEN or --token", file=sys.stderr)
        return 2
    ray.init(address=a.address, log_to_driver=False)
    handle = serve.get_app_handle("yolo-tokens")
    try:
        result = handle.detect.remote(
            token=a.token, images=[p.read_bytes() for p in a.images], model=a.model, request_id=a.request_id
        ).result(timeout_s=300)
    except Exception as exc:  # a denial: ApiError with its code from the error table
        print(json.dumps({"error": getattr(exc, "code", type(exc).__name__), "message": str(exc)[:300]}))
        return 1
    for path, image in zip(a.images, result["images"], strict=True):
        print(json.dumps({"file": str(path), "detections": image["detections"], "units": result["usage"]["units"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
