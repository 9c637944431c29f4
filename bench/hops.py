"""The floor under the serving overhead: round trips of a no-op Serve handle call and a no-op
Ray actor call on this machine (JSON lines; the last line is the summary).

The token check adds at least one ledger actor round trip (the admission) to a request, and the
graph routes through one Serve handle per deployment it crosses; these are their costs here.

    python -m bench.hops [--calls 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time

from serve_app import launcher  # neither Ray nor ultralytics

if __name__ == "__main__":  # run as a script: the rules before Ray and ultralytics, imported below, read them
    launcher.apply_environment()

import ray
from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Noop:
    async def f(self, x: int) -> int:
        return x


@ray.remote(num_cpus=0)
class NoopActor:
    async def f(self, x: int) -> int:
        return x


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


async def measure(call: object, n: int) -> list[float]:
    for _ in range(20):
        await call()  # type: ignore[operator]
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()  # type: ignore[operator]
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=500)
    a = ap.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        handle = serve.run(Noop.bind(), name="noop", route_prefix=None)
        actor = NoopActor.remote()  # type: ignore[attr-defined]
        results = {}
        for name, call in (("serve_handle", lambda: handle.f.remote(1)), ("actor", lambda: actor.f.remote(1))):
            lat = asyncio.run(measure(call, a.calls))
            results[name] = lat
            print(json.dumps({"bench": "hops", "measure": name, "calls": a.calls,
                              "p50_ms": round(pct(lat, 0.5), 3), "p99_ms": round(pct(lat, 0.99), 3),
                              "mean_ms": round(statistics.mean(lat), 3)}), flush=True)  # fmt: skip
        print(json.dumps({
            "bench": "hops", "summary": True,
            "serve_handle_p50_ms": round(pct(results["serve_handle"], 0.5), 3),
            "actor_p50_ms": round(pct(results["actor"], 0.5), 3),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
        }), flush=True)  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
