"""Verdict codes: the one vocabulary the ledger uses to say why something happened.

The ledger returns these; transports (HTTP, handle, CLI) map them to their own
surface from one table each. `ledger` never raises an HTTP exception.
"""

from __future__ import annotations

import enum


class Code(enum.StrEnum):
    """Outcome of a ledger operation. The value is the wire name used in error bodies."""

    OK = "ok"
    # admission replayed an earlier, identical idempotent request: no new charge
    REPLAY = "replay"
    # request malformed (bad units, unparsable limit, ...)
    INVALID_REQUEST = "invalid_request"
    # credential problems (401)
    MISSING_TOKEN = "missing_token"
    INVALID_TOKEN = "invalid_token"
    EXPIRED_TOKEN = "expired_token"
    REVOKED_TOKEN = "revoked_token"
    # policy (403)
    MODEL_NOT_ALLOWED = "model_not_allowed"
    IP_NOT_ALLOWED = "ip_not_allowed"
    FORBIDDEN = "forbidden"
    # a child may only narrow its parent's limits (403)
    LIMIT_WIDENING = "limit_widening"
    # lookups (404)
    NOT_FOUND = "not_found"
    # an allowlist names a model version that is not deployed (404)
    UNKNOWN_MODEL = "unknown_model"
    # idempotency (409)
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    IDEMPOTENCY_IN_PROGRESS = "idempotency_in_progress"
    # capacity (429)
    QUOTA_EXHAUSTED = "quota_exhausted"
    RATE_LIMITED = "rate_limited"
    # the ledger could not make its answer durable (503)
    LEDGER_UNAVAILABLE = "ledger_unavailable"

    @property
    def admitted(self) -> bool:
        """True for verdicts after which the caller may do the paid work."""
        return self is Code.OK
