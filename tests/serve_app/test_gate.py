"""TokenGate's rules with the in-process ledger (`FakeLedger`: the real rules, no Ray) and fake
detectors (the real graph is in test_http).

The gate verifies the credential and prices the request itself; a denial never reaches a
detector; every admitted request ends settled or refunded — on a detector failure, a timeout,
a caller that went away during admission or inference — and a refund the ledger could not take
is retried until it is durable.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ledger.api import Issued
from ledger.codes import Code
from ledger.credentials import KeyRing, issue
from ledger.entities import Admission, Decision, Settlement, TokenSpec
from ledger.fake import FakeLedger
from serve_app import gate as gate_mod
from serve_app.auth import KeyedVerifier
from serve_app.catalog import ModelCatalog
from serve_app.config import DEMO_WEIGHTS, ModelSpec
from serve_app.errors import ApiError
from serve_app.gate import GateRequest, TokenGate
from serve_app.results import Detection, InferenceParams

GateClass: Any = TokenGate.func_or_class  # the plain class behind the deployment
DET = Detection(0, "bolt", 0.9, 1.0, 2.0, 3.0, 4.0)


class Ledger(FakeLedger):
    """The real ledger rules in-process (`ledger.fake.FakeLedger`), with two faults to inject:
    admissions that take a while, and settlements the ledger cannot take for a while."""

    def __init__(self, directory: Path, admit_delay_s: float = 0.0) -> None:
        super().__init__(directory)
        self.admit_delay_s = admit_delay_s
        self.settle_failures = 0
        self.settle_attempts = 0
        self.admissions = 0

    async def admit(self, a: Admission) -> Decision:
        await asyncio.sleep(self.admit_delay_s)
        self.admissions += 1
        return await super().admit(a)

    async def settle(self, s: Settlement) -> Code:
        self.settle_attempts += 1
        if self.settle_failures > 0:
            self.settle_failures -= 1
            return Code.LEDGER_UNAVAILABLE
        return await super().settle(s)

    def states(self, token_id: str) -> list[tuple[str, str, int]]:
        """(request id, state, units) of the token's audit rows, oldest first."""
        return [(r["request_id"], r["state"], r["units"]) for r in reversed(self.usage(token_id=token_id))]


class FakeResponse:
    def __init__(self, coro: Any) -> None:
        self.task = asyncio.ensure_future(coro)
        self.cancelled = False

    def __await__(self) -> Any:
        return self.task.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self.task.cancel()


class FakeDetector:
    def __init__(self, fail: bool = False, delay_s: float = 0.0) -> None:
        self.calls = 0
        self.fail = fail
        self.delay_s = delay_s
        self.responses: list[FakeResponse] = []
        self.detect = self

    def remote(self, pixels: list[np.ndarray], params: InferenceParams) -> FakeResponse:
        self.responses.append(FakeResponse(self._detect(pixels)))
        return self.responses[-1]

    async def _detect(self, pixels: list[np.ndarray]) -> dict[str, Any]:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("replica died")
        return {"detections": [[DET, DET] for _ in pixels], "gpu_ms": 3.5}


SPECS = [
    ModelSpec(name="parts", version="1", weights=DEMO_WEIGHTS, timeout_s=0.5),
    ModelSpec(name="parts", version="2", weights=DEMO_WEIGHTS, cost_units=3),
]


def gate(client: Ledger, detector: FakeDetector) -> Any:
    g = object.__new__(GateClass)
    g.client, g._pending = client, set()
    g.detectors = {"parts@1": detector, "parts@2": detector}
    g.catalog = ModelCatalog(SPECS, "parts@1")
    g.auth = KeyedVerifier(g.public_keys)
    return g


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    fake = Ledger(tmp_path / "ledger")
    yield fake
    fake.close()


@pytest.fixture
def pkg(ledger: Ledger) -> Issued:
    return ledger.create_package(TokenSpec("gate", 100))


def request(cred: str | None, model: str | None = None, idem: str | None = None, n: int = 1) -> GateRequest:
    return GateRequest("req-1", cred, model, "127.0.0.1", idem, "hash", ((8, 8),) * n, 64 * n)


def pixels(n: int = 1) -> list[np.ndarray]:
    return [np.zeros((8, 8, 3), np.uint8)] * n


async def settled(g: Any) -> None:
    await asyncio.gather(*list(g._pending))


async def test_given_no_or_a_forged_credential_then_refused_before_the_ledger_and_the_detector(
    ledger: Ledger, pkg: Issued, tmp_path: Path
) -> None:
    det = FakeDetector()
    g = gate(ledger, det)
    foreign = KeyRing.open(tmp_path / "foreign")
    forged = issue(foreign, sub=pkg.token.id, pkg=pkg.token.id, jti="j", typ="access", exp=int(time.time()) + 60)
    admin = ledger.issue_admin("ops", 60)
    for cred in [None, "", "Bearer x.y.z", admin, forged]:
        reply = await g.detect(request(cred), pixels(), InferenceParams())
        assert reply.body is None and reply.error is not None and reply.error.status in (401, 403), cred
    assert ledger.admissions == 0 and det.calls == 0 and ledger.states(pkg.token.id) == []


async def test_given_a_request_then_the_gate_prices_it_from_its_own_catalog(ledger: Ledger, pkg: Issued) -> None:
    det = FakeDetector()
    reply = await gate(ledger, det).detect(request(pkg.credential, "parts@2", n=2), pixels(2), InferenceParams())
    assert reply.error is None and reply.body is not None
    assert ledger.states(pkg.token.id) == [("req-1", "admitted", 6)]  # 3 units x 2 images
    assert ledger.usage(token_id=pkg.token.id)[0]["model"] == "parts@2"
    assert reply.body["usage"] == {"units": 6, "used": 6, "allocation": 100, "remaining": 94}
    assert [len(im["detections"]) for im in reply.body["images"]] == [2, 2]


async def test_given_a_detector_failure_then_refunded_before_the_answer(ledger: Ledger, pkg: Issued) -> None:
    reply = await gate(ledger, FakeDetector(fail=True)).detect(request(pkg.credential), pixels(), InferenceParams())
    assert reply.error is not None and reply.error.code == "model_unavailable" and reply.error.retry_after
    assert ledger.states(pkg.token.id) == [("req-1", "refunded", 0)]
    assert ledger.token(pkg.token.id).used == 0


async def test_given_a_detector_that_does_not_answer_in_time_then_503_refunded_and_withdrawn(
    ledger: Ledger, pkg: Issued
) -> None:
    det = FakeDetector(delay_s=30)
    t0 = time.monotonic()
    reply = await gate(ledger, det).detect(request(pkg.credential), pixels(), InferenceParams())
    assert time.monotonic() - t0 < 5  # parts@1 times out after 0.5 s
    assert reply.error is not None and reply.error.code == "model_unavailable"
    assert "0.5s" in reply.error.message and reply.error.retry_after
    assert ledger.states(pkg.token.id) == [("req-1", "refunded", 0)]
    assert det.responses[0].cancelled  # the request is withdrawn from the detector's queue


async def test_given_a_denial_then_no_detector_runs_and_nothing_is_settled(ledger: Ledger) -> None:
    small = ledger.create_package(TokenSpec("small", 1))
    det = FakeDetector()
    reply = await gate(ledger, det).detect(request(small.credential, "parts@2"), pixels(), InferenceParams())
    assert reply.error is not None and reply.error.code == "quota_exhausted"
    assert det.calls == 0 and ledger.states(small.token.id) == [("req-1", "denied", 0)]
    assert ledger.settle_attempts == 0


async def test_given_a_success_then_settled_in_the_background(ledger: Ledger, pkg: Issued) -> None:
    det = FakeDetector()
    g = gate(ledger, det)
    reply = await g.detect(request(pkg.credential), pixels(), InferenceParams())
    assert reply.body is not None and det.calls == 1
    await settled(g)
    (row,) = ledger.usage(token_id=pkg.token.id)
    assert (row["state"], row["units"], row["detections"], row["gpu_ms"]) == ("settled", 1, 2, 3.5)


async def test_given_an_idempotent_success_then_its_body_is_stored_before_the_answer(
    ledger: Ledger, pkg: Issued
) -> None:
    g = gate(ledger, FakeDetector())
    reply = await g.detect(request(pkg.credential, idem="k-1"), pixels(), InferenceParams())
    assert ledger.states(pkg.token.id) == [("req-1", "settled", 1)]  # durable when the answer came back
    again = await g.detect(GateRequest("req-2", pkg.credential, None, "127.0.0.1", "k-1", "hash", ((8, 8),), 64),
                           pixels(), InferenceParams())  # fmt: skip
    assert again.body == reply.body and again.headers.get("Idempotent-Replayed") == "true"
    assert ledger.token(pkg.token.id).used == 1


async def test_given_the_caller_cancelled_during_inference_then_refunded(ledger: Ledger, pkg: Issued) -> None:
    det = FakeDetector(delay_s=5)
    g = gate(ledger, det)
    task = asyncio.ensure_future(g.detect(request(pkg.credential), pixels(), InferenceParams()))
    await asyncio.sleep(0.2)  # admitted, inferring
    task.cancel()  # what Serve does when the HTTP client hangs up
    with pytest.raises(asyncio.CancelledError):
        await task
    await settled(g)
    assert ledger.states(pkg.token.id) == [("req-1", "refunded", 0)]
    assert det.responses[0].cancelled


async def test_given_the_caller_cancelled_while_the_ledger_admits_then_refunded_once_admitted(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path / "slow", admit_delay_s=0.3)
    pkg = ledger.create_package(TokenSpec("slow", 10))
    det = FakeDetector()
    g = gate(ledger, det)
    task = asyncio.ensure_future(g.detect(request(pkg.credential), pixels(), InferenceParams()))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.4)  # the admission lands after the caller left
    await settled(g)
    assert ledger.admissions == 1 and det.calls == 0
    assert ledger.states(pkg.token.id) == [("req-1", "refunded", 0)]
    ledger.close()


async def test_given_a_refund_whose_first_commits_fail_then_it_is_retried_until_durable(
    ledger: Ledger, pkg: Issued, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gate_mod, "SETTLE_BACKOFF_S", (0.01,))
    ledger.settle_failures = 5  # the ledger is unavailable for the first five attempts
    g = gate(ledger, FakeDetector(fail=True))
    reply = await g.detect(request(pkg.credential), pixels(), InferenceParams())
    assert reply.error is not None and reply.error.code == "model_unavailable"
    await settled(g)
    assert ledger.settle_attempts == 6
    assert ledger.states(pkg.token.id) == [("req-1", "refunded", 0)]


async def test_given_token_operations_then_the_gate_acts_as_the_verified_token_only(
    ledger: Ledger, pkg: Issued
) -> None:
    g = gate(ledger, FakeDetector())
    other = ledger.create_package(TokenSpec("other", 10))
    assert [t.id for t in await g.call(pkg.credential, "tokens", {})] == [pkg.token.id]
    child = await g.call(pkg.credential, "split", {"parent_id": pkg.token.id, "spec": TokenSpec("kid", 5)})
    assert child.token.parent_id == pkg.token.id
    # an `actor` in the arguments is ignored: the gate acts as the verified token
    with pytest.raises(ApiError) as err:
        await g.call(pkg.credential, "token", {"token_id": other.token.id, "actor": other.token.id})
    assert err.value.status == 404
    ledger.rotate(pkg.token.id)  # the credential the caller holds is rotated out
    with pytest.raises(ApiError) as err:
        await g.call(pkg.credential, "tokens", {})
    assert err.value.status == 401
    for cred, op in [(None, "tokens"), (child.credential, "create_package"), (child.credential, "issue_admin")]:
        with pytest.raises(ApiError) as err:
            await g.call(cred, op, {})
        assert err.value.status in (401, 403)
