"""Pure shaping of ledger data for the console (no Streamlit, no Ray): tables, burn rate,
days-to-exhaustion forecast, usage series per team and per model, the token tree."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

DAY = 86400.0


def plain(view: Any) -> dict[str, Any]:
    """A TokenView (dataclass) or dict as a plain dict."""
    return asdict(view) if is_dataclass(view) and not isinstance(view, type) else dict(view)


def burn_rate(events: Iterable[Mapping[str, Any]], root_id: str, now: float, window_days: float = 7.0) -> float:
    """Units per day spent by a package over the last `window_days` (admitted and settled events)."""
    since = now - window_days * DAY
    units = sum(
        int(e["units"])
        for e in events
        if e["root_id"] == root_id and e["ts"] >= since and e["state"] in ("admitted", "settled")
    )
    return units / window_days


def days_left(remaining: int, rate_per_day: float) -> float | None:
    """Days until a package runs out at this burn rate; None when nothing is being spent."""
    if rate_per_day <= 0:
        return None
    return remaining / rate_per_day


def overview(
    tokens: Sequence[Any], events: Iterable[Mapping[str, Any]], now: float | None = None
) -> list[dict[str, Any]]:
    """One row per package: allocation, used (whole tree), remaining, burn rate, forecast."""
    now = time.time() if now is None else now
    events = list(events)
    rows = []
    for t in (plain(v) for v in tokens):
        if t["parent_id"] is not None:
            continue
        remaining = t["allocation"] - t["consumed"]
        rate = burn_rate(events, t["id"], now)
        left = days_left(remaining, rate)
        rows.append(
            {
                "package": t["name"],
                "id": t["id"],
                "team": t["team"],
                "status": t["status"],
                "allocation": t["allocation"],
                "used": t["consumed"],
                "remaining": remaining,
                "used_pct": round(100 * t["consumed"] / t["allocation"], 1) if t["allocation"] else 0.0,
                "burn_per_day": round(rate, 1),
                "days_to_exhaustion": None if left is None else round(left, 1),
                "expires_at": t["expires_at"],
            }
        )
    return sorted(rows, key=lambda r: r["package"])


def usage_series(
    events: Iterable[Mapping[str, Any]],
    teams: Mapping[str, str | None],
    by: str,
    bucket_s: float = 3600.0,
) -> dict[str, dict[float, int]]:
    """Units spent per time bucket, keyed by team (`by="team"`) or model (`by="model"`)."""
    out: dict[str, dict[float, int]] = defaultdict(lambda: defaultdict(int))
    for e in events:
        if e["state"] not in ("admitted", "settled"):
            continue
        key = (teams.get(e["token_id"]) or "(no team)") if by == "team" else str(e["model"])
        out[key][math.floor(e["ts"] / bucket_s) * bucket_s] += int(e["units"])
    return {k: dict(v) for k, v in out.items()}


def tree_rows(tokens: Sequence[Any], root_id: str) -> list[dict[str, Any]]:
    """The package's tokens, parents before children, with their depth (for an indented table)."""
    views = [plain(v) for v in tokens]
    kids: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for t in views:
        kids[t["parent_id"]].append(t)
    out: list[dict[str, Any]] = []

    def walk(t: dict[str, Any], depth: int) -> None:
        out.append(
            {
                "token": "    " * depth + ("└ " if depth else "") + t["name"],
                "id": t["id"],
                "team": t["team"],
                "status": t["status"],
                "allocation": t["allocation"],
                "used": t["used"],
                "delegated": t["delegated"],
                "leased": t.get("leased", 0),
                "free": t["free"],
                "models": ", ".join(t["models"] or []) or "any",
                "ips": ", ".join(t["ips"] or []) or "any",
                "rate": t["rate"] or "none",
            }
        )
        for c in sorted(kids[t["id"]], key=lambda x: x["name"]):
            walk(c, depth + 1)

    root = next((t for t in views if t["id"] == root_id), None)
    if root is not None:
        walk(root, 0)
    return out


def unplaceable(options: dict[str, Any], nodes: list[dict[str, float]]) -> str:
    """Why no node of the cluster, even idle, could hold one replica with these actor options ('' if one could)."""
    need = {"CPU": float(options.get("num_cpus") or 0), "GPU": float(options.get("num_gpus") or 0)}
    need.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    need = {k: v for k, v in need.items() if v > 0}
    if not need or any(all(node.get(k, 0.0) >= v for k, v in need.items()) for node in nodes):
        return ""
    return "cannot be scheduled: each replica needs " + ", ".join(
        f"{k} {v:g} (largest node: {max((node.get(k, 0.0) for node in nodes), default=0.0):g})" for k, v in need.items()
    )
