"""Shards fail alone: a shard SIGKILLed under load stops only its own packages, on a real local
Ray cluster (3 shards, SQLite and PostgreSQL); and across Ray nodes, a worker node removed under
load (`cluster_failover.py`, run on its own `ray.cluster_utils.Cluster`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from ledger.client.over_ray import LedgerClient
from ledger.core.credentials import Verifier
from ledger.core.entities import TokenSpec
from ledger.core.settings import LedgerSettings
from ledger.store.repository import Store
from tests.ledger.test_actor import Caller, actor_pid

pytestmark = pytest.mark.ray
HERE = Path(__file__).parent


def two_packages_on_two_shards(ledger: LedgerClient) -> tuple[tuple[str, str, int], tuple[str, str, int]]:
    made: dict[int, tuple[str, str, int]] = {}
    while len(made) < 2:
        pkg = ledger.create_package(TokenSpec(f"p{len(made)}", 1_000_000))
        shard = ledger.shard_map.of_root(pkg.token.id)
        made.setdefault(shard, (pkg.token.id, Verifier(ledger.public_keys()).verify(pkg.credential).jti, shard))
    a, b = made.values()
    return a, b


def test_given_load_on_two_shards_when_one_is_sigkilled_then_only_its_packages_pause(
    ledger: LedgerClient, settings: LedgerSettings
) -> None:
    (victim, vjti, vshard), (bystander, bjti, _) = two_packages_on_two_shards(ledger)
    callers = [Caller.remote(ledger.coordinator, ledger.shard_actors, ledger.capability) for _ in range(2)]
    waves, per_wave = 30, 100
    refs = [
        callers[0].load.remote(victim, vjti, waves, per_wave, "victim"),
        callers[1].load.remote(bystander, bjti, waves, per_wave, "bystander"),
    ]
    time.sleep(0.5)
    killed = actor_pid(ledger, vshard)
    t_kill = time.monotonic()
    os.kill(killed, signal.SIGKILL)
    victim_codes, bystander_codes = ray.get(refs)
    restart_s = time.monotonic() - t_kill
    assert actor_pid(ledger, vshard) != killed
    by = [c for c, _ in bystander_codes]
    vi = [c for c, _ in victim_codes]
    print(f"\nbystander: {by.count('ok')}/{len(by)} ok; victim: {vi.count('ok')} ok, "
          f"{vi.count('ledger_unavailable')} unavailable; victim's shard back after <= {restart_s:.1f} s")  # fmt: skip
    assert by == ["ok"] * waves * per_wave, "the other shard's package never noticed"
    assert set(vi) <= {"ok", "ledger_unavailable"} and "ok" in vi
    store = Store(settings.resolved().database_url)
    charged = store.charged_request_ids()
    ok = {rid for code, rid in victim_codes + bystander_codes if code == "ok"}
    assert ok <= charged, f"{len(ok - charged)} admitted verdicts lack a durable debit"
    report = ledger.consistency()
    assert report.violations == [] and report.book == report.db
    assert store.balances()[victim][1] == len({rid for rid in charged if rid.startswith("victim")})
    store.close()


def test_given_a_three_node_cluster_when_a_worker_node_is_removed_under_load_then_its_shards_restart_elsewhere(
    db_url: str, tmp_path: Path
) -> None:
    """Runs in its own process: a test session has one Ray cluster, this test needs a cluster of
    three nodes (`ray.cluster_utils.Cluster`, all on loopback). On PostgreSQL in `make test`, on
    SQLite too in `make chaos` (YT_LEASE_LONG=1)."""
    if db_url.startswith("sqlite") and os.environ.get("YT_LEASE_LONG") != "1":
        pytest.skip("make chaos (YT_LEASE_LONG=1): the 3-node failover on SQLite too")
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(HERE / "cluster_failover.py"), db_url, str(tmp_path / "data"), str(out)],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
        env={**os.environ, "PYTHONPATH": str(HERE.parents[1])},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report: dict[str, Any] = json.loads(out.read_text())
    print("\n" + json.dumps(report))
    assert report["removed_node_shards"], "the removed node held shards"
    assert report["restarted_elsewhere"] == report["removed_node_shards"]
    assert report["ok_without_debit"] == 0
    assert report["violations"] == [] and report["mismatched"] == []
    assert report["codes"] and set(report["codes"]) <= {"ok", "ledger_unavailable"}
    assert report["ok_after_node_gone"] > 0, "the restarted shards admit again"
    for other in report["other_shards"]:  # shards spread over both workers: the other node's never stopped
        assert report["epochs"][str(other)] == 1, "a shard on the surviving node was not restarted"
    assert report["other_shards_unavailable"] == 0
