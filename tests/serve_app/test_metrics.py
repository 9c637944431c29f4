"""Metrics of the serving side and the ledger: exported by a real Ray node, drawn by the Grafana dashboard."""

from __future__ import annotations

import ast
import json
import re
import time
import urllib.request
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from ledger.shard.metrics import ShardMetrics
from serve_app.metrics import DetectorMetrics, IngressMetrics, TeamLabels
from tests.serve_app.conftest import LiveApp, jpeg
from tests.serve_app.test_http import package, post

ROOT = Path(__file__).resolve().parents[2]
MODULES = (ROOT / "serve_app" / "metrics.py", ROOT / "ledger" / "shard" / "metrics.py")
DASHBOARD = ROOT / "cluster" / "grafana-dashboard.json"
PREFIX = "ray_"  # Ray's prefix for application metrics on its Prometheus endpoint
EXPORT_TIMEOUT_S = 60.0  # Ray's agent exports every metrics_report_interval_ms (10 s by default)


def defined_metrics() -> dict[str, str]:
    """Every metric the two modules create: name -> kind (Counter, Gauge, Histogram), read from their source."""
    found: dict[str, str] = {}
    for module in MODULES:
        for node in ast.walk(ast.parse(module.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in {"Counter", "Gauge", "Histogram"}
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found[node.args[0].value] = node.func.id
    return found


def exposed(name: str, kind: str) -> str:
    """The series a dashboard queries: histograms through their buckets."""
    return f"{PREFIX}{name}_bucket" if kind == "Histogram" else f"{PREFIX}{name}"


def panel_exprs(dashboard: dict[str, Any]) -> list[str]:
    panels = list(dashboard["panels"])
    for row in dashboard["panels"]:
        panels.extend(row.get("panels", []))
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def mentions(expr: str, series: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_:]){re.escape(series)}(?![A-Za-z0-9_:])", expr) is not None


def test_given_the_metrics_modules_when_the_dashboard_is_read_then_every_metric_has_a_panel() -> None:
    """Given the metrics of serve_app/metrics.py and ledger/shard/metrics.py,
    when cluster/grafana-dashboard.json is loaded,
    then it is a dashboard on a `${datasource}` Prometheus variable, every metric is in some panel's
    expression under its exposed name, and no expression names a metric that does not exist."""
    metrics = defined_metrics()
    assert len(metrics) >= 15 and all(name.startswith("yt_") for name in metrics), metrics
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    exprs = panel_exprs(dashboard)
    missing = [name for name, kind in metrics.items() if not any(mentions(e, exposed(name, kind)) for e in exprs)]
    assert not missing, f"metrics without a panel: {missing}"
    known = {f"{PREFIX}{name}{suffix}" for name in metrics for suffix in ("", "_bucket", "_sum", "_count")}
    unknown = {s for e in exprs for s in re.findall(r"ray_yt_[A-Za-z0-9_]+", e)} - known
    assert not unknown, f"panels query metrics nobody defines: {unknown}"
    for p in dashboard["panels"]:
        assert p["type"] == "row" or p["datasource"]["uid"] == "${datasource}", p["title"]


async def test_given_more_teams_than_the_bound_then_labels_are_inherited_named_up_to_the_bound_then_other() -> None:
    """Given team labels bounded at 3 and packages whose tokens set a team or inherit one,
    when their trees are read, then a child without a team carries its nearest ancestor's, a tree
    without any is "none", the first 3 teams keep their names and later ones are "other"; a token
    of a package not read yet is "unknown" (and its package is read on the next round); a failed
    read is tried again."""
    now = [0.0]
    labels = TeamLabels(max_teams=3, ttl_s=60, clock=lambda: now[0])

    def tree(root: str, team: str | None) -> list[dict[str, Any]]:
        return [
            {"id": root, "parent_id": None, "team": team},
            {"id": f"{root}-kid", "parent_id": root, "team": None},
            {"id": f"{root}-own", "parent_id": root, "team": f"{root}-own-team"},
        ]

    trees = {"p1": tree("p1", "vision"), "p2": tree("p2", None), "p3": tree("p3", "qa")}
    failing = {"p3"}

    async def read(package: str) -> list[dict[str, Any]]:
        if package in failing:
            failing.discard(package)
            raise ConnectionError("ledger down")
        return trees[package]

    assert [labels.label(f"{p}-kid", p) for p in ("p1", "p2", "p3")] == ["unknown"] * 3
    await labels.resolve(read)
    assert labels.label("p1-kid", "p1") == "vision" and labels.label("p1", "p1") == "vision"
    assert labels.label("p2-kid", "p2") == "none"
    assert labels.label("p3-kid", "p3") == "unknown", "its read failed: tried again"
    await labels.resolve(read)
    named = {labels.label(t, p) for p in ("p1", "p2", "p3") for t in (p, f"{p}-kid", f"{p}-own")}
    assert len(named - {"none", "other"}) == 3 and "other" in named, named
    assert labels.label("p1-kid", "p1") == "vision", "a name keeps its label"
    now[0] = 61.0  # past the TTL: the package is read again
    trees["p1"][0]["team"] = "renamed"
    labels.label("p1-kid", "p1")
    await labels.resolve(read)
    assert labels.label("p1-kid", "p1") == "other", "a new name beyond the bound"


def test_given_unset_tags_when_recorded_without_ray_then_nothing_raises() -> None:
    """Given metrics created in a process where Ray may not be initialised,
    when every method is called with None tags, zero counts and negative durations,
    then nothing raises (Ray's Counter.inc raises on a non-positive value; the methods drop those)."""
    ingress, detector, shard = IngressMetrics(), DetectorMetrics(None), ShardMetrics(0)  # type: ignore[arg-type]
    ingress.admission(None, None, None, local=True)  # type: ignore[arg-type]
    ingress.units_used(0, "m", "p")
    ingress.units_used(-3, "m", "p")
    ingress.leases(0, 0)
    ingress.report_lag(-0.5)
    ingress.request(-1.0, None, 200)  # type: ignore[arg-type]
    detector.batch(0, 0.1)
    detector.waited(0, None, -1.0)  # type: ignore[arg-type]
    detector.refused(0, None)  # type: ignore[arg-type]
    detector.queues([{"level": 0, "package": None, "queued": 0}])
    shard.commit(-1.0, 0)
    shard.quota_remaining(None, 0)  # type: ignore[arg-type]
    shard.leases(0, 0)
    shard.lost_lease(0, None)  # type: ignore[arg-type]


@ray.remote(num_cpus=0)
class Emitter:
    """Records every metric of the three owners once, with the given tag values, then refreshes
    their gauges when asked; it stays alive while the test scrapes (a gauge leaves with its process)."""

    def emit(self, model: str, package: str) -> tuple[str, str]:
        """Records everything; returns (node id, worker id) of this actor."""
        ingress = IngressMetrics()
        ingress.admission("ok", model, package, local=True)
        ingress.admission("ok", model, package, local=True)
        ingress.admission("quota_exhausted", model, package, local=False)
        ingress.admission("ok", model, None, local=True)  # type: ignore[arg-type]
        ingress.units_used(3, model, package)
        ingress.leases(2, 40)
        ingress.report_lag(0.05)
        ingress.request(0.2, model, 200)
        ingress.request(0.01, model, 429)
        detector = DetectorMetrics(model)
        detector.batch(4, 0.03)
        detector.waited(1, package, 0.02)
        detector.refused(0, package)
        detector.queues([{"level": 1, "package": package, "queued": 5}, {"level": 1, "package": package, "queued": 2}])
        shard = ShardMetrics(7)
        shard.commit(0.004, 12)
        shard.commit(0.002, 3)
        shard.quota_remaining(package, 960)
        shard.leases(5, 80)
        shard.lost_lease(6, "refund")
        self.owners = (ingress, shard, detector)
        context = ray.get_runtime_context()
        return context.get_node_id(), context.get_worker_id()

    def refresh(self) -> None:
        for owner in self.owners:
            owner.refresh()


def expected(model: str, package: str) -> list[tuple[str, dict[str, str], float]]:
    """(exposed sample name, tags it must carry, value) for what `Emitter.emit` recorded."""
    shard = {"shard": "7"}
    return [
        ("ray_yt_admissions_total", {"decision": "ok", "model": model, "package": package, "path": "local"}, 2),
        ("ray_yt_admissions_total", {"decision": "quota_exhausted", "package": package, "path": "strict"}, 1),
        ("ray_yt_admissions_total", {"decision": "ok", "model": model, "package": "unknown"}, 1),
        ("ray_yt_units_used_total", {"model": model, "package": package}, 3),
        ("ray_yt_leases_outstanding", {}, 2),
        ("ray_yt_lease_units", {}, 40),
        ("ray_yt_report_lag_seconds_count", {}, 1),
        ("ray_yt_report_lag_seconds_bucket", {"le": "0.05"}, 1),
        ("ray_yt_request_seconds_count", {"model": model, "status": "200"}, 1),
        ("ray_yt_request_seconds_count", {"model": model, "status": "429"}, 1),
        ("ray_yt_detector_batch_size_count", {"model": model}, 1),
        ("ray_yt_detector_batch_size_bucket", {"model": model, "le": "4.0"}, 1),
        ("ray_yt_detector_infer_seconds_count", {"model": model}, 1),
        ("ray_yt_detector_queue_wait_seconds_count", {"model": model, "level": "1", "package": package}, 1),
        ("ray_yt_detector_queue_wait_seconds_bucket", {"model": model, "level": "1", "le": "0.025"}, 1),
        ("ray_yt_detector_refused_total", {"model": model, "level": "0", "package": package}, 1),
        ("ray_yt_detector_queue_images", {"model": model, "level": "1", "package": package}, 7),
        ("ray_yt_ledger_commit_seconds_count", shard, 2),
        ("ray_yt_ledger_commits_total", shard, 2),
        ("ray_yt_ledger_ops_total", shard, 15),
        ("ray_yt_quota_remaining_units", {**shard, "package": package}, 960),
        ("ray_yt_ledger_leases_outstanding", shard, 5),
        ("ray_yt_ledger_leased_units", shard, 80),
        ("ray_yt_lost_lease_units_total", {**shard, "policy": "refund"}, 6),
    ]


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def unmatched(
    samples: list[tuple[str, dict[str, str], float]], wanted: list[tuple[str, dict[str, str], float]], worker: str
) -> list[tuple[str, dict[str, str], float]]:
    """The wanted samples that no scraped sample of `worker` matches (same name, tags a superset, same value)."""
    mine = [(n, labels, v) for n, labels, v in samples if labels.get("WorkerId") == worker]
    return [
        (name, tags, value)
        for name, tags, value in wanted
        if not any(n == name and tags.items() <= labels.items() and v == value for n, labels, v in mine)
    ]


@pytest.mark.ray
def test_given_every_metric_recorded_in_an_actor_when_the_node_is_scraped_then_each_appears_with_its_tags(
    ray_cluster: None,
) -> None:
    """Given an actor that creates IngressMetrics, DetectorMetrics and ShardMetrics and calls every method,
    when the metrics endpoint of the actor's node is scraped (Ray exports on an interval: polled, bounded),
    then every metric appears under its `ray_` name with the recorded tags and values, and the
    test's expectations cover every metric the modules define;
    and when the actor only refreshes for longer than Ray keeps a gauge that is not set again,
    then the gauges are still there with their values."""
    model, package = f"m{uuid.uuid4().hex[:6]}@1", f"pkg-{uuid.uuid4().hex[:8]}"  # unique in a shared cluster
    wanted = expected(model, package)
    covered = {re.sub(r"_(bucket|count)$", "", name).removeprefix(PREFIX) for name, _, _ in wanted}
    assert covered == set(defined_metrics()), "every defined metric needs an expectation here"

    actor = Emitter.remote()  # type: ignore[attr-defined]
    try:
        node_id, worker = ray.get(actor.emit.remote(model, package), timeout=120)
        emitted = time.monotonic()
        # the Prometheus endpoint of the node the actor runs on (public API: ray.nodes())
        (node,) = [n for n in ray.nodes() if n["NodeID"] == node_id]
        port = int(node["MetricsExportPort"])
        deadline = time.monotonic() + EXPORT_TIMEOUT_S
        missing = wanted
        while missing and time.monotonic() < deadline:
            time.sleep(1.0)
            missing = unmatched(scrape(port), wanted, worker)
        assert not missing, f"not on http://127.0.0.1:{port}/metrics after {EXPORT_TIMEOUT_S:.0f}s: {missing}"

        # Ray's agent drops a gauge series not set again within 2 export intervals (each at least 1 s)
        interval_s = max(ray._config.metrics_report_interval_ms(), 1000) / 1000
        gauges = {f"{PREFIX}{name}" for name, kind in defined_metrics().items() if kind == "Gauge"}
        while time.monotonic() < emitted + 3 * interval_s + 5:
            ray.get(actor.refresh.remote(), timeout=30)
            time.sleep(1.0)
        missing = unmatched(scrape(port), [w for w in wanted if w[0] in gauges], worker)
        assert not missing, (
            f"gauges gone from /metrics {time.monotonic() - emitted:.0f}s after they were set: {missing}"
        )
    finally:
        ray.kill(actor)


def summed(samples: list[tuple[str, dict[str, str], float]], name: str, **tags: str) -> float:
    """The sum of every sample named `name` whose labels include `tags` (over workers and nodes)."""
    return sum(v for n, labels, v in samples if n == name and tags.items() <= labels.items())


@pytest.mark.ray
def test_given_requests_to_the_running_app_when_its_node_is_scraped_then_the_product_metrics_count_them(
    live_app: LiveApp,
) -> None:
    """Given the running app (ingress replicas, detectors, ledger shard) and a fresh package,
    when 3 detections are answered and 1 is denied for a model the token may not use,
    then the node's metrics endpoint shows them: admissions by decision for that package, its
    units used, the detector's batches and inference time, the shard's commits and the package's
    quota remaining (each polled, bounded: Ray exports on an interval)."""
    team = f"team-{uuid.uuid4().hex[:6]}"
    tid, cred = package(live_app, 100, models=["parts@1"], team=team)
    assert [post(live_app, cred, jpeg()).status_code for _ in range(3)] == [200, 200, 200]
    assert post(live_app, cred, jpeg(), model="parts@2").status_code == 403
    ports = {int(n["MetricsExportPort"]) for n in ray.nodes() if n["Alive"]}
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while True:
        samples = [s for port in ports for s in scrape(port)]
        total = partial(summed, samples)
        seen = {
            "admitted": total("ray_yt_admissions_total", decision="ok", package=tid, model="parts@1"),
            "denied": total("ray_yt_admissions_total", decision="model_not_allowed", package=tid),
            "units": total("ray_yt_units_used_total", package=tid),
            "batches": total("ray_yt_detector_batch_size_count", model="parts@1"),
            "infer": total("ray_yt_detector_infer_seconds_count", model="parts@1"),
            "commits": total("ray_yt_ledger_commits_total"),
            "remaining": total("ray_yt_quota_remaining_units", package=tid),
        }
        done = (
            seen["admitted"] == 3
            and seen["denied"] == 1
            and seen["units"] == 3
            and seen["batches"] >= 1
            and seen["infer"] >= 1
            and seen["commits"] >= 1
            and seen["remaining"] == 97
        )
        if done or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert done, seen

    # the team label: the replica reads the package's tree off the request path, so the first
    # requests may count as "unknown"; later ones carry the team's name
    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while not (named := summed([s for port in ports for s in scrape(port)], "ray_yt_units_used_total",
                               package=tid, team=team)):  # fmt: skip
        assert time.monotonic() < deadline, f"no units under team={team}"
        assert post(live_app, cred, jpeg()).status_code == 200
        time.sleep(1.0)
    assert named >= 1
