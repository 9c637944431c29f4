"""cluster/ launch files are valid for the Ray this project pins, and agree with the app's typed args."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app import launcher, proxy_hooks
from serve_app.config import AppArgs

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def rayservice() -> dict[str, Any]:
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay-rayservice.yaml").read_text()))
    return next(d for d in docs if d["kind"] == "RayService")


def serve_configs() -> dict[str, dict[str, Any]]:
    return {
        "ray_config.yaml": yaml.safe_load((ROOT / "ray_config.yaml").read_text()),
        "cluster/serve-cluster.yaml": yaml.safe_load((CLUSTER / "serve-cluster.yaml").read_text()),
        "RayService.serveConfigV2": yaml.safe_load(rayservice()["spec"]["serveConfigV2"]),
    }


@pytest.mark.parametrize("name", list(serve_configs()))
def test_given_each_serve_config_then_serve_and_the_app_args_accept_it(name: str) -> None:
    doc = serve_configs()[name]
    ServeDeploySchema.model_validate(doc) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema(**doc)
    (app,) = doc["applications"]
    assert app["import_path"] == "serve_app.app:build_app"
    args = AppArgs.model_validate(app["args"])
    assert args.default_model in {m.name for m in args.models} | {m.key for m in args.models}
    # the gRPC API on Serve's gRPC proxy, with the servicer the stubs define (issue 22)
    assert doc["grpc_options"]["grpc_servicer_functions"] == list(launcher.GRPC_SERVICERS)
    for path in launcher.GRPC_SERVICERS:
        module, _, fn = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), fn))


def test_given_the_cluster_launcher_file_then_it_matches_rays_own_schema() -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    doc = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(doc, schema)
    head = " ".join(doc["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # the dashboard never listens beyond the head's loopback
    declared = json.loads(re.search(r"--resources='([^']+)'", head).group(1))  # type: ignore[union-attr]
    args = AppArgs.model_validate(serve_configs()["cluster/serve-cluster.yaml"]["applications"][0]["args"])
    assert set(args.ledger_resources) <= set(declared)  # the ledger actor can be placed on the head


def test_given_the_rayservice_then_the_head_holds_the_ledger_and_gpu_workers_fit_the_models() -> None:
    spec = rayservice()["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    args = AppArgs.model_validate(yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"])
    head = cluster["headGroupSpec"]
    declared = json.loads(json.loads(head["rayStartParams"]["resources"]))  # KubeRay's quoted JSON string
    assert set(args.ledger_resources) <= set(declared)
    mounts = {m["mountPath"] for m in head["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert str(args.data_dir) in mounts  # the key ring survives a head restart
    gpus = max(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in cluster["workerGroupSpecs"])  # fmt: skip
    assert all(m.num_gpus <= gpus for m in args.models)
    assert "postgresql" in args.database_url and ":" not in args.database_url.split("//", 1)[1].split("@")[0]


def test_given_the_dockerfile_then_its_ray_image_is_the_pinned_ray() -> None:
    first = next(ln for ln in (CLUSTER / "Dockerfile").read_text().splitlines() if ln.startswith("FROM "))
    assert first.split()[1].startswith(f"rayproject/ray:{ray.__version__}-py311")


def test_given_every_place_that_starts_ray_then_the_proxy_keeps_request_ids_rays_own() -> None:
    """Serve's proxy must run serve_app.proxy_hooks wherever Ray starts, or a client could pick
    the request ids the ledger charges once (and uvicorn must trust no X-Forwarded-For)."""
    setting = f"{proxy_hooks.CALLBACK_VAR}={proxy_hooks.CALLBACK}"
    doc = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(doc[key])
        assert setting in start and 'FORWARDED_ALLOW_IPS=""' in start, key
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert setting in dockerfile and 'FORWARDED_ALLOW_IPS=""' in dockerfile
    # gRPC between deployments everywhere, and the gRPC proxy on every interface of a cluster's nodes
    starts = [" ".join(doc[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands")]
    for start in starts:  # the gRPC proxy on the node's own address, never on every interface
        assert f"{proxy_hooks.GRPC_HOST_VAR}=$(hostname -I | cut -d' ' -f1)" in start
    for start in [*starts, dockerfile]:
        assert "RAY_SERVE_USE_GRPC_BY_DEFAULT=1" in start
        assert (
            f"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH={launcher.DEFAULTS['RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH']}"
            in start
        )
    cluster = rayservice()["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        for container in pod["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env[proxy_hooks.CALLBACK_VAR] == proxy_hooks.CALLBACK and env["FORWARDED_ALLOW_IPS"] == ""
            assert env["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"
            host = next(e for e in container["env"] if e["name"] == proxy_hooks.GRPC_HOST_VAR)
            assert host["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            limit = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
            assert env[limit] == launcher.DEFAULTS[limit]
    # local runs: every entry point applies the launcher's rules, and `ray start` gets them too
    assert proxy_hooks.installed(launcher.environment({})) and launcher.environment({})["FORWARDED_ALLOW_IPS"] == ""
    assert proxy_hooks.installed(launcher.ray_env())
