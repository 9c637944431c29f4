"""The lease-protocol simulator in `make test` (DESIGN §3b): a bounded sweep, determinism, the seeds
that still find open defects (pinned, strict), and mutation runs: each reverted fix is caught.

`make sim SIM_SECONDS=3600` sweeps for longer; a failing seed prints the command that replays it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SWEEP_SEEDS = int(os.environ.get("YT_SIM_SEEDS", "500"))
# seeds that find defects still open (docs/RELIABILITY.md, "Open findings"): left out of the sweep and
# pinned below, so that a fix shows up (xpass fails) and nothing else may fail
OPEN_DEFECTS = {
    197: "a denial resent after a shard restart is recorded twice",
    214: "two copies of one request: one answered, charged 0",
    347: "rate bound exceeded around a shard restart (20/s token)",
    351: "a denial resent after a shard restart is recorded twice",
    441: "a denial resent after a shard restart is recorded twice",
    486: "rate bound exceeded around a shard restart (20/s token)",
}
# (mutation, a seed that catches it): found with `python -m tests.sim.run --mutation NAME`
CAUGHT = [("close_without_waiting", 52), ("closed_admits_locally", 139), ("refund_overwrites_settled", 171)]


def sim(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "tests.sim.run", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
        timeout=timeout,
    )  # fmt: skip


def test_given_the_bounded_sweep_then_every_seed_keeps_every_rule() -> None:
    skip = ",".join(str(s) for s in OPEN_DEFECTS if s < SWEEP_SEEDS)
    out = sim("--seeds", f"0-{SWEEP_SEEDS}", "--steps", "300", "--workers", "2", "--skip", skip)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["failed"] == 0 and summary["runs"] == SWEEP_SEEDS - len(skip.split(","))


def test_given_one_seed_twice_then_the_runs_are_identical() -> None:
    one, two = sim("--seed", "3", "--steps", "300"), sim("--seed", "3", "--steps", "300")
    assert one.returncode == two.returncode == 0, one.stdout[-3000:]
    assert one.stdout == two.stdout


@pytest.mark.parametrize("seed", sorted(OPEN_DEFECTS))
def test_given_a_seed_of_an_open_defect_then_it_still_fails(seed: int) -> None:
    out = sim("--seed", str(seed), "--steps", "300")
    assert out.returncode == 1, f"seed {seed} passes now ({OPEN_DEFECTS[seed]}): move it back into the sweep"


@pytest.mark.parametrize(("mutation", "seed"), CAUGHT)
def test_given_a_fix_reverted_then_the_simulator_catches_it(mutation: str, seed: int) -> None:
    assert sim("--seed", str(seed), "--steps", "300").returncode == 0, "the seed passes with every fix in"
    out = sim("--seed", str(seed), "--steps", "300", "--mutation", mutation)
    assert out.returncode == 1 and "FAILED" in out.stdout, out.stdout[-2000:]
