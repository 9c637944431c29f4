"""`yolo-tokens`: the ledger commands (ledger/cli.py) plus `serve`, which starts the whole service.

`serve` starts a local Ray head on 127.0.0.1 (by pid), deploys `ray_config.yaml` with Ray
Serve on 127.0.0.1, makes sure a demo package exists, prints its credential once with a
ready-to-paste curl command, and stops everything it started on Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ledger import cli as ledger_cli
from ledger.client import LedgerClient
from ledger.entities import TokenSpec
from ledger.local import LocalRay
from ledger.settings import LedgerSettings
from serve_app.app import APP_NAME, build_app
from serve_app.config import AppArgs

# ledger.cli sets the loopback/auth environment before it imports Ray; use its Ray and Serve
ray = ledger_cli.ray
serve = ray.serve
DEMO_PACKAGE = "demo"
DEFAULT_CONFIG = Path("ray_config.yaml")


def load_config(path: Path) -> tuple[AppArgs, dict[str, Any]]:
    """The first application's typed args and the http_options of a Serve config file."""
    doc = yaml.safe_load(path.read_text())
    app = next(a for a in doc["applications"] if a.get("name", APP_NAME) == APP_NAME)
    http = dict(doc.get("http_options") or {})
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)
    return AppArgs.model_validate(app.get("args") or {}), http


def ensure_demo(client: LedgerClient) -> dict[str, Any]:
    """The demo package: created on first start; later starts rotate it to show a fresh credential."""
    for t in client.tokens():
        if t.parent_id is None and t.name == DEMO_PACKAGE and t.status == "active":
            return client.rotate(t.id)  # type: ignore[no-any-return]
    spec = TokenSpec.build(DEMO_PACKAGE, 10_000, expires_at=time.time() + 30 * 86400, rate="pro", team="demo")
    return client.create_package(spec)  # type: ignore[no-any-return]


def cmd_serve(a: argparse.Namespace) -> int:
    args, http = load_config(a.config)
    settings = args.ledger_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    local = LocalRay(port=a.port, log=settings.data_dir / "ray.log")
    stop = {"now": False}

    def _stop(_sig: int, _frame: Any) -> None:
        stop["now"] = True

    print(f"starting Ray on {local.address} (log: {settings.data_dir / 'ray.log'}) ...", flush=True)
    try:
        address = local.start()  # inside the try: Ctrl-C during start-up still stops what started
        client = ledger_cli.connect(address, settings, create=True)
        signal.signal(signal.SIGTERM, _stop)  # after ray.init, which installs handlers of its own
        signal.signal(signal.SIGINT, _stop)
        serve.start(http_options={"host": http["host"], "port": int(http["port"])})
        print(f"deploying {a.config} (models: {', '.join(m.key for m in args.models)}) ...", flush=True)
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        demo = ledger_cli.to_plain(ensure_demo(client))
        url = f"http://{http['host']}:{http['port']}"
        print(f"ledger: {settings.database_url}")
        print(ledger_cli.show_issued(demo))
        print("\ntry it:")
        print(f'  curl -s -X POST "{url}/v1/detect" -H "Authorization: Bearer {demo["credential"]}" \\')
        print('       -H "Content-Type: image/jpeg" --data-binary @your-image.jpg')
        print(f"  API docs: {url}/docs    CLI: yolo-tokens --address {address} token list")
        print("Ctrl-C stops everything started here.", flush=True)
        while not stop["now"]:
            time.sleep(0.5)
    finally:
        print("stopping Serve and Ray (Ray drains for up to 30 s) ...", flush=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            local.stop()
        print("stopped.", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = ledger_cli.build_parser()
    sub = next(x for x in ap._subparsers._group_actions if isinstance(x, argparse._SubParsersAction))  # type: ignore[union-attr]
    p = sub.add_parser("serve", help="start Ray on 127.0.0.1, the ledger and the Serve app; Ctrl-C stops it")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config file (default: ray_config.yaml)")
    p.add_argument("--port", type=int, default=6380, help="Ray head (GCS) port")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.group == "serve":
        return cmd_serve(args)
    return ledger_cli.run(args, LedgerSettings.from_env())


if __name__ == "__main__":
    sys.exit(main())
