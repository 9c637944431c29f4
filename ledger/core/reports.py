"""Cost reports over usage events (pure): units, requests and GPU milliseconds per team, cost
centre (`meta.cost_centre` of the token) or model. Used by the CLI and the console.

Team, cost centre and alert contacts are inherited: a token that does not set one has its nearest
ancestor's (`inherited`)."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

GROUPINGS = ("team", "cost_centre", "model")
# what a token inherits from its nearest ancestor that sets it: (key, read from the token's view)
INHERITED: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "team": lambda t: t.get("team"),
    "cost_centre": lambda t: (t.get("meta") or {}).get("cost_centre"),
    "alert_emails": lambda t: (t.get("meta") or {}).get("alert_emails"),
    "alert_webhooks": lambda t: (t.get("meta") or {}).get("alert_webhooks"),
}


def _plain(view: Any) -> dict[str, Any]:
    return asdict(view) if is_dataclass(view) and not isinstance(view, type) else dict(view)


def inherited(
    tokens: Mapping[str, Mapping[str, Any]], token_id: str, key: str | Callable[[Mapping[str, Any]], Any]
) -> tuple[Any, str | None]:
    """(value, id of the ancestor it comes from; None when the token sets it itself) of `key` (one
    of INHERITED, or a reader of a token's view) for `token_id`; (None, None) when no token on its
    path sets it."""
    read = INHERITED[key] if isinstance(key, str) else key
    t = tokens.get(token_id)
    first = True
    seen = 0
    while t is not None and seen < 64:  # a tree is at most MAX_TREE_DEPTH deep; never loop on bad input
        value = read(t)
        if value:
            return value, None if first else str(t["id"])
        first, seen = False, seen + 1
        parent = t.get("parent_id")
        t = tokens.get(parent) if parent else None
    return None, None


def cost_report(events: Iterable[Mapping[str, Any]], tokens: Sequence[Any], by: str = "team") -> list[dict[str, Any]]:
    """Units and GPU milliseconds per team (or cost centre in token meta) or per model."""
    info = {t["id"]: t for t in (_plain(v) for v in tokens)}
    agg: dict[str, dict[str, float]] = defaultdict(lambda: {"requests": 0, "units": 0, "gpu_ms": 0.0})
    for e in events:
        if e["state"] not in ("admitted", "settled"):
            continue
        if by == "model":
            key = str(e["model"])
        elif by == "cost_centre":
            key = str(inherited(info, e["token_id"], "cost_centre")[0] or "(none)")
        else:
            key = str(inherited(info, e["token_id"], "team")[0] or "(no team)")
        a = agg[key]
        a["requests"] += 1
        a["units"] += int(e["units"])
        a["gpu_ms"] += float(e.get("gpu_ms") or 0.0)
    return [{by: k, **{m: round(v, 1) for m, v in a.items()}} for k, a in sorted(agg.items())]


def iso_utc(ts: float | None) -> str | None:
    """Epoch seconds as ISO-8601 UTC with milliseconds, e.g. `2026-12-01T06:40:12.345Z`."""
    if ts is None:
        return None
    whole = math.floor(ts)
    ms = min(999, round((ts - whole) * 1000))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{ms:03d}Z"
