"""Plain value types shared by the quota book, the store and the client.

Nothing here does I/O. Times are epoch seconds (UTC) as floats.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Any, NamedTuple

from ledger.core import columns
from ledger.core.codes import Code
from ledger.core.errors import OperationRefused
from ledger.core.limits import MAX_ALLOWLIST, Bucket, IPNetwork, RateLimit, normalize_ips, normalize_models
from ledger.core.service import Service

DEFAULT_THRESHOLDS: tuple[int, ...] = (80, 95, 100)
MAX_EPOCH_S = 32503680000.0  # year 3000: later "expiries" are typos, and JWT exp must stay an exact integer
MAX_NAME = 200  # the tokens.name and tokens.team columns
MAX_THRESHOLDS = 10
# Node.meta: reclaimed whole; until a top-up it admits nothing, and what becomes unspent goes to the parent
RECLAIMING = "_reclaiming"
# Node.meta: units this token gave back to its parent (reclaim, revoke, expiry); its allocation as
# granted is `allocation + returned` (the allocation itself shrinks, so that conservation holds)
RETURNED = "_returned"
WRITTEN_OFF = "_written_off"  # units of lost leases written off (`refund` policy): left the books
MAX_MODEL = columns.MODEL
MAX_CLIENT_IP = columns.CLIENT_IP
MAX_META_BYTES = 16384  # a token's meta (alert contacts, cost centre) as JSON


class Status(enum.StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"
    EXPIRED = "expired"


class UsageState(enum.StrEnum):
    ADMITTED = "admitted"  # debited, work in progress
    SETTLED = "settled"  # work done, debit kept
    REFUNDED = "refunded"  # server-side failure, debit returned
    DENIED = "denied"  # never debited; `outcome` says why


@dataclass(slots=True, eq=False)
class Node:
    """One token in a package tree. `delegated` and `consumed` are derived, never stored."""

    id: str
    root_id: str
    parent_id: str | None
    name: str
    allocation: int
    used: int = 0
    status: Status = Status.ACTIVE
    expires_at: float | None = None
    models: frozenset[str] | None = None
    ips: tuple[IPNetwork, ...] | None = None
    rate: RateLimit | None = None
    jti: str = ""
    team: str | None = None
    created_at: float = 0.0
    thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS
    fired: set[int] = field(default_factory=set)
    meta: dict[str, Any] = field(default_factory=dict)
    # derived (kept out of repr: a deep tree must not be printed recursively)
    children: list[Node] = field(default_factory=list, repr=False)
    parent: Node | None = field(default=None, repr=False)
    delegated: int = 0
    leased: int = 0  # escrowed in quota leases of ingress replicas (DESIGN §3a); from the leases table
    consumed: int = 0
    bucket: Bucket | None = field(default=None, repr=False)
    ancestry: tuple[Node, ...] = field(default=(), repr=False)  # cache of path(); parents never change

    @property
    def live(self) -> bool:
        return self.status is Status.ACTIVE

    @property
    def free(self) -> int:
        return self.allocation - self.used - self.delegated - self.leased

    def path(self) -> tuple[Node, ...]:
        """This node, then each ancestor up to the root. Iterative: no depth of tree can recurse."""
        if not self.ancestry:
            chain: list[Node] = []
            n: Node | None = self
            while n is not None:
                if n.ancestry:  # an ancestor's cached path ends the walk
                    chain.extend(n.ancestry)
                    break
                chain.append(n)
                n = n.parent
            self.ancestry = tuple(chain)
        return self.ancestry

    def subtree(self) -> list[Node]:
        """This node and every descendant, parents before children."""
        out = [self]
        i = 0
        while i < len(out):
            out.extend(out[i].children)
            i += 1
        return out

    def view(self) -> TokenView:
        return TokenView(
            id=self.id,
            root_id=self.root_id,
            parent_id=self.parent_id,
            name=self.name,
            team=self.team,
            allocation=self.allocation,
            used=self.used,
            delegated=self.delegated,
            leased=self.leased,
            free=self.free if self.live else 0,
            consumed=self.consumed,
            status=self.status.value,
            expires_at=self.expires_at,
            models=sorted(self.models) if self.models is not None else None,
            ips=[str(n) for n in self.ips] if self.ips is not None else None,
            rate=self.rate.describe() if self.rate else None,
            created_at=self.created_at,
            thresholds=list(self.thresholds),
            fired=sorted(self.fired),
            children=[c.id for c in self.children],
            meta=dict(self.meta),
            returned=int(self.meta.get(RETURNED, 0)),
            written_off=int(self.meta.get(WRITTEN_OFF, 0)),
            granted=self.allocation + int(self.meta.get(RETURNED, 0)) + int(self.meta.get(WRITTEN_OFF, 0)),
        )


@dataclass(frozen=True, slots=True)
class TokenView:
    """What callers may see of a token (never its credential)."""

    id: str
    root_id: str
    parent_id: str | None
    name: str
    team: str | None
    allocation: int
    used: int
    delegated: int
    free: int
    consumed: int
    status: str
    expires_at: float | None
    models: list[str] | None
    ips: list[str] | None
    rate: str | None
    created_at: float
    thresholds: list[int]
    fired: list[int]
    children: list[str]
    meta: dict[str, Any]
    leased: int = 0  # units escrowed in leases of ingress replicas (DESIGN §3a)
    returned: int = 0  # units given back to the parent (reclaim, revoke, expiry)
    written_off: int = 0  # units of lost leases that left the books (`lost_lease_policy` refund)
    granted: int = 0  # the allocation as granted (split, top-ups): allocation + returned + written_off


@dataclass(frozen=True, slots=True)
class Admission:
    """One request to spend `units` of `token_id`. Tuple-cheap: crosses Ray in batches."""

    request_id: str
    token_id: str
    jti: str
    units: int
    model: str
    client_ip: str | None = None
    idem_key: str | None = None
    body_hash: str | None = None
    image_bytes: int = 0
    root_id: str = ""  # the credential's `pkg` claim: which shard owns the token ("" = look it up)
    # which copy of the request this is: one per admit call of a holder, the same on a resend of that
    # call. Copies of one request id (Ray redelivered it) are settled once all are done ("" = unknown)
    copy: str = ""
    # the caller (a lease holder) asks again while units come back from other replicas' leases: an
    # exhausted answer while leases of the token hold units is then not final and records nothing
    wait: bool = False

    def row(self) -> AdmissionRow:
        """Wire form (`AdmissionRow`); `dataclasses.astuple` deep-copies and is ~10x slower."""
        return AdmissionRow(
            self.request_id,
            self.token_id,
            self.jti,
            self.units,
            self.model,
            self.client_ip,
            self.idem_key,
            self.body_hash,
            self.image_bytes,
            self.root_id,
            self.copy,
            self.wait,
        )

    @classmethod
    def from_row(cls, r: object) -> Admission | None:
        """The admission a wire row stands for, or None when its types or sizes are wrong (so that a
        bad caller can neither crash a batch nor the write)."""
        if not isinstance(r, tuple | list) or len(r) not in (10, 11, 12):  # 10: a caller without copies
            return None
        a = cls(*r)
        ok = (
            _str(a.request_id, 1, 64)
            and _str(a.token_id, 0, 40)
            and _str(a.jti, 0, 64)
            and type(a.units) is int
            and _str(a.model, 1, 200)
            and _opt_str(a.client_ip, 64)
            and _opt_str(a.idem_key, 255)
            and _opt_str(a.body_hash, 128)
            and type(a.image_bytes) is int
            and 0 <= a.image_bytes < MAX_IMAGE_BYTES
            and _str(a.root_id, 0, 40)
            and _str(a.copy, 0, 64)
            and type(a.wait) is bool
        )
        return a if ok else None


class AdmissionRow(NamedTuple):
    """An `Admission` as it crosses processes, in batches: a typed record that is a tuple (it
    pickles as one, about as cheaply: the ledger bench before and after is in docs/BENCHMARKS.md).
    The shard rebuilds the `Admission` with `Admission.from_row`, which checks every field."""

    request_id: str
    token_id: str
    jti: str
    units: int
    model: str
    client_ip: str | None
    idem_key: str | None
    body_hash: str | None
    image_bytes: int
    root_id: str
    copy: str
    wait: bool


class SettlementRow(NamedTuple):
    """A `Settlement` as it crosses processes (checked by `Settlement.from_row`)."""

    request_id: str
    token_id: str
    success: bool
    charged: int | None
    latency_ms: float
    detections: int
    gpu_ms: float
    result: str | None
    root_id: str
    copy: str


MAX_IMAGE_BYTES = 2**62  # image_bytes is a BIGINT column


def _str(v: object, low: int, high: int) -> bool:
    return isinstance(v, str) and low <= len(v) <= high


def _opt_str(v: object, limit: int) -> bool:
    return v is None or (isinstance(v, str) and len(v) <= limit)


def _finite(v: object, top: float) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v < top


class Decision(NamedTuple):
    """The verdict of one admission. `code` is `Code.OK` iff the units were debited.

    A NamedTuple: built positionally on the hot path and pickled as a plain tuple across Ray.
    """

    code: Code
    request_id: str
    token_id: str = ""
    units: int = 0
    used: int = 0
    allocation: int = 0
    remaining: int = 0  # allocation - delegated - used: units not spent yet (leased ones included)
    rate_limit: float | None = None
    rate_remaining: int | None = None
    retry_after: float | None = None
    message: str = ""
    replay: str | None = None  # stored result of an idempotent replay
    replayed: bool = False  # True when the same request_id was admitted before (no new debit)
    recalled: bool = False  # exhausted, but units are being asked back from leases: ask again shortly
    copy: str = ""  # the delivery this verdict is for (`Admission.copy`): its settlement names it
    # whose request it is, for the detector's scheduler (DESIGN §3c); set on every OK verdict
    service: Service | None = None

    @property
    def admitted(self) -> bool:
        return self.code is Code.OK


@dataclass(frozen=True, slots=True)
class Settlement:
    """Close an admitted request: keep `charged` of its units (refund the rest)."""

    request_id: str
    token_id: str
    success: bool
    charged: int | None = None  # None: all units on success, none on failure
    latency_ms: float = 0.0
    detections: int = 0
    gpu_ms: float = 0.0
    result: str | None = None  # JSON kept for idempotent replays
    root_id: str = ""  # which shard owns the token ("" = look it up)
    copy: str = ""  # the copy of the request this settles (`Admission.copy`; "" = the request itself)

    def row(self) -> SettlementRow:
        return SettlementRow(
            self.request_id,
            self.token_id,
            self.success,
            self.charged,
            self.latency_ms,
            self.detections,
            self.gpu_ms,
            self.result,
            self.root_id,
            self.copy,
        )

    @classmethod
    def from_row(cls, r: object) -> Settlement | None:
        """The settlement a wire row stands for, or None when no column could hold its values."""
        if not isinstance(r, tuple | list) or len(r) not in (9, 10):  # 9: a caller without copies
            return None
        s = cls(*r)
        ok = (
            _str(s.request_id, 1, 64)
            and _str(s.token_id, 0, 40)
            and type(s.success) is bool
            and (s.charged is None or type(s.charged) is int)
            and _finite(s.latency_ms, 1e12)
            and type(s.detections) is int
            and 0 <= s.detections < 2**31
            and _finite(s.gpu_ms, 1e12)
            and _opt_str(s.result, 16 * 2**20)
            and _str(s.root_id, 0, 40)
            and _str(s.copy, 0, 64)
        )
        return s if ok else None


@dataclass(frozen=True, slots=True)
class TokenLimits:
    """Limits of a token (expiry, models, IPs, rate) for a new or edited node. `None` leaves a
    field as inherited / unchanged."""

    expires_at: float | None = None
    models: frozenset[str] | None = None
    ips: tuple[IPNetwork, ...] | None = None
    rate: RateLimit | None = None


@dataclass(frozen=True, slots=True)
class TokenSpec:
    """What a new token gets: a name, its units, and limits that may only narrow its parent's."""

    name: str
    allocation: int
    limits: TokenLimits = TokenLimits()
    team: str | None = None
    thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        name: str,
        allocation: int,
        *,
        expires_at: float | None = None,
        models: Iterable[str] | None = None,
        ips: Iterable[str] | None = None,
        rate: str | None = None,
        team: str | None = None,
        thresholds: Iterable[int] = DEFAULT_THRESHOLDS,
        meta: dict[str, Any] | None = None,
    ) -> TokenSpec:
        """From plain values (CLI, HTTP, console); raises OperationRefused(INVALID_REQUEST) on bad ones."""
        limits = make_token_limits(expires_at, models, ips, rate)
        spec = cls(name, allocation, limits, team, _thresholds(thresholds), meta or {})
        spec_problems(spec)
        return spec


def _thresholds(values: Iterable[int]) -> tuple[int, ...]:
    try:
        out = tuple(values)
    except TypeError:
        raise OperationRefused("alert thresholds must be a list of percentages", Code.INVALID_REQUEST) from None
    return out


def spec_problems(spec: TokenSpec) -> None:
    """Raise OperationRefused(INVALID_REQUEST) unless every field fits its column and range.

    Called by `TokenSpec.build` and again by the tree before anything changes (a spec may be
    built directly and sent over Ray)."""
    if not isinstance(spec, TokenSpec):
        raise OperationRefused("a token spec is required", Code.INVALID_REQUEST)
    if type(spec.name) is not str or len(spec.name) > MAX_NAME:
        raise OperationRefused(f"name must be a string of at most {MAX_NAME} characters", Code.INVALID_REQUEST)
    if spec.team is not None and (type(spec.team) is not str or len(spec.team) > MAX_NAME):
        raise OperationRefused(f"team must be a string of at most {MAX_NAME} characters", Code.INVALID_REQUEST)
    th = spec.thresholds
    if not isinstance(th, tuple) or len(th) > MAX_THRESHOLDS or not all(type(t) is int and 0 < t <= 100 for t in th):
        raise OperationRefused(
            f"alert thresholds must be at most {MAX_THRESHOLDS} percentages in 1..100", Code.INVALID_REQUEST
        )
    check_token_limits(spec.limits)
    if not isinstance(spec.meta, dict):
        raise OperationRefused("meta must be an object", Code.INVALID_REQUEST)
    if any(not isinstance(k, str) or k.startswith("_") for k in spec.meta):
        raise OperationRefused("meta keys must be strings not starting with '_' (reserved)", Code.INVALID_REQUEST)
    try:
        size = len(json.dumps(spec.meta, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        raise OperationRefused("meta must be plain JSON (no NaN or infinity)", Code.INVALID_REQUEST) from None
    if size > MAX_META_BYTES:
        raise OperationRefused(f"meta must be at most {MAX_META_BYTES} bytes of JSON", Code.INVALID_REQUEST)
    if problems := contact_problems(spec.meta):
        raise OperationRefused("; ".join(problems), Code.INVALID_REQUEST)


def _is_time(v: object) -> bool:
    """A finite epoch time in (0, MAX_EPOCH_S): refuses NaN, infinities, bools and strings."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0 < v < MAX_EPOCH_S


def check_token_limits(limits: TokenLimits) -> None:
    """Raise OperationRefused(INVALID_REQUEST) unless `limits` holds only well-formed values (as
    `make_token_limits` builds them). Narrowing against a parent is the tree's business."""
    if not isinstance(limits, TokenLimits):
        raise OperationRefused("limits are required", Code.INVALID_REQUEST)
    if limits.expires_at is not None and not _is_time(limits.expires_at):
        raise OperationRefused(f"expiry {str(limits.expires_at)[:40]!r} is not a time", Code.INVALID_REQUEST)
    if limits.models is not None and (
        not isinstance(limits.models, frozenset) or normalize_models(sorted(limits.models)) != limits.models
    ):
        raise OperationRefused("malformed model allowlist", Code.INVALID_REQUEST)
    if limits.ips is not None and (
        not isinstance(limits.ips, tuple)
        or len(limits.ips) > MAX_ALLOWLIST
        or not all(isinstance(n, IPv4Network | IPv6Network) for n in limits.ips)
    ):
        raise OperationRefused("malformed IP allowlist", Code.INVALID_REQUEST)
    if limits.rate is not None and not isinstance(limits.rate, RateLimit):
        raise OperationRefused("malformed rate limit", Code.INVALID_REQUEST)


def make_token_limits(
    expires_at: float | None = None,
    models: Iterable[str] | None = None,
    ips: Iterable[str] | None = None,
    rate: str | None = None,
) -> TokenLimits:
    """Validated `TokenLimits` from plain values; `None` leaves a field inherited / unchanged."""
    if expires_at is not None and not _is_time(expires_at):
        raise OperationRefused(f"expiry {str(expires_at)[:40]!r} is not a time", Code.INVALID_REQUEST)
    return TokenLimits(
        expires_at=expires_at,
        models=normalize_models(models),
        ips=normalize_ips(ips),
        rate=RateLimit.parse(rate) if rate else None,
    )


_EMAIL = re.compile(r"^[A-Za-z0-9._%+\-]{1,64}@(([A-Za-z0-9\-]{1,63}\.)+[A-Za-z]{2,63}|localhost)$")
_WEBHOOK = re.compile(r"^https?://[^\s/$.?#][^\s]{0,2000}$")


def contact_problems(meta: dict[str, Any]) -> list[str]:
    """What is wrong with the alert contacts in a token's meta (`alert_emails`, `alert_webhooks`)."""
    problems = []
    for key, pattern in (("alert_emails", _EMAIL), ("alert_webhooks", _WEBHOOK)):
        value = meta.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or len(value) > 10 or not all(isinstance(v, str) for v in value):
            problems.append(f"{key} must be a list of at most 10 strings")
        elif bad := [v for v in value if not pattern.match(v)]:
            problems.append(f"{key} has invalid entries: {bad[:3]}")
    return problems
