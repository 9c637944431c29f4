"""Which requests a Detector replica runs next (DESIGN §3c): priority levels, fair share, bounds.

Every request that reaches a replica waits here, not in the callers' routers (the Detector's
`max_ongoing_requests` is raised so that they hand requests over at once), and the scheduler
forms each batch the engine runs. Plain Python: the `Scheduler` is synchronous and clock-driven
(the tests and the benchmark drive it directly); `serve_app.engine.runner.BatchRunner` is its
asyncio loop around one engine, one batch at a time, the forward pass in a worker thread.

The policy `fair`, in a few lines:

* **Levels.** Each request carries its token's `Service` (ledger.core.service; a `Tenant` here): a priority level and
  weights. The highest level with queued work is served first, except that every lower level with
  queued work earns `min_share` of each image served, and is served whenever its credit covers its
  next request: so a backlogged lower level gets at least `min_share` of the images, and all of
  what the levels above leave (work-conserving: capacity never idles while anything is queued).
* **Fair share inside a level**, hierarchical: packages by their package weight, then inside a
  package its teams (the package's direct children) by theirs. Each is served in order of least
  normalized service (images served / weight), start-time fair queuing: a flow that goes idle
  and comes back starts at the level's current virtual time less one batch of credit, so a light
  tenant's burst of up to a batch goes ahead of the backlogged ones (its delay stays what it is
  alone), and idleness is not banked beyond that one batch.
* **Bounds.** A flow's queue is bounded by its share of the replica's measured drain rate: a
  request whose estimated wait (the flow's queued images ahead of it, at the flow's share of the
  drain rate) exceeds `queue_s` is refused at once (`Busy`, with the seconds after which it would
  fit). A queued request that has not started by its deadline (its timeout less one batch) is
  refused too (`Busy`), so no request waits out its caller's timeout in a queue. `max_queued`
  images in all bound the memory, whatever the rate estimate says.
* **Batches.** Requests are taken in that order up to `max_batch` images (a request larger than a
  batch goes alone); the engine groups a batch's images by letterboxed shape, as before.

The policy `fifo` is one queue in arrival order with the same total bound: today's behaviour,
bounded, for comparison (bench/isolation.py) and for single-tenant deployments.
"""

from __future__ import annotations

import itertools
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Policy = Literal["fair", "fifo"]


class Tenant(Protocol):
    """Whose request it is: what the scheduler reads of the ledger's `Service` (ledger.core.service)."""

    @property
    def level(self) -> int: ...
    @property
    def package(self) -> str: ...
    @property
    def package_weight(self) -> float: ...
    @property
    def team(self) -> str: ...
    @property
    def team_weight(self) -> float: ...


OTHER = "other"  # the package label of everything outside the top N (bounded metric cardinality)
TOP_PACKAGES = 10
MAX_TALLIES = 10_000  # (level, package, team) counters kept; idle ones are forgotten past it
_RATE_SAMPLES = 32


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: Policy = "fair"
    queue_s: float = 1.0  # the longest estimated wait a request may queue for
    max_batch: int = 8  # images per batch
    batch_wait_s: float = 0.005  # an idle engine waits this long for a batch to fill
    min_share: float = 0.1  # of the images, for each lower level that has work queued
    max_queued: int = 4096  # images queued in all

    def __post_init__(self) -> None:
        if self.policy not in ("fair", "fifo"):
            raise ValueError(f"scheduler policy must be fair or fifo, got {self.policy!r}")
        if not (0 < self.queue_s <= 3600 and self.max_batch >= 1 and 0 <= self.batch_wait_s <= 3600):
            raise ValueError("scheduler needs 0 < queue_s <= 3600, max_batch >= 1, 0 <= batch_wait_s <= 3600")
        if not (0 < self.min_share <= 0.5 and self.max_queued >= self.max_batch):
            raise ValueError("scheduler needs 0 < min_share <= 0.5 and max_queued >= max_batch")


class Busy(Exception):
    """Refused by the scheduler: the requester's queue is full, or its request could not start in time."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


@dataclass(eq=False, slots=True)
class Job:
    cost: int  # images
    service: Tenant
    enqueued: float
    deadline: float
    payload: Any = None  # the runner's (images, params, future)
    seq: int = 0
    flow: _Flow | None = field(default=None, repr=False)


@dataclass(eq=False, slots=True)
class _Flow:
    """One team's queue at one level."""

    key: str
    weight: float
    vserved: float = 0.0
    jobs: deque[Job] = field(default_factory=deque)
    queued: int = 0  # images
    pkg: _Pkg | None = field(default=None, repr=False)
    per_batch: float | None = None  # EWMA of its images per batch while it had work queued


@dataclass(eq=False, slots=True)
class _Pkg:
    key: str
    weight: float
    vserved: float = 0.0
    vtime: float = 0.0  # the virtual time of its teams
    teams: dict[str, _Flow] = field(default_factory=dict)
    active: int = 0  # teams with queued work
    queued: int = 0
    active_weight: float = 0.0  # sum of the active teams' weights

    def oldest(self) -> int:
        """Arrival order of its oldest queued request: the tie-break among equal service."""
        return min(f.jobs[0].seq for f in self.teams.values() if f.jobs)


@dataclass(eq=False, slots=True)
class _Level:
    level: int
    vtime: float = 0.0
    credit: float = 0.0  # images it may be served out of priority order (its minimum share)
    pkgs: dict[str, _Pkg] = field(default_factory=dict)
    queued: int = 0
    active_weight: float = 0.0  # sum of the active packages' weights
    share: float = 0.0  # EWMA of its fraction of the images served


@dataclass(slots=True)
class Tally:
    """Counters of one (level, package, team) since the replica started."""

    queued: int = 0  # images now
    served: int = 0  # images
    refused: int = 0  # requests
    expired: int = 0  # requests
    wait_s: float = 0.0  # summed over served requests
    requests: int = 0  # served


class Scheduler:
    """Synchronous and clock-free: every method takes `now` (seconds, monotonic)."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.levels: dict[int, _Level] = {}
        self.fifo: deque[Job] = deque()
        self.queued = 0  # images, all flows
        self.seq = itertools.count()
        self.samples: deque[tuple[int, float, bool]] = deque(maxlen=_RATE_SAMPLES)
        self.drain: float | None = None  # images per second the engine clears under load
        self.batch_s: float | None = None  # median seconds per batch
        self.tally: dict[tuple[int, str, str], Tally] = {}  # (level, package, team)

    # ------------------------------------------------------------ admission to the queue
    def offer(self, service: Tenant, cost: int, now: float, timeout_s: float, payload: Any = None) -> Job:
        """Queue a request of `cost` images, or raise `Busy`."""
        if cost < 1:
            raise ValueError("a request has at least one image")
        c = self.config
        job = Job(cost, service, now, now + self._patience(timeout_s), payload, next(self.seq))
        tally = self._tally(service)
        if self.queued + cost > c.max_queued:
            tally.refused += 1
            raise Busy(f"the model's queue is full ({self.queued} images)", self.retry_after(self.queued, 1.0))
        if c.policy == "fifo":
            ahead, share = self.queued, 1.0
        else:
            level, pkg, flow = self._find(service)
            ahead = flow.queued if flow else 0
            share = self._share(service, level, pkg, flow)
            if flow is not None and flow.queued and flow.per_batch is not None and self.drain and self.batch_s:
                # backlogged now: what it has been getting per batch is its rate (what the share
                # formula cannot know: how much the others leave it)
                share = min(1.0, max(flow.per_batch / self.batch_s / self.drain, c.min_share * share))
        if self.drain is not None and ahead + cost > max(c.max_batch, c.queue_s * self.drain * share):
            tally.refused += 1
            raise Busy(
                f"this model is busy: your share of it is queued for more than {c.queue_s:g} s",
                self.retry_after(ahead + cost - c.queue_s * self.drain * share, share),
            )
        self._push(job)
        tally.queued += cost
        return job

    def _find(self, service: Tenant) -> tuple[_Level | None, _Pkg | None, _Flow | None]:
        level = self.levels.get(service.level)
        pkg = level.pkgs.get(service.package) if level else None
        return level, pkg, pkg.teams.get(service.team) if pkg else None

    def share(self, service: Tenant) -> float:
        """The fraction of the drain rate a flow of `service` would get now (as if it had work)."""
        return self._share(service, *self._find(service))

    def _share(self, service: Tenant, level: _Level | None, pkg: _Pkg | None, flow: _Flow | None) -> float:
        pkg_weights = (level.active_weight if level else 0.0) + (0.0 if pkg and pkg.active else service.package_weight)
        pkg_share = (pkg.weight if pkg and pkg.active else service.package_weight) / pkg_weights
        team_weights = (pkg.active_weight if pkg else 0.0) + (0.0 if flow and flow.queued else service.team_weight)
        team_share = (flow.weight if flow and flow.queued else service.team_weight) / team_weights
        return self._level_fraction(service.level) * pkg_share * team_share

    def _level_fraction(self, level: int) -> float:
        above = sum(v.share for k, v in self.levels.items() if k > level and v.queued)
        return max(self.config.min_share, 1.0 - above)

    def _patience(self, timeout_s: float) -> float:
        """How long a request may wait to start: its timeout less one batch (and a margin)."""
        batch = self.batch_s or 0.0
        return max(0.0, timeout_s - 2 * batch - 0.05)

    def retry_after(self, excess_images: float, share: float) -> float:
        """Seconds until `excess_images` of a flow drain at its share (one batch at least)."""
        drain = (self.drain or 0.0) * share
        batch = self.batch_s or 0.1
        return round(max(batch, excess_images / drain if drain > 0 else 1.0), 3)

    def _push(self, job: Job) -> None:
        self.queued += job.cost
        if self.config.policy == "fifo":
            self.fifo.append(job)
            return
        s = job.service
        level = self.levels.get(s.level)
        if level is None:
            level = self.levels[s.level] = _Level(s.level)
        pkg = level.pkgs.get(s.package)
        if pkg is None:
            pkg = level.pkgs[s.package] = _Pkg(s.package, s.package_weight)
        flow = pkg.teams.get(s.team)
        if flow is None:
            flow = pkg.teams[s.team] = _Flow(s.team, s.team_weight, pkg=pkg)
        if not level.queued:
            level.credit = 0.0
        # (re)activated: starts at the level's virtual time less one batch of credit (bounded lag):
        # a tenant below its share gets a burst of up to a batch ahead of the backlogged ones (low
        # delay for light users), and idleness is not banked beyond that
        credit = self.config.max_batch
        if not pkg.queued:
            pkg.weight = s.package_weight
            pkg.vserved = max(pkg.vserved, level.vtime - credit / pkg.weight)
            level.active_weight += pkg.weight
        if not flow.queued:
            flow.per_batch = None  # its rate is measured afresh for this backlog
            flow.weight = s.team_weight
            flow.vserved = max(flow.vserved, pkg.vtime - credit / flow.weight)
            pkg.active_weight += flow.weight
            pkg.active += 1
        job.flow = flow
        flow.jobs.append(job)
        flow.queued += job.cost
        pkg.queued += job.cost
        level.queued += job.cost

    def _pop(self, job: Job) -> None:
        """Take a queued job off its queue (served, cancelled or expired)."""
        self.queued -= job.cost
        t = self.tally.get((job.service.level, job.service.package, job.service.team))
        if t is not None:
            t.queued -= job.cost
        if self.config.policy == "fifo":
            self.fifo.remove(job)
            return
        flow = job.flow
        assert flow is not None and flow.pkg is not None
        pkg = flow.pkg
        level = self.levels[job.service.level]
        flow.jobs.remove(job)
        flow.queued -= job.cost
        pkg.queued -= job.cost
        level.queued -= job.cost
        if not flow.queued:
            pkg.active_weight -= flow.weight
            pkg.active -= 1
        if not pkg.queued:
            level.active_weight -= pkg.weight
        if not level.queued:
            level.credit = 0.0

    def cancel(self, job: Job) -> None:
        """The caller went away before its request started: it leaves the queue."""
        if (job.flow is not None and job in job.flow.jobs) or job in self.fifo:
            self._pop(job)

    # ------------------------------------------------------------ batches
    def next_batch(self, now: float) -> tuple[list[Job], list[Job]]:
        """The jobs of the next batch, in service order, and the queued jobs past their deadline
        (taken off the queue: the caller refuses them as `Busy`)."""
        flows = self._backlogged()
        expired = self._expired(now, flows)
        backlogged = [f for f in flows if f.queued]  # what is left after the expired went
        batch: list[Job] = []
        images = 0
        while self.queued:
            job = self._peek()
            if batch and images + job.cost > self.config.max_batch:
                break
            self._serve(job)
            batch.append(job)
            images += job.cost
            if images >= self.config.max_batch:
                break
        got: dict[int, int] = {}
        for job in batch:
            t = self._tally(job.service)
            t.served += job.cost
            t.requests += 1
            t.wait_s += now - job.enqueued
            got[id(job.flow)] = got.get(id(job.flow), 0) + job.cost
        for flow in backlogged:
            x = got.get(id(flow), 0)
            flow.per_batch = x if flow.per_batch is None else 0.8 * flow.per_batch + 0.2 * x
        return batch, expired

    def _backlogged(self) -> list[_Flow]:
        if self.config.policy == "fifo":
            return []
        return [
            flow
            for level in self.levels.values()
            if level.queued
            for pkg in level.pkgs.values()
            if pkg.queued
            for flow in pkg.teams.values()
            if flow.queued
        ]

    def _expired(self, now: float, flows: list[_Flow]) -> list[Job]:
        """Queued jobs past their deadline, from the head of each queue (deadlines grow in arrival
        order within a queue; one behind a live head is found once that head has gone)."""
        late: list[Job] = []
        queues = [self.fifo] if self.config.policy == "fifo" else [flow.jobs for flow in flows]
        for q in queues:
            for j in q:
                if j.deadline > now:
                    break
                late.append(j)
        for j in late:
            self._pop(j)
            self._tally(j.service).expired += 1
        return late

    def _peek(self) -> Job:
        if self.config.policy == "fifo":
            return self.fifo[0]
        active = sorted((k for k, v in self.levels.items() if v.queued), reverse=True)
        level = self.levels[active[0]]
        for k in active[1:]:  # a lower level whose minimum share is due goes first
            lower = self.levels[k]
            if lower.credit >= self._head(lower).cost:
                level = lower
                break
        return self._head(level)

    @staticmethod
    def _head(level: _Level) -> Job:
        pkg = min((p for p in level.pkgs.values() if p.queued), key=lambda p: (p.vserved, p.oldest()))
        flow = min((f for f in pkg.teams.values() if f.queued), key=lambda f: (f.vserved, f.jobs[0].seq))
        return flow.jobs[0]

    def _serve(self, job: Job) -> None:
        if self.config.policy == "fair":
            flow = job.flow
            assert flow is not None and flow.pkg is not None
            pkg = flow.pkg
            level = self.levels[job.service.level]
            level.vtime = max(level.vtime, pkg.vserved)
            pkg.vtime = max(pkg.vtime, flow.vserved)
            pkg.vserved += job.cost / pkg.weight
            flow.vserved += job.cost / flow.weight
            top = max(k for k, v in self.levels.items() if v.queued)
            if job.service.level != top:
                level.credit -= job.cost
            cap = 2 * self.config.max_batch
            for k, v in self.levels.items():
                if k != top and v.queued:
                    v.credit = min(v.credit + self.config.min_share * job.cost, max(cap, self._head(v).cost))
        self._pop(job)

    def done(self, batch: Sequence[Job], seconds: float, saturated: bool) -> None:
        """A batch ran for `seconds`; `saturated`: work was still queued when it was formed."""
        images = sum(j.cost for j in batch)
        if not images or seconds <= 0:
            return
        self.samples.append((images, seconds, saturated))
        full = [n / t for n, t, sat in self.samples if sat]
        if len(full) >= 3:
            self.drain = statistics.median(full)
        else:  # not loaded yet: as if a full batch took as long (optimistic, corrected under load)
            self.drain = statistics.median(self.config.max_batch / t for _, t, _ in self.samples)
        self.batch_s = statistics.median(t for _, t, _ in self.samples)
        if self.config.policy == "fair":
            per_level: dict[int, int] = {}
            for j in batch:
                per_level[j.service.level] = per_level.get(j.service.level, 0) + j.cost
            for k, v in self.levels.items():
                v.share = 0.8 * v.share + 0.2 * per_level.get(k, 0) / images

    # ------------------------------------------------------------ visibility
    def _tally(self, s: Tenant) -> Tally:
        key = (s.level, s.package, s.team)
        t = self.tally.get(key)
        if t is None:
            if len(self.tally) >= MAX_TALLIES:  # forget idle tenants' counters: memory stays bounded
                for k in [k for k, v in self.tally.items() if not v.queued][: MAX_TALLIES // 2]:
                    del self.tally[k]
            t = self.tally[key] = Tally()
        return t

    def snapshot(self, top: int = TOP_PACKAGES) -> list[dict[str, Any]]:
        """Per (level, package, team): queued images, served images, refused and expired requests,
        mean wait. The `top` (package, team) pairs by images served and queued; the rest summed
        as package and team `other`. Bounded whatever the number of tenants."""
        ranked = sorted(self.tally.items(), key=lambda kv: -(kv[1].served + kv[1].queued))
        rows: dict[tuple[int, str, str], Tally] = {}
        for i, ((level, pkg, team), t) in enumerate(ranked):
            key = (level, pkg, team) if i < top else (level, OTHER, OTHER)
            acc = rows.setdefault(key, Tally())
            for name in Tally.__slots__:
                setattr(acc, name, getattr(acc, name) + getattr(t, name))
        return [
            {
                "level": level,
                "package": pkg,
                "team": team,
                "queued": t.queued,
                "served": t.served,
                "refused": t.refused,
                "expired": t.expired,
                "wait_ms": round(1000 * t.wait_s / t.requests, 2) if t.requests else 0.0,
            }
            for (level, pkg, team), t in sorted(rows.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2]))
        ]


__all__ = ["Busy", "Job", "Policy", "Scheduler", "SchedulerConfig", "Tally", "Tenant"]
