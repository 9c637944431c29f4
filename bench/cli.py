"""How long one `yolo-tokens` ledger command takes, over Ray (`--address`, the only way before issue
18 §11) and over the service's HTTP admin route (the default now), measured side by side in one run
against one `yolo-tokens serve --no-console` started here (loopback ports, a temporary $HOME and
database; stopped by pid). JSON lines; the last line is the summary.

    python -m bench.cli [--calls 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from serve_app.config import DEMO_WEIGHTS

REPO = Path(__file__).resolve().parents[1]
PORTS = {"ray": 6395, "http": 8131, "dashboard": 8281, "metrics": 8282}
COMMANDS = (["token", "list", "--json"], ["report", "costs", "--json"])


def local_service(tmp: Path, db: Path, http_port: int) -> tuple[Path, dict[str, str]]:
    """The shipped ray_config.yaml pointed at `db`, `tmp/var` and `http_port`, and the environment
    of a fresh shell whose $HOME is `tmp/home` (no Ray token, no admin credential of the caller's)."""
    config = yaml.safe_load((REPO / "ray_config.yaml").read_text())
    config["http_options"]["port"] = http_port
    args = config["applications"][0]["args"]
    args.update(database_url=f"sqlite:///{db}", data_dir=str(tmp / "var"))
    args["models"][0]["weights"] = str(DEMO_WEIGHTS)
    path = tmp / "ray_config.yaml"
    path.write_text(yaml.safe_dump(config))
    (tmp / "home").mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(tmp / "home")}
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "YT_ADMIN_TOKEN", "YT_ADMIN_FILE"):
        env.pop(var, None)
    return path, env


def start(tmp: Path) -> tuple[subprocess.Popen[bytes], dict[str, str], Path]:
    _, env = local_service(tmp, tmp / "var" / "ledger.db", PORTS["http"])
    exe = Path(sys.executable).parent / "yolo-tokens"
    log = tmp / "serve.log"
    proc = subprocess.Popen(
        [str(exe), "serve", "--no-console", "--config", str(tmp / "ray_config.yaml"), "--port", str(PORTS["ray"]),
         "--dashboard-port", str(PORTS["dashboard"]), "--metrics-port", str(PORTS["metrics"])],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while "Ctrl-C" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(log.read_text()[-3000:])
        time.sleep(1)
    return proc, env, exe


def timed(exe: Path, argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([str(exe), *argv], env=env, capture_output=True, text=True, timeout=120, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{argv}: {done.stderr[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=8, help="calls per command and transport (interleaved)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="yt-bench-cli-") as name:
        tmp = Path(name)
        proc, env, exe = start(tmp)
        try:
            address = ["--address", f"127.0.0.1:{PORTS['ray']}"]
            times: dict[str, list[float]] = {"ray": [], "http": []}
            for command in COMMANDS:
                timed(exe, command, env)  # warm the file cache of both paths once
                timed(exe, address + command, env)
            for i in range(a.calls):
                for command in COMMANDS:
                    for transport, argv in (("http", command), ("ray", address + command)):
                        wall = timed(exe, argv, env)
                        times[transport].append(wall)
                        print(json.dumps({"call": i, "transport": transport, "command": " ".join(command[:2]),
                                          "wall_s": round(wall, 3)}))  # fmt: skip
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
    summary = {
        t: {"median_s": round(statistics.median(v), 3), "max_s": round(max(v), 3), "calls": len(v)}
        for t, v in times.items()
    }
    print(json.dumps({
        "summary": "cli",
        "commands": [" ".join(c[:2]) for c in COMMANDS],
        "transports": summary,
        "ray_over_http": round(summary["ray"]["median_s"] / summary["http"]["median_s"], 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }))  # fmt: skip


if __name__ == "__main__":
    main()
