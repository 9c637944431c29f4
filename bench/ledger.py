"""Ledger admission throughput: micro-batched client vs one actor call per admission.

Both modes run in the same process tree, against the same durable actor (group commit,
SQLite WAL synchronous=FULL or PostgreSQL), from N caller processes with C concurrent
requests each. Prints one JSON object per measurement; the LAST line is the summary.

    python -m bench.ledger [--db sqlite|postgres] [--callers 2] [--concurrency 256] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from serve_app import launcher  # neither Ray nor ultralytics

if __name__ == "__main__":  # run as a script: the rules before Ray and ultralytics, imported below, read them
    launcher.apply_environment()

import psycopg
import ray

from ledger.client import LedgerClient
from ledger.credentials import Verifier
from ledger.entities import Admission, TokenSpec
from ledger.service import launch
from ledger.settings import LedgerSettings


@ray.remote(num_cpus=0)
class Caller:
    def __init__(self, coordinator: Any, shards: list[Any]) -> None:
        self.client = LedgerClient(coordinator, shards)
        self.shards = shards

    async def run(self, mode: str, token_id: str, jti: str, concurrency: int, seconds: float) -> dict[str, Any]:
        lat: list[float] = []
        ok = 0
        stop = time.perf_counter() + seconds
        prefix = uuid.uuid4().hex[:8]
        counter = 0

        async def worker() -> None:
            nonlocal ok, counter
            while time.perf_counter() < stop:
                counter += 1
                a = Admission(f"{prefix}-{counter}", token_id, jti, 1, "parts@1", "127.0.0.1", root_id=token_id)
                t0 = time.perf_counter()
                if mode == "batched":
                    d = await self.client.admit(a)
                    good = d.admitted
                else:
                    shard = self.shards[self.client.shard_map.of_root(token_id)]
                    rows = await shard.admit_batch.remote([a.row()])
                    good = rows[0][0] == "ok"
                lat.append(time.perf_counter() - t0)
                ok += good

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return {"n": len(lat), "ok": ok, "elapsed": time.perf_counter() - t0, "lat": lat}


def measure(mode: str, callers: list[Any], token_id: str, jti: str, concurrency: int, seconds: float) -> dict[str, Any]:
    res = ray.get([c.run.remote(mode, token_id, jti, concurrency, seconds) for c in callers])
    n = sum(r["n"] for r in res)
    ok = sum(r["ok"] for r in res)
    elapsed = max(r["elapsed"] for r in res)
    lat = sorted(x for r in res for x in r["lat"])
    return {
        "mode": mode,
        "admissions": n,
        "admitted": ok,
        "per_s": round(n / elapsed, 1),
        "p50_ms": round(statistics.median(lat) * 1000, 2),
        "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--pg-server", default="postgres@127.0.0.1:5432", help="a scratch database is made and dropped")
    ap.add_argument("--callers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="yt-bench-"))
    scratch = f"yt_bench_{uuid.uuid4().hex[:8]}"
    if args.db == "postgres":
        with psycopg.connect(f"postgresql://{args.pg_server}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{scratch}"')
    url = (
        f"sqlite:///{tmp / 'ledger.db'}" if args.db == "sqlite" else f"postgresql+psycopg://{args.pg_server}/{scratch}"
    )
    settings = LedgerSettings(
        database_url=url,
        data_dir=tmp,
        actor_name=f"bench-{uuid.uuid4().hex[:6]}",
        namespace="yt-bench",
        sweep_interval_s=0,
    )
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        namespace="yt-bench",
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    try:
        client = launch(settings)
        pkg = client.create_package(TokenSpec("bench", 10**11))
        tid = pkg.token.id
        jti = Verifier(client.public_keys()).verify(pkg.credential).jti
        callers = [Caller.remote(client.coordinator, client.shard_actors) for _ in range(args.callers)]
        measure("batched", callers, tid, jti, 8, 1.0)  # warm-up: workers, connections, imports
        results = {}
        for mode in os.environ.get("BENCH_MODES", "naive,batched").split(","):
            r = measure(mode, callers, tid, jti, args.concurrency, args.seconds)
            results[mode] = r
            print(
                json.dumps(
                    {"bench": "ledger", "db": args.db, "callers": args.callers, "concurrency": args.concurrency, **r}
                ),
                flush=True,
            )
        stats = {"commits": sum(s["commits"] for s in client.stats())}
        summary = {
            "bench": "ledger",
            "db": args.db,
            "durable": True,
            "callers": args.callers,
            "concurrency_per_caller": args.concurrency,
            "seconds": args.seconds,
            "batched_per_s": results["batched"]["per_s"],
            "naive_per_s": results["naive"]["per_s"],
            "ratio": round(results["batched"]["per_s"] / results["naive"]["per_s"], 1),
            "p50_ms": results["batched"]["p50_ms"],
            "p99_ms": results["batched"]["p99_ms"],
            "naive_p50_ms": results["naive"]["p50_ms"],
            "naive_p99_ms": results["naive"]["p99_ms"],
            "commits": stats["commits"],
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        }
        print(json.dumps(summary), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        if args.db == "postgres":
            with psycopg.connect(f"postgresql://{args.pg_server}/postgres", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')


if __name__ == "__main__":
    main()
