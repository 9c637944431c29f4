"""The ONE error table of the HTTP and handle surfaces (DESIGN §5).

    ApiError(ApiCode, message)       every client-visible failure; `status` from ERRORS
    ├── raised by imaging            invalid_image 400, payload_too_large / image_too_large 413,
    │                                unsupported_media_type 415
    └── built from ledger verdicts   `from_code(ledger Code)`: the ledger never raises HTTP errors

`ApiCode` is the ledger's `Code` (its failures) extended by the serving side's own codes.
Bodies are `{"error": {"code", "message", "request_id"}}`. Match on `code`, never on text.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

from ledger import Code

SERVE_LOGGER = "ray.serve"  # Serve's replica logs "Request failed." with a traceback here


class ApiCode(enum.StrEnum):
    """Every code a client can see: the ledger's `Code` (all but its two admitting verdicts, OK and
    REPLAY, under the same names and values) and the serving side's own. A Python enum with
    members cannot be subclassed, so this one repeats the ledger's and `_extends_the_ledger`
    checks at import that none is missing or spelled differently."""

    # the ledger's verdicts
    INVALID_REQUEST = "invalid_request"
    MISSING_TOKEN = "missing_token"
    INVALID_TOKEN = "invalid_token"
    EXPIRED_TOKEN = "expired_token"
    REVOKED_TOKEN = "revoked_token"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    IP_NOT_ALLOWED = "ip_not_allowed"
    FORBIDDEN = "forbidden"
    LIMIT_WIDENING = "limit_widening"
    NOT_FOUND = "not_found"
    UNKNOWN_MODEL = "unknown_model"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    IDEMPOTENCY_IN_PROGRESS = "idempotency_in_progress"
    QUOTA_EXHAUSTED = "quota_exhausted"
    RATE_LIMITED = "rate_limited"
    LEDGER_UNAVAILABLE = "ledger_unavailable"
    # the serving side's own: images and bodies, and the model replicas
    INVALID_IMAGE = "invalid_image"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    IMAGE_TOO_LARGE = "image_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    MODEL_UNAVAILABLE = "model_unavailable"
    MODEL_BUSY = "model_busy"  # the version's replica refused it: its tenant's queue share is full

    @classmethod
    def of(cls, code: Code) -> ApiCode:
        """A ledger verdict's code (ValueError for OK and REPLAY, which are not failures)."""
        return cls(code.value)


def _extends_the_ledger() -> None:
    missing = {c.value for c in Code if not c.admitted and c is not Code.REPLAY} - {a.value for a in ApiCode}
    if missing:
        raise ImportError(f"serve_app.errors.ApiCode lacks the ledger's codes {sorted(missing)}")
    for a in ApiCode:
        if a.value in Code.__members__.values() and Code(a.value).name != a.name:
            raise ImportError(f"ApiCode.{a.name} has the value of Code.{Code(a.value).name}")


_extends_the_ledger()

# the HTTP status of every code: the ONE error table
ERRORS: dict[ApiCode, int] = {
    ApiCode.INVALID_REQUEST: 400,
    ApiCode.INVALID_IMAGE: 400,
    ApiCode.MISSING_TOKEN: 401,
    ApiCode.INVALID_TOKEN: 401,
    ApiCode.EXPIRED_TOKEN: 401,
    ApiCode.REVOKED_TOKEN: 401,
    ApiCode.MODEL_NOT_ALLOWED: 403,
    ApiCode.IP_NOT_ALLOWED: 403,
    ApiCode.FORBIDDEN: 403,
    ApiCode.LIMIT_WIDENING: 403,
    ApiCode.NOT_FOUND: 404,
    ApiCode.UNKNOWN_MODEL: 404,
    ApiCode.IDEMPOTENCY_CONFLICT: 409,
    ApiCode.IDEMPOTENCY_IN_PROGRESS: 409,
    ApiCode.PAYLOAD_TOO_LARGE: 413,
    ApiCode.IMAGE_TOO_LARGE: 413,
    ApiCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ApiCode.QUOTA_EXHAUSTED: 429,
    ApiCode.RATE_LIMITED: 429,
    ApiCode.MODEL_UNAVAILABLE: 503,
    ApiCode.MODEL_BUSY: 503,
    ApiCode.LEDGER_UNAVAILABLE: 503,
}
if set(ERRORS) != set(ApiCode):
    raise ImportError(f"no HTTP status for {sorted(set(ApiCode) - set(ERRORS))}")


class ApiError(Exception):
    """A client-visible failure with a code of `ApiCode` (its status from `ERRORS`)."""

    def __init__(
        self, code: ApiCode, message: str, *, retry_after: float | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.code = ApiCode(code)  # ValueError for a code outside the table
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
        return cls(ApiCode.of(code), message or code.value.replace("_", " "), retry_after=retry_after, headers=headers)

    def body(self, request_id: str) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "request_id": request_id}}


def _rebuild(code: ApiCode, message: str, retry_after: float | None, headers: dict[str, str]) -> ApiError:
    return ApiError(code, message, retry_after=retry_after, headers=headers)


class QuietDenials(logging.Filter):
    """Serve logs every exception a replica method raises with its full traceback. A denial
    (`ApiError` below 500, or `model_busy`: the scheduler shedding a flood) raised to a handle
    caller is the API working, not a failure: it is
    logged as one INFO line with its code instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ApiError) and (exc.status < 500 or exc.code is ApiCode.MODEL_BUSY):
            record.msg, record.args = "request denied: %s (%s)", (exc.code, exc.status)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True

    @classmethod
    def install(cls) -> None:
        logger = logging.getLogger(SERVE_LOGGER)
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())
