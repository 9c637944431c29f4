"""Tenant isolation at the detector (issue 21, DESIGN §3c): `fair` against `fifo`, side by side.

    python -m bench.isolation [--seconds 6] [--out FILE]

The replicas are the real thing minus Ray: each is a `BatchRunner` (the Detector's scheduler and
batch loop, serve_app.engine.runner) around a FakeEngine whose every pass takes 25 ms for up to 8
images, so one replica's capacity is known: 320 images/s. Requests reach the replicas as Serve's
router sends them (the shorter queue of two), on 1 and then 2 replicas, with open-loop Poisson
arrivals of one image each, and a caller timeout of 10 s. Run in one process and one event loop so
that the load generator is not the bottleneck on a 2-core machine: what Ray adds (routing hops,
the proxy) is the same for both policies, and the Serve-level behaviour (HTTP, refunds, audit) is
tested in tests/hostile/test_isolation.py.

Scenarios (rates as multiples of capacity C), each run for both policies:

    scene       stress (custom, level 1, weight 1) floods at 5 C; production (pro, level 1,
                weight 2) sends 0.3 C.  Also production alone (scene_alone).
    equal       three tenants of one tier flood at 1 C, 2 C and 4 C.
    weighted    three tenants with weights 2:1:1 flood at 2 C each.
    pro_basic   pro (level 1) and basic (level 0) flood at 2 C each.  Also pro alone (pro_alone).

Goals for `fair` (`goals_met` is true only when all hold, on 1 and on 2 replicas):

    scene       production p99 <= 1.5 x its p99 alone; 0 production refusals; served >= 0.9 C;
                every stress refusal answered within 50 ms with a Retry-After
    equal       each 1/3 of the images served, +-10 % (relative)
    weighted    50 / 25 / 25 %, +-10 % (relative)
    pro_basic   pro p99 <= 1.5 x its p99 alone; basic >= its minimum share (0.1), -10 %

Prints the JSON summary on one line (and writes it, indented, to --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ledger import Service
from serve_app.engine.fake import timed
from serve_app.engine.runner import BatchRunner
from serve_app.engine.scheduler import Busy, SchedulerConfig
from serve_app.results import InferenceParams

PASS_S = 0.025
MAX_BATCH = 8
CAPACITY = MAX_BATCH / PASS_S  # images per second per replica
TIMEOUT_S = 10.0
WARMUP_S = 1.0
TICK_S = 0.002
REFUSAL_GOAL_S = 0.05
IMAGE = np.full((64, 64, 3), 100, np.uint8)
PARAMS = InferenceParams()


def tenant(name: str, tier: str, level: int, weight: float) -> Service:
    return Service(tier, level, weight, name, weight, name, weight)


STRESS = tenant("stress", "custom", 1, 1.0)
PRODUCTION = tenant("production", "pro", 1, 2.0)
PRO = tenant("pro", "pro", 1, 2.0)
BASIC = tenant("basic", "basic", 0, 1.0)
EQUAL = [tenant(n, "custom", 1, 1.0) for n in ("t1", "t2", "t4")]
WEIGHTED = [tenant("w2", "custom", 1, 2.0), tenant("w1a", "custom", 1, 1.0), tenant("w1b", "custom", 1, 1.0)]

SCENARIOS: dict[str, list[tuple[Service, float]]] = {  # tenant, rate in multiples of capacity
    "scene": [(STRESS, 5.0), (PRODUCTION, 0.3)],
    "scene_alone": [(PRODUCTION, 0.3)],
    "equal": [(EQUAL[0], 1.0), (EQUAL[1], 2.0), (EQUAL[2], 4.0)],
    "weighted": [(w, 2.0) for w in WEIGHTED],
    "pro_basic": [(PRO, 2.0), (BASIC, 2.0)],
    "pro_alone": [(PRO, 2.0)],
}


@dataclass
class Outcomes:
    latencies: list[float] = field(default_factory=list)  # served, seconds from arrival
    refusals: list[float] = field(default_factory=list)  # seconds from arrival to the refusal
    no_retry_after: int = 0
    served_images: int = 0
    failed: int = 0


class Router:
    """Serve's power of two choices: of two replicas picked at random, the one with less queued."""

    def __init__(self, runners: list[BatchRunner], rng: random.Random) -> None:
        self.runners = runners
        self.rng = rng

    def pick(self) -> BatchRunner:
        if len(self.runners) == 1:
            return self.runners[0]
        a, b = self.rng.sample(self.runners, 2)
        return a if a.scheduler.queued <= b.scheduler.queued else b


async def run_scenario(
    policy: str, replicas: int, load: list[tuple[Service, float]], seconds: float, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    engine_class = timed(PASS_S)
    config = SchedulerConfig(policy=policy, max_batch=MAX_BATCH)  # type: ignore[arg-type]
    runners = [
        BatchRunner(engine_class(Path("fake.pt"), imgsz=64, max_batch=MAX_BATCH).detect, config)
        for _ in range(replicas)
    ]
    router = Router(runners, rng)
    out = {s.package: Outcomes() for s, _ in load}
    start = time.monotonic()
    measure_from, end = start + WARMUP_S, start + WARMUP_S + seconds
    pending: set[asyncio.Future[None]] = set()

    async def one(s: Service, arrived: float) -> None:
        counted = arrived >= measure_from
        try:
            await router.pick().submit([IMAGE], PARAMS, s, TIMEOUT_S)
        except Busy as busy:
            if counted:
                out[s.package].refusals.append(time.monotonic() - arrived)
                out[s.package].no_retry_after += busy.retry_after <= 0
            return
        except Exception:
            out[s.package].failed += 1
            return
        done = time.monotonic()
        if counted and done <= end:
            out[s.package].latencies.append(done - arrived)
        if measure_from <= done <= end:
            out[s.package].served_images += 1

    lags: list[float] = []

    async def probe() -> None:  # the event loop's own delay: the load generator must not be the bottleneck
        while time.monotonic() < end:
            t = time.monotonic()
            await asyncio.sleep(0.001)
            if t >= measure_from:
                lags.append(time.monotonic() - t - 0.001)

    prober = asyncio.ensure_future(probe())
    # open loop: each tenant's arrivals are a Poisson process at its rate, launched on a 2 ms tick
    next_at = {s.package: start + rng.expovariate(rate * CAPACITY * replicas) for s, rate in load}
    while (now := time.monotonic()) < end:
        for s, rate in load:
            while next_at[s.package] <= now:
                f = asyncio.ensure_future(one(s, next_at[s.package]))
                pending.add(f)
                f.add_done_callback(pending.discard)
                next_at[s.package] += rng.expovariate(rate * CAPACITY * replicas)
        await asyncio.sleep(TICK_S)
    await asyncio.gather(*pending)
    await prober
    for r in runners:
        if r.task is not None:
            r.task.cancel()
    total = sum(o.served_images for o in out.values())
    return {
        "tenants": {
            name: {
                "served_per_s": round(o.served_images / seconds, 1),
                "share": round(o.served_images / total, 4) if total else 0.0,
                "p50_ms": _ms(_quantile(o.latencies, 0.5)),
                "p99_ms": _ms(_quantile(o.latencies, 0.99)),
                "refused": len(o.refusals),
                "refusal_max_ms": _ms(max(o.refusals) if o.refusals else None),
                "refusals_without_retry_after": o.no_retry_after,
                "failed": o.failed,
            }
            for name, o in out.items()
        },
        "served_per_s": round(total / seconds, 1),
        "capacity_per_s": CAPACITY * replicas,
        "loop_lag_ms": {
            "p50": _ms(_quantile(lags, 0.5)),
            "p99": _ms(_quantile(lags, 0.99)),
            "max": _ms(max(lags, default=0.0)),
        },
    }


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=1000, method="inclusive")[min(998, int(q * 1000) - 1)]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 2)


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b to 2 places; None when either was not measured (nothing served in the window)."""
    return None if a is None or not b else round(a / b, 2)


def _at_most(x: float | None, bound: float) -> bool:
    return x is not None and x <= bound


def goals(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal of the issue, for `fair`, with the figures it was judged on (fifo alongside)."""
    out = []

    def add(name: str, met: bool, fair: Any, fifo: Any) -> None:
        out.append({"goal": name, "met": bool(met), "fair": fair, "fifo": fifo})

    def t(policy: str, scenario: str, who: str) -> dict[str, Any]:
        return results[policy][scenario]["tenants"][who]

    alone = t("fair", "scene_alone", "production")["p99_ms"]
    ratio = {p: _ratio(t(p, "scene", "production")["p99_ms"], alone) for p in ("fair", "fifo")}
    add("scene: production p99 <= 1.5 x alone", _at_most(ratio["fair"], 1.5), ratio["fair"], ratio["fifo"])
    refused = {p: t(p, "scene", "production")["refused"] for p in ("fair", "fifo")}
    add("scene: 0 production refusals", refused["fair"] == 0, refused["fair"], refused["fifo"])
    through = {p: results[p]["scene"]["served_per_s"] / results[p]["scene"]["capacity_per_s"] for p in ("fair", "fifo")}
    add("scene: served >= 0.9 x capacity", through["fair"] >= 0.9, round(through["fair"], 3), round(through["fifo"], 3))
    fast = {
        p: (t(p, "scene", "stress")["refusal_max_ms"], t(p, "scene", "stress")["refusals_without_retry_after"])
        for p in ("fair", "fifo")
    }
    ok = fast["fair"][0] is not None and fast["fair"][0] <= 1000 * REFUSAL_GOAL_S and fast["fair"][1] == 0
    add("scene: every stress refusal <= 50 ms, with Retry-After", ok, fast["fair"], fast["fifo"])
    for scenario, want in (
        ("equal", {s.package: 1 / 3 for s in EQUAL}),
        ("weighted", {"w2": 0.5, "w1a": 0.25, "w1b": 0.25}),
    ):
        shares = {p: {k: t(p, scenario, k)["share"] for k in want} for p in ("fair", "fifo")}
        met = all(abs(shares["fair"][k] - v) <= 0.1 * v for k, v in want.items())
        add(
            f"{scenario}: shares {', '.join(f'{v:.0%}' for v in want.values())} +-10 %",
            met,
            shares["fair"],
            shares["fifo"],
        )
    pro_alone = t("fair", "pro_alone", "pro")["p99_ms"]
    pro_ratio = {p: _ratio(t(p, "pro_basic", "pro")["p99_ms"], pro_alone) for p in ("fair", "fifo")}
    add("pro_basic: pro p99 <= 1.5 x alone", _at_most(pro_ratio["fair"], 1.5), pro_ratio["fair"], pro_ratio["fifo"])
    basic = {p: t(p, "pro_basic", "basic")["share"] for p in ("fair", "fifo")}
    add("pro_basic: basic >= its minimum share (0.1) -10 %", basic["fair"] >= 0.09, basic["fair"], basic["fifo"])
    return out


async def main_async(seconds: float, replica_counts: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "bench": "isolation",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "engine": {"pass_ms": PASS_S * 1000, "max_batch": MAX_BATCH, "capacity_per_replica": CAPACITY},
        "seconds": seconds,
        "replicas": {},
    }
    all_met = True
    for replicas in replica_counts:
        results: dict[str, dict[str, Any]] = {"fair": {}, "fifo": {}}
        for i, (scenario, load) in enumerate(SCENARIOS.items()):
            for policy in ("fair", "fifo"):  # side by side, same seed
                results[policy][scenario] = await run_scenario(policy, replicas, load, seconds, seed=100 * replicas + i)
        judged = goals(results)
        all_met = all_met and all(g["met"] for g in judged)
        summary["replicas"][str(replicas)] = {"results": results, "goals": judged}
    summary["goals_met"] = all_met
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per scenario and policy")
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--out", type=Path)
    a = parser.parse_args()
    summary = asyncio.run(main_async(a.seconds, [int(x) for x in a.replicas.split(",")]))
    if a.out:
        a.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))  # one line: the summary is the last line, as every bench here prints


if __name__ == "__main__":
    main()
