"""Writes the upgrade fixtures `ledger_vNNNN.db` / `ledger_vNNNN.pg.sql` and their expected rows.

Run with the code of the version that wrote schema NNNN, never with the current code:
0002 = commit 55df6a3, 0003 = commit 469b93a (the last landed version before schema 0004), e.g.:

    git worktree add --detach /tmp/yt-prev 469b93a
    cd /tmp/yt-prev && PYTHONPATH=/tmp/yt-prev /work/main/.venv/bin/python \
        /work/main/tests/ledger/data/make_ledger_fixture.py /work/main/tests/ledger/data 0003

It drives a `LedgerCore` through packages, splits, admissions (settled, refunded, partially
charged, pending, idempotent) and denials, an alert (delivered and acknowledged) and admin
events, then writes every table's rows and the book's token views as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import select

from ledger.core import LedgerCore
from ledger.core.entities import Admission, Settlement, TokenSpec
from ledger.core.settings import LedgerSettings
from ledger.store.models import AdminEventRow, AlertRow, IdempotencyRow, TokenRow, UsageEventRow

T0 = 1_795_000_000.0  # 2026-11-19: the fixture's clock; the test reads it back from the JSON
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
TABLES = {
    "tokens": (TokenRow, "id"),
    "usage_events": (UsageEventRow, "id"),
    "admin_events": (AdminEventRow, "id"),
    "alerts": (AlertRow, "id"),
    "idempotency": (IdempotencyRow, "key"),
}


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        self.t += 0.25  # every reading is later: distinct created_at, settled_at
        return self.t


def scenario(core: LedgerCore) -> dict[str, Any]:
    """Every kind of row the schema holds; returns what the test needs to act on them."""

    def step(x: Any) -> Any:
        core.commit()
        return x

    meta = {"alert_emails": ["pm@example.com"], "cost_centre": "CC-7"}
    spec = TokenSpec.build("acme", 1000, rate="pro", team="vision", models=["parts"], ips=["10.0.0.0/8"], meta=meta)
    root = step(core.create_package(spec))["token"].id
    a = step(core.split(root, TokenSpec.build("frontend", 100, team="web")))["token"].id
    a1 = step(core.split(a, TokenSpec.build("frontend-ci", 20)))["token"].id
    b = step(core.split(root, TokenSpec.build("batch", 50, rate="2/min:2")))["token"].id
    c = step(core.split(root, TokenSpec.build("gone", 30)))["token"].id
    jti = {t: core.book.nodes[t].jti for t in (root, a, a1, b, c)}

    def admit(rid: str, tid: str, units: int = 1, model: str = "parts@1", ip: str = "10.0.0.1", **kw: Any) -> str:
        d = core.admit_rows([Admission(rid, tid, kw.pop("jti", jti[tid]), units, model, ip, **kw).row()])[0]
        core.commit()
        return str(d.code.value)

    def settle(rid: str, tid: str, success: bool, **kw: Any) -> None:
        core.settle_rows([Settlement(rid, tid, success, **kw).row()])
        core.commit()

    outcomes = {}
    for i in range(6):
        outcomes[f"a-{i}"] = admit(f"a-{i}", a, units=2)
    settle("a-0", a, True, latency_ms=12.5, detections=3, gpu_ms=4.0)
    settle("a-1", a, True, charged=1, latency_ms=8.0, detections=1, gpu_ms=2.0)
    settle("a-2", a, False, latency_ms=30.0)  # refunded
    outcomes["a1-big"] = admit("a1-big", a1, units=17)  # crosses 80 % of a1: an alert
    settle("a1-big", a1, True)
    outcomes["a1-quota"] = admit("a1-quota", a1, units=4)  # denied: quota
    outcomes["a-model"] = admit("a-model", a, model="other@1")  # denied: model
    outcomes["a-ip"] = admit("a-ip", a, ip="192.168.0.9")  # denied: IP
    for i in range(3):  # 2/min burst 2: the third is rate limited
        outcomes[f"b-{i}"] = admit(f"b-{i}", b)
    outcomes["idem-done"] = admit("idem-done", root, idem_key="key-done", body_hash="h-done")
    settle("idem-done", root, True, result='{"images": [], "stored": true}')
    outcomes["idem-pending"] = admit("idem-pending", root, idem_key="key-pending", body_hash="h-pending")
    outcomes["plain-pending"] = admit("plain-pending", root, units=3)
    step(core.top_up(root, 500))
    step(core.reclaim(a, 10))
    step(core.revoke(c))
    step(core.rotate(b))
    outcomes["b-old-jti"] = admit("b-old-jti", b, jti=jti[b])  # denied: rotated out
    alert_id = core.store.alerts()[0]["id"]
    core.store.record_delivery(
        alert_id,
        channels={"email:pm@example.com": {"status": "delivered", "attempts": 1, "error": None, "at": T0 + 99}},
        status="delivered",
        attempts=1,
        delivered_at=T0 + 99,
    )
    core.store.acknowledge_alert(alert_id, "pm", T0 + 100)
    return {
        "tokens": {"root": root, "a": a, "a1": a1, "b": b, "c": c},
        "jti": {k: core.book.nodes[t].jti for k, t in {"root": root, "a": a, "b": b}.items()},
        "outcomes": outcomes,
        "views": {n.id: _plain_view(n.view()) for n in core.book.nodes.values()},
        "violations": core.book.invariant_violations(),
    }


def _plain_view(view: Any) -> dict[str, Any]:
    return asdict(view)


def dump_rows(core: LedgerCore) -> dict[str, list[dict[str, Any]]]:
    out = {}
    with core.store.engine.connect() as conn:
        for name, (model, key) in TABLES.items():
            table = model.__table__
            rows = conn.execute(select(table).order_by(table.c[key])).mappings()  # type: ignore[attr-defined]
            out[name] = [dict(r) for r in rows]
    return out


def build(url: str, data_dir: Path) -> dict[str, Any]:
    core = LedgerCore(LedgerSettings(database_url=url, data_dir=data_dir, sweep_interval_s=0), clock=Clock())
    core.start()
    facts = scenario(core)
    rows = dump_rows(core)
    if url.startswith("sqlite"):  # everything into the main file: the fixture is that one file
        with core.store.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    core.close()
    return {"t0": T0, **facts, "rows": rows}


def main(out_dir: Path, version: str) -> None:
    expected: dict[str, Any] = {}
    scratch = f"yt_fixture_v{version}"
    sqlite_file = out_dir / f"ledger_v{version}.db"
    sqlite_file.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        expected["sqlite"] = build(f"sqlite:///{sqlite_file}", Path(tmp) / "sqlite")
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{scratch}"')
        try:
            expected["postgres"] = build(f"postgresql+psycopg://postgres@127.0.0.1:5432/{scratch}", Path(tmp) / "pg")
            options = ["--no-owner", "--no-privileges", "--inserts", "-h", "127.0.0.1", "-U", "postgres"]
            dump = subprocess.run(
                ["pg_dump", *options, scratch],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            (out_dir / f"ledger_v{version}.pg.sql").write_text(dump)
        finally:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
    for suffix in ("-wal", "-shm"):
        stray = Path(f"{sqlite_file}{suffix}")
        if stray.exists() and stray.stat().st_size:
            raise RuntimeError(f"{stray} still holds pages: the fixture would be incomplete")
        stray.unlink(missing_ok=True)
    text = json.dumps(expected, indent=1, sort_keys=True, default=str)
    (out_dir / f"ledger_v{version}.expected.json").write_text(text + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
