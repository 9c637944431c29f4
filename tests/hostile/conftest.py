"""The hostile suite runs against the same live app as the serving tests (tests/conftest.py: one per session)."""

from pathlib import Path
from typing import Any

import psutil

from serve_app.config import DEMO_WEIGHTS, AppArgs, Autoscaling, ModelSpec


def side_app_args(database_url: str, data_dir: Path, ledger_name: str, **model: Any) -> AppArgs:
    """A second, small app beside the live one (its own ledger): the bundled model, one replica."""
    spec = ModelSpec(
        name="parts",
        version="1",
        weights=DEMO_WEIGHTS,
        imgsz=320,
        num_cpus=0.25,
        autoscaling=Autoscaling(min_replicas=1, max_replicas=1),
        **model,
    )
    return AppArgs(
        database_url=database_url,
        data_dir=data_dir,
        ledger_name=ledger_name,
        namespace="yt-tests",
        models=[spec],
        default_model="parts@1",
    )


def replica_pids(app: str, deployment: str) -> list[int]:
    """Live replica processes of a deployment (Ray titles them `ray::ServeReplica:<app>:<deployment>...`)."""
    tag = f"ServeReplica:{app}:{deployment}"
    return [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if (cmd := " ".join(p.info["cmdline"] or [])).startswith("ray::") and tag in cmd
    ]
