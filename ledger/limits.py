"""Per-token limits: rate tiers and token buckets, model and IP allowlists.

Every limit here is a value object with a `narrows(parent)` rule: a child token's
limit may only be equal to or tighter than its parent's (DESIGN §3). `None` always
means "no limit of its own" (the ancestors' limits still apply at admission).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from ledger.codes import Code
from ledger.errors import OperationRefused

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_RATE_RE = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*(?:[:,]\s*(?:burst\s*=\s*)?(\d+))?\s*$"
)
_PERIOD_S = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token-bucket rate: `rate` requests per second refilled, at most `burst` banked."""

    rate: float
    burst: int
    name: str | None = None

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.burst >= 1):
            raise OperationRefused(
                f"rate limit needs rate > 0 and burst >= 1, got {self.rate}/{self.burst}", Code.INVALID_REQUEST
            )

    @classmethod
    def parse(cls, spec: str) -> RateLimit:
        """`basic` | `pro` | `enterprise` | `5/s` | `300/min` | `5/s:10` (burst 10)."""
        tier = TIERS.get(spec.strip().lower())
        if tier is not None:
            return tier
        m = _RATE_RE.match(spec.lower())
        if m is None:
            raise OperationRefused(
                f"unknown rate {spec!r}: use a tier ({', '.join(TIERS)}) or N/s, N/min, N/h with optional :BURST",
                Code.INVALID_REQUEST,
            )
        rate = float(m.group(1)) / _PERIOD_S[m.group(2)]
        burst = int(m.group(3)) if m.group(3) else max(1, round(float(m.group(1))))
        return cls(rate=rate, burst=burst)

    def narrows(self, parent: RateLimit | None) -> bool:
        return parent is None or (self.rate <= parent.rate and self.burst <= parent.burst)

    def to_json(self) -> dict[str, object]:
        return {"rate": self.rate, "burst": self.burst, "name": self.name}

    @classmethod
    def from_json(cls, data: Mapping[str, object] | None) -> RateLimit | None:
        if data is None:
            return None
        name = data.get("name")
        return cls(rate=float(str(data["rate"])), burst=int(str(data["burst"])), name=str(name) if name else None)

    def describe(self) -> str:
        if self.name:
            return self.name
        return f"{self.rate:g}/s:{self.burst}"


TIERS: Mapping[str, RateLimit] = {
    "basic": RateLimit(rate=1.0, burst=2, name="basic"),
    "pro": RateLimit(rate=10.0, burst=20, name="pro"),
    "enterprise": RateLimit(rate=100.0, burst=200, name="enterprise"),
}


class Bucket:
    """Token bucket state for one node. Time is passed in; nothing here reads a clock."""

    __slots__ = ("level", "limit", "stamp")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.limit = limit
        self.level = float(limit.burst)
        self.stamp = now

    def refill(self, now: float) -> float:
        if now > self.stamp:
            self.level = min(float(self.limit.burst), self.level + (now - self.stamp) * self.limit.rate)
            self.stamp = now
        return self.level

    def wait_s(self) -> float:
        """Seconds until one token is available (after `refill`)."""
        return 0.0 if self.level >= 1.0 else (1.0 - self.level) / self.limit.rate

    def take(self) -> None:
        self.level -= 1.0


def normalize_models(models: Iterable[str] | None) -> frozenset[str] | None:
    """Model allowlist entries are `name` (any version) or `name@version`."""
    if models is None:
        return None
    out = set()
    for raw in models:
        m = raw.strip()
        if not m or not re.fullmatch(r"[A-Za-z0-9_.\-]+(@[A-Za-z0-9_.\-]+)?", m):
            raise OperationRefused(f"invalid model name {raw!r}", Code.INVALID_REQUEST)
        out.add(m)
    return frozenset(out)


def model_allowed(allow: frozenset[str], model: str) -> bool:
    """`model` is `name@version`; allowed if listed exactly or by bare name."""
    if model in allow:
        return True
    name, _, _ = model.partition("@")
    return name in allow


def models_narrow(child: frozenset[str] | None, parent: frozenset[str] | None) -> bool:
    if parent is None:
        return True
    if child is None:
        return False
    return all(model_allowed(parent, m) if "@" in m else m in parent for m in child)


def normalize_ips(ips: Iterable[str] | None) -> tuple[IPNetwork, ...] | None:
    if ips is None:
        return None
    nets: list[IPNetwork] = []
    for raw in ips:
        try:
            nets.append(ipaddress.ip_network(raw.strip(), strict=False))
        except ValueError:
            raise OperationRefused(f"invalid IP or CIDR {raw!r}", Code.INVALID_REQUEST) from None
    return tuple(nets)


@lru_cache(maxsize=65536)
def parse_ip(raw: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(raw)
    except ValueError:
        return None


def ip_allowed(nets: tuple[IPNetwork, ...], raw_ip: str | None) -> bool:
    ip = parse_ip(raw_ip) if raw_ip else None
    if ip is None:
        return False
    return any(ip.version == n.version and ip in n for n in nets)


def ips_narrow(child: tuple[IPNetwork, ...] | None, parent: tuple[IPNetwork, ...] | None) -> bool:
    if parent is None:
        return True
    if child is None:
        return False
    return all(any(c.version == p.version and c.subnet_of(p) for p in parent) for c in child)  # type: ignore[arg-type]
