"""Shared fixtures: one local Ray cluster on loopback per test session, fresh databases per test."""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray starts: stay on loopback
os.environ["RAY_AUTH_MODE"] = "token"  # as the CLI and `make serve` use it; Ray reads it once, at import
os.environ["FORWARDED_ALLOW_IPS"] = ""  # Serve's uvicorn must not trust X-Forwarded-For (see ledger.local)
# Serve's request ids are Ray's, not the client's (serve_app/proxy_hooks.py)
from serve_app.proxy_hooks import CALLBACK, CALLBACK_VAR  # imports only starlette, not Ray

os.environ[CALLBACK_VAR] = CALLBACK
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("YT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(
        address="local",
        num_cpus=6,  # logical: the live app, its side apps and the ledger fit; the 2 real cores are shared
        include_dashboard=False,
        namespace="yt-tests",
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def _pg_database() -> Iterator[str]:
    import psycopg

    name = f"yt_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            raise  # CI machines run PostgreSQL: never skip there
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        yield from _pg_database()
