"""A Detector deployment scales up under load and back down when idle (short delays in the test config)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from ray import serve

from ledger.core.entities import TokenSpec
from serve_app.app import APP_NAME
from tests.serve_app.conftest import LiveApp, jpeg

pytestmark = pytest.mark.ray

DEPLOYMENT = "Detector-scaler-1"


def running_replicas() -> int:
    deployments = serve.status().applications[APP_NAME].deployments
    assert DEPLOYMENT in deployments, sorted(deployments)
    return int(deployments[DEPLOYMENT].replica_states.get("RUNNING", 0))


def wait_for(pred: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.5)
    return False


def test_given_sustained_load_then_replicas_go_up_and_come_back_down(live_app: LiveApp) -> None:
    cred = live_app.ledger.create_package(TokenSpec("scale", 100_000)).credential
    headers = {"Authorization": f"Bearer {cred}", "Content-Type": "image/jpeg"}
    image = jpeg(320, 320)
    assert running_replicas() == 1

    async def load(seconds: float) -> int:
        async with httpx.AsyncClient(timeout=120) as client:
            stop = time.monotonic() + seconds
            sent = 0

            async def worker() -> None:
                nonlocal sent
                while time.monotonic() < stop and running_replicas() < 2:
                    await client.post(
                        f"{live_app.url}/v1/detect", params={"model": "scaler@1"}, content=image, headers=headers
                    )
                    sent += 1

            await asyncio.gather(*[worker() for _ in range(6)])
            return sent

    sent = asyncio.run(load(60))  # bounded: stops as soon as the second replica runs, or after 60 s
    assert wait_for(lambda: running_replicas() == 2, 30), f"no scale-up after {sent} requests"
    assert wait_for(lambda: running_replicas() == 1, 60), "no scale-down after the load stopped"
