"""Ledger admission throughput: micro-batched client vs one actor call per admission vs quota leases.

The modes run in the same process tree, against the same durable shard actor (group commit,
SQLite WAL synchronous=FULL or PostgreSQL), from N caller processes with C concurrent
requests each. Prints one JSON object per measurement; the LAST line is the summary.

* naive: one shard actor call per admission (strict, durable before its verdict);
* batched: the real `LedgerClient.admit` (strict: micro-batched, group commit, durable before its verdict);
* lease: each caller is one `LeaseHolder` (as each ingress replica is, DESIGN §3a) over the real
  `LedgerClient`: admissions come from leases escrowed durably at the shard, each is settled
  (success) through the holder, and usage reaches the database in the holder's reports (every
  100 ms); each caller's holder is warmed up first (`--lease-warmup-s` of the same load, not
  counted), and closed at the end of the measured run (last report, leases released).

Database commits per 1,000 admissions come from the shard's `stats()` commits counter, before and
after each mode (lease: after the holders closed, so every report and release is counted).

    python -m bench.ledger [--db sqlite|postgres] [--callers 2] [--concurrency 256] [--seconds 5]
    BENCH_MODES=naive,batched,lease (the default)
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from serve_app import launcher  # neither Ray nor ultralytics

if __name__ == "__main__":  # run as a script: the rules before Ray and ultralytics, imported below, read them
    launcher.apply_environment()

import psycopg
import ray

from ledger.client.holder import LeaseHolder
from ledger.client.over_ray import LedgerClient
from ledger.client.service import launch
from ledger.core.capability import Capability
from ledger.core.credentials import Verifier
from ledger.core.entities import Admission, Settlement, TokenSpec
from ledger.core.settings import LedgerSettings


@ray.remote(num_cpus=0)
class Caller:
    def __init__(self, coordinator: Any, shards: list[Any], capability: Capability) -> None:
        self.client = LedgerClient(coordinator, shards, capability=capability)
        self.shards = shards
        self.holder: LeaseHolder | None = None  # kept from a warm-up run to the measured one

    async def run(
        self, mode: str, token_id: str, jti: str, concurrency: int, seconds: float, close: bool = True
    ) -> dict[str, Any]:
        """`close`: in lease mode, close the holder at the end (its last report, its releases)."""
        lat: list[float] = []
        ok = 0
        stop = time.perf_counter() + seconds
        prefix = uuid.uuid4().hex[:8]
        counter = 0
        holder = None
        if mode == "lease":
            holder = self.holder = self.holder or LeaseHolder(self.client, f"bench-{prefix}")
        stats0 = asdict(holder.stats) if holder is not None else {}

        async def worker() -> None:
            nonlocal ok, counter
            while time.perf_counter() < stop:
                counter += 1
                a = Admission(f"{prefix}-{counter}", token_id, jti, 1, "parts@1", "127.0.0.1", root_id=token_id)
                t0 = time.perf_counter()
                if holder is not None:
                    d = await holder.admit(a)
                    good = d.admitted
                    if good:  # what the ingress does after the detector answered
                        await holder.settle(Settlement(a.request_id, token_id, True, root_id=token_id))
                    # an ingress replica yields to its event loop between requests (HTTP I/O); a local
                    # admission does not, so yield here or the holder's report loop would never run
                    await asyncio.sleep(0)
                elif mode == "batched":
                    d = await self.client.admit(a)
                    good = d.admitted
                else:
                    shard = self.shards[self.client.shard_map.of_root(token_id)]
                    rows = await shard.admit_batch.remote([a.row()], self.client.capability)
                    good = rows[0][0] == "ok"
                lat.append(time.perf_counter() - t0)
                ok += good

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - t0
        extra = {}
        if holder is not None:
            extra = {"holder": {k: v - stats0[k] for k, v in asdict(holder.stats).items()}}
            if close:
                await holder.close(timeout_s=10.0)  # the last report and the releases
                self.holder = None
        return {"n": len(lat), "ok": ok, "elapsed": elapsed, "lat": lat, **extra}


def commits(client: LedgerClient) -> int:
    return sum(int(s["commits"]) for s in client.stats())


def measure(
    mode: str,
    client: LedgerClient,
    callers: list[Any],
    token_id: str,
    jti: str,
    concurrency: int,
    seconds: float,
    close: bool = True,
) -> dict[str, Any]:
    c0 = commits(client)
    res = ray.get([c.run.remote(mode, token_id, jti, concurrency, seconds, close) for c in callers])
    n_commits = commits(client) - c0
    n = sum(r["n"] for r in res)
    ok = sum(r["ok"] for r in res)
    elapsed = max(r["elapsed"] for r in res)
    lat = sorted(x for r in res for x in r["lat"])
    out = {
        "mode": mode,
        "admissions": n,
        "admitted": ok,
        "per_s": round(n / elapsed, 1),
        "p50_ms": round(statistics.median(lat) * 1000, 3),
        "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 3),
        "db_commits": n_commits,
        "db_commits_per_1000_admissions": round(1000 * n_commits / n, 3) if n else None,
    }
    holders = [r["holder"] for r in res if "holder" in r]
    if holders:
        out["holder"] = {k: sum(h[k] for h in holders) for k in holders[0]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--pg-server", default="postgres@127.0.0.1:5432", help="a scratch database is made and dropped")
    ap.add_argument("--callers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--lease-warmup-s", type=float, default=3.0, help="lease mode: load before the measured run")
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
        callers = [
            Caller.remote(client.coordinator, client.shard_actors, client.capability) for _ in range(args.callers)
        ]
        measure("batched", client, callers, tid, jti, 8, 1.0)  # warm-up: workers, connections, imports
        results: dict[str, dict[str, Any]] = {}
        for mode in os.environ.get("BENCH_MODES", "naive,batched,lease").split(","):
            if mode == "lease":  # steady state: the holders' leases and rate estimates warmed up first
                measure(mode, client, callers, tid, jti, args.concurrency, args.lease_warmup_s, close=False)
            r = measure(mode, client, callers, tid, jti, args.concurrency, args.seconds)
            results[mode] = r
            print(
                json.dumps(
                    {"bench": "ledger", "db": args.db, "callers": args.callers, "concurrency": args.concurrency, **r}
                ),
                flush=True,
            )
        summary: dict[str, Any] = {
            "bench": "ledger",
            "db": args.db,
            "durable": True,
            "callers": args.callers,
            "concurrency_per_caller": args.concurrency,
            "seconds": args.seconds,
        }
        if "batched" in results and "naive" in results:
            summary |= {
                "batched_per_s": results["batched"]["per_s"],
                "naive_per_s": results["naive"]["per_s"],
                "ratio": round(results["batched"]["per_s"] / results["naive"]["per_s"], 1),
                "p50_ms": results["batched"]["p50_ms"],
                "p99_ms": results["batched"]["p99_ms"],
                "naive_p50_ms": results["naive"]["p50_ms"],
                "naive_p99_ms": results["naive"]["p99_ms"],
            }
        if "lease" in results:
            lease = results["lease"]["db_commits_per_1000_admissions"]
            summary |= {
                "lease_per_s": results["lease"]["per_s"],
                "lease_p50_ms": results["lease"]["p50_ms"],
                "lease_p99_ms": results["lease"]["p99_ms"],
                "lease_goal_commits_per_1000": "met" if lease is not None and lease <= 10 else "missed",
            }
        summary["db_commits_per_1000_admissions"] = {m: r["db_commits_per_1000_admissions"] for m, r in results.items()}
        summary["commits"] = commits(client)
        summary["machine"] = {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
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
