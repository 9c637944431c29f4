"""Pure shaping of ledger data for the console (no Streamlit, no Ray): tables, burn rate,
days-to-exhaustion forecast, usage series per team and per model, the token tree."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from ledger import inherited

DAY = 86400.0
HOUR = 3600.0
EXHAUSTION_WARN_S = 72 * HOUR  # a team projected to run out sooner is flagged


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


def team_of(views: Mapping[str, Mapping[str, Any]], token_id: str) -> str:
    """A token's team, inherited from the nearest ancestor that sets one; a package without any is
    named after the package, never `None`."""
    team, _ = inherited(views, token_id, "team")
    if team:
        return str(team)
    t = views.get(token_id)
    root = views.get(str(t["root_id"])) if t is not None else None
    return f"{root['name']} (no team)" if root is not None else "(no team)"


def team_rows(
    tokens: Sequence[Any], events: Iterable[Mapping[str, Any]], now: float | None = None
) -> list[dict[str, Any]]:
    """One row per team (tokens grouped by their inherited team): what the team holds (its tokens'
    used + leased + free: units delegated to a child of another team are that team's), used, leased,
    remaining, burn rate over 7 days, days to exhaustion, a warning under 72 h, the next alert."""
    now = time.time() if now is None else now
    views = {t["id"]: t for t in (plain(v) for v in tokens)}
    teams = {tid: team_of(views, tid) for tid in views}
    rows: dict[str, dict[str, Any]] = {}
    for tid, t in views.items():
        r = rows.setdefault(
            teams[tid],
            {
                "team": teams[tid],
                "tokens": 0,
                "allocation": 0,
                "used": 0,
                "leased": 0,
                "remaining": 0,
                "next_alert": None,
                "_week": 0,
            },
        )
        r["tokens"] += 1
        r["used"] += t["used"]
        r["leased"] += t.get("leased", 0)
        r["remaining"] += (t["free"] + t.get("leased", 0)) if t["status"] == "active" else 0
        parent = views.get(t["parent_id"]) if t["parent_id"] else None
        if t["status"] == "active" and (parent is None or teams[parent["id"]] != teams[tid]) and t["allocation"]:
            pct = 100 * t["consumed"] / t["allocation"]  # the team's top token: its alerts are the team's
            ahead = [th for th in t["thresholds"] if th > pct and th not in t["fired"]]
            if ahead and (r["next_alert"] is None or min(ahead) < r["next_alert"]):
                r["next_alert"] = min(ahead)
    for e in events:
        if e["state"] in ("admitted", "settled") and e["ts"] >= now - 7 * DAY and e["token_id"] in teams:
            rows[teams[e["token_id"]]]["_week"] += int(e["units"])
    out = []
    for r in rows.values():
        r["allocation"] = r["used"] + r["remaining"]
        r["used_pct"] = round(100 * r["used"] / r["allocation"], 1) if r["allocation"] else 0.0
        rate = r.pop("_week") / 7.0
        left = days_left(r["remaining"], rate)
        r["burn_per_day"] = round(rate, 1)
        r["days_to_exhaustion"] = None if left is None else round(left, 2)
        r["exhaustion_soon"] = left is not None and left * DAY < EXHAUSTION_WARN_S
        out.append(r)
    return sorted(out, key=lambda r: (r["team"].endswith("(no team)"), r["team"]))


def usage_series(
    events: Iterable[Mapping[str, Any]],
    teams: Mapping[str, str | None],
    by: str,
    bucket_s: float = 3600.0,
    since: float | None = None,
    until: float | None = None,
) -> dict[str, dict[float, int]]:
    """Units spent per time bucket, keyed by team (`by="team"`) or model (`by="model"`). With
    `since` and `until`, every bucket in between is there (0 where nothing was spent): a real series."""
    out: dict[str, dict[float, int]] = defaultdict(lambda: defaultdict(int))
    for e in events:
        if e["state"] not in ("admitted", "settled"):
            continue
        if (since is not None and e["ts"] < since) or (until is not None and e["ts"] >= until):
            continue
        key = (teams.get(e["token_id"]) or "(no team)") if by == "team" else str(e["model"])
        out[key][math.floor(e["ts"] / bucket_s) * bucket_s] += int(e["units"])
    if since is not None and until is not None:
        first, last = math.floor(since / bucket_s), math.ceil(until / bucket_s) - 1
        for series in out.values():
            for b in range(first, last + 1):
                series.setdefault(b * bucket_s, 0)
    return {k: dict(v) for k, v in out.items()}


def tree_rows(tokens: Sequence[Any], root_id: str) -> list[dict[str, Any]]:
    """The package's tokens, parents before children, with their depth (for an indented table)."""
    views = [plain(v) for v in tokens]
    by_id = {t["id"]: t for t in views}
    kids: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for t in views:
        kids[t["parent_id"]].append(t)
    out: list[dict[str, Any]] = []

    def own_or_inherited(t: dict[str, Any], read: Any, empty: str) -> str:
        """A limit or label the token sets, else the nearest ancestor's, marked "inherited"."""
        value, source = inherited(by_id, t["id"], read)
        return empty if not value else f"{value} (inherited)" if source else str(value)

    def walk(t: dict[str, Any], depth: int) -> None:
        out.append(
            {
                # non-breaking spaces: four plain ones open a Markdown code block in st.table's cell
                # (a grey pill that doubled the row's height)
                "token": "\u00a0\u00a0\u00a0\u00a0" * depth + ("└\u00a0" if depth else "") + t["name"],
                "id": t["id"],
                "team": own_or_inherited(t, lambda n: n["team"], "-"),
                "status": t["status"],
                "granted": t.get("granted") or t["allocation"],
                "used": t["used"],
                "leased": t.get("leased", 0),
                "free": t["free"],
                "delegated": t["delegated"],
                "returned": t.get("returned", 0),
                "models": own_or_inherited(t, lambda n: ", ".join(n["models"] or []), "any"),
                "ips": own_or_inherited(t, lambda n: ", ".join(n["ips"] or []), "any"),
                "rate": own_or_inherited(t, lambda n: n["rate"], "none"),
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


def queue_rows(snapshot: Iterable[Mapping[str, Any]], tokens: Sequence[Any]) -> list[dict[str, Any]]:
    """The Detector schedulers' queues (serve_app.board's snapshot: one row per model, replica,
    level, package and team) as one row per model version, level and team, summed over replicas,
    with the package and team named as people read them. Mean wait is weighted by served images."""
    views = {t["id"]: t for t in (plain(v) for v in tokens)}

    def name(token_id: str) -> str:
        t = views.get(token_id)
        return str(t["name"]) if t is not None else token_id

    rows: dict[tuple[str, int, str, str], dict[str, Any]] = {}
    for r in snapshot:
        key = (str(r["model"]), int(r["level"]), str(r["package"]), str(r["team"]))
        acc = rows.setdefault(
            key,
            {
                "model": key[0],
                "level": key[1],
                "package": name(key[2]),
                "team": team_of(views, key[3]) if key[3] in views else name(key[3]),
                "queued": 0,
                "served": 0,
                "refused": 0,
                "expired": 0,
                "_wait": 0.0,
                "replicas": 0,
            },
        )
        for k in ("queued", "served", "refused", "expired"):
            acc[k] += int(r[k])
        acc["_wait"] += float(r["wait_ms"]) * int(r["served"])
        acc["replicas"] += 1
    out = []
    for acc in rows.values():
        wait = acc.pop("_wait")
        acc["mean_wait_ms"] = round(wait / acc["served"], 1) if acc["served"] else 0.0
        out.append(acc)
    return sorted(out, key=lambda r: (r["model"], -r["level"], -r["queued"], -r["served"], r["team"]))
