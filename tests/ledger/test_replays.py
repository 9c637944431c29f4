"""Replays and redeliveries (DESIGN §3, Idempotency-Key): a stored result goes only to a credential
that would be admitted now; a redelivered request id must carry the first delivery's body (also
after a restart); an idempotent admission never answered is refunded, and its key freed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from ledger.core.book import IDEM_PENDING_TIMEOUT_S, QuotaBook
from ledger.core.codes import Code
from ledger.core.entities import Admission, Node, Settlement, TokenLimits, TokenSpec
from ledger.core.settings import LedgerSettings
from ledger.shard.core import ShardCore
from ledger.store.repository import COPIES, USAGE, Store
from tests.ledger.book_helpers import Clock, admit, child, new_book, package

# ---------------------------------------------------------------- D: replays only to a usable credential


@pytest.mark.parametrize("how", ["revoked", "ancestor_revoked", "expired", "ancestor_expired"])
def test_given_a_stored_idempotent_result_when_the_token_is_no_longer_usable_then_its_401_not_the_body(
    how: str,
) -> None:
    book, clock = new_book()
    root = package(book, 100, TokenLimits(expires_at=clock.t + 100))
    kid = child(book, root, 10, TokenLimits(expires_at=clock.t + 50))
    d = admit(book, kid, key="k", body="h")
    book.settle(Settlement(d.request_id, kid.id, success=True, result='{"secret": 1}'))
    assert admit(book, kid, key="k", body="h").replay == '{"secret": 1}'
    if how == "revoked":
        book.tree.revoke(kid.id)
    elif how == "ancestor_revoked":
        book.tree.revoke(root.id)
    elif how == "expired":
        clock.advance(51)
    else:
        kid.expires_at = None
        clock.advance(101)
    again = admit(book, kid, key="k", body="h")
    expected = Code.REVOKED_TOKEN if "revoked" in how else Code.EXPIRED_TOKEN
    assert (again.code, again.replay) == (expected, None)


@pytest.mark.parametrize("how", ["revoked", "expired"])
def test_given_a_settled_request_id_when_sent_again_by_an_unusable_token_then_its_401_not_a_replay(how: str) -> None:
    book, clock = new_book()
    root = package(book, 100)
    kid = child(book, root, 10, TokenLimits(expires_at=clock.t + 50))
    admit(book, kid, rid="done-once")
    book.settle(Settlement("done-once", kid.id, success=True))
    assert admit(book, kid, rid="done-once").code is Code.REPLAY
    if how == "revoked":
        book.tree.revoke(kid.id)
    else:
        clock.advance(51)
    expected = Code.REVOKED_TOKEN if how == "revoked" else Code.EXPIRED_TOKEN
    assert admit(book, kid, rid="done-once").code is expected


# ---------------------------------------------------------------- E: a redelivery carries the same body


def test_given_a_pending_request_id_when_redelivered_with_another_body_then_refused_and_not_charged() -> None:
    book, _ = new_book()
    root = package(book, 10)
    assert admit(book, root, rid="same", body="hash-a").code is Code.OK
    other = admit(book, root, rid="same", body="hash-b")
    assert (other.code, other.message) == (Code.INVALID_REQUEST, "request id already in use for another request")
    assert admit(book, root, rid="same", body=None).code is Code.INVALID_REQUEST
    again = admit(book, root, rid="same", body="hash-a")
    assert (again.code, again.replayed, root.used) == (Code.OK, True, 1)


def test_given_a_request_without_a_body_hash_when_redelivered_with_one_then_refused() -> None:
    book, _ = new_book()
    root = package(book, 10)
    admit(book, root, rid="bare")
    assert admit(book, root, rid="bare", body="h").code is Code.INVALID_REQUEST
    assert admit(book, root, rid="bare").replayed


def test_given_a_pending_request_when_the_book_is_rebuilt_from_the_database_then_its_body_hash_still_binds(
    db_url: str,
) -> None:
    store = Store(db_url)
    store.migrate()
    book, clock = new_book()
    root = package(book, 10)
    admit(book, root, rid="r1", body="hash-a")
    admit(book, root, rid="r2", body=None)
    admit(book, root, rid="r3", body="hash-c")
    store.commit(book.drain())
    with store.engine.begin() as conn:  # a row written before 0003: its body is unknown
        conn.execute(update(USAGE).where(USAGE.c.request_id == "r3").values(body_hash=None))
    again = QuotaBook(clock)
    again.load(*store.load(clock.t, 3600, 120))
    assert {r: p.body_hash for r, p in again.pending.items()} == {"r1": "hash-a", "r2": "", "r3": None}
    node = again.nodes[root.id]
    assert admit(again, node, rid="r1", body="hash-b").code is Code.INVALID_REQUEST
    assert admit(again, node, rid="r1", body="hash-a").replayed
    assert admit(again, node, rid="r2", body="h").code is Code.INVALID_REQUEST
    assert admit(again, node, rid="r3", body="anything").replayed, "unknown body: model and units decide"
    assert node.used == 3
    store.close()


# ---------------------------------------------------------------- F: an abandoned idempotent admission


def test_given_the_settings_then_an_abandoned_key_waits_longer_than_the_detector_timeout() -> None:
    assert LedgerSettings().idem_pending_timeout_s == IDEM_PENDING_TIMEOUT_S == 120.0 > 30.0


def test_given_an_idempotent_admission_never_settled_when_swept_then_refunded_and_a_retry_is_charged_once() -> None:
    book, clock = new_book()
    root = package(book, 10)
    first = admit(book, root, key="k", body="h")
    clock.advance(IDEM_PENDING_TIMEOUT_S - 1)
    assert book.refund_abandoned() == []
    assert admit(book, root, key="k", body="h").code is Code.IDEMPOTENCY_IN_PROGRESS
    clock.advance(1)
    book.drain()
    assert book.refund_abandoned() == [first.request_id]
    out = book.drain()
    assert [(s[0], s[1]) for s in out.settles] == [("refunded", 0)]
    assert out.idem_deleted == [(root.id, "k")]
    assert (root.used, book.pending, book.idem) == (0, {}, {})
    retry = admit(book, root, key="k", body="h")
    assert (retry.code, root.used) == (Code.OK, 1)
    # the late settlement of the first attempt: unknown now, so no double refund
    assert book.settle(Settlement(first.request_id, root.id, success=False)) is Code.NOT_FOUND
    assert book.settle(Settlement(first.request_id, root.id, success=True)) is Code.NOT_FOUND
    assert root.used == 1
    assert book.tree.invariant_violations() == []


def test_given_an_abandoned_key_when_it_comes_again_before_any_sweep_then_refunded_lazily_and_admitted() -> None:
    book, clock = new_book()
    root = package(book, 10)
    admit(book, root, key="k", body="h")
    clock.advance(IDEM_PENDING_TIMEOUT_S)
    retry = admit(book, root, key="k", body="h")
    assert (retry.code, root.used) == (Code.OK, 1)
    assert len(book.pending) == 1 and book.idem[(root.id, "k")].request_id == retry.request_id


def test_given_an_idempotency_record_whose_admission_is_gone_then_the_key_is_freed_after_the_timeout() -> None:
    book, clock = new_book()
    root = package(book, 10)
    d = admit(book, root, key="k", body="h")
    del book.pending[d.request_id]  # as after a restart past the settle window
    assert admit(book, root, key="k", body="h").code is Code.IDEMPOTENCY_IN_PROGRESS
    clock.advance(IDEM_PENDING_TIMEOUT_S)
    assert admit(book, root, key="k", body="h").code is Code.OK


def test_given_a_completed_idempotent_request_then_it_is_never_refunded_by_the_sweep() -> None:
    book, clock = new_book()
    root = package(book, 10)
    d = admit(book, root, key="k", body="h")
    book.settle(Settlement(d.request_id, root.id, success=True, result="{}"))
    clock.advance(IDEM_PENDING_TIMEOUT_S * 10)
    assert book.refund_abandoned() == []
    assert (admit(book, root, key="k", body="h").code, root.used) == (Code.REPLAY, 1)


@pytest.fixture
def core(db_url: str, tmp_path: Path) -> Iterator[tuple[ShardCore, Clock]]:
    clock = Clock()
    settings = LedgerSettings(database_url=db_url, data_dir=tmp_path / "data", idem_pending_timeout_s=60.0)
    c = ShardCore(settings, clock=clock)
    c.start()
    yield c, clock
    c.close()


def test_given_the_ledger_sweep_then_an_abandoned_idempotent_admission_is_refunded_durably(
    core: tuple[ShardCore, Clock],
) -> None:
    c, clock = core
    tid = c.create_package(TokenSpec("p", 10)).token.id
    jti = c.book.nodes[tid].jti
    c.admit_rows([Admission("idem-1", tid, jti, 2, "parts@1", None, "key", "h").row()])
    c.admit_rows([Admission("plain-1", tid, jti, 1, "parts@1").row()])
    c.commit()
    clock.advance(61)
    assert c.sweep().idem_refunded == ["idem-1"]
    c.commit()
    assert c.store.balances()[tid][1] == 1
    states = {r["request_id"]: r["state"] for r in c.usage(token_id=tid)}
    assert states == {"idem-1": "refunded", "plain-1": "admitted"}
    c.reload()  # what the database says agrees: nothing pending under that key any more
    assert c.book.idem == {} and set(c.book.pending) == {"plain-1"}
    retry = c.admit_rows([Admission("idem-2", tid, jti, 2, "parts@1", None, "key", "h").row()])[0]
    assert retry.code is Code.OK
    assert c.settle_rows([Settlement("idem-1", tid, True).row()]) == [Code.NOT_FOUND.value]
    c.commit()
    assert c.store.balances()[tid][1] == 3
    assert c.consistency().violations == []


# ---------------------------------------------------------------- copies of one request (issue 17 §1.7)


def _copy(node: Node, rid: str, copy: str) -> Admission:
    return Admission(rid, node.id, node.jti, 1, "parts@1", "10.0.0.1", copy=copy)


def test_given_two_copies_at_the_shard_when_one_is_refunded_and_the_other_answered_then_charged_once() -> None:
    book, _ = new_book()
    root = package(book, 10)
    assert book.admit(_copy(root, "r", "h1#1")).code is Code.OK
    again = book.admit(_copy(root, "r", "h2#1"))  # Ray redelivered it to another replica
    assert (again.code, again.replayed, root.used) == (Code.OK, True, 1)
    # the first copy fails (its detector died): the debit stays, the second copy is still served
    assert book.settle(Settlement("r", root.id, success=False, copy="h1#1")) is Code.OK
    assert root.used == 1 and "r" in book.pending
    assert book.settle(Settlement("r", root.id, success=True, copy="h2#1")) is Code.OK
    assert (root.used, "r" in book.pending) == (1, False)


def test_given_two_copies_when_both_fail_then_the_debit_is_refunded_once_the_last_is_settled() -> None:
    book, _ = new_book()
    root = package(book, 10)
    book.admit(_copy(root, "r", "h1#1"))
    book.admit(_copy(root, "r", "h2#1"))
    book.settle(Settlement("r", root.id, success=False, copy="h2#1"))
    assert root.used == 1
    book.settle(Settlement("r", root.id, success=False, copy="h1#1"))
    assert root.used == 0


def test_given_a_copy_refused_while_another_is_served_then_the_served_one_is_still_charged() -> None:
    book, _ = new_book()
    root = package(book, 10)
    assert book.admit(_copy(root, "r", "h1#1")).code is Code.OK
    book.tree.revoke(root.id)  # a copy that comes now is refused ...
    assert book.admit(_copy(root, "r", "h2#1")).code is Code.REVOKED_TOKEN
    assert root.used == 1, "... and refunds nothing: the first copy is being answered"
    assert book.settle(Settlement("r", root.id, success=True, copy="h1#1")) is Code.OK
    assert root.used == 1


def test_given_a_resend_of_the_same_copy_refused_then_its_debit_is_refunded() -> None:
    book, _ = new_book()
    root = package(book, 10)
    assert book.admit(_copy(root, "r", "h1#1")).code is Code.OK  # its answer was lost on the way back
    book.tree.revoke(root.id)
    assert book.admit(_copy(root, "r", "h1#1")).code is Code.REVOKED_TOKEN  # the caller resends it
    assert (root.used, "r" in book.pending) == (0, False), "the caller will not serve it: refunded"


def test_given_a_copy_settled_in_a_batch_that_failed_then_the_rebuilt_book_still_knows_the_other_copy(
    core: tuple[ShardCore, Clock],
) -> None:
    """Found by the simulator: the settlement of the answered copy was in a batch whose commit failed;
    the rebuilt book had the request pending again but forgot its copies, so the other copy's
    refund refunded it, and the answered copy's resent settlement found nothing (charged 0)."""
    c, _ = core
    tid = c.create_package(TokenSpec("p", 10)).token.id
    c.commit()
    node = c.book.nodes[tid]
    assert c.admit_rows([_copy(node, "r", "h1#1").row()])[0].code is Code.OK
    assert c.admit_rows([_copy(node, "r", "h2#1").row()])[0].replayed
    c.commit()
    assert c.settle_rows([Settlement("r", tid, success=True, copy="h1#1").row()]) == ["ok"]
    c.discard()  # that batch's commit failed: the book is rebuilt from the database
    assert c.settle_rows([Settlement("r", tid, success=False, copy="h2#1").row()]) == ["ok"]
    assert c.settle_rows([Settlement("r", tid, success=True, copy="h1#1").row()]) == ["ok"]  # resent
    c.commit()
    assert c.book.nodes[tid].used == 1
    assert c.store.balances()[tid][1] == 1


def test_given_copies_being_served_when_the_shard_restarts_then_a_refunded_copy_leaves_the_answered_one_charged(
    db_url: str, tmp_path: Path
) -> None:
    """Found by the simulator (seed 14951: 42 units answered on a 40-unit package): a restarted shard
    did not know which copies of a pending strict admission were being served (schema 0005 kept them
    in memory), so a refunded copy refunded the debit, the answered copy was charged 0, and the unit
    went back to `free` to be served again. The copies are stored with the admission (0006)."""
    clock = Clock()
    settings = LedgerSettings(database_url=db_url, data_dir=tmp_path / "data")
    first = ShardCore(settings, clock=clock)
    first.start()
    tid = first.create_package(TokenSpec("p", 1)).token.id
    node = first.book.nodes[tid]
    assert first.admit_rows([_copy(node, "r", "h1#1").row()])[0].code is Code.OK
    assert first.admit_rows([_copy(node, "r", "h2#1").row()])[0].replayed  # Ray redelivered it
    first.commit()
    first.close()  # the shard dies; its successor rebuilds the book from the database
    c = ShardCore(settings, clock=clock)
    c.start()
    try:
        assert c.book.pending["r"].copies == {"h1#1", "h2#1"}
        assert c.settle_rows([Settlement("r", tid, success=False, copy="h2#1").row()]) == ["ok"]  # hung up
        c.commit()
        assert c.book.nodes[tid].used == 1, "the other copy is still being answered"
        other = c.admit_rows([Admission("r2", tid, node.jti, 1, "parts@1", "10.0.0.1").row()])[0]
        assert other.code is Code.QUOTA_EXHAUSTED, "the package's one unit is not served twice"
        assert c.settle_rows([Settlement("r", tid, success=True, copy="h1#1").row()]) == ["ok"]
        c.commit()
        assert c.store.balances()[tid][1] == 1
        with c.store.engine.connect() as conn:
            assert conn.execute(select(COPIES)).all() == [], "a settled admission keeps no copies"
        assert c.consistency().violations == []
    finally:
        c.close()
