"""TokenGate's rules with a fake ledger client and fake detectors (the real graph is in test_http).

The gate verifies the credential and prices the request itself; a denial never reaches a
detector; every admitted request ends settled or refunded — on a detector failure, a timeout,
a caller that went away during admission or inference — and a refund the ledger could not take
is retried until it is durable.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ledger.codes import Code
from ledger.credentials import KeyRing, issue
from ledger.entities import Admission, Decision, Settlement
from serve_app import gate as gate_mod
from serve_app.auth import KeyedVerifier
from serve_app.catalog import ModelCatalog
from serve_app.config import DEMO_WEIGHTS, ModelSpec
from serve_app.errors import ApiError
from serve_app.gate import GateRequest, TokenGate
from serve_app.results import Detection, InferenceParams

GateClass: Any = TokenGate.func_or_class  # the plain class behind the deployment
DET = Detection(0, "bolt", 0.9, 1.0, 2.0, 3.0, 4.0)


class FakeClient:
    """The ledger as the gate sees it; `settle_failures` makes the first settlements fail to commit."""

    def __init__(self, ring: KeyRing, code: Code = Code.OK, admit_delay_s: float = 0.0) -> None:
        self.ring = ring
        self.code = code
        self.admit_delay_s = admit_delay_s
        self.settle_failures = 0
        self.admitted: list[Admission] = []
        self.settled: list[Settlement] = []
        self.settle_attempts = 0
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def admit(self, a: Admission) -> Decision:
        await asyncio.sleep(self.admit_delay_s)
        self.admitted.append(a)
        return Decision(self.code, a.request_id, a.token_id, a.units)

    async def settle(self, s: Settlement) -> Code:
        self.settle_attempts += 1
        if self.settle_failures > 0:
            self.settle_failures -= 1
            return Code.LEDGER_UNAVAILABLE
        self.settled.append(s)
        return Code.OK

    async def acall(self, op: str, **kwargs: Any) -> Any:
        if op == "public_keys":
            return self.ring.public_keys()
        self.calls.append((op, kwargs))
        return {"op": op}


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


def gate(client: FakeClient, detector: FakeDetector) -> Any:
    g = object.__new__(GateClass)
    g.client, g._pending = client, set()
    g.detectors = {"parts@1": detector, "parts@2": detector}
    g.catalog = ModelCatalog(SPECS, "parts@1")
    g.auth = KeyedVerifier(g.public_keys)
    return g


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    return KeyRing.open(tmp_path / "keys")


def credential(ring: KeyRing, sub: str = "tok_1", typ: str = "access") -> str:
    return issue(ring, sub=sub, pkg="pkg_1", jti="jti_1", typ=typ, exp=int(time.time()) + 3600)


def request(cred: str | None, model: str | None = None, idem: str | None = None, n: int = 1) -> GateRequest:
    return GateRequest("req-1", cred, model, "127.0.0.1", idem, "hash", ((8, 8),) * n, 64 * n)


def pixels(n: int = 1) -> list[np.ndarray]:
    return [np.zeros((8, 8, 3), np.uint8)] * n


async def settled(g: Any) -> None:
    await asyncio.gather(*list(g._pending))


async def test_given_no_or_a_forged_credential_then_refused_before_the_ledger_and_the_detector(
    ring: KeyRing, tmp_path: Path
) -> None:
    client, det = FakeClient(ring), FakeDetector()
    g = gate(client, det)
    foreign = KeyRing.open(tmp_path / "foreign")
    for cred in [None, "", "Bearer x.y.z", credential(ring, typ="admin"), credential(foreign)]:
        reply = await g.detect(request(cred), pixels(), InferenceParams())
        assert reply.body is None and reply.error is not None and reply.error.status in (401, 403), cred
    assert client.admitted == [] and det.calls == 0


async def test_given_a_request_then_the_gate_prices_it_from_its_own_catalog(ring: KeyRing) -> None:
    client, det = FakeClient(ring), FakeDetector()
    reply = await gate(client, det).detect(request(credential(ring), "parts@2", n=2), pixels(2), InferenceParams())
    assert reply.error is None and reply.body is not None
    (a,) = client.admitted
    assert (a.token_id, a.jti, a.units, a.model) == ("tok_1", "jti_1", 6, "parts@2")  # 3 units x 2 images
    assert [len(im["detections"]) for im in reply.body["images"]] == [2, 2]


async def test_given_a_detector_failure_then_refunded_before_the_answer(ring: KeyRing) -> None:
    client, det = FakeClient(ring), FakeDetector(fail=True)
    reply = await gate(client, det).detect(request(credential(ring)), pixels(), InferenceParams())
    assert reply.error is not None and reply.error.code == "model_unavailable" and reply.error.retry_after
    assert [(s.request_id, s.success) for s in client.settled] == [("req-1", False)]


async def test_given_a_detector_that_does_not_answer_in_time_then_503_refunded_and_withdrawn(ring: KeyRing) -> None:
    client, det = FakeClient(ring), FakeDetector(delay_s=30)
    t0 = time.monotonic()
    reply = await gate(client, det).detect(request(credential(ring)), pixels(), InferenceParams())
    assert time.monotonic() - t0 < 5  # parts@1 times out after 0.5 s
    assert reply.error is not None and reply.error.code == "model_unavailable"
    assert "0.5s" in reply.error.message and reply.error.retry_after
    assert [(s.request_id, s.success) for s in client.settled] == [("req-1", False)]
    assert det.responses[0].cancelled  # the request is withdrawn from the detector's queue


async def test_given_a_denial_then_no_detector_runs_and_nothing_is_settled(ring: KeyRing) -> None:
    client, det = FakeClient(ring, Code.QUOTA_EXHAUSTED), FakeDetector()
    reply = await gate(client, det).detect(request(credential(ring)), pixels(), InferenceParams())
    assert reply.error is not None and reply.error.code == "quota_exhausted"
    assert det.calls == 0 and client.settled == []


async def test_given_a_success_then_settled_in_the_background(ring: KeyRing) -> None:
    client, det = FakeClient(ring), FakeDetector()
    g = gate(client, det)
    reply = await g.detect(request(credential(ring)), pixels(), InferenceParams())
    assert reply.body is not None and det.calls == 1
    await settled(g)
    assert [(s.success, s.detections, s.gpu_ms, s.result) for s in client.settled] == [(True, 2, 3.5, None)]


async def test_given_an_idempotent_success_then_its_body_is_stored_before_the_answer(ring: KeyRing) -> None:
    client, det = FakeClient(ring), FakeDetector()
    reply = await gate(client, det).detect(request(credential(ring), idem="k-1"), pixels(), InferenceParams())
    (s,) = client.settled  # already durable when the answer comes back
    assert s.success and s.result is not None and json.loads(s.result) == reply.body


async def test_given_the_caller_cancelled_during_inference_then_refunded(ring: KeyRing) -> None:
    client, det = FakeClient(ring), FakeDetector(delay_s=5)
    g = gate(client, det)
    task = asyncio.ensure_future(g.detect(request(credential(ring)), pixels(), InferenceParams()))
    await asyncio.sleep(0.2)  # admitted, inferring
    task.cancel()  # what Serve does when the HTTP client hangs up
    with pytest.raises(asyncio.CancelledError):
        await task
    await settled(g)
    assert [(s.request_id, s.success) for s in client.settled] == [("req-1", False)]
    assert det.responses[0].cancelled


async def test_given_the_caller_cancelled_while_the_ledger_admits_then_refunded_once_admitted(ring: KeyRing) -> None:
    client, det = FakeClient(ring, admit_delay_s=0.3), FakeDetector()
    g = gate(client, det)
    task = asyncio.ensure_future(g.detect(request(credential(ring)), pixels(), InferenceParams()))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.4)  # the admission lands after the caller left
    await settled(g)
    assert len(client.admitted) == 1 and det.calls == 0
    assert [(s.request_id, s.success) for s in client.settled] == [("req-1", False)]


async def test_given_a_refund_whose_first_commits_fail_then_it_is_retried_until_durable(
    ring: KeyRing, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gate_mod, "SETTLE_BACKOFF_S", (0.01,))
    client, det = FakeClient(ring), FakeDetector(fail=True)
    client.settle_failures = 5  # the ledger is unavailable for the first five attempts
    g = gate(client, det)
    reply = await g.detect(request(credential(ring)), pixels(), InferenceParams())
    assert reply.error is not None and reply.error.code == "model_unavailable"
    await settled(g)
    assert client.settle_attempts == 6
    assert [(s.request_id, s.success) for s in client.settled] == [("req-1", False)]


async def test_given_token_operations_then_the_gate_acts_as_the_verified_token_only(ring: KeyRing) -> None:
    client, det = FakeClient(ring), FakeDetector()
    g = gate(client, det)
    assert await g.call(credential(ring), "tokens", {}) == {"op": "tokens"}
    assert client.calls == [("tokens", {"actor": "tok_1", "actor_jti": "jti_1"})]
    await g.call(credential(ring), "token", {"token_id": "t", "actor": "tok_9", "actor_jti": "x"})
    assert client.calls[-1] == ("token", {"token_id": "t", "actor": "tok_1", "actor_jti": "jti_1"})  # not tok_9
    for cred, op in [(None, "tokens"), (credential(ring), "create_package"), (credential(ring), "issue_admin")]:
        with pytest.raises(ApiError) as err:
            await g.call(cred, op, {})
        assert err.value.status in (401, 403)
