"""HTTP load helpers of the serving benchmarks: timed closed loops and interleaved single requests.

Plain asyncio + httpx on loopback; no Ray. Every request's status code is counted, and a non-200
answer is never counted as served.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (nearest rank, upper) of xs; NaN when empty."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))]


@dataclass(slots=True)
class Tally:
    """Requests to one target, summed over rounds."""

    ok: int = 0
    elapsed_s: float = 0.0
    lat_s: list[float] = field(default_factory=list)
    codes: dict[int, int] = field(default_factory=dict)

    def add(self, other: Tally) -> None:
        self.ok += other.ok
        self.elapsed_s += other.elapsed_s
        self.lat_s += other.lat_s
        for k, v in other.codes.items():
            self.codes[k] = self.codes.get(k, 0) + v

    def summary(self, images_per_request: int = 1) -> dict[str, Any]:
        return {
            "requests": len(self.lat_s),
            "codes": {str(k): v for k, v in sorted(self.codes.items())},
            "seconds": round(self.elapsed_s, 2),
            "images_per_s": round(self.ok * images_per_request / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "p50_ms": round(pct(self.lat_s, 0.5) * 1000, 2),
            "p99_ms": round(pct(self.lat_s, 0.99) * 1000, 2),
        }


async def closed_loop(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], bodies: list[bytes], concurrency: int, seconds: float
) -> Tally:
    """`concurrency` workers each sending one request after another for `seconds`."""
    t = Tally()
    stop = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        i = w
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await client.post(url, content=bodies[i % len(bodies)], headers=headers)
            t.lat_s.append(time.perf_counter() - t0)
            t.codes[r.status_code] = t.codes.get(r.status_code, 0) + 1
            t.ok += r.status_code == 200
            i += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*[worker(w) for w in range(concurrency)])
    t.elapsed_s = time.perf_counter() - t0
    return t


async def interleaved_rounds(
    urls: dict[str, str], headers: dict[str, str], bodies: list[bytes], concurrency: int, seconds: float, rounds: int
) -> dict[str, Tally]:
    """Throughput of each target, measured in alternating rounds (the order rotates every round),
    so that slow drifts of a shared machine fall on every target alike."""
    out = {name: Tally() for name in urls}
    names = list(urls)
    async with httpx.AsyncClient(timeout=120) as client:
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                out[name].add(await closed_loop(client, urls[name], headers, bodies, concurrency, seconds))
    return out


async def interleaved_singles(
    urls: dict[str, str], headers: dict[str, str], bodies: list[bytes], n: int
) -> tuple[dict[str, list[float]], list[dict[str, float]]]:
    """`n` requests to each target at concurrency 1, one target after the other (rotating order).
    Returns the latencies (s) per target and the `timing_ms` of every 200 answer that had one."""
    lat: dict[str, list[float]] = {name: [] for name in urls}
    timings: list[dict[str, float]] = []
    names = list(urls)
    async with httpx.AsyncClient(timeout=120) as client:
        for i in range(n):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                t0 = time.perf_counter()
                r = await client.post(urls[name], content=bodies[i % len(bodies)], headers=headers)
                lat[name].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"{name}: {r.status_code} {r.text[:300]}")
                timing = r.json().get("timing_ms")  # after the clock stopped
                if isinstance(timing, dict):
                    timings.append({k: float(v) for k, v in timing.items() if isinstance(v, int | float)})
    return lat, timings


def latency_summary(lat_s: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(lat_s, 0.5) * 1000, 2),
        "p99_ms": round(pct(lat_s, 0.99) * 1000, 2),
        "mean_ms": round(statistics.mean(lat_s) * 1000, 2) if lat_s else float("nan"),
    }
