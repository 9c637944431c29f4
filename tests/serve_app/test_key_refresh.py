"""The ingress pipeline's public-key ring: fetched on first need, single-flight, at most once per interval."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from ledger.credentials import KeyRing, issue
from serve_app import auth as auth_mod
from serve_app.config import AppArgs
from serve_app.errors import ApiError
from serve_app.pipeline import Pipeline


class Remote:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    async def remote(self) -> Any:
        return await self.fn()


class FakeGate:
    """Counts key fetches; `fail` makes the ledger look unavailable."""

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring
        self.fetches = 0
        self.fail = False
        self.public_keys = Remote(self._keys)

    async def _keys(self) -> dict[str, bytes]:
        self.fetches += 1
        await asyncio.sleep(0.05)  # a round trip: concurrent requests must share it
        if self.fail:
            raise ConnectionError("ledger restarting")
        return self.ring.public_keys()


def credential(ring: KeyRing, jti: str = "jti_1") -> str:
    return issue(ring, sub="tok_1", pkg="pkg_1", jti=jti, typ="access", exp=int(time.time()) + 3600)


async def test_given_a_fresh_pipeline_then_concurrent_first_requests_share_one_fetch_and_pass(tmp_path: Path) -> None:
    ring = KeyRing.open(tmp_path / "keys")
    gate = FakeGate(ring)
    pipe = Pipeline(AppArgs(), gate, {})
    claims = await asyncio.gather(*(pipe.verify(credential(ring)) for _ in range(20)))
    assert {c.sub for c in claims} == {"tok_1"} and gate.fetches == 1


async def test_given_unknown_kids_then_at_most_one_fetch_per_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ring = KeyRing.open(tmp_path / "keys")
    gate = FakeGate(ring)
    pipe = Pipeline(AppArgs(), gate, ring.public_keys())
    await pipe.verify(credential(ring))
    ring.rotate()  # a key the pipeline has not seen: the first credential under it fetches the ring
    await pipe.verify(credential(ring, "jti_2"))
    assert gate.fetches == 1
    other = KeyRing.open(tmp_path / "foreign")  # forged: a kid nobody knows
    for _ in range(50):
        with pytest.raises(ApiError) as err:
            await pipe.verify(credential(other))
        assert err.value.code == "invalid_token"
    assert gate.fetches == 1  # within the interval: no flood of fetches
    monkeypatch.setattr(auth_mod, "KEY_REFRESH_INTERVAL_S", 0.0)
    with pytest.raises(ApiError):
        await pipe.verify(credential(other))
    assert gate.fetches == 2


async def test_given_the_ledger_down_at_first_request_then_503_not_401(tmp_path: Path) -> None:
    ring = KeyRing.open(tmp_path / "keys")
    gate = FakeGate(ring)
    gate.fail = True
    pipe = Pipeline(AppArgs(), gate, {})
    with pytest.raises(ApiError) as err:
        await pipe.verify(credential(ring))
    assert err.value.code == "ledger_unavailable"
