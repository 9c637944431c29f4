"""A worker node removed under load, on a three-node Ray cluster on loopback (run by
test_shard_failover.py in its own process; writes one JSON report to REPORT).

    python tests/ledger/cluster_failover.py sqlite:///tmp/l.db /tmp/data REPORT

Head (coordinator, pinned by the custom resource `head`) + 2 workers (resource `ledger_node`,
which the 3 shards ask for; `launch` spreads them over both). One package per shard is loaded
from the driver; after 2 s the worker holding the most shards is removed (its raylet and every
process on it killed). Its shards restart on the other worker; the load goes on until they admit
again. Then: every `ok` has its durable debit, the book equals the database, conservation holds.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from serve_app import launcher

launcher.apply_environment()  # loopback, token auth: before Ray is imported
launcher.ensure_auth_token()

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from ledger.client.over_ray import LedgerClient  # noqa: E402
from ledger.client.service import launch, stop  # noqa: E402
from ledger.core.credentials import Verifier  # noqa: E402
from ledger.core.entities import Admission, TokenSpec  # noqa: E402
from ledger.core.settings import LedgerSettings  # noqa: E402
from ledger.store.repository import Store  # noqa: E402

FAST_FAILURE_DETECTION = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}


def shard_nodes(client: LedgerClient) -> dict[int, str]:
    return {s["shard"]: s["node"] for s in client.stats()}


async def load(
    client: LedgerClient, pkgs: dict[int, tuple[str, str]], until: Any, log: list[tuple[float, int, str, str]]
) -> None:
    """One loop per package, each at its own pace: a shard that pauses holds up only its own loop."""

    async def one(shard: int, tid: str, jti: str) -> None:
        n = 0
        while not until():
            batch = [Admission(f"s{shard}-r{n + i}", tid, jti, 1, "m@1", root_id=tid) for i in range(20)]
            n += len(batch)
            decisions = await asyncio.gather(*[client.admit(a) for a in batch])
            now = time.monotonic()
            log.extend((now, shard, d.code.value, d.request_id) for d in decisions)

    await asyncio.gather(*[one(shard, tid, jti) for shard, (tid, jti) in pkgs.items()])


async def run(cluster: Cluster, client: LedgerClient, pkgs: dict[int, tuple[str, str]]) -> dict[str, Any]:
    before = shard_nodes(client)
    workers = {w.node_id: w for w in cluster.worker_nodes}
    victim_id = max(workers, key=lambda node: sum(1 for n in before.values() if n == node))
    on_victim = sorted(s for s, n in before.items() if n == victim_id)
    log: list[tuple[float, int, str, str]] = []
    removed_at: list[float] = []
    back: set[int] = set()

    def done() -> bool:
        if not removed_at or time.monotonic() - removed_at[0] < 1.0:
            return False
        ok_after = {s for t, s, c, _ in log if t > removed_at[0] and c == "ok"}
        back.update(ok_after)
        return set(on_victim) <= back or time.monotonic() - removed_at[0] > 120

    loader = asyncio.create_task(load(client, pkgs, done, log))
    await asyncio.sleep(2.0)
    removed_at.append(time.monotonic())
    await asyncio.to_thread(cluster.remove_node, workers[victim_id], False)
    gone = time.monotonic()  # every process of the node is dead from here on
    await loader
    after = shard_nodes(client)
    others = sorted(s for s in before if s not in on_victim)
    first_back = min((t for t, s, c, _ in log if t > gone and c == "ok" and s in on_victim), default=gone)
    return {
        "shard_nodes_before": {s: n[:8] for s, n in before.items()},
        "other_shards": others,
        # admissions of the shards on the surviving worker between the removal and the removed shards' return
        "other_shards_ok_during_outage": sum(
            1 for t, s, c, _ in log if removed_at[0] < t <= first_back and s in others and c == "ok"
        ),
        "other_shards_unavailable": sum(1 for _, s, c, _ in log if s in others and c != "ok"),
        "removed_node_shards": on_victim,
        "restarted_elsewhere": sorted(s for s in on_victim if after[s] != victim_id),
        "log": log,
        "ok_after_removal": sum(1 for t, _, c, _ in log if t > removed_at[0] and c == "ok"),
        # from the node's last process gone to the first admission of one of its shards after that
        "recovery_s": round(
            min((t for t, s, c, _ in log if t > gone and c == "ok" and s in on_victim), default=gone) - gone, 2
        ),
        "ok_after_node_gone": sum(1 for t, s, c, _ in log if t > gone and c == "ok" and s in on_victim),
    }


def main(db_url: str, data_dir: str, report_path: str) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "resources": {"head": 1},
            "_system_config": FAST_FAILURE_DETECTION,
        },
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"ledger_node": 10})
    cluster.connect(namespace="yt-failover")
    settings = LedgerSettings(
        database_url=db_url,
        data_dir=Path(data_dir),
        actor_name="failover-ledger",
        namespace="yt-failover",
        sweep_interval_s=0,
        shards=3,
        actor_resources={"head": 0.01},
        shard_resources={"ledger_node": 1},
    )
    client = launch(settings)
    try:
        pkgs: dict[int, tuple[str, str]] = {}
        while len(pkgs) < 3:
            made = client.create_package(TokenSpec(f"p{len(pkgs)}", 10_000_000))
            jti = Verifier(client.public_keys()).verify(made.credential).jti
            pkgs.setdefault(client.shard_map.of_root(made.token.id), (made.token.id, jti))
        out = asyncio.run(run(cluster, client, pkgs))
        log = out.pop("log")
        store = Store(settings.resolved().database_url)
        charged = store.charged_request_ids()
        ok = {rid for _, _, code, rid in log if code == "ok"}
        report = client.consistency()
        out |= {
            "admissions": len(log),
            "codes": sorted({code for _, _, code, _ in log}),
            "ok": len(ok),
            "ok_without_debit": len(ok - charged),
            "violations": report.violations,
            "mismatched": report.mismatched,
            "epochs": {s["shard"]: s["epoch"] for s in client.stats()},
        }
        store.close()
        Path(report_path).write_text(json.dumps(out))
    finally:
        stop(client)
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
