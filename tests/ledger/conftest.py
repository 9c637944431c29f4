from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger.settings import LedgerSettings


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> LedgerSettings:
    return LedgerSettings(
        database_url=db_url,
        data_dir=tmp_path / "data",
        actor_name=f"ledger-{uuid.uuid4().hex[:8]}",
        namespace="yt-tests",
        sweep_interval_s=0,
    )


@pytest.fixture
def ledger(ray_cluster: None, settings: LedgerSettings) -> Iterator[object]:
    import ray

    from ledger.client import LedgerClient

    client = LedgerClient.connect(settings)
    yield client
    ray.kill(client.actor, no_restart=True)
