"""The reference model the simulator checks the real ledger against (DESIGN §3, §3a, §3b).

Written from the design, not from the implementation: it never reads the book to decide what
should have happened. It keeps its own tree of tokens (status, expiry, credential id, allowlists,
rate, reclaimed), what each package was granted, every answered request, and the admission times
of every node with a rate. `Violation` is raised with a one-line reason.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

MAX_SKEW_S = 0.3  # holder clocks are within this of the shard's (the documented bound is ttl_margin_s = 1 s)
JUMP_S = 0.05  # a holder clock may jump by up to this at once


class Violation(AssertionError):
    pass


@dataclass(slots=True)
class OToken:
    id: str
    parent: str | None
    root: str
    jti: str
    active: bool = True
    expires_at: float | None = None
    models: frozenset[str] | None = None
    ips: frozenset[str] | None = None
    rate: tuple[float, int] | None = None
    rate_since: float = 0.0  # when this rate took effect (creation or the last change)
    rate_change: int = 0  # the change counter of that change: a holder applies it once it has seen it
    reclaimed: bool = False
    last_change: int = 0  # the oracle's change counter at this token's last narrowing change


@dataclass(slots=True)
class ORequest:
    request_id: str
    token: str
    units: int
    answered: bool = False


@dataclass
class Oracle:
    interval_s: float
    tokens: dict[str, OToken] = field(default_factory=dict)
    granted: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # root -> units ever granted
    requests: dict[str, ORequest] = field(default_factory=dict)
    answered_by_root: dict[str, int] = field(default_factory=dict)  # units of answered requests
    admitted_at: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # node with a rate
    change: int = 0

    # ---------------------------------------------------------------- the tree
    def path(self, token_id: str) -> list[OToken]:
        out = []
        t: OToken | None = self.tokens[token_id]
        while t is not None:
            out.append(t)
            t = self.tokens[t.parent] if t.parent else None
        return out

    def subtree(self, token_id: str) -> list[OToken]:
        out = [self.tokens[token_id]]
        for t in list(self.tokens.values()):
            if t.parent == token_id:
                out.extend(self.subtree(t.id))
        return out

    def created(self, t: OToken, units: int, now: float) -> None:
        t.rate_since = now
        self.tokens[t.id] = t
        if t.parent is None:
            self.granted[t.id] += units

    def narrowed(self, token_id: str) -> None:
        self.change += 1
        for t in self.subtree(token_id):
            t.last_change = self.change

    def last_change(self, token_id: str) -> int:
        return max(t.last_change for t in self.path(token_id))

    # ---------------------------------------------------------------- what may be admitted
    def refusal(self, token_id: str, jti: str, model: str, ip: str | None, now: float) -> str | None:
        path = self.path(token_id)
        if path[0].jti != jti:
            return "credential rotated"
        for t in path:
            if not t.active:
                return f"{t.id} revoked or expired"
            if t.expires_at is not None and now >= t.expires_at + MAX_SKEW_S + JUMP_S:
                return f"{t.id} expired"
            if t.models is not None and model not in t.models and model.partition("@")[0] not in t.models:
                return f"model {model[:20]} not allowed by {t.id}"
            if t.ips is not None and ip not in t.ips:
                return f"ip {str(ip)[:20]} not allowed by {t.id}"
        if path[0].reclaimed:
            return "reclaimed whole"
        return None

    def admitted(self, request_id: str, token_id: str, units: int, now: float, replayed: bool, seen: int) -> None:
        """`seen`: the change counter the admitting holder has seen (the shard's: `self.change`)."""
        if request_id not in self.requests:
            self.requests[request_id] = ORequest(request_id, token_id, units)
        if not replayed:
            for t in self.path(token_id):
                if t.rate is not None and t.rate_change <= seen:  # the holder knew this rate
                    self.admitted_at[t.id].append(now)

    def answered(self, request_id: str) -> None:
        req = self.requests[request_id]
        if not req.answered:
            req.answered = True
            root = self.tokens[req.token].root
            self.answered_by_root[root] = self.answered_by_root.get(root, 0) + req.units

    def answered_units(self, root: str) -> int:
        return self.answered_by_root.get(root, 0)

    # ---------------------------------------------------------------- checks
    def check_granted(self, root: str) -> None:
        """Never more answered than the package was granted."""
        answered = self.answered_units(root)
        if answered > self.granted[root]:
            raise Violation(f"{root}: {answered} units answered, {self.granted[root]} granted")

    def check_rates(self) -> None:
        """For every node with a rate (r, b): admissions in any window W since the rate took effect
        (plus one interval, for rate tokens drawn before) are at most b + r * (W + interval + jump)."""
        slack = self.interval_s + JUMP_S
        for node_id, times in self.admitted_at.items():
            t = self.tokens[node_id]
            if t.rate is None:
                continue
            rate, burst = t.rate
            ts = sorted(x for x in times if x >= t.rate_since + slack)
            best = float("-inf")  # max over i <= j of (rate * t_i - i)
            for j, tj in enumerate(ts):
                best = max(best, rate * tj - j)
                excess = (j + 1) - rate * tj + best
                if excess > burst + rate * slack + 1e-6:
                    raise Violation(
                        f"{node_id}: {excess:.2f} admissions above rate x window in a window ending at {tj:.3f}"
                        f" (rate {rate}/s, burst {burst}, slack {rate * slack:.2f})"
                    )
