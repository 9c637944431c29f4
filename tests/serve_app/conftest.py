"""A real Ray Serve app on 127.0.0.1 for the HTTP and handle tests (one per test session)."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from serve_app.config import DEMO_WEIGHTS, AppArgs, Autoscaling, ModelSpec, RequestLimits

HTTP_PORT = 8123


@dataclass
class LiveApp:
    url: str
    args: AppArgs
    ledger: Any  # LedgerClient


def jpeg(w: int = 160, h: int = 120, color: tuple[int, int, int] = (120, 120, 120)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def live_app(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    from ray import serve

    from ledger.service import attach, stop
    from serve_app.app import APP_NAME, build_app

    tmp: Path = tmp_path_factory.mktemp("serve")
    args = AppArgs(
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
    serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    client = attach(args.ledger_settings())  # build_app launched it
    yield LiveApp(f"http://127.0.0.1:{HTTP_PORT}", args, client)
    serve.delete(APP_NAME)
    stop(client)
