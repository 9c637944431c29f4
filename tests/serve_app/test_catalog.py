"""ModelCatalog: names to versions, prices, the /v1/models list, and whether a version can be
placed on the cluster at all."""

from __future__ import annotations

import pytest

from serve_app.catalog import ModelCatalog, placement_problem
from serve_app.config import DEMO_WEIGHTS, AppArgs, ModelSpec
from serve_app.errors import ApiError

SPECS = [
    ModelSpec(name="parts", version="1", weights=DEMO_WEIGHTS),
    ModelSpec(name="parts", version="2", weights=DEMO_WEIGHTS, cost_units=3),
    ModelSpec(name="big", version="1", weights=DEMO_WEIGHTS),
]


def test_given_names_then_the_catalog_resolves_versions_and_prices_batches() -> None:
    catalog = ModelCatalog(SPECS, "parts@1")
    assert catalog.resolve(None).key == "parts@1"
    assert catalog.resolve("parts").key == "parts@2"  # a bare name is its highest version
    assert catalog.resolve("big@1").key == "big@1"
    assert catalog.units(catalog.resolve("parts@2"), 4) == 12
    for unknown in ("nosuch", "parts@9", "@1"):
        with pytest.raises(ApiError) as err:
            catalog.resolve(unknown)
        assert err.value.code == "unknown_model"


def test_given_args_and_deployment_status_then_the_listing_shows_every_version_in_config_order() -> None:
    catalog = ModelCatalog.from_args(AppArgs(models=SPECS, default_model="parts@2"))
    status = {"parts@2": {"status": "HEALTHY", "replicas": {"RUNNING": 1}, "message": ""}}
    listing = catalog.listing(status)
    assert listing["default"] == "parts@2" == catalog.resolve(None).key
    assert [(m["key"], m["cost_units"], m["status"]) for m in listing["models"]] == [
        ("parts@1", 1, "unknown"),
        ("parts@2", 3, "HEALTHY"),
        ("big@1", 1, "unknown"),
    ]
    assert listing["models"][1] == {
        "name": "parts",
        "version": "2",
        "key": "parts@2",
        "cost_units": 3,
        "imgsz": 640,
        "backend": "torch",
        "timeout_s": 30.0,
        "status": "HEALTHY",
        "replicas": {"RUNNING": 1},
        "message": "",
    }
    assert [m.key for m in catalog.specs] == [m.key for m in SPECS]


def test_given_replica_needs_then_placement_problem_names_what_no_node_has() -> None:
    nodes = [{"CPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert placement_problem({"CPU": 1, "GPU": 0}, nodes) is None
    assert placement_problem({"CPU": 8, "GPU": 1}, nodes) is None
    why = placement_problem({"CPU": 64, "GPU": 0}, nodes)
    assert why is not None and "CPU 64" in why and "CPU 8" in why
    assert placement_problem({"CPU": 1, "GPU": 2}, nodes) is not None
    assert placement_problem({"CPU": 1}, []) is not None
