"""QueueBoard: where the Detector replicas publish their schedulers' queues, for the console.

Each Detector replica publishes its scheduler's snapshot (queued and served images, refusals and
mean wait per priority level, package and team; the top packages by name, the rest as `other`) at
most once a second while it serves, and when its queue empties. The console's Models page reads
`snapshot()` and shows each model version's queue by team. One small replica, no CPU reserved;
what it holds is lost with it and refilled within a second of traffic.

`publish` answers only the detectors (the key the app builder derived from the ledger's
capability), so no one else can write a queue; `snapshot` is read-only.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from ray import serve

from serve_app import surface
from serve_app.errors import ApiCode, ApiError

BOARD_NAME = "QueueBoard"  # the deployment name the console looks up (ui/app.py)
STALE_S = 30.0  # a replica not heard from this long is gone (stopped, or idle long: nothing queued)


@serve.deployment(name=BOARD_NAME, num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class QueueBoard:
    __surface__ = surface.Surface(handle=frozenset({"publish", "snapshot"}))

    def __init__(self, key: str) -> None:
        surface.install()
        self.key = key
        self.queues: dict[tuple[str, str], tuple[float, list[dict[str, Any]]]] = {}  # (model, replica)

    def publish(self, model: str, replica: str, ts: float, rows: list[dict[str, Any]], key: str | None = None) -> None:
        if not isinstance(key, str) or not hmac.compare_digest(key, self.key):
            raise ApiError(ApiCode.FORBIDDEN, "only the detectors publish their queues")
        self.queues[(str(model), str(replica))] = (float(ts), list(rows))

    def snapshot(self) -> list[dict[str, Any]]:
        """One row per (model, replica, level, package, team), with the age of its replica's report."""
        now = time.time()
        out: list[dict[str, Any]] = []
        for (model, replica), (ts, rows) in sorted(self.queues.items()):
            if now - ts > STALE_S:
                continue
            out.extend({"model": model, "replica": replica, "age_s": round(now - ts, 1), **r} for r in rows)
        self.queues = {k: v for k, v in self.queues.items() if now - v[0] <= STALE_S}
        return out
