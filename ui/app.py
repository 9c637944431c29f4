"""yolo-tokens admin console (Streamlit): `streamlit run ui/app.py` (or `make serve`, which starts it).

Every read and write goes through the ledger's typed API (`ledger.LedgerApi`): the running
cluster's (`YT_RAY_ADDRESS`, default the local one), or the one a caller put in the session
state as `ledger_api` (the console's tests put an in-process `FakeLedger` there). Nothing works before sign-in with an
admin credential (`yolo-tokens admin issue`). New token credentials are shown once, never again.
"""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import pandas as pd
import streamlit as st
from PIL import Image, ImageDraw, ImageOps

from ledger import (
    ClientSettings,
    CredentialError,
    Issued,
    LedgerApi,
    LedgerError,
    LedgerSettings,
    TokenSpec,
    Verifier,
    connect,
    cost_report,
    iso_utc,
    usage_csv,
)
from ui.data import DAY, HOUR, plain, queue_rows, team_of, team_rows, tree_rows, unplaceable, usage_series

QUEUE_BOARD = "QueueBoard"  # the Detectors' queue board (serve_app.board.BOARD_NAME)
PAGES = ("Overview", "Token tree", "Alerts", "Audit", "Models", "Try it")
OUTCOMES = ("", "ok", "quota_exhausted", "rate_limited", "model_not_allowed", "ip_not_allowed", "expired_token",
            "revoked_token", "idempotency_conflict")  # fmt: skip


@st.cache_resource
def cluster_ledger() -> LedgerApi:
    return connect(ClientSettings.from_env().ray_address, LedgerSettings.from_env())


def ledger() -> LedgerApi:
    given: LedgerApi | None = st.session_state.get("ledger_api")
    return given if given is not None else cluster_ledger()


def sign_in(client: LedgerApi) -> str | None:
    """The signed-in admin's name, or None after drawing the sign-in form."""
    if st.session_state.get("admin"):
        return str(st.session_state["admin"])
    st.title("yolo-tokens console")
    cred = st.text_input("Admin credential", type="password", key="credential")
    if st.button("Sign in", key="signin") and cred:
        try:
            claims = Verifier(client.public_keys()).verify(cred)
        except CredentialError as exc:
            st.error(f"{exc.code.value}: {exc.message}")
            return None
        if claims.typ != "admin":
            st.error("forbidden: this is a token credential, not an admin credential")
            return None
        st.session_state["admin"] = claims.sub.removeprefix("admin:")
        st.rerun()
    st.caption("Get one with `yolo-tokens admin issue --name you` on the cluster.")
    return None


# ------------------------------------------------------------------ pages
def page_overview(client: LedgerApi) -> None:
    st.header("Overview")
    now = time.time()
    tokens = client.tokens()
    events = client.usage(since=now - 30 * DAY, limit=100_000)
    teams_table = team_rows(tokens, events, now)
    c1, c2, c3 = st.columns(3)
    c1.metric("Teams", len(teams_table))
    c2.metric("Units remaining", sum(r["remaining"] for r in teams_table))
    c3.metric(
        "Units used, last 24 h", sum(e["units"] for e in events if e["ts"] >= now - DAY and e["state"] != "denied")
    )
    for r in teams_table:
        if r["exhaustion_soon"]:
            st.warning(
                f"{r['team']}: projected exhaustion in {r['days_to_exhaustion'] * 24:.0f} h "
                f"({r['remaining']} units left at {r['burn_per_day']:.0f} units/day)"
            )
    table = pd.DataFrame(teams_table)
    if not table.empty:
        table = table[["team", "allocation", "used", "leased", "remaining", "used_pct", "burn_per_day",
                       "days_to_exhaustion", "next_alert", "tokens"]]  # fmt: skip
        table["next_alert"] = table["next_alert"].map(lambda v: "-" if v is None or pd.isna(v) else f"{int(v)} %")
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        column_config={
            "used_pct": st.column_config.ProgressColumn("used %", format="%.1f %%", min_value=0, max_value=100),
            "burn_per_day": st.column_config.NumberColumn("burn / day", format="%.1f"),
            "days_to_exhaustion": st.column_config.NumberColumn("days left", format="%.1f"),
            "next_alert": "next alert",
        },
    )
    views = {t["id"]: t for t in (plain(v) for v in tokens)}
    teams = {tid: team_of(views, tid) for tid in views}
    for title, bucket, span in (("per hour, last 24 h", HOUR, DAY), ("per day, last 30 days", DAY, 30 * DAY)):
        until = (now // bucket + 1) * bucket
        for by in ("team", "model"):
            series = usage_series(events, teams, by, bucket, since=until - span, until=until)
            st.subheader(f"Units by {by}, {title}")
            if series:
                frame = pd.DataFrame(series).sort_index().fillna(0)
                frame.index = pd.to_datetime(frame.index, unit="s", utc=True)
                st.bar_chart(frame)  # stacked, every bucket of the span (0 where nothing was spent)
            else:
                st.info("No usage in this span.")
    st.subheader("Cost report, last 7 days")
    by = st.radio("Group by", ["team", "cost_centre", "model"], horizontal=True, key="cost_by")
    week = [e for e in events if e["ts"] >= now - 7 * DAY]
    st.dataframe(pd.DataFrame(cost_report(week, tokens, by)), hide_index=True)


def label(t: Any) -> str:
    """A token as people read it: its name and team, the id after them."""
    v = plain(t)
    return f"{v['name']} · {v['team'] or '-'} ({v['id']})"


def iso(ts: float | None) -> str:
    return "" if ts is None or pd.isna(ts) else iso_utc(float(ts)) or ""


def _issued(out: Issued) -> None:
    t = plain(out.token)
    st.success(f"Token {t['id']} ({t['name']}) with {t['allocation']} units. Its credential, shown this once:")
    st.code(out.credential, language=None)  # st.code has a copy button


def page_tree(client: LedgerApi) -> None:
    st.header("Token tree")
    tokens = client.tokens()
    roots = {f"{t.name} ({t.id})": t.id for t in tokens if t.parent_id is None}
    with st.expander("Create a package", expanded=not roots), st.form("create"):
        name = st.text_input("Name", key="new_name")
        quota = st.number_input("Quota (units)", min_value=1, value=10_000, step=100, key="new_quota")
        days = st.number_input("Expires in days (0 = never)", min_value=0, value=30, key="new_days")
        team = st.text_input("Team", key="new_team")
        rate = st.text_input("Rate (basic, pro, enterprise or N/s[:BURST])", key="new_rate")
        emails = st.text_input("Alert e-mails (comma-separated)", key="new_emails")
        if st.form_submit_button("Create"):
            _act(lambda: _issued(client.create_package(_spec(name, quota, days, team, rate, emails))))
    tokens = client.tokens()  # again: a package created just now is listed at once
    roots = {label(t): t.id for t in tokens if t.parent_id is None}
    if not roots:
        return
    root_label = st.selectbox("Package", sorted(roots), key="package")
    root_id = roots[root_label]
    st.table(pd.DataFrame(tree_rows(tokens, root_id)).set_index("token"))  # plain HTML: every number is text
    ids = [r["id"] for r in tree_rows(tokens, root_id)]
    by_id = {t.id: label(t) for t in tokens}

    def name_of(token_id: str) -> str:  # selectors show names and teams, the id after them
        return by_id.get(token_id, token_id)

    tabs = st.tabs(["Split", "Top up", "Limits", "Revoke / reclaim", "Rotate"])
    with tabs[0], st.form("split"):
        parent = st.selectbox("Parent", ids, format_func=name_of, key="split_parent")
        name = st.text_input("Name", key="split_name")
        quota = st.number_input("Units", min_value=1, value=100, key="split_units")
        days = st.number_input("Expires in days (0 = the parent's)", min_value=0, value=0, key="split_days")
        team = st.text_input("Team", key="split_team")
        rate = st.text_input("Rate", key="split_rate")
        emails = st.text_input("Alert e-mails", key="split_emails")
        if st.form_submit_button("Split"):
            _act(lambda: _issued(client.split(parent, _spec(name, quota, days, team, rate, emails))))
    with tabs[1], st.form("topup"):
        target = st.selectbox("Token", ids, format_func=name_of, key="topup_token")
        units = st.number_input("Units", min_value=1, value=100, key="topup_units")
        if st.form_submit_button("Top up"):
            _act(lambda: st.success(f"now {plain(client.top_up(target, int(units)))['allocation']} units"))
    with tabs[2], st.form("limits"):
        target = st.selectbox("Token", ids, format_func=name_of, key="limits_token")
        days = st.number_input("Expires in days (0 = unchanged)", min_value=0, value=0, key="limits_days")
        models = st.text_input("Models (comma-separated; empty = unchanged)", key="limits_models")
        ips = st.text_input("IPs / CIDRs (comma-separated; empty = unchanged)", key="limits_ips")
        rate = st.text_input("Rate (empty = unchanged)", key="limits_rate")
        if st.form_submit_button("Save limits"):
            _act(
                lambda: (
                    client.update_limits(
                        target,
                        expires_at=time.time() + days * DAY if days else None,
                        models=_list(models),
                        ips=_list(ips),
                        rate=rate or None,
                    )
                    and st.success("limits saved")
                )
            )
    with tabs[3], st.form("revoke"):
        target = st.selectbox("Token", ids, format_func=name_of, key="revoke_token")
        action = st.radio("Action", ["reclaim unspent units", "revoke (subtree stops now)"], key="revoke_action")
        if st.form_submit_button("Apply"):
            if action.startswith("reclaim"):
                _act(lambda: st.success(f"{client.reclaim(target).returned} units returned to the parent"))
            else:
                _act(lambda: st.success(f"revoked; {client.revoke(target).returned} units returned"))
    with tabs[4], st.form("rotate"):
        target = st.selectbox("Token", ids, format_func=name_of, key="rotate_token")
        if st.form_submit_button("Rotate credential"):
            _act(lambda: _issued(client.rotate(target)))


def _spec(name: str, quota: float, days: float, team: str, rate: str, emails: str) -> TokenSpec:
    meta = {"alert_emails": _list(emails)} if _list(emails) else {}
    return TokenSpec.build(
        name.strip(),
        int(quota),
        expires_at=time.time() + days * DAY if days else None,
        rate=rate.strip() or None,
        team=team.strip() or None,
        meta=meta,
    )


def _list(text: str) -> list[str] | None:
    items = [x.strip() for x in text.split(",") if x.strip()]
    return items or None


def _act(fn: Any) -> None:
    try:
        fn()
    except LedgerError as exc:
        st.error(f"{exc.code.value}: {exc.message}")


def page_alerts(client: LedgerApi, admin: str) -> None:
    st.header("Alerts")
    alerts = client.alerts(limit=500)
    if not alerts:
        st.info("No alert has fired yet.")
        return
    counts = pd.Series([a["status"] for a in alerts]).value_counts()
    cols = st.columns(4)
    for col, status in zip(cols, ("pending", "delivered", "failed", "no_channel"), strict=True):
        col.metric(status, int(counts.get(status, 0)))
    names = {t.id: label(t) for t in client.tokens()}
    rows = [
        {
            "id": a["id"],
            "fired": iso(a["ts"]),
            "kind": a["kind"],
            "token": names.get(a["token_id"], a["token_id"]),
            "threshold %": a["threshold"],
            "consumed": f"{a['consumed']}/{a['allocation']}",
            "status": a["status"],
            "attempts": a["attempts"],
            "acknowledged": f"{a['acknowledged_by']} {iso(a['acknowledged_at'])}" if a["acknowledged_at"] else "",
            "last error": a["last_error"] or "",
        }
        for a in alerts
    ]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    open_ids = [a["id"] for a in alerts if not a["acknowledged_at"]]
    if open_ids:
        pick = st.selectbox("Acknowledge alert", open_ids, key="ack_id")
        if st.button("Acknowledge", key="ack"):
            _act(lambda: client.acknowledge_alert(int(pick), admin) and st.rerun())


def page_audit(client: LedgerApi) -> None:
    st.header("Audit")
    tokens = client.tokens()
    names = {t.id: label(t) for t in tokens}
    views = {t["id"]: t for t in (plain(v) for v in tokens)}
    team_by_id = {tid: team_of(views, tid) for tid in views}
    c1, c2, c3 = st.columns(3)
    token = c1.selectbox("Token", ["", *sorted(names)], format_func=lambda i: names.get(i, "all"), key="au_token")
    team = c2.selectbox("Team", ["", *sorted(set(team_by_id.values()))], key="au_team")
    outcome = c3.selectbox("Outcome", OUTCOMES, key="au_outcome")
    c4, c5 = st.columns(2)
    model = c4.text_input("Model (name@version)", key="au_model")
    days = c5.number_input("Last days", min_value=1, max_value=365, value=7, key="au_days")
    rows = client.usage(
        token_id=token or None,
        model=model or None,
        outcome=outcome or None,
        since=time.time() - days * DAY,
        limit=100_000,
    )
    if team:
        rows = [r for r in rows if team_by_id.get(r["token_id"]) == team]
    st.caption(f"{len(rows)} usage events")
    shown = pd.DataFrame(rows)
    if not shown.empty:
        shown.insert(1, "token", shown["token_id"].map(lambda i: names.get(i, i)))
        shown.insert(2, "team", shown["token_id"].map(lambda i: team_by_id.get(i, "")))
        for col in ("ts", "settled_at"):
            if col in shown:
                shown[col] = shown[col].map(iso)
    st.dataframe(shown, hide_index=True, width="stretch")
    st.download_button("Export CSV", "".join(usage_csv(rows)), file_name="usage.csv", mime="text/csv", key="csv")
    st.subheader("Admin events")
    admin_events = pd.DataFrame(client.admin_events(token or None, limit=200))
    if not admin_events.empty:
        admin_events["ts"] = admin_events["ts"].map(iso)
        if "token_id" in admin_events:
            admin_events.insert(1, "token", admin_events["token_id"].map(lambda i: names.get(i, i)))
    st.dataframe(admin_events, hide_index=True)


def page_models(client: LedgerApi) -> None:
    st.header("Models")
    import ray

    if not ray.is_initialized():  # a console on an in-process ledger: no cluster to ask
        st.info("The console is not attached to a Ray cluster: no Serve deployments to show.")
        return
    try:
        from ray import serve
        from ray.serve.context import _get_global_client

        status = serve.status()
        serve_client = _get_global_client()
        if serve_client is None:
            raise RuntimeError("no Serve controller on this cluster")
        details = serve_client.get_serve_details()
        nodes = [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]
    except Exception as exc:  # Serve not running on this cluster
        st.warning(f"Serve status unavailable: {type(exc).__name__}: {exc}")
        return
    rows = []
    for app_name, app in status.applications.items():
        configs = details.get("applications", {}).get(app_name, {}).get("deployments", {})
        for dep_name, dep in app.deployments.items():
            options = (configs.get(dep_name, {}).get("deployment_config") or {}).get("ray_actor_options") or {}
            placement = unplaceable(options, nodes)
            rows.append(
                {
                    "application": app_name,
                    "deployment": dep_name,
                    "status": "UNSCHEDULABLE"
                    if placement
                    else str(dep.status.value if hasattr(dep.status, "value") else dep.status),
                    "replicas": sum(dep.replica_states.values()),
                    "replica states": ", ".join(f"{k}: {v}" for k, v in dep.replica_states.items()) or "none",
                    "message": placement or dep.message,
                }
            )
    if not rows:
        st.info("No Serve application is running.")
        return
    for r in rows:
        if r["status"] == "UNSCHEDULABLE":
            st.error(f"{r['application']}/{r['deployment']} {r['message']}")
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    page_queues(client, serve, list(status.applications))


def page_queues(client: LedgerApi, serve: Any, apps: list[str]) -> None:
    """Each model version's scheduler queue by team (DESIGN §3c), from the QueueBoard the
    Detector replicas publish to (serve_app/board.py)."""
    st.subheader("Queues by team")
    snapshot: list[dict[str, Any]] = []
    for app_name in apps:
        try:
            board = serve.get_deployment_handle(QUEUE_BOARD, app_name=app_name)
            snapshot.extend(board.snapshot.remote().result(timeout_s=5))
        except Exception:  # an application without a board (another app on the cluster)
            continue
    rows = queue_rows(snapshot, client.tokens())
    if not rows:
        st.info("No queue reported in the last 30 s: the detectors are idle.")
        return
    st.caption(
        "Per model version, priority level and team, summed over replicas: images queued now, images "
        "served, requests refused as model_busy (refunded) or expired in the queue, mean wait."
    )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def page_try() -> None:
    st.header("Try it")
    url = ClientSettings.from_env().url
    cred = st.text_input("Token credential", type="password", key="try_cred")
    model = st.text_input("Model (empty = the default)", key="try_model")
    upload = st.file_uploader("Image", type=["jpg", "jpeg", "png", "webp", "bmp"], key="try_image")
    if not st.button("Detect", key="try_go"):
        return
    if upload is None or not cred:
        st.warning("Paste a token credential and choose an image first.")
        return
    data = upload.getvalue()
    params = {"model": model} if model else {}
    try:
        headers = {"Authorization": f"Bearer {cred}", "Content-Type": "application/octet-stream"}
        r = httpx.post(f"{url}/v1/detect", content=data, params=params, timeout=120, headers=headers)
    except httpx.HTTPError as exc:
        st.error(f"service unreachable at {url}: {exc}")
        return
    if r.status_code != 200:
        err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        st.error(f"{r.status_code} {err.get('code', '')}: {err.get('message', r.text[:200])}")
        return
    body = r.json()
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    draw = ImageDraw.Draw(img)
    for d in body["images"][0]["detections"]:
        b = d["box"]
        draw.rectangle((b["x1"], b["y1"], b["x2"], b["y2"]), outline=(230, 25, 75), width=3)
        text = f"{d['class_name']} {d['confidence']:.2f}"
        x0, y0, x1, y1 = draw.textbbox((b["x1"] + 3, b["y1"] + 2), text)
        draw.rectangle((x0 - 2, y0 - 2, x1 + 2, y1 + 2), fill=(230, 25, 75))  # legible on any image
        draw.text((b["x1"] + 3, b["y1"] + 2), text, fill=(255, 255, 255))
    u = body["usage"]
    st.success(f"charged {u['units']} unit(s); {u['remaining']} of {u['allocation']} remaining")
    st.image(img, caption=f"{len(body['images'][0]['detections'])} detections")


def main() -> None:
    st.set_page_config(page_title="yolo-tokens console", layout="wide")
    try:
        client = ledger()
    except LedgerError as exc:
        st.error(f"{exc.code.value}: {exc.message}")
        st.stop()
    admin = sign_in(client)
    if admin is None:
        st.stop()
    st.sidebar.write(f"Signed in as **{admin}**")
    page = st.sidebar.radio("Page", PAGES, key="page")
    if st.sidebar.button("Sign out", key="signout"):
        st.session_state.clear()
        st.rerun()
    try:
        if page == "Overview":
            page_overview(client)
        elif page == "Token tree":
            page_tree(client)
        elif page == "Alerts":
            page_alerts(client, admin)
        elif page == "Audit":
            page_audit(client)
        elif page == "Models":
            page_models(client)
        else:
            page_try()
    except LedgerError as exc:
        st.error(f"{exc.code.value}: {exc.message}")


main()
