"""The console's screenshots in docs/ (issue 18 §8): every page, in headless Chromium, on realistic data.

    make screenshots          # or: .venv/bin/python -m tests.ui.screenshots --out docs/screenshots

It starts `yolo-tokens serve` (loopback ports of its own, a temporary $HOME and SQLite database;
stopped by pid), and then goes through the real API. Over the HTTP admin route it creates 3 packages
and 8 team tokens. It sends about 3,500 images of machine parts (the demo renderer's) to
`POST /v1/detect` with the teams' credentials, and adds a few denials: a rate-limited burst, and a
request for more units than are left.

A week cannot pass in a script. So the service is stopped, and every timestamp of those packages is
moved back in the database: creation 7 days ago, each request to a time drawn from a factory's
two-shift day (a night job for `qa-nightly`, a ramp-up for the paint shop), and each alert to the
moment its threshold was crossed. Balances are not touched. The service is then started again on
that database, and the pages are captured. The numbers in the pictures are what the ledger says.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import io
import json
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.cli import local_service
from ledger.client.over_http import AdminFile, HttpLedger
from ledger.core.entities import TokenSpec
from serve_app.demo.synth import render
from tests.ui.browser import CHROMIUM

REPO = Path(__file__).resolve().parents[2]
PORTS = {"ray": 6396, "http": 8132, "console": 8532, "dashboard": 8285, "metrics": 8286}
DAY, HOUR = 86400.0, 3600.0
PER_REQUEST = 10  # images per request (the service takes up to 16)

# (package, team, cost centre, allocation, rate) and its tokens: (name, quota, units to use, rate, models)
PLAN: list[tuple[tuple[str, str, str, int, str], list[tuple[str, int, int, str | None, list[str] | None]]]] = [
    (("press-line", "stamping", "CC-110", 4000, "pro"), [
        ("press-vision", 1500, 900, None, None),
        ("press-algo", 1000, 450, None, ["parts@1"]),
        ("press-test", 300, 120, "basic", None),
        ("press-frontend", 500, 200, None, None),
    ]),
    (("paint-shop", "finishing", "CC-220", 1800, "pro"), [
        ("paint-inspect", 1200, 1000, None, None),
        ("paint-dev", 500, 330, None, None),
    ]),
    (("qa-lab", "quality", "CC-330", 1200, "pro"), [
        ("qa-bench", 600, 250, None, None),
        ("qa-nightly", 300, 285, None, None),
    ]),
]  # fmt: skip


# ------------------------------------------------------------------ the service
def start(tmp: Path, db: Path, log: Path) -> subprocess.Popen[bytes]:
    _, env = local_service(tmp, db, PORTS["http"])
    exe = Path(sys.executable).parent / "yolo-tokens"
    proc = subprocess.Popen(
        [str(exe), "serve", "--config", str(tmp / "ray_config.yaml"), "--port", str(PORTS["ray"]),
         "--console-port", str(PORTS["console"]), "--dashboard-port", str(PORTS["dashboard"]),
         "--metrics-port", str(PORTS["metrics"])],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while "Ctrl-C" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(log.read_text()[-3000:])
        time.sleep(1)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)


def images(n: int, seed: int) -> list[str]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        render(seed, "shots", i, 320)[0].save(buf, format="JPEG", quality=85)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


# ------------------------------------------------------------------ a week of use, through the API
def populate(ledger: HttpLedger, url: str) -> dict[str, Any]:
    tokens: dict[str, dict[str, Any]] = {}
    for (pkg, team, cc, quota, rate), kids in PLAN:
        issued = ledger.create_package(TokenSpec.build(pkg, quota, rate=rate, team=team, meta={"cost_centre": cc}))
        tokens[pkg] = {"id": issued.token.id, "credential": issued.credential, "use": 0}
        for name, q, use, kid_rate, models in kids:
            kid = ledger.split(issued.token.id, TokenSpec.build(name, q, rate=kid_rate, models=models))
            tokens[name] = {"id": kid.token.id, "credential": kid.credential, "use": use, "root": issued.token.id}
    pool = images(40, 7)
    sent = 0
    with httpx.Client(base_url=url, timeout=120, trust_env=False) as http:
        for t in tokens.values():
            left = t["use"]
            i = 0
            while left > 0:
                n = min(PER_REQUEST, left)
                batch = [pool[(i + k) % len(pool)] for k in range(n)]
                r = http.post("/v1/detect", json={"images": batch},
                              headers={"Authorization": f"Bearer {t['credential']}"})  # fmt: skip
                if r.status_code == 429 and r.json()["error"]["code"] == "rate_limited":
                    time.sleep(float(r.headers.get("Retry-After", "1")))
                    continue
                r.raise_for_status()
                left -= n
                sent += n
                i += n
        # denials, as a week has them: a burst on the `basic` token, a request beyond what is left
        basic = {"Authorization": f"Bearer {tokens['press-test']['credential']}"}
        codes = [http.post("/v1/detect", json={"image": pool[0]}, headers=basic).status_code for _ in range(4)]
        nightly = {"Authorization": f"Bearer {tokens['qa-nightly']['credential']}"}  # 15 units left, 16 asked
        codes.append(http.post("/v1/detect", json={"images": pool[:16]}, headers=nightly).status_code)
    return {"tokens": tokens, "images_sent": sent, "denial_codes": codes}


# ------------------------------------------------------------------ the week, in the database
def shift_day(hour: float, token: str, day: int) -> float:
    """How busy an hour of the day is (UTC): two shifts, 06-22, a lull at 14; weekend light."""
    if token == "qa-nightly":
        return 1.0 if 1 <= hour < 4 else 0.0  # a night job
    base = 1.0 if 6 <= hour < 22 else 0.08
    if 13.5 <= hour < 14.5:
        base *= 0.4
    if day % 7 in (5, 6):  # Saturday, Sunday of the window
        base *= 0.3
    if token.startswith("paint"):  # a new line ramping up: the last days are the busiest
        base *= 0.3 + day / 3.0
    return base


def draw_times(n: int, token: str, t0: float, t1: float, rng: random.Random) -> list[float]:
    """n sorted times in [t0, t1), distributed by `shift_day` (10-minute grid, then jittered)."""
    grid = [t0 + i * 600.0 for i in range(int((t1 - t0) // 600))]
    weights = [shift_day((g % DAY) / HOUR, token, int((g - t0) // DAY)) for g in grid]
    cum, total = [], 0.0
    for w in weights:
        total += w
        cum.append(total)
    out = []
    for _ in range(n):
        k = bisect.bisect_left(cum, rng.random() * total)
        out.append(grid[min(k, len(grid) - 1)] + rng.random() * 600.0)
    return sorted(out)


def move_back(db: Path, populated: dict[str, Any], now: float) -> dict[str, int]:
    """Creation 7 days ago, every request at a time of the week, alerts where they were crossed."""
    rng = random.Random(18)
    t0, t1 = now - 7 * DAY, now - 600.0
    ids = {t["id"]: name for name, t in populated["tokens"].items()}
    con = sqlite3.connect(db)
    moved = {"tokens": 0, "admin_events": 0, "usage_events": 0, "alerts": 0}
    with con:
        first = con.execute(
            f"SELECT min(ts) FROM admin_events WHERE token_id IN ({','.join('?' * len(ids))})", list(ids)
        ).fetchone()[0]
        delta_admin = (t0 - HOUR) - first
        for tid in ids:
            moved["tokens"] += con.execute(
                "UPDATE tokens SET created_at = created_at + ? WHERE id = ?", (delta_admin, tid)
            ).rowcount
            moved["admin_events"] += con.execute(
                "UPDATE admin_events SET ts = ts + ? WHERE token_id = ?", (delta_admin, tid)
            ).rowcount
        for tid, name in ids.items():
            rows = con.execute("SELECT id, ts, settled_at FROM usage_events WHERE token_id = ? ORDER BY id",
                               (tid,)).fetchall()  # fmt: skip
            for (rid, ts, settled), when in zip(rows, draw_times(len(rows), name, t0, t1, rng), strict=True):
                con.execute(
                    "UPDATE usage_events SET ts = ?, settled_at = ? WHERE id = ?",
                    (when, None if settled is None else when + (settled - ts), rid),
                )
                moved["usage_events"] += 1
        # an alert fired when its token's subtree crossed the threshold: that request's new time
        alerts = con.execute("SELECT id, token_id, consumed, ts FROM alerts").fetchall()
        for aid, tid, consumed, ts in alerts:
            if tid not in ids:
                continue
            subtree = [t["id"] for t in populated["tokens"].values() if t["id"] == tid or t.get("root") == tid]
            events = con.execute(
                f"SELECT ts, units FROM usage_events WHERE token_id IN ({','.join('?' * len(subtree))}) "
                "AND state != 'denied' ORDER BY ts", subtree,
            ).fetchall()  # fmt: skip
            total, when = 0, t1
            for ets, units in events:
                total += units
                if total >= consumed:
                    when = ets
                    break
            d = when - ts
            con.execute(
                "UPDATE alerts SET ts = ts + ?, delivered_at = delivered_at + ?, next_attempt_at = NULL "
                "WHERE id = ?", (d, d, aid),
            )  # fmt: skip
            moved["alerts"] += 1
    con.close()
    return moved


# ------------------------------------------------------------------ every page
# (page, file, what shows it has drawn, window height): Streamlit scrolls inside the page, so a
# "full page" shot is one window; the window is as tall as the page's content
PAGES = [
    ("Overview", "console-overview.png", "Units remaining", 2500),
    ("Token tree", "console-token-tree.png", "Create a package", 1900),
    ("Alerts", "console-alerts.png", "Acknowledge alert", 1000),
    ("Audit", "console-audit.png", "usage events", 1500),
    ("Models", "console-models.png", "[data-testid=stDataFrame]", 700),  # a canvas: no cell text to find
]


def screenshots(url: str, admin: str, out: Path, credential: str, sample: Path) -> dict[str, str]:
    from playwright.sync_api import sync_playwright

    texts: dict[str, str] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(url, wait_until="networkidle", timeout=60_000)
            page.get_by_label("Admin credential").fill(admin)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_text("Signed in as").wait_for(timeout=60_000)
            for title, name, marker, height in PAGES:
                page.set_viewport_size({"width": 1440, "height": height})
                page.get_by_text(title, exact=True).first.click()
                found = page.locator(marker) if marker.startswith("[") else page.get_by_text(marker)
                found.first.wait_for(timeout=60_000)
                if title == "Token tree":  # the largest package, not the demo (first by name)
                    page.locator("[data-testid=stSelectbox]").first.click()
                    page.get_by_role("option", name=re.compile("^press-line")).click()
                    page.get_by_text("press-frontend").first.wait_for(timeout=60_000)
                page.wait_for_timeout(2500)  # charts and tables draw after the data arrives
                page.screenshot(path=str(out / name), full_page=True)
                texts[title] = page.inner_text("body")
            page.set_viewport_size({"width": 1440, "height": 1300})
            page.get_by_text("Try it", exact=True).click()
            page.get_by_label("Token credential").fill(credential)
            page.locator("input[type=file]").set_input_files(str(sample))
            page.get_by_role("button", name="Detect").click()
            page.get_by_text("detections").first.wait_for(timeout=120_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / "console-try-it.png"), full_page=True)
            texts["Try it"] = page.inner_text("body")
        finally:
            browser.close()
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="yt-shots-") as name:
        tmp = Path(name)
        db = tmp / "ledger.db"
        proc = start(tmp, db, tmp / "serve-1.log")
        try:
            found = AdminFile(tmp / "home" / ".yolo-tokens" / "admin.json").read()
            assert found is not None, "serve wrote no admin credential for the CLI"
            url, credential = found
            ledger = HttpLedger(url, credential)
            t = time.monotonic()
            populated = populate(ledger, url)
            populated["populate_s"] = round(time.monotonic() - t, 1)
        finally:
            stop(proc)
        populated["moved"] = move_back(db, populated, time.time())
        proc = start(tmp, db, tmp / "serve-2.log")
        try:
            log = (tmp / "serve-2.log").read_text()
            admin = log.split("(12 h, shown once):\n", 1)[1].splitlines()[0].strip()
            url, credential = AdminFile(tmp / "home" / ".yolo-tokens" / "admin.json").read() or ("", "")
            ledger = HttpLedger(url, credential)
            fired = [x for x in ledger.alerts() if x["token_id"] == populated["tokens"]["qa-nightly"]["id"]]
            if fired:
                ledger.acknowledge_alert(fired[0]["id"], "mei (qa lead)")
            doctor = ledger.consistency()
            sample = tmp / "part.jpg"
            render(31, "shots", 0, 640)[0].save(sample)
            texts = screenshots(f"http://127.0.0.1:{PORTS['console']}", admin, a.out,
                                populated["tokens"]["press-vision"]["credential"], sample)  # fmt: skip
        finally:
            stop(proc)
    summary = {
        "images_sent": populated["images_sent"],
        "populate_s": populated["populate_s"],
        "denial_codes": populated["denial_codes"],
        "moved": populated["moved"],
        "doctor_violations": doctor.violations,
        "doctor_mismatched": doctor.mismatched,
        "pages": {k: len(v) for k, v in texts.items()},
        "out": str(a.out),
    }
    (a.out / "screenshots.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
