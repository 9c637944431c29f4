"""The ONE error table of the HTTP and handle surfaces (DESIGN §5).

    ApiError(code, message)          every client-visible failure; `status` from ERRORS
    ├── raised by imaging            invalid_image 400, payload_too_large / image_too_large 413,
    │                                unsupported_media_type 415
    └── built from ledger verdicts   `from_code(ledger Code)`: the ledger never raises HTTP errors

Bodies are `{"error": {"code", "message", "request_id"}}`. Match on `code`, never on text.
"""

from __future__ import annotations

from typing import Any

from ledger.codes import Code

ERRORS: dict[str, int] = {
    "invalid_request": 400,
    "invalid_image": 400,
    "missing_token": 401,
    "invalid_token": 401,
    "expired_token": 401,
    "revoked_token": 401,
    "model_not_allowed": 403,
    "ip_not_allowed": 403,
    "forbidden": 403,
    "limit_widening": 403,
    "not_found": 404,
    "unknown_model": 404,
    "idempotency_conflict": 409,
    "idempotency_in_progress": 409,
    "payload_too_large": 413,
    "image_too_large": 413,
    "unsupported_media_type": 415,
    "quota_exhausted": 429,
    "rate_limited": 429,
    "model_unavailable": 503,
    "ledger_unavailable": 503,
}


class ApiError(Exception):
    """A client-visible failure with a code from `ERRORS`."""

    def __init__(self, code: str, message: str, *, retry_after: float | None = None) -> None:
        if code not in ERRORS:
            raise ValueError(f"{code!r} is not in the error table")
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return ERRORS[self.code]

    @classmethod
    def from_code(cls, code: Code, message: str, retry_after: float | None = None) -> ApiError:
        """A ledger verdict as an API error (every non-OK ledger code is in the table)."""
        return cls(code.value, message or code.value.replace("_", " "), retry_after=retry_after)

    def body(self, request_id: str) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "request_id": request_id}}
