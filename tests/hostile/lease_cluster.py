"""The lease tests' app on a Ray cluster (issue 12 §4), and the burst with a worker node removed.

Imported by the lease tests: `lease_args` / `deployed` put the real Ingress (token check from quota
leases, 3 replicas by default) in front of a Detector whose engine is the `FakeEngine` (instant,
deterministic: thousands of requests fit in a test's time) under its own ledger, beside the test
session's app; `LeaseApp` reads the outcome back from the ledger and its database.

Run as a script (test_lease_node_loss.py does, in its own process: a test session has one Ray
cluster, this needs three nodes):

    python tests/hostile/lease_cluster.py DB_URL DATA_DIR REPORT SEED POLICY REQUESTS UNITS

a `ray.cluster_utils.Cluster` on loopback, head + 2 workers; Serve's proxy, the ledger and the
detector on the head, the 3 ingress replicas spread over the nodes by Serve (lease TTL 2 s,
`lost_lease_policy` POLICY); REQUESTS requests from 4 client processes on a token of UNITS, and
the worker holding the most ingress replicas removed 1-3 s into the burst (SEED). One JSON report
to REPORT: what was answered, charged and settled as lost.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serve_app import launcher

launcher.apply_environment()  # loopback, token auth (a no-op under pytest, whose conftest did it first)
launcher.ensure_auth_token()

import psutil  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.serve import Application  # noqa: E402

from ledger.client.over_ray import LedgerClient  # noqa: E402
from ledger.client.service import attach, launch, stop  # noqa: E402
from ledger.core.entities import TokenSpec, TokenView  # noqa: E402
from ledger.core.results import AdminEvent  # noqa: E402
from ledger.store.repository import Store, UsageQuery  # noqa: E402
from serve_app.app import deployment  # noqa: E402
from serve_app.board import QueueBoard  # noqa: E402
from serve_app.config import DEMO_WEIGHTS, AppArgs, Autoscaling, LedgerArgs, ModelSpec  # noqa: E402
from serve_app.detector_deployment import Detector  # noqa: E402
from serve_app.engine.fake import FakeEngine  # noqa: E402
from serve_app.ingress import Ingress  # noqa: E402
from serve_app.surface import DETECTOR_KEY  # noqa: E402
from tests.hostile.lease_helpers import ClientSpec, Load, body_file, ok_ids, spread, statuses, wait_until  # noqa: E402
from tests.serve_app.conftest import jpeg  # noqa: E402

MODEL = "fast@1"
FAKE_ENGINES = {"torch": FakeEngine}  # the Detector's engine registry, passed in (serve_app.engine.registry)


def lease_args(
    database_url: str,
    data_dir: Path,
    *,
    ttl_s: float = 10.0,
    policy: str = "refund",
    namespace: str = "yt-tests",
    ledger_resources: dict[str, float] | None = None,
) -> AppArgs:
    """An app of its own ledger: 3 ingress replicas, one Detector replica (0 CPUs: its engine is fake)."""
    spec = ModelSpec(
        name="fast",
        weights=DEMO_WEIGHTS,
        imgsz=64,
        num_cpus=0,
        max_batch_size=32,
        autoscaling=Autoscaling(min_replicas=1, max_replicas=1),
    )
    resources = ledger_resources or {}
    return AppArgs(
        database_url=database_url,
        data_dir=data_dir,
        ledger_name=f"lease-{uuid.uuid4().hex[:8]}",
        namespace=namespace,
        ledger_resources=resources,
        ledger=LedgerArgs(lease_ttl_s=ttl_s, lost_lease_policy=policy, shard_resources=resources),  # type: ignore[arg-type]
        models=[spec],
        default_model=MODEL,
        ingress_replicas=3,
    )


def fake_app(
    args: AppArgs, detector_resources: dict[str, float] | None = None, engines: dict[str, Any] | None = None
) -> Application:
    """`serve_app.app.build_app`'s graph, its detectors given the FakeEngine registry (what the
    Detector takes for tests; `engines` replaces it); the Ingress is the production one."""
    capability = launch(args.ledger_settings()).capability
    assert capability is not None
    detectors = {}
    key = capability.derive(DETECTOR_KEY)
    board = deployment(QueueBoard).bind(key)
    for m in args.models:
        options = m.deployment_options()
        if detector_resources:
            options["ray_actor_options"]["resources"] = detector_resources
        detectors[m.key] = deployment(Detector).options(**options).bind(m, key, board, engines=engines or FAKE_ENGINES)
    return (
        deployment(Ingress).options(**args.ingress_options()).bind(args.ledger_settings(), detectors, args, capability)
    )


@dataclass
class LeaseApp:
    name: str
    url: str  # its detect route
    args: AppArgs
    ledger: LedgerClient

    def package(self, units: int, rate: str | None = None) -> tuple[str, str]:
        """A new package: (token id, credential)."""
        made = self.ledger.create_package(TokenSpec.build(f"lease-{time.monotonic_ns()}", units, rate=rate))
        return made.token.id, made.credential

    def token(self, token_id: str) -> TokenView:
        return self.ledger.token(token_id)

    def rows(self, token_id: str) -> list[dict[str, Any]]:
        """The token's audit rows, straight from the database."""
        store = Store(self.args.database_url)
        try:
            return store.usage(UsageQuery(token_id=token_id, limit=100_000))
        finally:
            store.close()

    def lost(self, token_id: str) -> list[AdminEvent]:
        """The token's `lease.lost` admin events (detail: lease, holder, units, policy)."""
        return [e for e in self.ledger.admin_events(token_id=token_id) if e["action"] == "lease.lost"]

    def leases(self) -> int:
        """Leases the ledger holds for any replica (this app's ledger serves only this app)."""
        return sum(int(s["leases"]) for s in self.ledger.stats())

    def ingress_pids(self) -> list[int]:
        return replica_pids(self.name, "Ingress")

    def settled(self, token_id: str) -> tuple[int, int, int]:
        """(used, leased, settled audit rows): what the ledger has turned into charges so far."""
        view = self.token(token_id)
        return view.used, view.leased, sum(1 for r in self.rows(token_id) if charged(r))

    def deleted(self, timeout_s: float = 60.0) -> None:
        """Delete the app (its replicas release their leases on the way out) and wait for the ledger
        to hold no lease."""
        serve.delete(self.name)
        wait_until(self.leases, lambda n: n == 0, timeout_s, "leases after the app was deleted")


def charged(row: dict[str, Any]) -> bool:
    return bool(row["state"] == "settled" and row["units"] > 0)


def replica_pids(app: str, deployment_name: str) -> list[int]:
    """Live replica processes of a deployment (Ray titles them `ray::ServeReplica:<app>:<deployment>`)."""
    tag = f"ServeReplica:{app}:{deployment_name}"
    return [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if (cmd := " ".join(p.info["cmdline"] or [])).startswith("ray::") and tag in cmd
    ]


@contextmanager
def deployed(args: AppArgs, name: str, http_url: str, **bind: Any) -> Iterator[LeaseApp]:
    """The app running under `name` at `/name` (Serve's proxy must be up), and its ledger client.
    Deleted, and its ledger stopped, on the way out."""
    serve.run(fake_app(args, **bind), name=name, route_prefix=f"/{name}")
    client = attach(args.ledger_settings())
    try:
        yield LeaseApp(name, f"{http_url}/{name}/v1/detect", args, client)
    finally:
        serve.delete(name)
        stop(client)


def serve_proxy(port: int) -> str:
    """Serve's HTTP proxy on 127.0.0.1:`port` (the one the session's live app uses, if it runs)."""
    from serve_app import launcher
    from tests.serve_app.conftest import GRPC_PORT

    serve.start(http_options={"host": "127.0.0.1", "port": port}, grpc_options=launcher.grpc_options(GRPC_PORT))
    return f"http://127.0.0.1:{port}"


def replica_stats(app: str, replicas: int = 3, timeout_s: float = 30.0) -> dict[int, dict[str, Any]]:
    """`Ingress.stats()` of every replica (by pid), asked through the app's handle until each answered."""
    handle = serve.get_app_handle(app)
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < replicas:
        assert time.monotonic() < deadline, f"stats of {len(seen)} of {replicas} ingress replicas"
        for s in [r.result() for r in [handle.stats.remote() for _ in range(4 * replicas)]]:
            seen[int(s["pid"])] = s
    return seen


# ---------------------------------------------------------------- a worker node removed mid-burst
FAST_FAILURE_DETECTION = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
NAMESPACE = "yt-lease-nodes"
SPREAD_VAR = "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"


def node_of(pid: int, raylets: dict[int, Any]) -> Any:
    """The Cluster node whose raylet started process `pid` (Ray workers are its children)."""
    for parent in psutil.Process(pid).parents():
        if parent.pid in raylets:
            return raylets[parent.pid]
    raise LookupError(f"process {pid} belongs to no node of this cluster")


def burst_with_a_node_removed(
    cluster: Cluster, app: LeaseApp, workdir: Path, rng: random.Random, requests: int, units: int
) -> dict[str, Any]:
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in [cluster.head_node, *cluster.worker_nodes]}
    placed = {pid: node_of(pid, raylets) for pid in wait_until(app.ingress_pids, lambda p: len(p) == 3, 120, "3")}
    victim = max(cluster.worker_nodes, key=lambda n: sum(1 for node in placed.values() if node is n))
    doomed = sorted(pid for pid, node in placed.items() if node is victim)
    tid, cred = app.package(units)
    start = time.time() + 2.0
    template = ClientSpec(app.url, cred, body_file(workdir, jpeg(64, 48)), requests, 64, start)
    load = Load(spread(template, 4), workdir)
    time.sleep(max(0.0, start + rng.uniform(1.0, 3.0) - time.time()))
    removed_at = time.time()
    cluster.remove_node(victim, allow_graceful=False)
    shots = load.wait(600)
    lost = wait_until(
        lambda: app.lost(tid),
        lambda ev: all(any(f":{pid}:" in e["detail"]["holder"] for e in ev) for pid in doomed),
        120,
        "lost leases of the removed node's replicas",
    )
    view = wait_until(lambda: app.token(tid), lambda v: v.leased == 0, 120, "leases on the token")
    lost = app.lost(tid)
    report = app.ledger.consistency()
    paid = {r["request_id"] for r in app.rows(tid) if charged(r)}
    ok = set(ok_ids(shots))
    return {
        "policy": app.args.ledger.lost_lease_policy,
        "requests": len(shots),
        "allocation": units,
        "statuses": statuses(shots),
        "ingress_per_node": sorted(sum(1 for n in placed.values() if n is node) for node in raylets.values()),
        "removed_node_ingress": len(doomed),
        "removed_after_s": round(removed_at - start, 2),
        "ok": len(ok),
        "ok_sent_after_removal": sum(1 for s in shots if s.status == 200 and s.sent > removed_at),
        "token": asdict(view),
        "charged_rows": len(paid),
        "charged_unanswered": len(paid - ok),
        "answered_unreported": len(ok - paid),
        "lost_units": sum(int(e["detail"]["units"]) for e in lost),
        "lost_policies": sorted({e["detail"]["policy"] for e in lost}),
        "removed_holders_lost": sorted(pid for pid in doomed if any(f":{pid}:" in e["detail"]["holder"] for e in lost)),
        "removed_holders": doomed,
        "violations": report.violations,
        "mismatched": report.mismatched,
    }


def main(db_url: str, data_dir: str, report_path: str, seed: int, policy: str, requests: int, units: int) -> None:
    # Serve's proxy sends every request to a replica on its own node while that one keeps up: with
    # the one proxy on the head, the workers' replicas would never be asked (nor hold a lease)
    if os.environ.get(SPREAD_VAR) != "0":
        raise SystemExit(f"run with {SPREAD_VAR}=0 in the environment")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "resources": {"head": 1},
            "_system_config": FAST_FAILURE_DETECTION,
        },
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.connect(namespace=NAMESPACE)
    try:
        port = launcher.free_port()
        # one proxy, on the head: the replicas' nodes share its address and could not bind its port
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        args = lease_args(db_url, Path(data_dir), ttl_s=2.0, policy=policy, namespace=NAMESPACE,
                          ledger_resources={"head": 0.01})  # fmt: skip
        # the ledger and the detector on the head: the node removed takes only ingress replicas with it
        with deployed(args, "nodes", f"http://127.0.0.1:{port}", detector_resources={"head": 0.01}) as app:
            out = burst_with_a_node_removed(cluster, app, Path(data_dir), random.Random(seed), requests, units)
        Path(report_path).write_text(json.dumps(out))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6]), int(sys.argv[7]))
