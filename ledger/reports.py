"""Cost reports over usage events (pure): units, requests and GPU milliseconds per team, cost
centre (`meta.cost_centre` of the token) or model. Used by the CLI and the console."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

GROUPINGS = ("team", "cost_centre", "model")


def _plain(view: Any) -> dict[str, Any]:
    return asdict(view) if is_dataclass(view) and not isinstance(view, type) else dict(view)


def cost_report(events: Iterable[Mapping[str, Any]], tokens: Sequence[Any], by: str = "team") -> list[dict[str, Any]]:
    """Units and GPU milliseconds per team (or cost centre in token meta) or per model."""
    info = {t["id"]: t for t in (_plain(v) for v in tokens)}
    agg: dict[str, dict[str, float]] = defaultdict(lambda: {"requests": 0, "units": 0, "gpu_ms": 0.0})
    for e in events:
        if e["state"] not in ("admitted", "settled"):
            continue
        t = info.get(e["token_id"], {})
        if by == "model":
            key = str(e["model"])
        elif by == "cost_centre":
            key = str((t.get("meta") or {}).get("cost_centre") or "(none)")
        else:
            key = str(t.get("team") or "(no team)")
        a = agg[key]
        a["requests"] += 1
        a["units"] += int(e["units"])
        a["gpu_ms"] += float(e.get("gpu_ms") or 0.0)
    return [{by: k, **{m: round(v, 1) for m, v in a.items()}} for k, a in sorted(agg.items())]
