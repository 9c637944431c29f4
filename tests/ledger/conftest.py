from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger.core.settings import LedgerSettings


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> LedgerSettings:
    return LedgerSettings(
        database_url=db_url,
        data_dir=tmp_path / "data",
        actor_name=f"ledger-{uuid.uuid4().hex[:8]}",
        namespace="yt-tests",
        sweep_interval_s=0,
        shards=3,  # the actor tests run against a sharded ledger: packages land on different shards
    )


@pytest.fixture
def ledger(ray_cluster: None, settings: LedgerSettings) -> Iterator[object]:
    from ledger.client.service import launch, stop

    client = launch(settings)
    yield client
    stop(client)
