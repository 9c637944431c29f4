"""The ledger's exception tree. Catch by type, never by message.

    LedgerError
    ├── CredentialError          a credential is missing, malformed, forged, expired, ...
    ├── LedgerUnavailable        the actor or the database cannot answer durably
    │   ├── WriteRejected        the database refused a write's data (not its availability)
    │   └── Fenced               a newer instance of this ledger shard started: this one may not commit
    ├── CredentialNotIssued      the operation WAS committed, but its credential could not be signed
    ├── OperationRefused         an admin operation was refused; carries a `Code`
    └── ConfigError              settings or key ring unusable

Admission never raises: it returns a `Decision` whose `code` says why.
"""

from __future__ import annotations

from ledger.core.codes import Code


class LedgerError(Exception):
    """Base of every exception raised by `ledger`."""

    # each instance's `code` is set here, never read from the class: an error that crossed Ray is a
    # `RayTaskError(<this class>)` whose attributes come from the original only when the class has none
    default_code: Code = Code.INVALID_REQUEST

    def __init__(self, message: str, code: Code | None = None) -> None:
        super().__init__(message)
        self.code: Code = code if code is not None else self.default_code

    def __reduce__(self) -> tuple[object, ...]:
        # keep `code` when the error crosses a process boundary (Ray, Serve handles)
        return (type(self), (self.message, self.code))

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class CredentialError(LedgerError):
    """The credential cannot be trusted; `code` is one of the 401 codes."""

    default_code = Code.INVALID_TOKEN


class LedgerUnavailable(LedgerError):
    """No durable answer could be given; nothing was charged."""

    default_code = Code.LEDGER_UNAVAILABLE


class WriteRejected(LedgerUnavailable):
    """The database is up but refused the data of a group commit (a value out of range, a
    constraint): one operation of the batch is at fault, so the batch is retried op by op."""


class CredentialNotIssued(LedgerError):
    """A token was created or rotated (committed), but the coordinator could not sign its
    credential: do not retry the operation; `rotate` the token (`token_id`) to get one."""

    def __init__(self, message: str, token_id: str) -> None:
        super().__init__(message, Code.LEDGER_UNAVAILABLE)
        self.token_id = token_id

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message, self.token_id))


class Fenced(LedgerUnavailable):
    """This shard instance was superseded (its epoch is no longer the database's): it commits
    nothing more. Callers retry; the named actor is then the successor."""


class OperationRefused(LedgerError):
    """An admin or tree operation (split, revoke, top-up, ...) was refused."""


class ConfigError(LedgerError, ValueError):
    """Settings, database URL or key ring are unusable (a ValueError too: a typed config loader,
    pydantic's for `ray_config.yaml`, reports it as a validation error of the field)."""
