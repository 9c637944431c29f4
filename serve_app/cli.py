"""`yolo-tokens`: the ledger commands (ledger/cli.py) plus `serve`, which starts the whole service.

`detect FILE|DIR` is a plain HTTP client of a running service (serve_app/detect_client.py);
`stream VIDEO|DIR` sends frames over one WebSocket or gRPC stream (serve_app/stream_client.py).
`serve` starts a local Ray head on 127.0.0.1 (by pid), deploys `ray_config.yaml` with Ray
Serve on 127.0.0.1, makes sure a demo package exists, prints its credential once with a
ready-to-paste curl command, and stops everything it started on Ctrl-C.
The `yolo-tokens` entry point is serve_app/__main__.py: it applies the environment rules
(serve_app/launcher.py) before this module imports Ray.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ledger import (
    CLI_ADMIN_REFRESH_S,
    CLI_ADMIN_TTL_S,
    AdminFile,
    ClientSettings,
    Issued,
    LedgerApi,
    LedgerError,
    LedgerSettings,
    TokenSpec,
)
from ledger import cli as ledger_cli
from serve_app import launcher
from serve_app.launcher import APP_NAME, METRICS_PORT, LocalRay, apply_environment, auth_token_location, ray_env

if TYPE_CHECKING:
    from serve_app.config import AppArgs

# Ray, Serve, the app and its config (pydantic) are imported by `serve` only: the ledger commands
# over HTTP start in a fraction of a second (issue 18 §11)

DEMO_PACKAGE = "demo"
DEFAULT_CONFIG = Path("ray_config.yaml")


def load_config(path: Path) -> tuple[AppArgs, dict[str, Any]]:
    """The first application's typed args and the http_options of a Serve config file (its
    `grpc_options`, if any, under the key "grpc")."""
    import yaml

    from serve_app.config import AppArgs

    doc = yaml.safe_load(path.read_text())
    app = next(a for a in doc["applications"] if a.get("name", APP_NAME) == APP_NAME)
    http = dict(doc.get("http_options") or {})
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)
    http["grpc"] = dict(doc.get("grpc_options") or launcher.grpc_options())
    return AppArgs.model_validate(app.get("args") or {}), http


SAMPLE = "docs/samples/part-1.jpg"


def demo_banner(demo: dict[str, Any]) -> str:
    """What a start says of the demo package: new, or what is left of it and that its credential
    was rotated (the one printed last time no longer works)."""
    t = demo["token"]
    if demo.get("rotated"):
        left = t["allocation"] - t["delegated"] - t["used"]
        return (
            f"token {t['id']} ({t['name']}): {left} of {t['granted'] or t['allocation']} units left; its credential"
            f" was rotated on this start (the one printed before no longer works):\n{demo['credential']}"
        )
    return ledger_cli.show_issued(demo)


def ensure_demo(client: LedgerApi) -> Issued:
    """The demo package: created on first start; later starts rotate it to show a fresh credential."""
    for t in client.tokens():
        if t.parent_id is None and t.name == DEMO_PACKAGE and t.status == "active":
            return client.rotate(t.id)
    spec = TokenSpec.build(DEMO_PACKAGE, 10_000, expires_at=time.time() + 30 * 86400, rate="pro", team="demo")
    return client.create_package(spec)


class Console:
    """`streamlit run ui/app.py` on 127.0.0.1 as a child process group; `stop()` ends it by pid."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ray_address: str, settings: LedgerSettings, service_url: str) -> str:
        spec = importlib.util.find_spec("ui")
        if spec is None or spec.origin is None:
            raise RuntimeError("the console package `ui` is not installed")
        app = Path(spec.origin).parent / "app.py"
        env = ray_env() | {
            "YT_RAY_ADDRESS": ray_address,
            "YT_LEDGER_NAME": settings.actor_name,
            "YT_NAMESPACE": settings.namespace,
            # the console reads the ledger's capability in the key directory (docs/SECURITY.md)
            "YT_DATA_DIR": str(settings.data_dir.resolve()),
            "YT_URL": service_url,
        }
        cmd = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", "127.0.0.1",
               "--server.port", str(self.port), "--server.headless", "true",
               "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer"]  # fmt: skip  # no "Deploy"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class CliAdmin:
    """The admin credential of the local CLI (over HTTP): written at start, renewed daily."""

    def __init__(self, file: AdminFile, client: LedgerApi, url: str) -> None:
        self.file, self.client, self.url = file, client, url
        self.written = float("-inf")
        self.renew_if_due()

    def renew_if_due(self) -> None:
        if time.monotonic() - self.written < CLI_ADMIN_REFRESH_S:
            return
        try:
            credential = self.client.issue_admin("cli", CLI_ADMIN_TTL_S)
        except LedgerError as exc:  # the ledger away for a moment: the file still holds days; retry in a minute
            print(f"warning: the CLI's admin credential was not renewed ({exc}); retrying", file=sys.stderr)
            self.written = time.monotonic() - CLI_ADMIN_REFRESH_S + 60
            return
        self.file.write(self.url, credential, time.time() + CLI_ADMIN_TTL_S)
        self.written = time.monotonic()


def cmd_serve(a: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from ledger import attach
    from ledger import stop as stop_ledger
    from serve_app.app import build_app

    args, http = load_config(a.config)
    settings = args.ledger_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    local = LocalRay(
        port=a.port, log=settings.data_dir / "ray.log", dashboard_port=a.dashboard_port, metrics_port=a.metrics_port
    )
    console = Console(a.console_port, settings.data_dir / "console.log")
    stop = {"now": False}
    client = None

    def _stop(_sig: int, _frame: Any) -> None:
        stop["now"] = True

    print(f"starting Ray on {local.address} (log: {settings.data_dir / 'ray.log'}) ...", flush=True)
    try:
        address = local.start()  # inside the try: Ctrl-C during start-up still stops what started
        ledger_cli.join(address, settings)
        signal.signal(signal.SIGTERM, _stop)  # after ray.init, which installs handlers of its own
        signal.signal(signal.SIGINT, _stop)
        serve.start(http_options={"host": http["host"], "port": int(http["port"])}, grpc_options=http["grpc"])
        print(f"deploying {a.config} (models: {', '.join(m.key for m in args.models)}) ...", flush=True)
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")  # launches the ledger
        client = attach(settings)
        existed = any(t.parent_id is None and t.name == DEMO_PACKAGE and t.status == "active" for t in client.tokens())
        demo = {**ledger_cli.to_plain(ensure_demo(client)), "rotated": existed}
        url = f"http://{http['host']}:{http['port']}"
        console_url = None if a.no_console else console.start(address, settings, url)
        print(f"ledger: {settings.database_url}")
        print(demo_banner(demo))
        print("\ntry it (the demo model detects machine parts, as in docs/samples/):")
        print(f'  curl -s -X POST "{url}/v1/detect" -H "Authorization: Bearer {demo["credential"]}" \\')
        print(f'       -H "Content-Type: image/jpeg" --data-binary @{SAMPLE}')
        admin_file = AdminFile.default()
        cli_admin = CliAdmin(admin_file, client, url)
        print(f"  API docs: {url}/docs    gRPC: 127.0.0.1:{http['grpc'].get('port', launcher.GRPC_PORT)} "
              f"(yolo_tokens.v1.DetectService)    frame stream: yolo-tokens stream VIDEO --fps 15")  # fmt: skip
        print(f"  CLI: yolo-tokens token list   (over HTTP, as admin: its credential is in {admin_file.path},")
        print(f"       readable by you only, valid 7 days and renewed daily; over Ray: --address {address})")
        print(f"\nRay: dashboard {local.dashboard_url}; Ray's tools and drivers need the token mode exported:")
        print(f"  export RAY_AUTH_MODE=token   # the token is {_token_hint()}")
        print(f"  ray status --address {address}    serve status -a {local.dashboard_url}")
        print(
            f"  ray job submit --address {local.dashboard_url} --working-dir cluster -- "
            "python detect_job.py --token-file ~/.yt-token /abs/path/image.jpg"
        )
        print(f"  metrics: Prometheus scrapes {local.metrics_url} (dashboard: cluster/grafana-dashboard.json)")
        if console_url is not None:
            print(f"\nconsole: {console_url}  (log: {console.log})")
            print(f"  admin credential for the console (12 h, shown once):\n  {client.issue_admin('console')}")
        print("Ctrl-C stops everything started here.", flush=True)
        while not stop["now"]:
            time.sleep(0.5)
            cli_admin.renew_if_due()
    finally:
        print("stopping the console, Serve, the ledger and Ray ...", flush=True)
        t_stop = time.monotonic()
        AdminFile.default().remove_if_mine()
        console.stop()
        t_serve = time.monotonic()
        try:
            serve.shutdown()  # replicas give their leases back to the ledger first
            if client is not None:
                stop_ledger(client)  # every answer it gave was committed first: nothing to flush
        finally:
            t_ray = time.monotonic()
            ray.shutdown()
            local.stop()
        now = time.monotonic()
        print(
            f"stopped in {now - t_stop:.1f} s (console {t_serve - t_stop:.1f} s, Serve {t_ray - t_serve:.1f} s,"
            f" Ray {now - t_ray:.1f} s).",
            flush=True,
        )
    return 0


def _token_hint() -> str:
    where = auth_token_location()
    return f"in {where}" if where.startswith("$") else where


def build_parser() -> argparse.ArgumentParser:
    ap = ledger_cli.build_parser()
    sub = next(x for x in ap._subparsers._group_actions if isinstance(x, argparse._SubParsersAction))  # type: ignore[union-attr]
    p = sub.add_parser("serve", help="start Ray on 127.0.0.1, the ledger and the Serve app; Ctrl-C stops it")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config file (default: ray_config.yaml)")
    p.add_argument("--port", type=int, default=6380, help="Ray head (GCS) port")
    p.add_argument("--console-port", type=int, default=8501, help="Streamlit console port (127.0.0.1)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard and Jobs API port (127.0.0.1)")
    p.add_argument(
        "--metrics-port", type=int, default=METRICS_PORT, help="Ray's metrics export port, for Prometheus (127.0.0.1)"
    )
    p.add_argument("--no-console", action="store_true", help="do not start the console")

    p = sub.add_parser("detect", help="detect objects in an image file or a folder of images over HTTP")
    p.add_argument("target", type=Path, help="an image file, or a folder searched recursively")
    client_options(p)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--out", type=Path, help="folder for annotated copies and detections.jsonl (default: stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stderr")

    p = sub.add_parser("stream", help="send a video's frames (or a folder's images) as one frame stream")
    p.add_argument("target", type=Path, help="a video file (OpenCV reads it), or a folder of images (sorted)")
    p.add_argument("--fps", type=float, default=15.0, help="frames sent per second (0: as fast as answered)")
    p.add_argument("--grpc", action="store_true", help="gRPC DetectStream instead of the WebSocket route")
    p.add_argument("--grpc-target", default=None, help=f"gRPC proxy host:port (default 127.0.0.1:{launcher.GRPC_PORT})")
    client_options(p)
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    p.add_argument("--out-video", type=Path, help="write the frames with their boxes drawn (.mp4 or .avi)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stderr")
    return ap


def client_options(p: argparse.ArgumentParser) -> None:
    """What `detect` and `stream` share: where the service is, the credential, the model and its thresholds."""
    p.add_argument("--url", help="service URL (default: $YT_URL or http://127.0.0.1:8000)")
    p.add_argument("--token", help="credential (default: $YT_TOKEN; it and --token-file keep it out of `ps`)")
    p.add_argument("--token-file", type=Path, help="file holding the credential")
    p.add_argument("--model", help="name or name@version (default: the service's default model)")
    p.add_argument("--conf", type=float, default=0.25)
    p.add_argument("--iou", type=float, default=0.7)


def client_credential(a: argparse.Namespace, env: ClientSettings) -> str | None:
    """--token-file, else --token, else $YT_TOKEN; None (and the error printed) when there is none."""
    credential = a.token_file.read_text().strip() if a.token_file is not None else (a.token or env.token)
    if not credential:
        print("error: no credential: give --token, --token-file or $YT_TOKEN", file=sys.stderr)
        return None
    return str(credential)


def cmd_stream(a: argparse.Namespace) -> int:
    from serve_app.stream_client import StreamClient, StreamOptions, open_frames, summary_line

    env = ClientSettings.from_env()
    credential = client_credential(a, env)
    if credential is None:
        return 2
    if a.fps < 0:
        print("error: --fps must be >= 0", file=sys.stderr)
        return 2
    try:
        frames, video_fps = open_frames(a.target, a.max_frames)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opts = StreamOptions(
        url=a.url or env.url,
        credential=credential,
        fps=a.fps,
        model=a.model,
        conf=a.conf,
        iou=a.iou,
        grpc_target=(a.grpc_target or f"127.0.0.1:{launcher.GRPC_PORT}") if a.grpc else None,
        progress=not a.no_progress and sys.stderr.isatty(),
    )
    summary = StreamClient(opts, a.out_video, video_fps).run(frames, sys.stdout)
    if a.json:
        print(json.dumps({**summary.__dict__, "fps": round(summary.fps, 2)}), file=sys.stderr)
    else:
        print(summary_line(summary, a.out_video), file=sys.stderr)
    return 0 if summary.frames and summary.answered == summary.frames and not summary.ended_by else 1


def cmd_detect(a: argparse.Namespace) -> int:
    from serve_app.detect_client import DetectClient, DetectOptions, find_images

    env = ClientSettings.from_env()
    credential = client_credential(a, env)
    if credential is None:
        return 2
    if not (1 <= a.concurrency <= 64):
        print("error: --concurrency must be in 1..64", file=sys.stderr)
        return 2
    try:
        files = find_images(a.target)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not files:
        print(f"error: no image files (.jpg .jpeg .png .webp .bmp) under {a.target}", file=sys.stderr)
        return 2
    opts = DetectOptions(
        url=a.url or env.url,
        credential=credential,
        model=a.model,
        conf=a.conf,
        iou=a.iou,
        concurrency=a.concurrency,
        out_dir=a.out,
        progress=not a.no_progress and sys.stderr.isatty(),
    )
    det = DetectClient(opts, a.target)
    try:
        if a.out is not None:
            a.out.mkdir(parents=True, exist_ok=True)
            with (a.out / "detections.jsonl").open("w") as sink:
                summary = det.run(files, sink)
        else:
            summary = det.run(files, sys.stdout)
    finally:
        det.close()
    if a.json:
        print(json.dumps(summary.__dict__), file=sys.stderr)
    else:
        print(
            f"{summary.succeeded}/{summary.files} images, {summary.detections} detections "
            f"{dict(sorted(summary.per_class.items()))}, {summary.units} units charged"
            + (f", {summary.remaining} remaining" if summary.remaining is not None else "")
            + (f"; {summary.failed} failed" if summary.failed else "")
            + (f"; stopped by {summary.stopped_by}, {summary.skipped} not sent" if summary.stopped_by else "")
            + (f"; annotated images in {a.out}" if a.out is not None else ""),
            file=sys.stderr,
        )
    return 0 if summary.succeeded == summary.files else 1


def main(argv: Sequence[str] | None = None) -> int:
    """The commands; `yolo-tokens` (serve_app/__main__.py) runs them after the environment rules."""
    apply_environment()  # changes nothing after the entry point did; raises if Ray was imported without them
    args = build_parser().parse_args(argv)
    if args.group == "serve":
        return cmd_serve(args)
    if args.group == "detect":
        return cmd_detect(args)
    if args.group == "stream":
        return cmd_stream(args)
    return ledger_cli.run(args, LedgerSettings.from_env())


if __name__ == "__main__":
    sys.exit(main())
