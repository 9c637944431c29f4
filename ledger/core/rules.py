"""The admission rules: what refuses a request, read by both sides that admit.

    the shard           `ledger.core.book.QuotaBook` (admissions at the shard) and `ledger.core.leases`
    the lease holder    `ledger.client.holder.LeaseHolder` (admissions in an ingress replica, from a
                        lease, against the `Rule`s of the token's path the shard sent it)

Both give the same verdict for the same path: a status or expiry (`status_refusal`), the model
and IP allowlists (`access_refusal`), and the fields an audit row must fit (`field_refusal`).
No I/O, no Ray.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ledger.core.codes import Code
from ledger.core.entities import MAX_CLIENT_IP, MAX_MODEL, Node, Status
from ledger.core.limits import IPNetwork, ip_allowed, model_allowed


def status_refusal(path: Iterable[Rule | Node], now: float) -> tuple[Code, str] | None:
    """The first dead or expired node on a token's path, as the verdict to give (None: all live)."""
    first = True
    for n in path:
        status = n.status if isinstance(n.status, str) else n.status.value
        if status != Status.ACTIVE.value:
            code = Code.REVOKED_TOKEN if status == Status.REVOKED.value else Code.EXPIRED_TOKEN
            return code, f"token {'' if first else 'or an ancestor '}is {status}"
        if n.expires_at is not None and now >= n.expires_at:
            return Code.EXPIRED_TOKEN, f"token {'' if first else 'or an ancestor '}has expired"
        first = False
    return None


def access_refusal(path: Iterable[Rule | Node], model: str, client_ip: str | None) -> tuple[Code, str] | None:
    """The model and IP allowlists of every node on the path (None: allowed)."""
    path = tuple(path)
    for n in path:
        if n.models is not None and not model_allowed(n.models, model):
            return Code.MODEL_NOT_ALLOWED, f"model {model!r} is not allowed for this token"
    for n in path:
        if n.ips is not None and not ip_allowed(n.ips, client_ip):
            return Code.IP_NOT_ALLOWED, f"client IP {client_ip!r} is not allowed for this token"
    return None


@dataclass(frozen=True, slots=True)
class Rule:
    """What a holder needs of one node on a token's path to admit locally."""

    id: str
    status: str
    expires_at: float | None
    models: frozenset[str] | None
    ips: tuple[IPNetwork, ...] | None


def field_refusal(model: object, client_ip: object) -> str | None:
    """Why an admission's model or client IP cannot be recorded (None: both fit their columns).
    Refused before anything is recorded, on every path (the ingress never sends such values)."""
    if type(model) is not str or not 0 < len(model) <= MAX_MODEL:
        return f"model must be 1-{MAX_MODEL} characters"
    if client_ip is not None and (type(client_ip) is not str or len(client_ip) > MAX_CLIENT_IP):
        return f"client IP must be at most {MAX_CLIENT_IP} characters"
    return None
