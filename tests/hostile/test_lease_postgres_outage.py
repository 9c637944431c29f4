"""Issue 12 §4: the ledger's PostgreSQL stopped under load on leased tokens. Each ingress replica
goes on admitting from its lease while the database is down (the ledger cannot commit a thing);
after the restart the reports land and the book equals the database.

The test's own PostgreSQL (`PrivatePostgres` of test_postgres_restart.py: initdb, its own port)
is stopped for 8 s here and for 30 s with `YT_LEASE_LONG=1`; the lease TTL is the default 10 s
in both (a lease whose holder keeps reporting is not lost, even when nothing can be committed).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from ledger.core.errors import LedgerUnavailable
from tests.hostile.lease_cluster import charged, deployed, lease_args, replica_stats, serve_proxy
from tests.hostile.lease_helpers import ClientSpec, Load, body_file, ok_ids, spread, statuses, wait_until
from tests.hostile.test_postgres_restart import PrivatePostgres, private_pg  # noqa: F401 (a fixture)
from tests.serve_app.conftest import HTTP_PORT, jpeg

pytestmark = [pytest.mark.ray, pytest.mark.postgres]
OUTAGE_S = 30.0 if os.environ.get("YT_LEASE_LONG") == "1" else 8.0


def test_given_leases_warmed_by_load_when_postgres_is_down_then_no_503_and_after_restart_book_equals_database(
    ray_cluster: None,
    private_pg: PrivatePostgres,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    """Given a token loaded through 3 replicas for 3 s (so each replica's lease holds about a second
    of its traffic),
    when PostgreSQL is stopped for OUTAGE_S seconds while clients keep sending, at a pace the
    smallest lease covers (fewer requests in all than the units any one replica holds),
    then every request during the outage is answered 200 (0 x 503) and no lease is lost; a burst
    of 300 more before the restart is answered from what is left in the leases and then 503
    ledger_unavailable, never beyond the leased units; once PostgreSQL is back, the ledger has
    charged exactly the answered request ids and the book equals the database."""
    args = lease_args(private_pg.url, tmp_path, ttl_s=10.0)
    body = body_file(tmp_path, jpeg(64, 48))
    with deployed(args, "lease-pg", serve_proxy(HTTP_PORT)) as app:
        tid, cred = app.package(1_000_000)
        start = time.time() + 1.5
        warm = Load(spread(ClientSpec(app.url, cred, body, 1_000_000, 64, start, start + 3.0), 4), tmp_path).wait()
        assert statuses(warm) == {"200": len(warm)}
        held = {pid: int(s["units"]) for pid, s in replica_stats(app.name).items()}
        smallest = min(held.values())
        # how the warm-up spread over the replicas is Serve's routing (6 to 22 units seen): the outage
        # load is sized by the smallest lease, so any replica may take all of it; it needs one unit
        assert smallest >= 1, held
        private_pg.stop()
        down = time.time()
        pace = ClientSpec(app.url, cred, body, smallest, 4, down, gap_s=4 * OUTAGE_S / smallest)
        during = Load(spread(pace, 4), tmp_path).wait()
        time.sleep(max(0.0, down + OUTAGE_S - time.time()))
        beyond = Load(spread(ClientSpec(app.url, cred, body, 300, 32, time.time() + 1.0), 4), tmp_path).wait()
        private_pg.start()
        up = time.time()
        counts = statuses(during)
        ok = set(ok_ids(warm + during + beyond))
        used, leased, _ = wait_until(
            lambda: app.settled(tid), lambda v: v[0] == len(ok), 120, "reports after restart", (LedgerUnavailable,)
        )
        rows = app.rows(tid)
        paid = {r["request_id"] for r in rows if charged(r)}
        report = app.ledger.consistency()
        print(json.dumps({"lease": "postgres_outage", "outage_s": round(up - down, 1), "warm": len(warm),
                          "units_held_at_stop": sorted(held.values()), "during": counts,
                          "beyond_leases": statuses(beyond), "used": used,
                          "leased_after": leased, "lost_leases": len(app.lost(tid))}))  # fmt: skip
        assert counts == {"200": smallest}, counts
        assert set(statuses(beyond)) <= {"200", "503 ledger_unavailable"}
        assert len(ok_ids(during + beyond)) <= sum(held.values()), "served beyond the leases while down"
        assert app.lost(tid) == []
        assert paid == ok and used == len(ok)
        assert report.violations == [] and report.mismatched == []
