"""The hostile suite runs against the same live app as the serving tests (one per session)."""

from pathlib import Path
from typing import Any

from serve_app.config import DEMO_WEIGHTS, AppArgs, Autoscaling, ModelSpec
from tests.serve_app.conftest import live_app  # noqa: F401 (a fixture, registered by import)


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
