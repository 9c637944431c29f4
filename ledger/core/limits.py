"""Per-token limits: rate tiers and token buckets, model and IP allowlists.

Every limit here is a value object with a `narrows(parent)` rule: a child token's
limit may only be equal to or tighter than its parent's (DESIGN §3). `None` always
means "no limit of its own" (the ancestors' limits still apply at admission).
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from ledger.core import columns
from ledger.core.codes import Code
from ledger.core.errors import OperationRefused

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# digit runs are bounded, so that no spec can overflow a float or an int parse before the range check
_RATE_RE = re.compile(
    r"^\s*(\d{1,12}(?:\.\d{1,9})?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*"
    r"(?:[:,]\s*(?:burst\s*=\s*)?(\d{1,12}))?\s*$"
)
_PERIOD_S = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}
MAX_RATE = 1e6  # requests per second: far above what one token can be served, still a finite JSON number
MIN_RATE = 1e-6  # one request in ~12 days: slower "rates" are typos, and 1/rate must stay a sane retry time
MAX_BURST = 10**9
MAX_RATE_NAME = 40
MAX_SPEC = 100  # characters of a rate spec
MAX_ALLOWLIST = 256  # entries of a model or IP allowlist
MAX_MODEL_NAME = columns.MODEL


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token-bucket rate: `rate` requests per second refilled, at most `burst` banked."""

    rate: float
    burst: int
    name: str | None = None

    def __post_init__(self) -> None:
        """Finite and bounded (rate in (0, MAX_RATE] per second, burst in 1..MAX_BURST): NaN, inf and
        huge values are refused here, so that they never reach a bucket, a JSON column or a header."""
        rate, burst = self.rate, self.burst
        ok_rate = type(rate) in (float, int) and math.isfinite(rate) and MIN_RATE <= rate <= MAX_RATE
        ok_burst = type(burst) is int and 1 <= burst <= MAX_BURST
        ok_name = self.name is None or (type(self.name) is str and 0 < len(self.name) <= MAX_RATE_NAME)
        if not (ok_rate and ok_burst and ok_name):
            raise OperationRefused(
                f"rate limit needs {MIN_RATE:g} <= rate <= {MAX_RATE:g}/s and 1 <= burst <= {MAX_BURST} "
                f"(and a short name), got {str(rate)[:40]}/{str(burst)[:40]}",
                Code.INVALID_REQUEST,
            )

    @classmethod
    def parse(cls, spec: str) -> RateLimit:
        """`basic` | `pro` | `enterprise` | `5/s` | `300/min` | `5/s:10` (burst 10)."""
        if type(spec) is not str or len(spec) > MAX_SPEC:
            raise OperationRefused(f"a rate is a string of at most {MAX_SPEC} characters", Code.INVALID_REQUEST)
        tier = TIERS.get(spec.strip().lower())
        if tier is not None:
            return tier
        m = _RATE_RE.match(spec.lower())
        if m is None:
            raise OperationRefused(
                f"unknown rate {spec!r}: use a tier ({', '.join(TIERS)}) or N/s, N/min, N/h with optional :BURST",
                Code.INVALID_REQUEST,
            )
        amount = float(m.group(1))  # at most 12 digits: finite
        burst = int(m.group(3)) if m.group(3) else max(1, round(amount))
        return cls(rate=amount / _PERIOD_S[m.group(2)], burst=burst)

    def narrows(self, parent: RateLimit | None) -> bool:
        return parent is None or (self.rate <= parent.rate and self.burst <= parent.burst)

    def to_json(self) -> dict[str, object]:
        return {"rate": self.rate, "burst": self.burst, "name": self.name}

    @classmethod
    def from_json(cls, data: Mapping[str, object] | None) -> RateLimit | None:
        """The stored form; raises OperationRefused(INVALID_REQUEST) for anything `__post_init__` refuses."""
        if data is None:
            return None
        try:
            rate, burst, name = data["rate"], data["burst"], data.get("name")
        except (KeyError, TypeError, AttributeError):
            rate = burst = name = None
        if (
            not isinstance(rate, float | int)
            or isinstance(rate, bool)
            or type(burst) is not int
            or not (name is None or isinstance(name, str))
        ):
            raise OperationRefused(f"malformed stored rate {str(data)[:80]}", Code.INVALID_REQUEST)
        return cls(rate=float(rate), burst=burst, name=name or None)

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
    """Token bucket state for one node. Time is passed in; nothing here reads a clock.

    A new token's bucket starts full (`Bucket(limit, now)`). Buckets are never persisted: when the
    book is rebuilt they are either carried over from the book in memory (`resumed`) or, on a cold
    start, begin EMPTY (`empty`): refilling every bucket on a restart would hand every token holder
    a fresh burst, so the conservative choice is to let them refill at their rate.

    `lent`: tokens drawn by lease holders (DESIGN §3b) that they may still spend. They count against
    the burst until given back unused (`repay`, back into `level`) or spent (`spent`, gone): so
    `level + lent <= burst` always, and admissions in any window W, wherever they are decided, are at
    most `burst + rate * W`. `serial` names the bucket across a rebuild or a rate change (`resumed`
    keeps it; a cold bucket gets a new one): tokens are only ever given back to the bucket they were
    drawn from.
    """

    __slots__ = ("lent", "level", "limit", "serial", "stamp")

    def __init__(
        self, limit: RateLimit, now: float, level: float | None = None, lent: float = 0.0, serial: int | None = None
    ) -> None:
        self.limit = limit
        burst = float(limit.burst)
        self.lent = min(max(lent, 0.0), burst)
        self.level = burst - self.lent if level is None else min(burst - self.lent, level)
        self.stamp = now
        self.serial = next(_SERIALS) if serial is None else serial

    @classmethod
    def empty(cls, limit: RateLimit, now: float) -> Bucket:
        """No token banked; the first one is there after 1/rate seconds."""
        return cls(limit, now, 0.0)

    @classmethod
    def resumed(cls, limit: RateLimit, previous: Bucket) -> Bucket:
        """The previous bucket's level, loans and stamp under `limit` (cut to its burst, loans first)."""
        return cls(limit, previous.stamp, previous.level, previous.lent, previous.serial)

    @property
    def room(self) -> float:
        """The most `level` may hold: the burst less what holders may still spend."""
        return float(self.limit.burst) - self.lent

    def give_back(self) -> None:
        """Undo one `take` of an admission that was never committed (never above the burst)."""
        self.level = min(self.room, self.level + 1.0)

    def refill(self, now: float) -> float:
        if now > self.stamp:
            self.level = min(self.room, self.level + (now - self.stamp) * self.limit.rate)
            self.stamp = now
        return self.level

    def wait_s(self) -> float:
        """Seconds until one token is available (after `refill`)."""
        return 0.0 if self.level >= 1.0 else (1.0 - self.level) / self.limit.rate

    def take(self) -> None:
        self.level -= 1.0

    def lend(self, n: int) -> None:
        """`n` tokens (at most `floor(level)`) go to a lease holder."""
        self.level -= n
        self.lent += n

    def repay(self, n: int) -> None:
        """Lent tokens given back unused: spendable here again."""
        back = min(float(n), self.lent)
        self.lent -= back
        self.level = min(self.room, self.level + back)

    def spent(self, n: int) -> None:
        """Lent tokens used (or past the time they could be): they no longer hold back the level."""
        self.lent = max(0.0, self.lent - n)


_SERIALS = itertools.count(1)


def normalize_models(models: Iterable[str] | None) -> frozenset[str] | None:
    """Model allowlist entries are `name` (any version) or `name@version`."""
    if models is None:
        return None
    items = _bounded_list(models, "model")
    out = set()
    for raw in items:
        m = raw.strip() if type(raw) is str else ""
        if not m or len(m) > MAX_MODEL_NAME or not re.fullmatch(r"[A-Za-z0-9_.\-]+(@[A-Za-z0-9_.\-]+)?", m):
            raise OperationRefused(f"invalid model name {str(raw)[:80]!r}", Code.INVALID_REQUEST)
        out.add(m)
    return frozenset(out)


def _bounded_list(values: Iterable[str], what: str) -> list[str]:
    """An allowlist as a list of at most MAX_ALLOWLIST entries (a bare string is not a list of them)."""
    if isinstance(values, str | bytes):
        raise OperationRefused(f"{what} allowlist must be a list, not a string", Code.INVALID_REQUEST)
    out: list[str] = []
    try:
        for v in values:
            out.append(v)
            if len(out) > MAX_ALLOWLIST:
                raise OperationRefused(f"at most {MAX_ALLOWLIST} {what} entries", Code.INVALID_REQUEST)
    except TypeError:
        raise OperationRefused(f"{what} allowlist must be a list", Code.INVALID_REQUEST) from None
    return out


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
    for raw in _bounded_list(ips, "IP"):
        try:
            if type(raw) is not str or len(raw) > 64:
                raise ValueError
            nets.append(ipaddress.ip_network(raw.strip(), strict=False))
        except ValueError:
            raise OperationRefused(f"invalid IP or CIDR {str(raw)[:80]!r}", Code.INVALID_REQUEST) from None
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
