"""Shared fixtures: one local Ray cluster on loopback per test session, fresh databases per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve_app import launcher  # imports neither Ray nor ultralytics

# the test session's entry point: the environment rules (loopback, token auth, the proxy hook, offline)
# before any test module imports Ray or ultralytics, which read them once, when imported
launcher.apply_environment()

from tests.serve_app.conftest import GRPC_PORT, HTTP_PORT, LiveApp, live_args  # noqa: E402

PG_ADMIN_URL = os.environ.get("YT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session", autouse=True)
def no_admin_credential(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The CLI goes over HTTP when it finds an admin credential (ledger/cli.py `open_ledger`): never
    with the one a developer's `make serve` wrote to ~/.yolo-tokens, nor one in the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("YT_ADMIN_FILE", str(tmp_path_factory.mktemp("no-admin") / "admin.json"))
        mp.delenv("YT_ADMIN_TOKEN", raising=False)
        yield


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
        # Ray's agent exports metrics every 10 s by default: the metrics tests poll for them, 1 s apart
        _system_config={"metrics_report_interval_ms": 1000},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def live_app(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    from ray import serve

    from ledger.client.service import attach, stop
    from serve_app.app import APP_NAME, build_app

    tmp: Path = tmp_path_factory.mktemp("serve")
    args = live_args(tmp)
    serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT}, grpc_options=launcher.grpc_options(GRPC_PORT))
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    client = attach(args.ledger_settings())  # build_app launched it
    yield LiveApp(f"http://127.0.0.1:{HTTP_PORT}", args, client)
    serve.delete(APP_NAME)
    stop(client)


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


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The simulator's sweep first: it is CPU-bound on both cores (2,000 seeds in its 2-minute budget,
    issue 17), so it runs before the session's Ray cluster and its replicas share those cores."""
    items.sort(key=lambda item: 0 if "/tests/sim/" in str(item.path) else 1)
