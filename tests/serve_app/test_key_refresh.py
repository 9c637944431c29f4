"""The ingress steps' public-key ring: fetched on first need, single-flight, at most once per interval."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from ledger import ops
from ledger.client.fake import FakeLedger
from ledger.client.holder import LeaseHolder
from ledger.core.credentials import KeyRing, issue
from ledger.core.errors import LedgerUnavailable
from serve_app import auth as auth_mod
from serve_app.config import AppArgs
from serve_app.errors import ApiError
from serve_app.ingress_steps import IngressSteps
from serve_app.metering import Meter


class KeyLedger:
    """The ledger as the ingress steps fetch keys from it (`await ledger.acall(ops.PublicKeys())`):
    counts fetches; `fail` makes the ledger look unavailable."""

    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring
        self.fetches = 0
        self.fail = False

    async def acall(self, op: Any) -> Any:
        assert isinstance(op, ops.PublicKeys), op  # verifying a credential needs nothing else
        self.fetches += 1
        await asyncio.sleep(0.05)  # a round trip: concurrent requests must share it
        if self.fail:
            raise LedgerUnavailable("ledger restarting")
        return self.ring.public_keys()


@pytest.fixture
def meter(tmp_path: Path) -> Iterator[Meter]:
    """A replica's meter (never asked here: these tests stop at the credential)."""
    ledger = FakeLedger(tmp_path / "ledger")
    yield Meter(LeaseHolder(ledger, "key-tests"))
    ledger.close()


def steps(ledger: KeyLedger, meter: Meter, public_keys: dict[str, bytes] | None = None) -> IngressSteps:
    return IngressSteps(AppArgs(), cast(Any, ledger), meter, {}, public_keys)


def credential(ring: KeyRing, jti: str = "jti_1") -> str:
    return issue(ring, sub="tok_1", pkg="pkg_1", jti=jti, typ="access", exp=int(time.time()) + 3600)


async def test_given_fresh_steps_then_concurrent_first_requests_share_one_fetch_and_pass(
    tmp_path: Path, meter: Meter
) -> None:
    ring = KeyRing.open(tmp_path / "keys")
    ledger = KeyLedger(ring)
    pipe = steps(ledger, meter)
    claims = await asyncio.gather(*(pipe.verify(credential(ring)) for _ in range(20)))
    assert {c.sub for c in claims} == {"tok_1"} and ledger.fetches == 1


async def test_given_unknown_kids_then_at_most_one_fetch_per_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meter: Meter
) -> None:
    # an interval no test run outlasts: "within the interval" must not depend on how fast this machine is
    monkeypatch.setattr(auth_mod, "KEY_REFRESH_INTERVAL_S", 3600.0)
    ring = KeyRing.open(tmp_path / "keys")
    ledger = KeyLedger(ring)
    pipe = steps(ledger, meter, ring.public_keys())
    await pipe.verify(credential(ring))
    ring.rotate()  # a key the ingress steps have not seen: the first credential under it fetches the ring
    await pipe.verify(credential(ring, "jti_2"))
    assert ledger.fetches == 1
    other = KeyRing.open(tmp_path / "foreign")  # forged: a kid nobody knows
    for _ in range(50):
        with pytest.raises(ApiError) as err:
            await pipe.verify(credential(other))
        assert err.value.code == "invalid_token"
    assert ledger.fetches == 1  # within the interval: no flood of fetches
    monkeypatch.setattr(auth_mod, "KEY_REFRESH_INTERVAL_S", 0.0)
    with pytest.raises(ApiError):
        await pipe.verify(credential(other))
    assert ledger.fetches == 2


async def test_given_the_ledger_down_at_first_request_then_503_not_401(tmp_path: Path, meter: Meter) -> None:
    ring = KeyRing.open(tmp_path / "keys")
    ledger = KeyLedger(ring)
    ledger.fail = True
    pipe = steps(ledger, meter)
    with pytest.raises(ApiError) as err:
        await pipe.verify(credential(ring))
    assert err.value.code == "ledger_unavailable"


async def test_given_a_key_rotated_in_right_after_a_fetch_then_its_first_credential_verifies(
    tmp_path: Path, meter: Meter
) -> None:
    """Each ingress replica holds its own ring: a fetch made a moment ago for another reason must
    not make a fresh credential under a new key fail with 401 for seconds."""
    ring = KeyRing.open(tmp_path / "keys")
    ledger = KeyLedger(ring)
    pipe = steps(ledger, meter)
    await pipe.verify(credential(ring))  # first fetch
    await asyncio.sleep(0.3)  # > interval / 25, far less than the 5 s interval
    ring.rotate()
    claims = await pipe.verify(credential(ring, "jti_new"))
    assert claims.jti == "jti_new" and ledger.fetches == 2


async def test_given_many_random_kids_then_fetches_stay_bounded(tmp_path: Path, meter: Meter) -> None:
    ring = KeyRing.open(tmp_path / "keys")
    ledger = KeyLedger(ring)
    pipe = steps(ledger, meter, ring.public_keys())
    t0 = time.monotonic()
    for i in range(40):  # a new forged kid every request
        with pytest.raises(ApiError):
            await pipe.verify(credential(KeyRing.open(tmp_path / f"forged{i}")))
    elapsed = time.monotonic() - t0
    assert ledger.fetches <= 1 + elapsed / (auth_mod.KEY_REFRESH_INTERVAL_S / 25), (ledger.fetches, elapsed)


async def test_given_a_known_kid_with_a_bad_signature_then_401_without_a_fetch(tmp_path: Path, meter: Meter) -> None:
    ring = KeyRing.open(tmp_path / "keys")
    ledger = KeyLedger(ring)
    pipe = steps(ledger, meter, ring.public_keys())
    good = credential(ring)
    head, body, sig = good.split(".")
    with pytest.raises(ApiError) as err:
        await pipe.verify(f"{head}.{body}.{sig[:-4]}AAAA")
    assert err.value.code == "invalid_token" and ledger.fetches == 0
