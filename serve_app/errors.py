"""The ONE error table of the HTTP and handle surfaces (DESIGN §5).

    ApiError(code, message)          every client-visible failure; `status` from ERRORS
    ├── raised by imaging            invalid_image 400, payload_too_large / image_too_large 413,
    │                                unsupported_media_type 415
    └── built from ledger verdicts   `from_code(ledger Code)`: the ledger never raises HTTP errors

Bodies are `{"error": {"code", "message", "request_id"}}`. Match on `code`, never on text.
"""

from __future__ import annotations

import logging
from typing import Any

from ledger import Code

SERVE_LOGGER = "ray.serve"  # Serve's replica logs "Request failed." with a traceback here

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

    def __init__(
        self, code: str, message: str, *, retry_after: float | None = None, headers: dict[str, str] | None = None
    ) -> None:
        if code not in ERRORS:
            raise ValueError(f"{code!r} is not in the error table")
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.headers = dict(headers or {})  # e.g. quota and rate-limit headers of a 429

    def __reduce__(self) -> tuple[Any, ...]:
        # keep code and retry_after when the error crosses a process boundary (handle calls)
        return (_rebuild, (self.code, self.message, self.retry_after, self.headers))

    @property
    def status(self) -> int:
        return ERRORS[self.code]

    @classmethod
    def from_code(
        cls, code: Code, message: str, retry_after: float | None = None, headers: dict[str, str] | None = None
    ) -> ApiError:
        """A ledger verdict as an API error (every non-OK ledger code is in the table)."""
        return cls(code.value, message or code.value.replace("_", " "), retry_after=retry_after, headers=headers)

    def body(self, request_id: str) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "request_id": request_id}}


def _rebuild(code: str, message: str, retry_after: float | None, headers: dict[str, str]) -> ApiError:
    return ApiError(code, message, retry_after=retry_after, headers=headers)


class QuietDenials(logging.Filter):
    """Serve logs every exception a replica method raises with its full traceback. A denial
    (`ApiError` below 500) raised to a handle caller is the API working, not a failure: it is
    logged as one INFO line with its code instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ApiError) and exc.status < 500:
            record.msg, record.args = "request denied: %s (%s)", (exc.code, exc.status)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True

    @classmethod
    def install(cls) -> None:
        logger = logging.getLogger(SERVE_LOGGER)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())
