"""The ledger's errors keep their code across Ray: a job that calls a ledger actor directly sees
`RayTaskError(OperationRefused)`, whose `code` must be the refusal's, not a class default."""

from __future__ import annotations

import pickle

import pytest
from ray.exceptions import RayTaskError

from ledger.core.codes import Code
from ledger.core.errors import CredentialError, LedgerUnavailable, OperationRefused


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OperationRefused("needs the capability", Code.FORBIDDEN), Code.FORBIDDEN),
        (OperationRefused("bad"), Code.INVALID_REQUEST),
        (CredentialError("expired", Code.EXPIRED_TOKEN), Code.EXPIRED_TOKEN),
        (CredentialError("forged"), Code.INVALID_TOKEN),
        (LedgerUnavailable("down"), Code.LEDGER_UNAVAILABLE),
    ],
)
def test_given_an_error_that_crossed_ray_then_its_code_is_the_original(error: Exception, code: Code) -> None:
    crossed = pickle.loads(pickle.dumps(error))
    assert crossed.code is code  # type: ignore[attr-defined]
    dual = RayTaskError("ShardActor.call", "Traceback ...", crossed).as_instanceof_cause()
    assert isinstance(dual, type(error))
    assert dual.code is code
