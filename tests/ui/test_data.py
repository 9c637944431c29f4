"""The console's numbers (ui/data.py), pure: series with every bucket, inherited labels."""

from __future__ import annotations

from typing import Any

from ui.data import DAY, HOUR, queue_rows, team_rows, tree_rows, usage_series

NOW = 1_800_000_000.0


def token(id: str, parent: str | None, allocation: int, used: int = 0, **kw: Any) -> dict[str, Any]:
    t = {"id": id, "root_id": "r", "parent_id": parent, "name": id, "team": None, "allocation": allocation,
         "granted": allocation, "used": used, "delegated": 0, "leased": 0, "free": allocation - used,
         "consumed": used, "status": "active", "models": None, "ips": None, "rate": None,
         "thresholds": [80, 95, 100], "fired": [], "returned": 0}  # fmt: skip
    return {**t, **kw}


def test_given_a_burst_an_hour_ago_then_the_24_hour_series_has_every_hour_and_zeros_elsewhere() -> None:
    events = [{"ts": NOW - HOUR - 5, "token_id": "a", "model": "parts@1", "units": 3, "state": "settled"}]
    until = (NOW // HOUR + 1) * HOUR
    series = usage_series(events, {"a": "qa"}, "team", HOUR, since=until - DAY, until=until)
    assert list(series) == ["qa"] and len(series["qa"]) == 24
    assert sum(series["qa"].values()) == 3 and sorted(series["qa"].values())[-2:] == [0, 3]
    days = usage_series(events, {"a": "qa"}, "team", DAY, since=NOW - 30 * DAY, until=NOW)
    assert len(days["qa"]) in (30, 31) and sum(days["qa"].values()) == 3


def test_given_a_tree_then_team_rate_and_models_show_inherited_values_marked() -> None:
    tokens = [
        token("r", None, 100, team="pm", rate="5/s:10", models=["parts"], delegated=30, free=70),
        token("c", "r", 30, team=None),
    ]
    rows = {r["id"]: r for r in tree_rows(tokens, "r")}
    assert (rows["c"]["team"], rows["c"]["rate"], rows["c"]["models"]) == (
        "pm (inherited)", "5/s:10 (inherited)", "parts (inherited)"
    )  # fmt: skip
    assert (rows["r"]["team"], rows["r"]["granted"], rows["r"]["returned"]) == ("pm", 100, 0)


def test_given_a_deep_tree_then_names_are_indented_by_depth_without_markdown_code_blocks() -> None:
    tokens = [token("r", None, 100), token("c", "r", 30), token("g", "c", 10)]
    names = {r["id"]: r["token"] for r in tree_rows(tokens, "r")}
    assert names["r"] == "r" and names["c"].endswith("└\u00a0c") and names["g"].endswith("└\u00a0g")
    assert len(names["g"]) - len(names["c"]) == 4  # one level deeper
    # st.table renders cells as Markdown: 4 leading spaces or a tab would make a grey code block
    assert not any(n.startswith(("    ", "\t")) for n in names.values()), names


def test_given_a_team_spending_fast_then_its_row_warns_and_every_row_adds_up() -> None:
    tokens = [
        token("r", None, 1000, team="pm", delegated=100, free=900, consumed=90),
        token("c", "r", 100, 90, team="qa"),
    ]
    events = [{"ts": NOW - 60, "token_id": "c", "model": "m", "units": 90, "state": "settled"}]
    rows = {r["team"]: r for r in team_rows(tokens, events, NOW)}
    qa = rows["qa"]
    assert (qa["allocation"], qa["used"], qa["remaining"], qa["next_alert"]) == (100, 90, 10, 95)
    assert qa["exhaustion_soon"] and not rows["pm"]["exhaustion_soon"]
    for r in rows.values():
        assert r["allocation"] == r["used"] + r["remaining"]


def test_given_two_replicas_queues_then_the_table_sums_them_by_team_with_names() -> None:
    tokens = [
        token("r", None, 1000, name="factory", team="pm"),
        token("qa", "r", 100, name="qa-line", team="qa"),
        token("s", None, 1000, name="stress-test", root_id="s"),
    ]

    def row(replica: str, level: int, pkg: str, team: str, queued: int, served: int, wait: float) -> dict[str, Any]:
        return {"model": "parts@1", "replica": replica, "age_s": 0.4, "level": level, "package": pkg, "team": team,
                "queued": queued, "served": served, "refused": 1, "expired": 0, "wait_ms": wait}  # fmt: skip

    snapshot = [
        row("x", 1, "r", "qa", 3, 10, 20.0),
        row("y", 1, "r", "qa", 1, 30, 40.0),
        row("x", 1, "s", "s", 50, 100, 900.0),
        row("x", 0, "other", "other", 0, 5, 10.0),
    ]
    rows = queue_rows(snapshot, tokens)
    qa = next(r for r in rows if r["team"] == "qa")
    assert (qa["package"], qa["queued"], qa["served"], qa["refused"], qa["replicas"]) == ("factory", 4, 40, 2, 2)
    assert qa["mean_wait_ms"] == 35.0  # weighted by images served: (20*10 + 40*30) / 40
    stress = next(r for r in rows if r["package"] == "stress-test")
    assert stress["team"] == "stress-test (no team)"
    assert [r["level"] for r in rows] == [1, 1, 0]  # higher levels first, the busiest queue first
    assert rows[0]["package"] == "stress-test" and rows[-1]["package"] == "other"
