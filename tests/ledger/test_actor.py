"""The ledger actor on a real local Ray cluster, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import signal
import time
from typing import Any

import pytest
import ray

from ledger.client.over_ray import LedgerClient
from ledger.client.service import launch, stop
from ledger.core import ops
from ledger.core.capability import Capability
from ledger.core.codes import Code
from ledger.core.credentials import Verifier
from ledger.core.entities import Admission, Settlement, TokenSpec
from ledger.core.errors import LedgerUnavailable, OperationRefused
from ledger.core.settings import LedgerSettings
from ledger.store.repository import Store

pytestmark = pytest.mark.ray


@ray.remote(num_cpus=0)
class Caller:
    """A separate worker process with its own LedgerClient (and so its own micro-batcher)."""

    def __init__(self, coordinator: Any, shards: list[Any], capability: Capability) -> None:
        self.client = LedgerClient(coordinator, shards, capability=capability)

    async def burst(
        self, token_id: str, jti: str, n: int, prefix: str, key: str | None = None, body: str | None = None
    ) -> list[tuple[str, str]]:
        ds = await asyncio.gather(
            *[
                self.client.admit(Admission(f"{prefix}-{i}", token_id, jti, 1, "parts@1", "127.0.0.1", key, body))
                for i in range(n)
            ]
        )
        return [(d.code.value, d.request_id) for d in ds]

    async def load(self, token_id: str, jti: str, waves: int, per_wave: int, prefix: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for w in range(waves):
            out += await self.burst(token_id, jti, per_wave, f"{prefix}-{w}")
        return out


def actor_pid(client: LedgerClient, shard: int, timeout_s: float = 30.0) -> int:
    """The pid of a shard's actor, waiting while it restarts."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return int(ray.get(client.shard_actors[shard].stats.remote(client.capability))["pid"])
        except ray.exceptions.RayError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def jti_of(client: LedgerClient, credential: str) -> str:
    return Verifier(client.public_keys()).verify(credential).jti


def test_given_100_units_when_500_admissions_race_from_two_processes_then_exactly_100_debits(
    ledger: LedgerClient, settings: LedgerSettings
) -> None:
    pkg = ledger.create_package(TokenSpec("burst", 100))
    tid, jti = pkg.token.id, jti_of(ledger, pkg.credential)
    callers = [Caller.remote(ledger.coordinator, ledger.shard_actors, ledger.capability) for _ in range(2)]
    results = ray.get([c.burst.remote(tid, jti, 250, f"c{i}") for i, c in enumerate(callers)])
    codes = [code for r in results for code, _ in r]
    assert codes.count("ok") == 100
    assert codes.count("quota_exhausted") == 400
    assert ledger.token(tid).free == 0
    store = Store(settings.resolved().database_url)
    counts = store.usage_counts(tid)
    assert counts["admitted"] == (100, 100)
    assert counts["denied"] == (400, 0)
    assert store.balances()[tid] == (100, 100, "active")
    store.close()


def test_given_one_idempotency_key_sent_10x_concurrently_then_one_debit_and_conflict_on_other_body(
    ledger: LedgerClient, settings: LedgerSettings
) -> None:
    pkg = ledger.create_package(TokenSpec("idem", 50))
    tid, jti = pkg.token.id, jti_of(ledger, pkg.credential)
    callers = [Caller.remote(ledger.coordinator, ledger.shard_actors, ledger.capability) for _ in range(2)]
    results = ray.get([c.burst.remote(tid, jti, 5, f"i{i}", "key-1", "hash-a") for i, c in enumerate(callers)])
    codes = sorted(code for r in results for code, _ in r)
    assert codes.count("ok") == 1
    assert codes.count("idempotency_in_progress") == 9
    winner = next(rid for r in results for code, rid in r if code == "ok")
    assert ledger.settle_sync([Settlement(winner, tid, True, result='{"images": []}')]) == [Code.OK]
    again = ledger.admit_sync([Admission("later", tid, jti, 1, "parts@1", None, "key-1", "hash-a")])[0]
    assert (again.code, again.replay) == (Code.REPLAY, '{"images": []}')
    other = ledger.admit_sync([Admission("other", tid, jti, 1, "parts@1", None, "key-1", "hash-b")])[0]
    assert other.code is Code.IDEMPOTENCY_CONFLICT
    assert ledger.token(tid).used == 1
    store = Store(settings.resolved().database_url)
    assert store.usage_counts(tid)["settled"] == (1, 1)
    assert "admitted" not in store.usage_counts(tid)
    store.close()


def test_given_revoked_or_rotated_credentials_then_admission_is_refused(ledger: LedgerClient) -> None:
    pkg = ledger.create_package(TokenSpec("rev", 50))
    tid = pkg.token.id
    kid = ledger.split(tid, TokenSpec("team", 10))
    kid_id, old_jti = kid.token.id, jti_of(ledger, kid.credential)
    rotated = ledger.rotate(kid_id)
    new_jti = jti_of(ledger, rotated.credential)
    d_old, d_new = ledger.admit_sync(
        [Admission("a", kid_id, old_jti, 1, "m@1"), Admission("b", kid_id, new_jti, 1, "m@1")]
    )
    assert (d_old.code, d_new.code) == (Code.REVOKED_TOKEN, Code.OK)
    assert ledger.revoke(kid_id).returned == 9
    assert ledger.admit_sync([Admission("c", kid_id, new_jti, 1, "m@1")])[0].code is Code.REVOKED_TOKEN
    assert ledger.token(tid).free == 49
    with pytest.raises(OperationRefused) as e:
        ledger.split(tid, TokenSpec("too-big", 1000))
    assert e.value.code is Code.QUOTA_EXHAUSTED


def test_given_a_random_concurrent_mix_then_conservation_holds_and_book_equals_database(ledger: LedgerClient) -> None:
    rng = random.Random(20261128)
    pkg = ledger.create_package(TokenSpec("mix", 2000))
    root = pkg.token.id
    creds = {root: jti_of(ledger, pkg.credential)}
    callers = [Caller.remote(ledger.coordinator, ledger.shard_actors, ledger.capability) for _ in range(2)]
    for step in range(30):
        ids = list(creds)
        op = rng.choice(["split", "admit", "admit", "revoke", "reclaim", "top_up", "settle"])
        t = rng.choice(ids)
        try:
            if op == "split":
                c = ledger.split(t, TokenSpec(f"s{step}", rng.randint(1, 200)))
                creds[c.token.id] = jti_of(ledger, c.credential)
            elif op == "admit":
                refs = [cl.burst.remote(rng.choice(ids), creds[t], 20, f"m{step}-{i}") for i, cl in enumerate(callers)]
                ray.get(refs)
            elif op == "revoke" and t != root:
                ledger.revoke(t)
            elif op == "reclaim" and t != root:
                ledger.reclaim(t, rng.choice([None, 5]))
            elif op == "top_up":
                ledger.top_up(t, rng.randint(1, 50))
            elif op == "settle":
                rows = ledger.usage(limit=20)
                ledger.settle_sync(
                    [
                        Settlement(r["request_id"], r["token_id"], rng.random() < 0.5)
                        for r in rows
                        if r["state"] == "admitted"
                    ]
                )
        except OperationRefused:
            pass
        report = ledger.consistency()
        assert report.violations == []
        assert report.book == report.db


def test_given_load_when_the_actor_is_sigkilled_then_it_restarts_and_every_ok_has_its_durable_debit(
    ledger: LedgerClient, settings: LedgerSettings
) -> None:
    pkg = ledger.create_package(TokenSpec("kill", 1_000_000))
    tid, jti = pkg.token.id, jti_of(ledger, pkg.credential)
    callers = [Caller.remote(ledger.coordinator, ledger.shard_actors, ledger.capability) for _ in range(2)]
    refs = [c.load.remote(tid, jti, 40, 200, f"k{i}") for i, c in enumerate(callers)]
    shard = ledger.shard_map.of_root(tid)
    killed = []
    for _ in range(2):
        time.sleep(0.4)
        killed.append(actor_pid(ledger, shard))
        os.kill(killed[-1], signal.SIGKILL)
    results = ray.get(refs)
    assert actor_pid(ledger, shard) not in killed
    ok = {rid for r in results for code, rid in r if code == "ok"}
    codes = {code for r in results for code, _ in r}
    assert codes <= {"ok", "ledger_unavailable"}
    assert len(ok) > 0
    store = Store(settings.resolved().database_url)
    charged = store.charged_request_ids()
    assert ok <= charged, f"{len(ok - charged)} admitted verdicts lack a durable debit"
    report = ledger.consistency()
    assert report.violations == []
    assert report.book == report.db
    assert store.balances()[tid][1] == len(charged)
    store.close()


def test_given_a_rotated_out_credential_then_it_can_no_longer_steer_its_subtree(ledger: LedgerClient) -> None:
    pkg = ledger.create_package(TokenSpec("stale", 100))
    tid, old_jti = pkg.token.id, jti_of(ledger, pkg.credential)
    new_jti = jti_of(ledger, ledger.rotate(tid).credential)
    for op in (ops.Split(tid, TokenSpec("x", 1)), ops.Rotate(tid), ops.Tokens(), ops.Usage()):
        with pytest.raises(OperationRefused) as e:
            ledger.acting_as(tid, old_jti, tid).call(op)
        assert e.value.code is Code.REVOKED_TOKEN, op
    assert ledger.acting_as(tid, new_jti, tid).split(tid, TokenSpec("ok", 1)).token.parent_id == tid


def _fail_credentials_and_slow_commits(actor_self: Any, token_id: str, commit_delay_s: float) -> None:
    """Inside the actor: credentials of `token_id` cannot be signed (as a rotate in a token's last
    second once failed, after the node had changed), and every commit takes a while, so that the
    calls sent meanwhile are queued into one batch."""
    core = actor_self._run.core
    unsigned, commit = core._unsigned, core.store.commit

    def failing(n: Any) -> Any:
        if n.id == token_id:
            raise ValueError("exp and iat must be ints with exp > iat")
        return unsigned(n)

    def slow(changes: Any) -> None:
        time.sleep(commit_delay_s)
        commit(changes)

    core._unsigned = failing
    core.store.commit = slow


def test_given_a_victim_on_1_per_s_when_another_holder_fails_rotates_in_its_batches_then_the_victim_is_unharmed(
    ledger: LedgerClient, settings: LedgerSettings
) -> None:
    pkg = ledger.create_package(TokenSpec("shared", 1000))
    root, root_jti = pkg.token.id, jti_of(ledger, pkg.credential)
    victim = ledger.split(root, TokenSpec.build("victim", 100, rate="1/s:1"))
    vid, vjti = victim.token.id, jti_of(ledger, victim.credential)
    attacker = ledger.split(root, TokenSpec("attacker", 100))
    aid, ajti = attacker.token.id, jti_of(ledger, attacker.credential)
    shard = ledger.shard_actors[ledger.shard_map.of_root(root)]
    ray.get(shard.__ray_call__.remote(_fail_credentials_and_slow_commits, aid, 0.3, capability=ledger.capability))
    rounds = 3
    for r in range(rounds):
        time.sleep(1.1)  # one rate token for the victim
        pacer = shard.admit_batch.remote([Admission(f"pace-{r}", root, root_jti, 1, "m@1").row()], ledger.capability)
        time.sleep(0.1)  # its commit is now in flight: the next calls queue into ONE batch
        first = shard.admit_batch.remote(
            [Admission(f"v{r}a{i}", vid, vjti, 1, "m@1").row() for i in range(2)], ledger.capability
        )
        rotated = shard.call.remote(ops.Rotate(aid), None, ledger.capability)
        second = shard.admit_batch.remote(
            [Admission(f"v{r}b{i}", vid, vjti, 1, "m@1").row() for i in range(2)], ledger.capability
        )
        codes = sorted(d.code.value for d in [*ray.get(first), *ray.get(second)])
        assert codes == ["ok", "rate_limited", "rate_limited", "rate_limited"], codes
        with pytest.raises(ray.exceptions.RayTaskError) as failed:
            ray.get(rotated)
        assert isinstance(failed.value.cause, LedgerUnavailable) and "internal error" in failed.value.cause.message
        assert ray.get(pacer)[0].code is Code.OK
    stats = ray.get(shard.stats.remote(ledger.capability))
    assert stats["failed_ops"] == rounds and stats["ready"]
    store = Store(settings.resolved().database_url)
    assert store.balances()[vid][1] == rounds
    assert store.usage_counts(vid)["denied"] == (3 * rounds, 0)
    store.close()
    assert ledger.admit_sync([Admission("attacker-ok", aid, ajti, 1, "m@1")])[0].code is Code.OK, "jti unchanged"
    report = ledger.consistency()
    assert report.violations == [] and report.book == report.db


def test_given_a_stored_row_the_book_cannot_load_then_the_actor_starts_answers_unavailable_and_recovers(
    ray_cluster: None, settings: LedgerSettings
) -> None:
    from sqlalchemy import delete, insert

    from ledger.core.entities import Node
    from ledger.store.repository import TOKENS, _node_row

    settings = settings.resolved()
    store = Store(settings.database_url)
    store.migrate()
    orphan = Node(id="tok_orphan", root_id="pkg_gone", parent_id="pkg_gone", name="o", allocation=1, jti="j")
    with store.engine.begin() as conn:
        conn.execute(insert(TOKENS), [_node_row(orphan)])
    client = launch(settings)
    try:
        assert not all(s["ready"] for s in client.stats()), "the shard is up, its book is not"
        assert client.admit_sync([Admission("r", "tok_orphan", "j", 1, "m@1")])[0].code is Code.LEDGER_UNAVAILABLE
        with pytest.raises(LedgerUnavailable):
            client.tokens()
        with store.engine.begin() as conn:
            conn.execute(delete(TOKENS).where(TOKENS.c.id == "tok_orphan"))
        # the shard rebuilds its book at its next call after the reload back-off (0.5 s): polled, bounded
        deadline = time.monotonic() + 30
        while True:
            try:
                tokens = client.tokens()
                break
            except LedgerUnavailable:
                assert time.monotonic() < deadline, "a shard still answers unavailable 30 s after the row went"
                time.sleep(0.1)
        assert tokens == [], "every shard answers again"
        pkg = client.create_package(TokenSpec("after", 5))
        assert all(s["ready"] for s in client.stats()) and client.token(pkg.token.id).free == 5
    finally:
        stop(client)
        store.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_given_every_method_ray_exposes_then_none_answers_without_the_capability(
    ledger: LedgerClient, settings: LedgerSettings
) -> None:
    """Issue 19: Ray makes every method of an actor class callable by name (private helpers too) and
    adds `__ray_call__`, which runs the caller's function in the actor. Each one a ledger actor has,
    called with no capability, is refused and changes nothing (`describe` says the shard count only;
    `__ray_ready__` answers True; `__ray_terminate__` ends the actor, as `ray.kill` does: not called)."""
    pkg = ledger.create_package(TokenSpec.build("mine", 10))
    jti = jti_of(ledger, pkg.credential)
    probes = {
        "__ray_call__": (lambda actor: actor._capability,),
        "call": ("top_up", (), {"token_id": pkg.token.id, "units": 10**6}),
        "admit_batch": ([Admission("free-1", pkg.token.id, jti, 1, "parts@1").row()],),
        "settle_batch": ([Settlement("free-1", pkg.token.id, False, root_id=pkg.token.id).row()],),
    }
    seen: dict[str, list[str]] = {}
    for label, actor in (("shard", ledger.shard_actors[0]), ("coordinator", ledger.coordinator)):
        methods = sorted(actor._ray_method_signatures)  # what Ray accepts by name on this handle
        assert {"__ray_call__", "__ray_terminate__"} <= set(methods), methods
        seen[label] = methods
        for method in methods:
            if method in ("__ray_terminate__", "__ray_ready__", "describe"):
                continue
            if not hasattr(getattr(actor, method), "remote"):  # the handle's own attribute: not a remote call
                assert method in ("__init__", "__init_subclass__"), method
                continue
            params = [p for p in actor._ray_method_signatures[method] if p.default is inspect.Parameter.empty]
            args = probes.get(method, tuple(None for p in params if p.kind is p.POSITIONAL_OR_KEYWORD))
            with pytest.raises(OperationRefused) as err:
                ray.get(getattr(actor, method).remote(*args), timeout=60)
            refused = getattr(err.value, "cause", err.value)  # Ray's RayTaskError(OperationRefused)
            assert refused.code is Code.FORBIDDEN, (label, method, err.value)
        assert ray.get(actor.__ray_ready__.remote(), timeout=60) is True
    assert ray.get(ledger.coordinator.describe.remote(), timeout=60) == {"shards": settings.shards}
    # the private helpers of ShardRuntime/CoordinatorRuntime are not methods of the actors at all
    assert not [m for ms in seen.values() for m in ms if m.startswith("_") and not m.startswith("__")], seen
    after = ledger.token(pkg.token.id)
    assert (after.allocation, after.used) == (10, 0)
    assert ledger.usage(token_id=pkg.token.id) == [] and not ledger.consistency().violations
    # and the holder of the capability is still answered: nothing was replaced
    assert ledger.top_up(pkg.token.id, 5).allocation == 15
