"""The lease-protocol simulator in `make test` (DESIGN §3b): a bounded sweep, determinism, the seeds
and mutation runs: each reverted fix is caught.

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
SWEEP_SEEDS = int(os.environ.get("YT_SIM_SEEDS", "2000"))  # issue 17: 2,000 x 300 steps in 2 min
# seeds that find defects still open (docs/RELIABILITY.md, "Open findings"): left out of the sweep
OPEN_DEFECTS: dict[int, str] = {}
CAUGHT = [
    ("close_without_waiting", 52),
    ("closed_admits_locally", 236),
    ("refund_overwrites_settled", 171),
    ("first_copy_settles", 196),
    ("resend_applied_again", 349),
    ("reclaim_ignored", 696),
    ("reload_latest_outcome_wins", 1227),
    ("copy_skips_access_check", 2595),
    ("rate_stash_never_expires", 2143),  # a seed with bursts (BURSTY_EVERY)
    ("refund_names_no_copy", 10352),  # found by `make sim` beyond the sweep
    ("waiting_copy_debits_again", 6746),  # found by `make sim` beyond the sweep
    ("copies_forgotten_on_restart", 14951),  # found by `make sim` beyond the sweep (42 answered on 40)
    ("named_copy_settles_local", 23834),  # found by `make sim` beyond the sweep (charged 17, answered 18)
    ("idle_release_takes_inflight", 454),  # a seed of the RACY class (a request as a report round runs)
    ("strict_copy_admitted_locally", 6110),  # found by `make sim` beyond the sweep (issue 21's session)
]
# seeds beyond the sweep that found a defect (of the code or of the simulator's own accounting)
FOUND_LATER = [1537, 2143, 2595, 4826, 6110, 6746, 10352, 14951, 23376, 23834]


def sim(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "tests.sim.run", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
        timeout=timeout,
    )  # fmt: skip


def test_given_the_bounded_sweep_then_every_seed_keeps_every_rule() -> None:
    skip = [str(s) for s in OPEN_DEFECTS if s < SWEEP_SEEDS]
    out = sim("--seeds", f"0-{SWEEP_SEEDS}", "--steps", "300", "--workers", "2", "--skip", ",".join(skip))
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["failed"] == 0 and summary["runs"] == SWEEP_SEEDS - len(skip)


def test_given_the_seeds_found_beyond_the_sweep_then_each_keeps_every_rule() -> None:
    out = sim("--seeds", ",".join(str(s) for s in FOUND_LATER), "--steps", "300")
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]


def test_given_one_seed_twice_then_the_runs_are_identical() -> None:
    one, two = sim("--seed", "3", "--steps", "300"), sim("--seed", "3", "--steps", "300")
    assert one.returncode == two.returncode == 0, one.stdout[-3000:]
    assert one.stdout == two.stdout


@pytest.mark.parametrize(("mutation", "seed"), CAUGHT)
def test_given_a_fix_reverted_then_the_simulator_catches_it(mutation: str, seed: int) -> None:
    # that the seed passes with every fix in is shown by the sweep (seeds below SWEEP_SEEDS) or by
    # the FOUND_LATER run; a smaller sweep (YT_SIM_SEEDS) runs it here
    if seed >= SWEEP_SEEDS and seed not in FOUND_LATER:
        assert sim("--seed", str(seed), "--steps", "300").returncode == 0, "the seed passes with every fix in"
    out = sim("--seed", str(seed), "--steps", "300", "--mutation", mutation)
    assert out.returncode == 1 and "FAILED" in out.stdout, out.stdout[-2000:]
