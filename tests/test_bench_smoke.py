"""The in-process benchmarks still run against today's code (a signature change broke
`bench/metering_cost.py` once without any test noticing): a few requests each, the summary's keys
present. No figure is asserted: figures are measured by `make`-less runs and kept in
docs/BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return summary


def test_given_a_few_requests_then_the_metering_cost_bench_runs_and_summarizes() -> None:
    summary = run("bench.metering_cost", "--requests", "50")
    assert summary["summary"] is True
    assert {"verify_p50_us", "metered_minus_unmetered_p50_us", "admit_settle_p50_us"} <= set(summary)


def test_given_short_scenarios_then_the_isolation_bench_judges_every_goal() -> None:
    summary = run("bench.isolation", "--seconds", "0.3", "--replicas", "1")
    goals = summary["replicas"]["1"]["goals"]  # type: ignore[index]
    assert len(goals) == 8 and all(isinstance(g["met"], bool) for g in goals)
    assert isinstance(summary["goals_met"], bool)
