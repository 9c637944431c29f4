"""The ledger sharded by package root, without Ray: placement, fencing, conservation per root.

Every test runs on SQLite and on PostgreSQL. The shards are the real `ShardCore`s behind the
in-process ledger (`InProcessLedger`), routed exactly as `LedgerClient` routes over Ray.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger.client.inprocess import InProcessLedger
from ledger.core.codes import Code
from ledger.core.entities import Admission, Settlement, TokenSpec
from ledger.core.errors import Fenced, OperationRefused
from ledger.core.settings import LedgerSettings
from ledger.core.shards import ID_STRIDE, ShardMap, ShardScope
from ledger.shard.core import ShardCore
from ledger.store.repository import Store


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> LedgerSettings:
    return LedgerSettings(database_url=db_url, data_dir=tmp_path / "data", sweep_interval_s=0, shards=3)


@pytest.fixture
def sharded(settings: LedgerSettings) -> Iterator[InProcessLedger]:
    ledger = InProcessLedger(settings)
    yield ledger
    ledger.close()


def jti(ledger: InProcessLedger, token_id: str) -> str:
    return next(n.jti for s in ledger.shards for n in s.book.nodes.values() if n.id == token_id)


def test_given_packages_then_each_lives_on_the_shard_its_root_maps_to_and_only_there(
    sharded: InProcessLedger, settings: LedgerSettings
) -> None:
    roots = [sharded.create_package(TokenSpec(f"p{i}", 10)).token.id for i in range(9)]
    owners = {r: ShardMap(3).of_root(r) for r in roots}
    assert sorted(owners.values()) == [0, 0, 0, 1, 1, 1, 2, 2, 2], "new packages go round the shards"
    for i, shard in enumerate(sharded.shards):
        assert set(shard.book.roots) == {r for r, o in owners.items() if o == i}
    for r in roots:
        kid = sharded.split(r, TokenSpec("kid", 1)).token
        assert kid.id in sharded.shards[owners[r]].book.nodes  # a child lives with its root
        assert sharded.admit_sync([Admission(f"req-{kid.id}", kid.id, jti(sharded, kid.id), 1, "m@1")])[0].admitted
    # a shard started afresh loads its own packages' rows, no others
    fresh = ShardCore(settings, scope=ShardScope(1, 3))
    fresh.start()
    assert set(fresh.book.roots) == {r for r, o in owners.items() if o == 1}
    assert {p.token_id for p in fresh.book.pending.values()} == {
        n.id for n in fresh.book.nodes.values() if n.parent_id is not None
    }
    fresh.close()
    # usage row ids never collide: shard i writes ids i (mod ID_STRIDE)
    for event in sharded.usage(limit=100):
        assert event["id"] % ID_STRIDE == owners[event["root_id"]], event


def test_given_a_shard_superseded_by_a_newer_instance_then_its_commit_is_refused_and_nothing_lands(
    settings: LedgerSettings,
) -> None:
    scope = ShardScope(0, 1)
    old = ShardCore(settings, scope=scope, fence_owner="old")
    old.start()
    root = old.create_package(TokenSpec("fenced", 10)).token.id
    old.commit()
    new = ShardCore(settings, scope=scope, fence_owner="new")  # e.g. restarted while the old one was partitioned
    new.start()
    assert new.store.epoch == (old.store.epoch or 0) + 1
    # the zombie still believes it owns the shard: it admits in memory ...
    decision = old.admit_rows([Admission("zombie-1", root, old.book.nodes[root].jti, 3, "m@1").row()])[0]
    assert decision.code is Code.OK
    with pytest.raises(Fenced):  # ... but its commit is refused, in the same transaction as the write
        old.commit()
    assert old.fenced and not old.ready
    with pytest.raises(Fenced):
        old.reload()  # and it never comes back to life
    assert Store(settings.database_url).balances()[root] == (10, 0, "active"), "nothing of the zombie landed"
    assert [e["request_id"] for e in new.usage(limit=10)] == []
    decision = new.admit_rows([Admission("live-1", root, new.book.nodes[root].jti, 2, "m@1").row()])[0]
    assert decision.code is Code.OK
    new.commit()
    assert Store(settings.database_url).balances()[root] == (10, 2, "active")
    old.close()
    new.close()


def test_given_a_random_mix_across_three_shards_then_conservation_holds_for_every_root(
    sharded: InProcessLedger,
) -> None:
    rng = random.Random(20261201)
    live: dict[str, str] = {}  # token id -> root id
    for i in range(6):
        t = sharded.create_package(TokenSpec(f"pkg{i}", rng.randint(100, 1000))).token
        live[t.id] = t.id
    pending: list[tuple[str, str]] = []
    for step in range(400):
        token = rng.choice(list(live))
        op = rng.choice(["split", "admit", "admit", "admit", "settle", "revoke", "reclaim", "top_up", "rotate"])
        try:
            if op == "split":
                kid = sharded.split(token, TokenSpec(f"s{step}", rng.randint(1, 60))).token
                live[kid.id] = kid.root_id
            elif op == "admit":
                rid = f"r{step}"
                d = sharded.admit_sync([Admission(rid, token, jti(sharded, token), rng.randint(1, 5), "m@1")])[0]
                if d.admitted:
                    pending.append((rid, token))
            elif op == "settle" and pending:
                rid, tid = pending.pop(rng.randrange(len(pending)))
                assert sharded.settle_sync([Settlement(rid, tid, rng.random() < 0.7)]) == [Code.OK]
            elif op == "revoke" and live[token] != token:
                sharded.revoke(token)
            elif op == "reclaim" and live[token] != token:
                sharded.reclaim(token, rng.choice([None, 1, 3]))
            elif op == "top_up":
                sharded.top_up(token, rng.randint(1, 20))
            elif op == "rotate":
                sharded.rotate(token)
        except OperationRefused:
            pass
    report = sharded.consistency()
    assert report.violations == [], report.violations
    assert report.book == report.db and not report.mismatched
    assert len(report.book) == len(live)
    # every root's tree is whole on one shard
    for shard in sharded.shards:
        assert all(shard.book.nodes[n.id].root_id in shard.book.roots for n in shard.book.nodes.values())


def test_given_a_superseded_shard_that_never_committed_then_it_cannot_reload_and_answer_either(
    settings: LedgerSettings,
) -> None:
    first = ShardCore(settings, scope=ShardScope(2, 3), fence_owner="first")
    first.start()
    second = ShardCore(settings, scope=ShardScope(2, 3), fence_owner="second")
    second.start()
    with pytest.raises(Fenced):
        first.reload()  # a stale book would answer reads and redeliveries: refused at the load
    assert first.fenced and not first.ready
    first.close()
    second.close()


def test_given_a_commit_that_fails_in_process_then_the_admission_is_not_charged_later(
    sharded: InProcessLedger, settings: LedgerSettings
) -> None:
    pkg = sharded.create_package(TokenSpec("flaky", 100)).token.id
    shard = sharded.shards[ShardMap(3).of_root(pkg)]
    real = shard.store.commit

    def down(_changes: object) -> None:
        shard.store.commit = real  # type: ignore[method-assign]
        raise OSError("database went away")

    shard.store.commit = down  # type: ignore[method-assign]
    with pytest.raises(OSError):
        sharded.admit_sync([Admission("lost", pkg, jti(sharded, pkg), 10, "m@1")])
    assert sharded.admit_sync([Admission("next", pkg, jti(sharded, pkg), 10, "m@1")])[0].admitted
    assert Store(settings.database_url).balances()[pkg] == (100, 10, "active"), "only the answered admission"
    report = sharded.consistency()
    assert report.violations == [] and report.book == report.db
