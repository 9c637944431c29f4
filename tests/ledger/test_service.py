"""Service classes (DESIGN §3c): the tier table, a token's inherited tier, its package and team,
and that they travel in the cached policy and in every OK verdict, with the table a deployment set."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from ledger import Admission, Code, ConfigError, FakeLedger, LedgerSettings, TokenSpec
from ledger.core.credentials import Verifier
from ledger.core.leases import LeaseAsk
from ledger.core.service import CUSTOM, SERVICE_CLASSES, ServiceClass, service_table


@pytest.fixture
def ledger() -> Iterator[FakeLedger]:
    led = FakeLedger(tiers={"pro": {"weight": 3}})
    try:
        yield led
    finally:
        led.close()


def admit(ledger: FakeLedger, credential: str, rid: str) -> object:
    claims = Verifier(ledger.public_keys()).verify(credential)
    a = Admission(rid, claims.sub, claims.jti, 1, "parts@1", "127.0.0.1", root_id=claims.pkg)
    return asyncio.run(ledger.admit(a))


def test_given_the_built_in_table_then_levels_order_the_tiers() -> None:
    levels = {k: v.level for k, v in SERVICE_CLASSES.items()}
    assert levels["basic"] < levels["pro"] == levels[CUSTOM] < levels["enterprise"]
    assert SERVICE_CLASSES["pro"].weight > SERVICE_CLASSES[CUSTOM].weight


def test_given_overrides_then_only_named_fields_change_and_unknown_tiers_are_refused() -> None:
    table = service_table({"pro": {"weight": 3}, "custom": {"level": 0.0}})
    assert table["pro"] == ServiceClass(level=1, weight=3)
    assert table[CUSTOM] == ServiceClass(level=0, weight=1.0)
    with pytest.raises(ConfigError, match="not a tier"):
        service_table({"gold": {"level": 2}})
    with pytest.raises(ConfigError, match=r"level in 0\.\.9"):
        service_table({"pro": {"level": 10}})
    with pytest.raises(ConfigError, match="weight"):
        service_table({"pro": {"weight": float("nan")}})
    with pytest.raises(ConfigError, match="must map to"):
        service_table({"pro": {"speed": 1}})
    with pytest.raises(ConfigError, match="not a tier"):
        LedgerSettings(tiers={"gold": {"level": 2}})


def test_given_a_tree_then_each_token_has_its_nearest_rates_tier_its_package_and_its_team(ledger: FakeLedger) -> None:
    # given: a pro package; team A without a rate of its own, team B basic; a token under team B
    root = ledger.create_package(TokenSpec.build("factory", 1000, rate="pro"))
    team_a = ledger.split(root.token.id, TokenSpec("line-1", 100))
    team_b = ledger.split(root.token.id, TokenSpec.build("test-team", 100, rate="basic"))
    camera = ledger.split(team_b.token.id, TokenSpec("camera", 10))
    # when: each is admitted at the shard
    got = {name: admit(ledger, issued.credential, name) for name, issued in
           (("root", root), ("a", team_a), ("b", team_b), ("camera", camera))}  # fmt: skip
    # then: the deployment's table applies (pro weight 3), inherited from the nearest rate
    assert all(d.code is Code.OK for d in got.values())  # type: ignore[attr-defined]
    services = {k: tuple(d.service) for k, d in got.items()}  # type: ignore[attr-defined]
    pkg = root.token.id
    assert services["root"] == ("pro", 1, 3.0, pkg, 3.0, pkg, 3.0)
    assert services["a"] == ("pro", 1, 3.0, pkg, 3.0, team_a.token.id, 3.0)
    assert services["b"] == ("basic", 0, 1.0, pkg, 3.0, team_b.token.id, 1.0)
    assert services["camera"] == ("basic", 0, 1.0, pkg, 3.0, team_b.token.id, 1.0)


def test_given_a_denial_then_the_verdict_carries_no_service(ledger: FakeLedger) -> None:
    small = ledger.create_package(TokenSpec("small", 1))
    assert admit(ledger, small.credential, "one").service is not None  # type: ignore[attr-defined]
    denied = admit(ledger, small.credential, "two")
    assert denied.code is Code.QUOTA_EXHAUSTED and denied.service is None  # type: ignore[attr-defined]


def test_given_a_lease_grant_then_its_policy_carries_the_service(ledger: FakeLedger) -> None:
    pkg = ledger.create_package(TokenSpec.build("leased", 10_000, rate="enterprise"))
    claims = Verifier(ledger.public_keys()).verify(pkg.credential)
    ask = LeaseAsk(claims.sub, claims.jti, claims.pkg, "holder-1", "lease-1", 1, want=10)
    grant = asyncio.run(ledger.lease_sync(ledger.shard_of(claims.pkg), [ask]))[0]
    assert grant.policy is not None and grant.policy.service is not None
    assert tuple(grant.policy.service) == ("enterprise", 2, 4.0, pkg.token.id, 4.0, pkg.token.id, 4.0)
