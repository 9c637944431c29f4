"""Prometheus metrics of a ledger shard, recorded through Ray's metrics API (`ray.util.metrics`).

    ShardMetrics          one per shard actor instance: group commits, quota remaining per package,
                          outstanding leases, units settled from lost leases
    tag_value(value)      a tag value Ray accepts: a string, never empty (None and "" are UNKNOWN)

Contract: every metric object is created in `ShardMetrics.__init__`, once per shard instance;
importing this module creates nothing (it does import Ray, so the pure core takes a ShardMetrics
passed in and never imports this module). The recording methods do no I/O: Ray buffers the values
in the process and its metrics agent exports them on the node's Prometheus endpoint every
`metrics_report_interval_ms` (10 s by default). They are safe to call at a high rate and in a
process where Ray is not initialised (the values then go nowhere). Every metric carries the tag
`shard`; a tag value that is None or empty is recorded as "unknown"; a counter increment that is
not positive is dropped, because Ray's `Counter.inc` raises on it.

Ray exposes these names with the prefix `ray_` (`yt_ledger_commits_total` is `ray_yt_ledger_commits_total`),
histograms with `_bucket`, `_sum` (rebuilt by Ray from bucket midpoints, so approximate) and `_count`.
Gauges are kept alive here: Ray's agent forgets a gauge series that its process has not set again
within two report intervals (20 s by default), even while the process lives. ShardMetrics remembers
the last value of each gauge series and sets them all again (`refresh()`) when any of its methods
runs at least REFRESH_S after the last refresh; a shard that may stay idle calls `refresh()` from a
periodic loop at least every REFRESH_S. The series vanish with the process: a restarted shard sets
`quota_remaining` again for the packages it loads.
"""

from __future__ import annotations

import time
from typing import Final

from ray.util.metrics import Counter, Gauge, Histogram

UNKNOWN: Final = "unknown"
REFRESH_S: Final = 5.0  # well inside Ray's gauge lifetime of 2 x metrics_report_interval_ms (10 s by default)

# one group commit on SQLite or PostgreSQL: sub-millisecond to seconds when the database struggles
COMMIT_BOUNDARIES: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def tag_value(value: object) -> str:
    """`value` as a Ray tag value: its `str`, or UNKNOWN for None and the empty string."""
    if value is None:
        return UNKNOWN
    text = str(value)
    return text if text else UNKNOWN


class ShardMetrics:
    """The metrics of one ledger shard, tagged `shard` with its index.

    `package` tags name the package (root token) a value belongs to: one series per package the
    shard owns. `policy` is the lost-lease policy that settled a lease ("refund" or "charge").
    """

    def __init__(self, shard: int) -> None:
        default = {"shard": tag_value(shard)}
        self._commit = Histogram(
            "yt_ledger_commit_seconds",
            description="Duration of one group commit to the database, by shard.",
            boundaries=list(COMMIT_BOUNDARIES),
            tag_keys=("shard",),
        )
        self._commits = Counter(
            "yt_ledger_commits_total",
            description="Group commits, by shard.",
            tag_keys=("shard",),
        )
        self._ops = Counter(
            "yt_ledger_ops_total",
            description="Operations written by group commits, by shard (ops per commit = ops rate / commits rate).",
            tag_keys=("shard",),
        )
        self._quota_remaining = Gauge(
            "yt_quota_remaining_units",
            description="Free units of a package root (allocation - used - delegated - leased), by package.",
            tag_keys=("shard", "package"),
        )
        self._leases = Gauge(
            "yt_ledger_leases_outstanding",
            description="Leases granted by the shard and not yet released or expired.",
            tag_keys=("shard",),
        )
        self._leased_units = Gauge(
            "yt_ledger_leased_units",
            description="Units held in the shard's outstanding leases.",
            tag_keys=("shard",),
        )
        self._lost_lease = Counter(
            "yt_lost_lease_units_total",
            description="Units of leases whose holder died, settled at their TTL, by shard and lost-lease policy.",
            tag_keys=("shard", "policy"),
        )
        for metric in (
            self._commit,
            self._commits,
            self._ops,
            self._quota_remaining,
            self._leases,
            self._leased_units,
            self._lost_lease,
        ):
            metric.set_default_tags(default)
        self._remaining: dict[str, int] = {}  # package -> free units last set
        self._lease_state: tuple[int, int] | None = None  # (outstanding, units) last set
        self._refreshed = time.monotonic()

    def refresh(self) -> None:
        """Set the gauges again to their last values, so that Ray keeps exporting them."""
        self._refreshed = time.monotonic()
        for package, units in self._remaining.items():
            self._quota_remaining.set(units, {"package": package})
        if self._lease_state is not None:
            outstanding, units = self._lease_state
            self._leases.set(outstanding)
            self._leased_units.set(units)

    def _tick(self) -> None:
        if time.monotonic() - self._refreshed >= REFRESH_S:
            self.refresh()

    def commit(self, seconds: float, ops: int) -> None:
        """Observe one group commit that wrote `ops` operations in `seconds` (negative seconds count as 0)."""
        self._tick()
        self._commit.observe(max(0.0, float(seconds)))
        self._commits.inc(1)
        if ops > 0:
            self._ops.inc(int(ops))

    def quota_remaining(self, package: str, units: int) -> None:
        """Set the free units of `package`'s root (remembered until the shard's process ends)."""
        self._tick()
        key = tag_value(package)
        self._remaining[key] = int(units)
        self._quota_remaining.set(self._remaining[key], {"package": key})

    def leases(self, outstanding: int, units: int) -> None:
        """Set the number of the shard's outstanding leases and the units they hold."""
        self._tick()
        self._lease_state = (int(outstanding), int(units))
        self._leases.set(self._lease_state[0])
        self._leased_units.set(self._lease_state[1])

    def lost_lease(self, units: int, policy: str) -> None:
        """Count `units` of a lost lease settled by `policy`; zero or fewer counts nothing."""
        self._tick()
        if units > 0:
            self._lost_lease.inc(int(units), {"policy": tag_value(policy)})
