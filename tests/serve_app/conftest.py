"""What the HTTP and handle tests share: the live app's record and a test image. The live app itself
(one per test session, for the serving and the hostile suites alike) is the `live_app` fixture of
tests/conftest.py: a fixture defined in two conftest files is two apps."""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from serve_app.config import DEMO_WEIGHTS, AppArgs, Autoscaling, ModelSpec, RequestLimits, SchedulerArgs

HTTP_PORT = 8123
GRPC_PORT = 9123  # Serve's gRPC proxy of the test session (whichever fixture starts Serve first)


@dataclass
class LiveApp:
    url: str
    args: AppArgs
    ledger: Any  # LedgerClient


def jpeg(w: int = 160, h: int = 120, color: tuple[int, int, int] = (120, 120, 120)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="JPEG")
    return buf.getvalue()


def live_args(tmp: Path) -> AppArgs:
    """The live app: three model versions (a hot one, a cold one, one that autoscales), 2 ingress replicas."""
    return AppArgs(
        database_url=f"sqlite:///{tmp / 'ledger.db'}",
        data_dir=tmp,
        ledger_name=f"ledger-{uuid.uuid4().hex[:8]}",
        namespace="yt-tests",
        models=[
            ModelSpec(
                name="parts",
                version="1",
                weights=DEMO_WEIGHTS,
                imgsz=320,
                autoscaling=Autoscaling(min_replicas=1, max_replicas=1),
                # the quota tests burst hundreds of requests at one tenant on one CPU replica: a
                # queue bound of 20 s keeps them all (the default 1 s would shed part of the burst
                # as model_busy, refunded; tests/hostile/test_isolation.py tests that)
                scheduler=SchedulerArgs(queue_s=20.0),
            ),
            ModelSpec(
                name="parts",
                version="2",
                weights=DEMO_WEIGHTS,
                imgsz=320,
                cost_units=2,
                num_cpus=0.5,
                autoscaling=Autoscaling(min_replicas=0, max_replicas=1, downscale_delay_s=600),
            ),
            # short delays so that the autoscaling test sees it go up under load and back down
            ModelSpec(
                name="scaler",
                version="1",
                weights=DEMO_WEIGHTS,
                imgsz=320,
                num_cpus=0.5,
                max_batch_size=1,
                autoscaling=Autoscaling(
                    min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0, downscale_delay_s=3
                ),
            ),
        ],
        default_model="parts@1",
        ingress_replicas=2,  # the hostile burst goes through more than one ingress
        limits=RequestLimits(max_body_bytes=2 * 1024 * 1024, trusted_proxies=["127.0.0.2/32"]),
    )
