"""ModelCatalog: the served model versions, how a request names one, what it costs, and the
list `GET /v1/models` shows. The one place that resolves models, prices requests and lists them
(the ingress and its request steps hold one, built from the args)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from serve_app.config import AppArgs, ModelSpec
from serve_app.errors import ApiCode, ApiError


class ModelCatalog:
    def __init__(self, models: Iterable[ModelSpec], default: str) -> None:
        self.models: dict[str, ModelSpec] = {m.key: m for m in models}
        self.default = default

    @classmethod
    def from_args(cls, args: AppArgs) -> ModelCatalog:
        return cls(args.models, args.default_model)

    @property
    def specs(self) -> list[ModelSpec]:
        """Every served version, in configuration order."""
        return list(self.models.values())

    def resolve(self, requested: str | None) -> ModelSpec:
        """`name@version`, or `name` for its highest version; None for the default. 404 otherwise."""
        name = requested or self.default
        if name in self.models:
            return self.models[name]
        versions = sorted((m for m in self.models.values() if m.name == name), key=lambda m: m.version)
        if not versions:
            raise ApiError(ApiCode.UNKNOWN_MODEL, f"no model {name!r}; GET /v1/models lists them")
        return versions[-1]

    def units(self, spec: ModelSpec, images: int) -> int:
        """DESIGN §3: each image costs the version's `cost_units`; a batch costs the sum."""
        return spec.cost_units * images

    def listing(self, status: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """The body of `GET /v1/models`: the default and every version with its price and settings,
        and its deployment `status` (by version key: status, replicas, message) where known."""
        return {
            "default": self.default,
            "models": [
                {
                    "name": m.name,
                    "version": m.version,
                    "key": m.key,
                    "cost_units": m.cost_units,
                    "imgsz": m.imgsz,
                    "backend": m.backend,
                    "timeout_s": m.timeout_s,
                    "status": status.get(m.key, {}).get("status", "unknown"),
                    "replicas": status.get(m.key, {}).get("replicas", {}),
                    "message": status.get(m.key, {}).get("message", ""),
                }
                for m in self.specs
            ],
        }


def placement_problem(need: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> str | None:
    """Why no live node could ever hold a replica that needs `need` (its total resources, not what
    is free now: a busy cluster frees up, a too-small one never does), or None if one could."""
    need = {k: v for k, v in need.items() if v > 0}
    if any(all(n.get(k, 0.0) >= v for k, v in need.items()) for n in nodes):
        return None
    wanted = ", ".join(f"{k} {v:g}" for k, v in sorted(need.items()))
    largest = max(nodes, key=lambda n: tuple(n.get(k, 0.0) for k in sorted(need)), default={})
    has = ", ".join(f"{k} {largest.get(k, 0.0):g}" for k in sorted(need)) or "nothing"
    return f"cannot be scheduled: a replica needs {wanted}; the largest node has {has}"
