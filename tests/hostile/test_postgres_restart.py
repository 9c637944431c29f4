"""Item 4: the ledger's PostgreSQL goes down under load and comes back. The test starts its OWN
server (initdb into a temporary folder, its own port; the machine's server is left alone).
While it is down, a token with units escrowed in the ingress's lease is served from them
(DESIGN §3a) and anything beyond needs the database: 503 `ledger_unavailable`, as for a token
with nothing escrowed. Full recovery after, and every answer served is debited, none lost."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ledger.client.service import attach, stop
from ledger.core.entities import TokenSpec
from ledger.store.repository import Store, UsageQuery
from tests.hostile.conftest import side_app_args
from tests.serve_app.conftest import LiveApp, jpeg

pytestmark = [pytest.mark.ray, pytest.mark.postgres]
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)


def as_postgres(*cmd: str) -> subprocess.CompletedProcess[str]:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120, check=True)


class PrivatePostgres:
    def __init__(self, root: Path) -> None:
        assert PG_BIN is not None, "PostgreSQL server binaries not found"
        self.data = root / "pgdata"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        root.chmod(0o777)
        as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres", "--no-sync")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data} -c fsync=on"
        # -l: the server writes its own log file, so it holds none of our pipes open
        log = str(self.data.parent / "postgres.log")
        as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", log, "-o", opts, "-w", "-t", "60", "start")

    def stop(self) -> None:
        as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    if PG_BIN is None or shutil.which("runuser") is None:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) and runuser are required")
    # not under pytest's tmp (0700, root's): the postgres user must be able to reach it
    root = Path(tempfile.mkdtemp(prefix="yt-pg-"))
    pg = PrivatePostgres(root)
    pg.start()
    try:
        yield pg
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(pg.data), "-m",
                        "immediate", "stop"], capture_output=True, check=False)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


async def fire(url: str, credential: str, n: int) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {credential}", "Content-Type": "image/jpeg"}
    async with httpx.AsyncClient(timeout=180) as client:
        return await asyncio.gather(*(client.post(url, content=jpeg(64, 48), headers=headers) for _ in range(n)))


def test_given_postgres_restarted_under_load_then_503_while_down_and_no_lost_debit(
    live_app: LiveApp, private_pg: PrivatePostgres, tmp_path: Path
) -> None:
    from ray import serve

    from serve_app.app import build_app

    args = side_app_args(private_pg.url, tmp_path, f"pg-ledger-{uuid.uuid4().hex[:6]}")
    serve.run(build_app(args), name="pg-app", route_prefix="/pg")
    url = f"{live_app.url}/pg/v1/detect"
    client = attach(args.ledger_settings())
    try:
        pkg = client.create_package(TokenSpec.build("pg-restart", 10_000))
        tid, cred = pkg.token.id, pkg.credential
        fresh = client.create_package(TokenSpec.build("pg-restart-fresh", 10_000))  # nothing escrowed for it
        before = asyncio.run(fire(url, cred, 10))
        assert [r.status_code for r in before] == [200] * 10
        private_pg.stop()
        down = asyncio.run(fire(url, cred, 10))
        assert {r.status_code for r in down} <= {200, 503}, [r.text for r in down]
        assert {r.json()["error"]["code"] for r in down if r.status_code == 503} <= {"ledger_unavailable"}
        down_fresh = asyncio.run(fire(url, fresh.credential, 10))
        assert {r.status_code for r in down_fresh} == {503}, [r.text for r in down_fresh]
        assert {r.json()["error"]["code"] for r in down_fresh} == {"ledger_unavailable"}
        private_pg.start()
        deadline = time.monotonic() + 60
        while (after := asyncio.run(fire(url, cred, 10))) and any(r.status_code != 200 for r in after):
            assert time.monotonic() < deadline, [r.text for r in after]
            time.sleep(1)
        served = [r.json()["request_id"] for r in before + down + after if r.status_code == 200]
        store = Store(private_pg.url)
        try:
            # answers from the lease are debited with the ingress's reports, and a refund the ledger could
            # not take while PostgreSQL was down is retried in the background: read until rows and `used`
            # agree (each read is one instant: a refund landing between them moves both)
            deadline = time.monotonic() + 60
            while True:
                rows = store.usage(UsageQuery(token_id=tid, limit=10_000))
                debited = {r["request_id"] for r in rows if r["outcome"] == "ok" and r["state"] != "refunded"}
                used = client.token(tid).used
                if (set(served) <= debited and used == len(debited)) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            store.close()
        assert set(served) <= debited and used == len(debited)
        assert client.token(fresh.token.id).used == 0
        report = client.consistency()
        assert report.violations == []
        assert {k: tuple(v) for k, v in report.book.items()} == {k: tuple(v) for k, v in report.db.items()}
        down_200 = sum(r.status_code == 200 for r in down)
        print(json.dumps({"hostile": "postgres_restart", "before": len(before), "down_200": down_200,
                          "down_503": len(down) + len(down_fresh) - down_200, "after": len(after),
                          "debited": len(debited)}))  # fmt: skip
    finally:
        serve.delete("pg-app")

        stop(client)
