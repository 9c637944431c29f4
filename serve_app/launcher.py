"""The launcher: the environment rules of every Ray process this project starts, and a local Ray head.

    apply_environment()   this process, once, first thing at its entry point (the `yolo-tokens`
                          command, tests/conftest.py, the benchmarks, cluster/detect_job.py)
    ray_env()             the environment of a child process that starts or joins Ray
    LocalRay              `ray start --head --block` on 127.0.0.1, stopped by pid
    LaunchError           the environment came too late, or a Ray head did not start

Ray reads `RAY_AUTH_MODE` and `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` once, when `ray` is imported, and
ultralytics reads `YOLO_OFFLINE` once, when it is imported. A value set after that import is worse
than none (the driver and the Ray processes it starts then disagree on token authentication), so
`apply_environment()` refuses to change them once their reader is imported. No other module writes
`os.environ`; the processes Ray starts inherit the environment of the process that starts the node.

This module imports the standard library and `serve_app.proxy_hooks` (Starlette) only: never Ray,
ultralytics or the ledger, so an entry point can import it before them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from types import MappingProxyType

from serve_app.proxy_hooks import CALLBACK, CALLBACK_VAR

LOOPBACK = "127.0.0.1"
APP_NAME = "yolo-tokens"  # the Serve application (serve_app/app.py builds it)
METRICS_PORT = 8270  # `yolo-tokens serve --metrics-port`: Ray's metrics export port, fixed for Prometheus
LOOPBACK_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
GRPC_PORT = 9000  # Serve's gRPC proxy (bound to 127.0.0.1 by serve_app.proxy_hooks)
GRPC_SERVICERS = ("serve_app.proto.yolo_tokens.v1.detect_pb2_grpc.add_DetectServiceServicer_to_server",)

# always these values, whatever the caller's shell says
ENFORCED: Mapping[str, str] = MappingProxyType(
    {
        # Serve's HTTP proxy is uvicorn, which by default rewrites the client address from
        # X-Forwarded-For for loopback peers: anyone on this host could then claim any IP and
        # pass an IP allowlist. Trust no proxy there; the ingress honours only `trusted_proxies`.
        "FORWARDED_ALLOW_IPS": "",
        # the proxy renames a client's X-Request-ID: request ids, which the ledger charges once, are Ray's
        CALLBACK_VAR: CALLBACK,
    }
)
# these values unless the caller's shell sets the variable
DEFAULTS: Mapping[str, str] = MappingProxyType(
    {
        # Ray >= 2.59 starts local clusters with token auth; clients must say so to send the token
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "YOLO_OFFLINE": "1",  # ultralytics never downloads: weights are local files
        # handles call replicas over gRPC, arguments by value, not through the object store: +15 %
        # metered images/s, no API change (docs/BENCHMARKS.md, issues 12 and 22); `=0` turns it off
        "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
        # ... whose replicas take 4 MiB per message by default: a handle call may carry up to
        # `limits.max_body_bytes` (20 MiB) of images. The ingress sends decoded pixels past 3 MiB to the
        # detectors through the object store (serve_app/ingress_steps.py `GRPC_ARG_LIMIT`)
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(64 * 1024 * 1024),
    }
)
# variable -> the package that reads it once, when it is imported
READ_AT_IMPORT: Mapping[str, str] = MappingProxyType(
    {
        LOOPBACK_VAR: "ray",
        "RAY_AUTH_MODE": "ray",
        "YOLO_OFFLINE": "ultralytics",
        "RAY_SERVE_USE_GRPC_BY_DEFAULT": "ray",
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "ray",
    }
)


def grpc_options(port: int = GRPC_PORT) -> dict[str, object]:
    """`serve.start(grpc_options=...)`: the yolo-tokens gRPC API on Serve's gRPC proxy."""
    return {"port": port, "grpc_servicer_functions": list(GRPC_SERVICERS)}


class LaunchError(RuntimeError):
    """The environment rules came after Ray or ultralytics was imported, or a local Ray head failed to start."""


def environment(base: Mapping[str, str], *, local: bool = True) -> dict[str, str]:
    """`base` with the rules applied. `local`: Ray runs on this machine only, so it binds 127.0.0.1
    (otherwise Ray binds the machine's external address). A driver of a cluster that may span
    machines passes `local=False`: Ray finds its node address and, from its token, the auth mode."""
    env = dict(base)
    for name, value in DEFAULTS.items():
        if local or name != "RAY_AUTH_MODE":
            env.setdefault(name, value)
    env.update(ENFORCED)
    if local:
        env[LOOPBACK_VAR] = "0"
    return env


def apply_environment(*, local: bool = True, env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Apply the rules to this process's environment (`os.environ`); returns what changed.

    Call it once, first thing at the process's entry point. Raises `LaunchError` (changing nothing)
    if a variable must change whose reader (`READ_AT_IMPORT`) is already imported; calling it again
    later changes nothing and so never raises.
    """
    target = os.environ if env is None else env
    changes = {k: v for k, v in environment(target, local=local).items() if target.get(k) != v}
    readers = {k: READ_AT_IMPORT[k] for k in changes if k in READ_AT_IMPORT}
    late = sorted(f"{k} ({reader})" for k, reader in readers.items() if reader in sys.modules)
    if late:
        raise LaunchError(
            f"{', '.join(late)} must be set before that package is imported: call "
            "serve_app.launcher.apply_environment() first thing at the entry point "
            "(run `yolo-tokens` or `python -m serve_app`, not `python -m serve_app.cli`)"
        )
    target.update(changes)
    return changes


def ray_env(*, local: bool = True) -> dict[str, str]:
    """Environment for a child process that starts or joins Ray: the rules over this process's environment."""
    env = environment(os.environ, local=local)
    # `python` in a Ray job's entrypoint (`ray job submit -- python job.py`) is the cluster's own
    # interpreter, with Ray and this project installed, not whatever comes first on the caller's PATH
    bin_dir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        env["PATH"] = os.pathsep.join([bin_dir, *filter(None, [env.get("PATH")])])
    return env


def auth_token_location(env: Mapping[str, str] | None = None) -> str:
    """Where Ray's token authentication finds its token: `$RAY_AUTH_TOKEN`, the file
    `$RAY_AUTH_TOKEN_PATH` names, else `~/.ray/auth_token`."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN"):
        return "$RAY_AUTH_TOKEN"
    return env.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")


def ensure_auth_token(env: Mapping[str, str] | None = None) -> Path | None:
    """Make sure Ray's token authentication finds a token, as `ray get-auth-token --generate` would.

    On a machine where Ray never ran there is no `~/.ray/auth_token`, and `ray start` with token
    auth refuses to start. Returns the token file created (mode 0600), or None when a token was
    already there (`RAY_AUTH_TOKEN`, the file `RAY_AUTH_TOKEN_PATH` names, or `~/.ray/auth_token`).
    """
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(auth_token_location(env))
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
        self,
        port: int = 6380,
        num_cpus: int | None = None,
        log: Path | None = None,
        dashboard_port: int = 8265,
        metrics_port: int = METRICS_PORT,
    ) -> None:
        self.port = port
        self.num_cpus = num_cpus
        self.log = log
        self.dashboard_port = dashboard_port
        self.metrics_port = metrics_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def metrics_url(self) -> str:
        """Where Prometheus scrapes this node: Ray's metrics export port (every `yt_` metric, `ray_` prefixed)."""
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def start(self, timeout_s: float = 60.0) -> str:
        ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
        if ray_bin is None:
            raise LaunchError("the `ray` command is not installed in this environment")
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
            f"--metrics-export-port={self.metrics_port}",  # fixed, so a Prometheus config can name it
            "--disable-usage-stats",
        ]
        if self.num_cpus is not None:
            cmd.append(f"--num-cpus={self.num_cpus}")
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=ray_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LaunchError(f"`ray start` exited with {self.proc.returncode}; is port {self.port} in use?")
            probe = subprocess.run(
                [ray_bin, "status", f"--address={self.address}"], env=ray_env(), capture_output=True, check=False
            )
            if probe.returncode == 0:
                return self.address
            time.sleep(1.0)
        self.stop()
        raise LaunchError(f"Ray head did not come up on {self.address} within {timeout_s:.0f}s")

    def stop(self) -> None:
        """SIGTERM the `ray start --block` process we started: it stops its node's processes itself
        (2.5 s here). Only if it lingers, the whole process group: SIGTERM, then SIGKILL. (SIGTERM to
        the group first took 34 s: `ray start` then waits on children that are already exiting.)"""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        for sig, wait_s, group in ((signal.SIGTERM, 20, False), (signal.SIGTERM, 10, True), (signal.SIGKILL, 10, True)):
            if group:
                os.killpg(pgid, sig)
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # what it left behind (nothing, normally)
            os.killpg(pgid, signal.SIGKILL)
