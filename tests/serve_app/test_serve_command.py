"""`yolo-tokens serve` (what `make serve` runs): Ray on loopback, the ledger and the Serve app from a
ray_config.yaml, a demo token that works with the printed curl command, everything stopped by pid."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import httpx
import psutil
import pytest
import yaml

from serve_app.config import DEMO_WEIGHTS
from serve_app.demo.synth import render
from tests.serve_app.conftest import jpeg
from tests.ui.browser import screenshot_console

pytestmark = pytest.mark.ray

PORT = 6391
HTTP_PORT = 8124
CONSOLE_PORT = 8526
DASHBOARD_PORT = 8276
METRICS_PORT = 8277
REPO = Path(__file__).resolve().parents[2]


def listed_demo(exe: str, env: dict[str, str]) -> dict[str, Any]:
    """The demo package as `yolo-tokens token list --json` shows it (over HTTP, with the admin
    credential `serve` wrote for the CLI)."""
    listed = subprocess.run(
        [exe, "token", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    (demo,) = json.loads(listed.stdout)
    return cast(dict[str, Any], demo)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ray_tool(args: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_given_serve_when_started_then_demo_token_is_printed_and_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    """On a fresh machine: a $HOME where Ray, ultralytics and the service never ran (no ~/.ray)."""
    exe = str(Path(sys.executable).parent / "yolo-tokens")
    config = yaml.safe_load((REPO / "ray_config.yaml").read_text())  # the shipped file, pointed at tmp_path
    config["http_options"]["port"] = HTTP_PORT
    app_args = config["applications"][0]["args"]
    app_args.update(database_url=f"sqlite:///{tmp_path / 'var' / 'ledger.db'}", data_dir=str(tmp_path / "var"))
    app_args["models"][0]["weights"] = str(DEMO_WEIGHTS)
    (tmp_path / "ray_config.yaml").write_text(yaml.safe_dump(config))
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "YT_DATABASE_URL": app_args["database_url"],
        "YT_DATA_DIR": app_args["data_dir"],
        "RAY_metrics_report_interval_ms": "1000",  # Ray's agent exports every 10 s otherwise: polled below
    }
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "YT_ADMIN_FILE", "YT_ADMIN_TOKEN"):  # a fresh shell's
        env.pop(var, None)
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(
        [
            exe,
            "serve",
            "--port",
            str(PORT),
            "--config",
            str(tmp_path / "ray_config.yaml"),
            "--console-port",
            str(CONSOLE_PORT),
            "--dashboard-port",
            str(DASHBOARD_PORT),
            "--metrics-port",
            str(METRICS_PORT),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 180
        text = ""
        while "Ctrl-C" not in text:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, text
            time.sleep(1)
            text = (tmp_path / "serve.log").read_text()
        assert "(demo): 10000 units" in text
        credential = text.split("store it now):\n", 1)[1].splitlines()[0]
        assert credential.count(".") == 2
        assert f'curl -s -X POST "http://127.0.0.1:{HTTP_PORT}/v1/detect"' in text
        r = httpx.post(
            f"http://127.0.0.1:{HTTP_PORT}/v1/detect",
            content=jpeg(),
            headers={"Authorization": f"Bearer {credential}", "Content-Type": "image/jpeg"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["remaining"] == 9999
        descendants = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert descendants, "ray start should run under serve"
        listed = subprocess.run(
            [exe, "--address", f"127.0.0.1:{PORT}", "token", "list", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr + (tmp_path / "serve.log").read_text()
        assert [t["name"] for t in json.loads(listed.stdout)] == ["demo"]  # over Ray
        admin_file = home / ".yolo-tokens" / "admin.json"
        assert oct(admin_file.stat().st_mode & 0o777) == "0o600"
        assert listed_demo(exe, env) == json.loads(listed.stdout)[0]  # over HTTP: the same
        assert f"CLI: yolo-tokens token list   (over HTTP, as admin: its credential is in {admin_file}" in text
        assert (tmp_path / "var" / "ledger.db").exists()

        # Ray's own tools and a Ray job, as the README shows them, from a shell with the same $HOME
        token_file = home / ".ray" / "auth_token"
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        assert "export RAY_AUTH_MODE=token" in text
        bin_dir = Path(sys.executable).parent
        shell = {**env, "RAY_AUTH_MODE": "token"}
        status = ray_tool([str(bin_dir / "ray"), "status", "--address", f"127.0.0.1:{PORT}"], shell)
        assert status.returncode == 0 and "Resources" in status.stdout, status.stderr[-2000:]
        dash = f"http://127.0.0.1:{DASHBOARD_PORT}"
        served = ray_tool([str(bin_dir / "serve"), "status", "-a", dash], shell)
        assert served.returncode == 0 and "yolo-tokens" in served.stdout and "RUNNING" in served.stdout, served.stderr
        sample_jpg = tmp_path / "part.jpg"
        render(12, "job", 0, 320)[0].save(sample_jpg)
        driver = ray_tool(
            [sys.executable, str(REPO / "cluster" / "detect_job.py"), "--address", f"127.0.0.1:{PORT}",
             "--token", credential, str(sample_jpg)],
            shell,
        )  # fmt: skip
        assert driver.returncode == 0, driver.stderr[-3000:]
        line = json.loads(driver.stdout.strip().splitlines()[-1])
        assert line["units"] == 1 and line["detections"], line
        token_file = tmp_path / "yt-token"  # as the README does it: the credential is not in the job's entrypoint
        token_file.write_text(credential)
        token_file.chmod(0o600)
        job = ray_tool(
            [str(bin_dir / "ray"), "job", "submit", "--address", dash, "--working-dir", str(REPO / "cluster"),
             "--", "python", "detect_job.py", "--token-file", str(token_file), str(sample_jpg)],
            shell,
            timeout=300,
        )  # fmt: skip
        assert job.returncode == 0 and '"units": 1' in job.stdout, job.stdout[-3000:] + job.stderr[-3000:]

        # the ingress replica charged the three detections from its lease; once it gave back what
        # it did not spend (idle for a few seconds), the tree's free units are the package's
        deadline = time.monotonic() + 90
        while (demo := listed_demo(exe, env))["leased"] or demo["used"] < 3:
            assert time.monotonic() < deadline, demo
            time.sleep(1)
        assert (demo["used"], demo["free"]) == (3, 9997), demo

        # Prometheus scrapes the fixed port that `serve` printed; the product's metrics are there
        metrics_url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        assert f"metrics: Prometheus scrapes {metrics_url}" in text
        deadline = time.monotonic() + 60  # Ray's agent exports every 10 s
        while "ray_yt_admissions_total{" not in (body := httpx.get(metrics_url, timeout=10).text):
            assert time.monotonic() < deadline, body[-2000:]
            time.sleep(1)

        # the console, served by `serve`, looked at in headless Chromium: real numbers appear
        assert f"console: http://127.0.0.1:{CONSOLE_PORT}" in text
        admin = text.split("(12 h, shown once):\n", 1)[1].splitlines()[0].strip()
        shots = Path(os.environ.get("YT_SCREENSHOT_DIR") or tmp_path)
        sample = tmp_path / "parts.png"
        render(11, "console", 0, 320)[0].save(sample)
        seen = screenshot_console(f"http://127.0.0.1:{CONSOLE_PORT}", admin, shots, credential, sample)
        assert "9997" in seen["overview"] and "Teams" in seen["overview"]  # 10,000 less three detections
        # the team table is a canvas (no text to read); the charts' titles and the toolbar are text
        assert "Units by team, per hour, last 24 h" in seen["overview"] and "per day, last 30 days" in seen["overview"]
        assert "Deploy" not in seen["overview"], seen["overview"][:2000]
        assert "demo" in seen["tree"] and "10000" in seen["tree"] and "9997" in seen["tree"]
        assert "detections" in seen["try"] and "9996 of 10000 remaining" in seen["try"]
        for name in ("console-overview.png", "console-token-tree.png", "console-try-it.png"):
            assert (shots / name).stat().st_size > 20_000
        assert oct((tmp_path / "var" / "keys").stat().st_mode & 0o777) == "0o700"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
    log_text = (tmp_path / "serve.log").read_text()
    assert re.search(r"stopped in \d+\.\d s \(console", log_text), log_text  # the time is printed, not asserted
    deadline = time.monotonic() + 20
    while True:  # Ray's own children may take a moment after `ray start` has exited
        alive = [pid for pid in descendants if _running(pid)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert alive == [], f"left running: {alive}"
    assert not admin_file.exists()  # the CLI's admin credential went with the service
