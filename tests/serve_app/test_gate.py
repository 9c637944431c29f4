"""TokenGate's routing rules with a fake ledger client and fake detectors (the real graph is in test_http).

A detector failure after admission is refunded BEFORE the gate answers; a denial never reaches a
detector; an unmetered call never touches the ledger; a success settles in the background.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from ledger.codes import Code
from ledger.entities import Admission, Decision, Settlement
from serve_app.gate import TokenGate
from serve_app.results import InferenceParams

GateClass: Any = TokenGate.func_or_class  # the plain class behind the deployment


class FakeClient:
    def __init__(self, code: Code = Code.OK) -> None:
        self.code = code
        self.admitted: list[Admission] = []
        self.settled: list[Settlement] = []

    async def admit(self, a: Admission) -> Decision:
        self.admitted.append(a)
        return Decision(self.code, a.request_id, a.token_id, a.units)

    async def settle(self, s: Settlement) -> Code:
        self.settled.append(s)
        return Code.OK


class Remote:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    async def remote(self, *args: Any) -> Any:
        return await self.fn(*args)


class FakeDetector:
    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail
        self.detect = Remote(self._detect)

    async def _detect(self, pixels: list[np.ndarray], params: InferenceParams) -> dict[str, Any]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("replica died")
        return {"detections": [[object(), object()] for _ in pixels], "gpu_ms": 3.5}


def gate(client: FakeClient, detector: FakeDetector) -> Any:
    g = object.__new__(GateClass)
    g.client, g.detectors, g._pending = client, {"parts@1": detector}, set()
    return g


ADMISSION = Admission("req-1", "tok_1", "jti_1", 1, "parts@1")
PIXELS = [np.zeros((8, 8, 3), np.uint8)]


async def test_given_a_detector_failure_then_refunded_before_the_answer() -> None:
    client, det = FakeClient(), FakeDetector(fail=True)
    reply = await gate(client, det).detect(ADMISSION, "parts@1", PIXELS, InferenceParams())
    assert reply.result is None and reply.failure == "RuntimeError"
    assert [(s.request_id, s.success) for s in client.settled] == [("req-1", False)]


async def test_given_a_denial_then_no_detector_runs_and_nothing_is_settled() -> None:
    client, det = FakeClient(Code.QUOTA_EXHAUSTED), FakeDetector()
    reply = await gate(client, det).detect(ADMISSION, "parts@1", PIXELS, InferenceParams())
    assert reply.decision is not None and reply.decision.code is Code.QUOTA_EXHAUSTED
    assert reply.result is None and det.calls == 0 and client.settled == []


@pytest.mark.parametrize("settle_now", [True, False])
async def test_given_a_success_then_settled_in_the_background_unless_the_caller_settles(settle_now: bool) -> None:
    client, det = FakeClient(), FakeDetector()
    g = gate(client, det)
    reply = await g.detect(ADMISSION, "parts@1", PIXELS, InferenceParams(), settle_now=settle_now)
    assert reply.result is not None and det.calls == 1
    await asyncio.gather(*g._pending)
    if settle_now:
        assert [(s.success, s.detections, s.gpu_ms) for s in client.settled] == [(True, 2, 3.5)]
    else:
        assert client.settled == []


async def test_given_no_admission_then_the_gate_only_routes() -> None:
    client, det = FakeClient(), FakeDetector()
    reply = await gate(client, det).detect(None, "parts@1", PIXELS, InferenceParams())
    assert reply.decision is None and reply.result is not None
    assert client.admitted == [] and client.settled == []
