"""Run the lease-protocol simulator: `python -m tests.sim.run --seeds 0-2000 --steps 300`.

`--seconds S` runs fresh seeds for S seconds (`make sim SIM_SECONDS=3600`); `--seed N` replays one
seed and prints its trace; `--mutation NAME` runs with one of the fixes of issue 17 reverted
(`tests/sim/mutations.py`) and reports the first seed that catches it. A failing seed prints the
one-line command that replays it and the last lines of its trace. Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import traceback
from typing import Any


def one(job: tuple[int, int, str, str | None]) -> dict[str, Any]:
    seed, steps, policy, mutation = job
    from tests.sim import mutations
    from tests.sim.oracle import Violation
    from tests.sim.world import World

    undo = mutations.apply(mutation) if mutation else None
    w = World(seed, steps, policy)
    try:
        stats = w.run()
        return {"seed": seed, "ok": True, **stats}
    except Violation as exc:
        return {"seed": seed, "ok": False, "error": str(exc), "trace": list(w.trace)}
    except Exception as exc:  # a crash of the code under test is a failure too
        return {"seed": seed, "ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": list(w.trace),
                "traceback": traceback.format_exc()}  # fmt: skip
    finally:
        if undo is not None:
            undo()


def replay_command(seed: int, steps: int, policy: str, mutation: str | None) -> str:
    """The one line that replays a seed (and prints its trace)."""
    extra = f" --mutation {mutation}" if mutation else ""
    return f".venv/bin/python -m tests.sim.run --seed {seed} --steps {steps} --policy {policy}{extra}"


def sweep(
    seeds: list[int] | None, steps: int, policies: list[str], seconds: float | None, workers: int,
    mutation: str | None = None, stop_at_first: bool = False,
) -> dict[str, Any]:  # fmt: skip
    t0 = time.perf_counter()
    failures: list[dict[str, Any]] = []
    runs = 0
    deadline = t0 + seconds if seconds else None

    def jobs() -> Any:
        n = 0
        while True:
            seed = seeds[n] if seeds is not None else n
            for policy in policies if policies != ["alt"] else [("refund", "charge")[seed % 2]]:
                yield (seed, steps, policy, mutation)
            n += 1
            if seeds is not None and n >= len(seeds):
                return
            if deadline is not None and time.perf_counter() > deadline:
                return

    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers) as pool:
        for r in pool.imap_unordered(one, jobs(), chunksize=4):
            runs += 1
            if not r["ok"]:
                failures.append(r)
                if stop_at_first:
                    pool.terminate()
                    break
    wall = time.perf_counter() - t0
    return {"runs": runs, "steps": steps, "wall_s": round(wall, 2), "seeds_per_s": round(runs / wall, 1),
            "failures": failures}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":  # set iteration order is part of a run: fix it
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "tests.sim.run", *(sys.argv[1:] if argv is None else argv)])
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seed", type=int)
    p.add_argument("--seeds", default="0-2000", help="A-B, or a list: 1537,4826")
    p.add_argument("--seconds", type=float)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument(
        "--policy",
        choices=("refund", "charge", "both", "alt"),
        default="alt",
        help="lost_lease_policy; alt: refund on even seeds, charge on odd ones",
    )
    p.add_argument("--workers", type=int, default=max(1, multiprocessing.cpu_count()))
    p.add_argument("--mutation")
    p.add_argument("--skip", default="", help="seeds left out (comma-separated): known open defects")
    a = p.parse_args(argv)
    policies = ["refund", "charge"] if a.policy == "both" else [a.policy]
    if a.seed is not None and a.policy == "alt":
        policies = [("refund", "charge")[a.seed % 2]]
    if a.seed is not None:
        for policy in policies:
            r = one((a.seed, a.steps, policy, a.mutation))
            if not r["ok"]:
                print("\n".join(r["trace"]))
                print(r.get("traceback", ""))
                print(f"FAILED seed {a.seed} ({policy}): {r['error']}")
                return 1
            print(json.dumps(r))
        return 0
    skip = {int(x) for x in a.skip.split(",") if x}
    if "," in a.seeds or "-" not in a.seeds:  # a list: 1537,4826
        listed = [int(x) for x in a.seeds.split(",") if x]
    else:
        lo, _, hi = a.seeds.partition("-")
        listed = list(range(int(lo), int(hi)))
    seeds = None if a.seconds else [x for x in listed if x not in skip]
    out = sweep(seeds, a.steps, policies, a.seconds, a.workers, a.mutation, stop_at_first=bool(a.mutation))
    for f in out["failures"][:3]:
        print("\n".join(f["trace"][-25:]))
    for f in out["failures"]:
        print(f"FAILED seed {f['seed']}: {f['error']}")
        print(f"  replay: {replay_command(f['seed'], a.steps, a.policy, a.mutation)}")
    print(json.dumps({k: v for k, v in out.items() if k != "failures"} | {"failed": len(out["failures"])}))
    return 1 if out["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
