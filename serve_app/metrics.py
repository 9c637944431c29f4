"""Prometheus metrics of the serving side, recorded through Ray's metrics API (`ray.util.metrics`).

    IngressMetrics        one per TokenCheck ingress replica: admissions, units used, the replica's
                          leases, usage-report lag, request latency
    DetectorMetrics       one per Detector replica: batch sizes and inference time of its model version,
                          its scheduler's queue depth, waits and refusals by level and package
    tag_value(value)      a tag value Ray accepts: a string, never empty (None and "" are UNKNOWN)

Contract: every metric object is created in `__init__`, once per replica (creating the same name
twice in one process is harmless but wasteful); importing this module creates nothing. The
recording methods do no I/O: Ray buffers the values in the process and its metrics agent exports
them on the node's Prometheus endpoint every `metrics_report_interval_ms` (10 s by default). They are
safe to call at a high rate (about a microsecond each) and in a process where Ray is not initialised
(the values then go nowhere). A tag value that is None or empty is recorded as "unknown"; a counter
increment that is not positive is dropped, because Ray's `Counter.inc` raises on it.

Names as Prometheus sees them: Ray prefixes every application metric with `ray_` (`yt_admissions_total`
is exposed as `ray_yt_admissions_total`); a counter keeps its `_total` name as is; a histogram adds
`_bucket`, `_sum` and `_count`. Ray also adds the labels `Component`, `NodeAddress`, `SessionName`,
`Version` and `WorkerId` (one series per worker process), so dashboards aggregate with `sum by (...)`.
Ray's agent rebuilds a histogram's `_sum` from bucket midpoints: quantiles (`histogram_quantile` over
`_bucket`) are what to read, not `_sum / _count`.

Gauges are kept alive here: Ray's agent forgets a gauge series that its process has not set again
within two report intervals (20 s by default), even while the process lives. So a class with gauges
remembers their last values and sets them again (`refresh()`) when any of its methods runs at least
REFRESH_S after the last refresh; an owner that may stay idle calls `refresh()` from a periodic loop
at least every REFRESH_S.

Bucket boundaries are constants: Ray registers a histogram once per node and drops the data of a
process whose boundaries for the same name differ.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, is_dataclass
from typing import Any, Final

from ray.util.metrics import Counter, Gauge, Histogram

from ledger import inherited

log = logging.getLogger(__name__)

UNKNOWN: Final = "unknown"
REFRESH_S: Final = 5.0  # well inside Ray's gauge lifetime of 2 x metrics_report_interval_ms (10 s by default)
LOCAL: Final = "local"
MAX_PACKAGES: Final = 16  # `package` tag values per Detector replica: the first 16 packages served, then OTHER
MAX_TEAMS: Final = 16  # `team` tag values per replica: the first 16 teams by name, then OTHER
OTHER: Final = "other"
NO_TEAM: Final = "none"
TEAM_TTL_S: Final = 300.0  # a package's teams are read again after this (a team renamed shows within it)
TEAM_READS_PER_ROUND: Final = 8
STRICT: Final = "strict"

# usage reports go out at least every 100 ms (DESIGN §3a); seconds of lag mean a ledger in trouble
REPORT_LAG_BOUNDARIES: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# a request's wait in a Detector's scheduler: one batch (milliseconds) up to its queue bound (seconds)
QUEUE_WAIT_BOUNDARIES: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# a whole request: the local admission (microseconds) up to a cold model version loading (tens of seconds)
REQUEST_BOUNDARIES: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BOUNDARIES: Final = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
INFER_BOUNDARIES: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def tag_value(value: object) -> str:
    """`value` as a Ray tag value: its `str`, or UNKNOWN for None and the empty string."""
    if value is None:
        return UNKNOWN
    text = str(value)
    return text if text else UNKNOWN


class BoundedLabels:
    """Tag values that never grow a label set: the first `limit` distinct values keep their names,
    every later one is OTHER."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.named: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.named:
            return value
        if len(self.named) < self.limit:
            self.named.add(value)
            return value
        return OTHER


class TeamLabels:
    """Bounded `team` tag values for one replica: a token's team is the nearest ancestor's that sets
    one (as in reports and the console); the first MAX_TEAMS distinct teams keep their names and
    every later one is OTHER, so a label set never grows with the number of teams. A token with no
    team on its path is NO_TEAM; one whose package was not read yet is UNKNOWN. `label` does no I/O:
    it notes the package, and `resolve` (from the replica's periodic loop) reads the package trees."""

    def __init__(
        self, max_teams: int = MAX_TEAMS, ttl_s: float = TEAM_TTL_S, clock: Callable[[], float] = time.monotonic
    ):
        self.max_teams = max_teams
        self.ttl_s = ttl_s
        self.clock = clock
        self.named = BoundedLabels(max_teams)
        self.of: dict[str, str] = {}  # token id -> label
        self.read_at: dict[str, float] = {}  # package -> when its tree was read
        self.wanted: dict[str, None] = {}  # packages to read, oldest first

    def label(self, token_id: str | None, package: str | None) -> str:
        if not token_id or not package:
            return UNKNOWN
        known = self.of.get(token_id)
        if known is None or self.clock() - self.read_at.get(package, float("-inf")) > self.ttl_s:
            self.wanted.setdefault(package, None)
        return known or UNKNOWN

    def _bounded(self, team: Any) -> str:
        return self.named(str(team)) if team else NO_TEAM

    def learn(self, package: str, views: Iterable[Any]) -> None:
        """Labels for every token of a package's tree (views as `LedgerApi.tokens` returns them)."""
        tree: dict[str, Mapping[str, Any]] = {}
        for v in views:
            plain = asdict(v) if is_dataclass(v) and not isinstance(v, type) else dict(v)
            tree[str(plain["id"])] = plain
        for token_id in tree:
            self.of[token_id] = self._bounded(inherited(tree, token_id, "team")[0])
        self.read_at[package] = self.clock()
        self.wanted.pop(package, None)

    async def resolve(self, read: Callable[[str], Awaitable[Iterable[Any]]]) -> None:
        """Read up to TEAM_READS_PER_ROUND noted packages; a failed read is tried again next round."""
        for package in list(self.wanted)[:TEAM_READS_PER_ROUND]:
            try:
                self.learn(package, await read(package))
            except Exception as exc:  # metrics must never take the replica down
                log.debug("team labels of %s not read: %r", package, exc)
                self.wanted.pop(package, None)
                self.wanted[package] = None  # to the back of the queue


class IngressMetrics:
    """The metrics of one TokenCheck ingress replica.

    Tags: `decision` is the admission's code ("ok", "quota_exhausted", ...); `model` the model key
    (`name@version`); `package` the package (root token) the caller's token belongs to, one series
    per package; `path` "local" (admitted from this replica's lease) or "strict" (a synchronous
    ledger admission); `status` the HTTP status answered.
    """

    def __init__(self) -> None:
        self._admissions = Counter(
            "yt_admissions_total",
            description="Admission decisions, by decision code, model, package and path (local lease or strict).",
            tag_keys=("decision", "model", "package", "path", "team"),
        )
        self._units_used = Counter(
            "yt_units_used_total",
            description="Quota units charged for answered requests, by model and package.",
            tag_keys=("model", "package", "team"),
        )
        self._leases = Gauge(
            "yt_leases_outstanding",
            description="Leases this ingress replica holds now.",
        )
        self._lease_units = Gauge(
            "yt_lease_units",
            description="Units left in the leases this ingress replica holds now.",
        )
        self._report_lag = Histogram(
            "yt_report_lag_seconds",
            description="Age of the oldest usage row when its report reached the ledger.",
            boundaries=list(REPORT_LAG_BOUNDARIES),
        )
        self._request = Histogram(
            "yt_request_seconds",
            description="Time from receiving a detect request to answering it, by model and HTTP status.",
            boundaries=list(REQUEST_BOUNDARIES),
            tag_keys=("model", "status"),
        )
        self._lease_state: tuple[int, int] | None = None  # (outstanding, units) last set
        self._refreshed = time.monotonic()

    def refresh(self) -> None:
        """Set the gauges again to their last values, so that Ray keeps exporting them."""
        self._refreshed = time.monotonic()
        if self._lease_state is not None:
            outstanding, units = self._lease_state
            self._leases.set(outstanding)
            self._lease_units.set(units)

    def _tick(self) -> None:
        if time.monotonic() - self._refreshed >= REFRESH_S:
            self.refresh()

    def admission(self, decision: str, model: str, package: str, local: bool, team: str | None = None) -> None:
        """Count one admission decision (admitted or denied); `local` says it came from a lease;
        `team` is a bounded label (`TeamLabels`)."""
        self._tick()
        self._admissions.inc(
            1,
            {
                "decision": tag_value(decision),
                "model": tag_value(model),
                "package": tag_value(package),
                "path": LOCAL if local else STRICT,
                "team": tag_value(team),
            },
        )

    def units_used(self, units: int, model: str, package: str, team: str | None = None) -> None:
        """Count `units` charged (settled as used); zero or fewer counts nothing."""
        self._tick()
        if units > 0:
            tags = {"model": tag_value(model), "package": tag_value(package), "team": tag_value(team)}
            self._units_used.inc(int(units), tags)

    def leases(self, outstanding: int, units: int) -> None:
        """Set the number of leases this replica holds and the units left in them."""
        self._tick()
        self._lease_state = (int(outstanding), int(units))
        self._leases.set(self._lease_state[0])
        self._lease_units.set(self._lease_state[1])

    def report_lag(self, seconds: float) -> None:
        """Observe the lag of one usage report (negative values count as 0)."""
        self._tick()
        self._report_lag.observe(max(0.0, float(seconds)))

    def request(self, seconds: float, model: str, status: int) -> None:
        """Observe one answered request's latency (negative values count as 0)."""
        self._tick()
        self._request.observe(max(0.0, float(seconds)), {"model": tag_value(model), "status": tag_value(status)})


class DetectorMetrics:
    """The metrics of one Detector replica, tagged with its model key (`name@version`): batches, and
    its scheduler's queue, waits and refusals by priority level and package (DESIGN §3c). Package
    tags are bounded: the first MAX_PACKAGES packages this replica serves keep their id, the rest
    are OTHER. The queue gauge is set at each of the replica's publications (at most every second
    while it serves, and when its queue empties, to 0) and by `refresh()`; the Detector has no
    periodic loop, so an idle replica's series (0 since its queue emptied) lapse after Ray's gauge
    lifetime, which reads as what they are: nothing queued."""

    def __init__(self, model: str) -> None:
        default = {"model": tag_value(model)}
        self._batch_size = Histogram(
            "yt_detector_batch_size",
            description="Images per inference batch, by model.",
            boundaries=list(BATCH_SIZE_BOUNDARIES),
            tag_keys=("model",),
        )
        self._infer = Histogram(
            "yt_detector_infer_seconds",
            description="Inference time of one batch, by model.",
            boundaries=list(INFER_BOUNDARIES),
            tag_keys=("model",),
        )
        self._queued = Gauge(
            "yt_detector_queue_images",
            description="Images queued in the replica's scheduler, by model, priority level and package.",
            tag_keys=("model", "level", "package"),
        )
        self._wait = Histogram(
            "yt_detector_queue_wait_seconds",
            description="Time a request waited in the scheduler before its batch, by model, level and package.",
            boundaries=list(QUEUE_WAIT_BOUNDARIES),
            tag_keys=("model", "level", "package"),
        )
        self._refused = Counter(
            "yt_detector_refused_total",
            description="Requests refused as model_busy by the scheduler, by model, level and package.",
            tag_keys=("model", "level", "package"),
        )
        for metric in (self._batch_size, self._infer, self._queued, self._wait, self._refused):
            metric.set_default_tags(default)
        self.package_label = BoundedLabels(MAX_PACKAGES)
        self.depth: dict[tuple[str, str], float] = {}  # (level, package tag) -> images queued, last set

    def batch(self, size: int, infer_s: float) -> None:
        """Observe one inference batch of `size` images that took `infer_s` seconds; an empty batch is none."""
        if size < 1:
            return
        self._batch_size.observe(int(size))
        self._infer.observe(max(0.0, float(infer_s)))

    def waited(self, level: int, package: str, seconds: float) -> None:
        tags = {"level": str(level), "package": tag_value(self.package_label(package))}
        self._wait.observe(max(0.0, float(seconds)), tags=tags)

    def refused(self, level: int, package: str) -> None:
        self._refused.inc(1, tags={"level": str(level), "package": tag_value(self.package_label(package))})

    def queues(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """The scheduler's snapshot: queued images summed by (level, package label); a series seen
        before and empty now is set to 0, not left at its last value."""
        depth: dict[tuple[str, str], float] = dict.fromkeys(self.depth, 0.0)
        for r in rows:
            key = (str(r["level"]), tag_value(self.package_label(str(r["package"]))))
            depth[key] = depth.get(key, 0.0) + float(r["queued"])
        self.depth = depth
        self.refresh()

    def refresh(self) -> None:
        """Set the queue gauges again to their last values, so that Ray keeps exporting them."""
        for (level, package), value in self.depth.items():
            self._queued.set(value, tags={"level": level, "package": package})
