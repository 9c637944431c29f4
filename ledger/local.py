"""A local Ray head on loopback, started and stopped by process id (for `make serve`)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from ledger.errors import ConfigError

LOOPBACK = "127.0.0.1"


def ray_env() -> dict[str, str]:
    """Environment for Ray processes: loopback only, no usage stats, no downloads."""
    env = dict(os.environ)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # Ray >= 2.59 starts local clusters with token auth; clients must say so to send the token
    env.setdefault("RAY_AUTH_MODE", "token")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("YOLO_OFFLINE", "1")
    # Serve's HTTP proxy is uvicorn, which by default rewrites the client address from
    # X-Forwarded-For for loopback peers: anyone on this host could then claim any IP and
    # pass an IP allowlist. Trust no proxy there; the ingress honours only `trusted_proxies`.
    env["FORWARDED_ALLOW_IPS"] = ""
    # the proxy renames a client's X-Request-ID: request ids, which the ledger charges once, are Ray's
    env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = "serve_app.proxy_hooks:middlewares"
    # `python` in a Ray job's entrypoint (`ray job submit -- python job.py`) is the cluster's own
    # interpreter, with Ray and this project installed, not whatever comes first on the caller's PATH
    bin_dir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        env["PATH"] = os.pathsep.join([bin_dir, *filter(None, [env.get("PATH")])])
    return env


def ensure_auth_token(env: Mapping[str, str] | None = None) -> Path | None:
    """Make sure Ray's token authentication finds a token, as `ray get-auth-token --generate` would.

    On a machine where Ray never ran there is no `~/.ray/auth_token`, and `ray start` with token
    auth refuses to start. Returns the token file created (mode 0600), or None when a token was
    already there (`RAY_AUTH_TOKEN`, the file `RAY_AUTH_TOKEN_PATH` names, or `~/.ray/auth_token`).
    """
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else Path.home() / ".ray" / "auth_token"
    if path.is_file() and path.read_text().strip():
        return None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, Ray's own format
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


class LocalRay:
    """`ray start --head --block` as a child process; `stop()` ends it (and so its node) by pid.

    The dashboard listens on 127.0.0.1 (`dashboard_port`): Ray's Jobs API (`ray job submit`) and
    `serve status` go through it. Token authentication is on; a missing token is generated first.
    """

    def __init__(
        self, port: int = 6380, num_cpus: int | None = None, log: Path | None = None, dashboard_port: int = 8265
    ) -> None:
        self.port = port
        self.num_cpus = num_cpus
        self.log = log
        self.dashboard_port = dashboard_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> str:
        ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
        if ray_bin is None:
            raise ConfigError("the `ray` command is not installed in this environment")
        ensure_auth_token()
        cmd = [
            ray_bin,
            "start",
            "--head",
            "--block",
            f"--node-ip-address={LOOPBACK}",
            f"--port={self.port}",
            "--include-dashboard=true",
            f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={self.dashboard_port}",
            # the agent's default port (52365) is taken by any other Ray on this host: job submission
            # then fails with "No available agent"
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=ray_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConfigError(f"`ray start` exited with {self.proc.returncode}; is port {self.port} in use?")
            probe = subprocess.run(
                [ray_bin, "status", f"--address={self.address}"], env=ray_env(), capture_output=True, check=False
            )
            if probe.returncode == 0:
                return self.address
            time.sleep(1.0)
        self.stop()
        raise ConfigError(f"Ray head did not come up on {self.address} within {timeout_s:.0f}s")

    def stop(self) -> None:
        """SIGTERM the `ray start --block` process group we started; SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=10)
