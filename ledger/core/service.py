"""Service classes (DESIGN §3c): the tier table's priority levels and weights, and the `Service` a
request carries to the detector so that its scheduler knows whose request it is.

A token's tier is the name of the rate on its nearest node that has one (itself, then each
ancestor): `basic`, `pro`, `enterprise`, or `custom` for an unnamed rate (`50/s`) or no rate at
all. The tier table maps each tier to a priority `level` (higher is served first; a lower level
keeps a guaranteed minimum share at the detector) and a `weight` (its fair share inside a level).

The scheduler's fair queuing is hierarchical: packages share a level by their package root's
weight, and inside a package its direct children ("teams") share it by theirs. A request of a
token deeper in a team counts as that team's. All of it is computed from the token tree the shard
already holds (no I/O) and travels in the token's cached policy and in every decision.

The default table can be changed per deployment (`ledger.tiers` in ray_config.yaml:
`{pro: {level: 1, weight: 3}}`); tiers it does not list keep their defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from ledger.core.errors import ConfigError

if TYPE_CHECKING:
    from ledger.core.entities import Node

MAX_LEVEL = 9
MAX_WEIGHT = 1000.0
CUSTOM = "custom"  # an unnamed rate, or none on the token's path


@dataclass(frozen=True, slots=True)
class ServiceClass:
    level: int  # 0..MAX_LEVEL: higher levels are served first
    weight: float  # > 0: the share inside a level

    def __post_init__(self) -> None:
        ok_level = type(self.level) is int and 0 <= self.level <= MAX_LEVEL
        ok_weight = isinstance(self.weight, int | float) and not isinstance(self.weight, bool)
        if not (ok_level and ok_weight and math.isfinite(self.weight) and 0 < self.weight <= MAX_WEIGHT):
            raise ConfigError(
                f"a tier needs level in 0..{MAX_LEVEL} and weight in (0, {MAX_WEIGHT:g}], "
                f"got level={self.level!r} weight={self.weight!r}"
            )


# the built-in tier table: a named rate tier (ledger.core.limits.TIERS) and `custom`
SERVICE_CLASSES: Mapping[str, ServiceClass] = {
    "basic": ServiceClass(level=0, weight=1.0),
    CUSTOM: ServiceClass(level=1, weight=1.0),
    "pro": ServiceClass(level=1, weight=2.0),
    "enterprise": ServiceClass(level=2, weight=4.0),
}


def service_table(overrides: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, ServiceClass]:
    """The built-in table with `overrides` (tier name -> {level, weight}, either or both) applied;
    `ConfigError` names what it refuses. The names are the built-in tiers: a rate is named only so."""
    table = dict(SERVICE_CLASSES)
    for name, spec in (overrides or {}).items():
        if name not in table:
            raise ConfigError(f"tiers: {str(name)[:40]!r} is not a tier (they are: {', '.join(table)})")
        if not isinstance(spec, Mapping) or set(spec) - {"level", "weight"}:
            raise ConfigError(f"tiers: {name} must map to {{level, weight}}, got {str(spec)[:80]}")
        base = table[name]
        level: object = spec.get("level", base.level)
        if isinstance(level, float) and level.is_integer():  # YAML may say 1.0
            level = int(level)
        table[name] = ServiceClass(level=level, weight=spec.get("weight", base.weight))  # type: ignore[arg-type]
    return table


class Service(NamedTuple):
    """Whose request this is, for the detector's scheduler. A plain tuple on the wire."""

    tier: str
    level: int
    weight: float
    package: str  # the package root's id
    package_weight: float
    team: str  # the package's direct child this token is (or descends from); the root itself
    team_weight: float


def tier_of(node: Node) -> str:
    for n in node.path():
        if n.rate is not None:
            return n.rate.name or CUSTOM
    return CUSTOM


def service_of(node: Node, table: Mapping[str, ServiceClass] = SERVICE_CLASSES) -> Service:
    path = node.path()
    root = path[-1]
    team = path[-2] if len(path) >= 2 else root
    tier = tier_of(node)
    own = table.get(tier) or table[CUSTOM]
    pkg = table.get(tier_of(root)) or table[CUSTOM]
    tm = table.get(tier_of(team)) or table[CUSTOM]
    return Service(tier, own.level, own.weight, root.id, pkg.weight, team.id, tm.weight)


def default_service(package: str, team: str) -> Service:
    """For a request whose token's policy this replica does not hold (it cannot happen after an
    admission, which carries it; kept for callers that bypass the ledger, e.g. benchmarks)."""
    c = SERVICE_CLASSES[CUSTOM]
    return Service(CUSTOM, c.level, c.weight, package, c.weight, team, c.weight)
