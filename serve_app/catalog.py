"""ModelCatalog: the served model versions, how a request names one, and what it costs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from serve_app.config import ModelSpec
from serve_app.errors import ApiError


class ModelCatalog:
    def __init__(self, models: Iterable[ModelSpec], default: str) -> None:
        self.models: dict[str, ModelSpec] = {m.key: m for m in models}
        self.default = default

    def resolve(self, requested: str | None) -> ModelSpec:
        """`name@version`, or `name` for its highest version; None for the default. 404 otherwise."""
        name = requested or self.default
        if name in self.models:
            return self.models[name]
        versions = sorted((m for m in self.models.values() if m.name == name), key=lambda m: m.version)
        if not versions:
            raise ApiError("unknown_model", f"no model {name!r}; GET /v1/models lists them")
        return versions[-1]

    def units(self, spec: ModelSpec, images: int) -> int:
        """DESIGN §3: each image costs the version's `cost_units`; a batch costs the sum."""
        return spec.cost_units * images


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
