"""QuotaBook rules of DESIGN §3, without I/O."""

from __future__ import annotations

from typing import Any

import pytest

from ledger.core.book import IDEMPOTENCY_TTL_S, QuotaBook
from ledger.core.codes import Code
from ledger.core.entities import Settlement, Status, TokenLimits, TokenSpec
from ledger.core.errors import OperationRefused
from ledger.core.limits import RateLimit, normalize_ips, normalize_models
from ledger.store.repository import Store
from tests.ledger.book_helpers import admit, child, counters, new_book, package


def test_given_a_package_when_units_are_admitted_then_each_debits_until_free_is_zero() -> None:
    book, _ = new_book()
    root = package(book, 5)
    codes = [admit(book, root).code for _ in range(7)]
    assert codes == [Code.OK] * 5 + [Code.QUOTA_EXHAUSTED] * 2
    assert (root.used, root.free) == (5, 0)
    assert book.tree.invariant_violations() == []


def test_given_a_split_when_the_child_spends_then_parent_free_is_unchanged_and_child_bounded() -> None:
    book, _ = new_book()
    root = package(book, 100)
    kid = child(book, root, 30)
    assert (root.free, root.delegated, kid.free) == (70, 30, 30)
    assert admit(book, kid, units=30).code is Code.OK
    assert admit(book, kid).code is Code.QUOTA_EXHAUSTED
    assert (root.free, root.consumed) == (70, 30)
    assert book.tree.invariant_violations() == []


def test_given_a_parent_when_splitting_more_than_its_free_then_refused_and_nothing_moves() -> None:
    book, _ = new_book()
    root = package(book, 10)
    before = counters(book)
    with pytest.raises(OperationRefused) as e:
        child(book, root, 11)
    assert e.value.code is Code.QUOTA_EXHAUSTED
    assert counters(book) == before


def test_given_a_child_with_spend_when_revoked_then_unspent_returns_to_parent_and_subtree_stops() -> None:
    book, _ = new_book()
    root = package(book, 100)
    kid = child(book, root, 40)
    grandkid = child(book, kid, 10)
    admit(book, kid, units=5)
    admit(book, grandkid, units=3)
    returned = book.tree.revoke(kid.id)
    assert returned == 40 - 5 - 3
    assert root.free == 100 - 8
    assert grandkid.status is Status.REVOKED
    assert admit(book, grandkid).code is Code.REVOKED_TOKEN
    assert admit(book, kid).code is Code.REVOKED_TOKEN
    assert book.tree.invariant_violations() == []


def test_given_a_revoked_child_with_pending_work_when_refunded_then_units_reach_the_live_parent() -> None:
    book, _ = new_book()
    root = package(book, 100)
    kid = child(book, root, 40)
    d = admit(book, kid, units=4)
    book.tree.revoke(kid.id)
    assert root.free == 96
    assert book.settle(Settlement(d.request_id, kid.id, success=False)) is Code.OK
    assert (kid.used, kid.allocation, root.free) == (0, 0, 100)
    assert book.tree.invariant_violations() == []


def test_given_a_live_child_when_reclaimed_partially_then_it_keeps_the_rest_and_stays_active() -> None:
    book, _ = new_book()
    root = package(book, 100)
    kid = child(book, root, 40)
    admit(book, kid, units=10)
    assert book.tree.reclaim(kid.id, 20) == 20
    assert (kid.allocation, kid.free, root.free, kid.status) == (20, 10, 80, Status.ACTIVE)
    with pytest.raises(OperationRefused):
        book.tree.reclaim(kid.id, 11)
    assert book.tree.reclaim(kid.id) == 10
    assert book.tree.invariant_violations() == []


def test_given_a_child_reclaimed_whole_then_whatever_becomes_unspent_later_goes_to_the_parent_until_a_top_up() -> None:
    """Found by the simulator: a child reclaimed whole with nothing leased got units back (a refund of
    a pending request, a grandchild's return) and admitted again."""
    book, _ = new_book()
    root = package(book, 100)
    kid = child(book, root, 40)
    grandkid = child(book, kid, 10)
    pending = admit(book, kid, units=3)
    assert book.tree.reclaim(kid.id) == 27
    assert (kid.free, root.free, kid.status) == (0, 87, Status.ACTIVE)
    assert book.settle(Settlement(pending.request_id, kid.id, success=False)) is Code.OK  # refunded now
    assert (kid.free, kid.allocation, root.free) == (0, 10, 90), "the refund went on to the parent"
    assert book.tree.revoke(grandkid.id) == 10
    assert (kid.free, kid.allocation, root.free) == (0, 0, 100), "and so did the grandchild's unspent"
    assert admit(book, kid).code is Code.QUOTA_EXHAUSTED
    book.tree.top_up(kid.id, 5)  # a top-up ends it: its units stay with it
    d = admit(book, kid)
    assert d.code is Code.OK
    assert book.settle(Settlement(d.request_id, kid.id, success=False)) is Code.OK
    assert (kid.free, root.free) == (5, 95)
    assert book.tree.invariant_violations() == []


def test_given_an_expired_child_when_swept_then_it_is_expired_and_unspent_returns() -> None:
    book, clock = new_book()
    root = package(book, 100)
    kid = child(book, root, 50, TokenLimits(expires_at=clock.t + 60))
    admit(book, kid, units=5)
    clock.advance(61)
    assert admit(book, kid).code is Code.EXPIRED_TOKEN
    assert book.tree.expire_due() == [kid.id]
    assert (kid.status, kid.allocation, root.free) == (Status.EXPIRED, 5, 95)
    assert book.tree.invariant_violations() == []


def test_given_a_root_top_up_when_thresholds_fired_then_they_rearm_below_consumption() -> None:
    book, _ = new_book()
    root = package(book, 10)
    for _ in range(8):
        admit(book, root)
    assert root.fired == {80}
    alerts = book.drain().alerts
    assert [a["threshold"] for a in alerts] == [80]
    book.tree.top_up(root.id, 10)
    assert root.fired == set() and root.free == 12
    for _ in range(8):
        admit(book, root)
    assert [a["threshold"] for a in book.drain().alerts] == [80]


def test_given_thresholds_when_one_admission_crosses_two_then_each_fires_exactly_once() -> None:
    book, _ = new_book()
    root = package(book, 100)
    kid = child(book, root, 20)
    admit(book, kid, units=19)  # 95 % of the child, 19 % of the root
    admit(book, kid, units=1)
    fired = [(a["token_id"], a["threshold"]) for a in book.drain().alerts]
    assert fired == [(kid.id, 80), (kid.id, 95), (kid.id, 100)]


@pytest.mark.parametrize("field", ["rate", "model", "ip", "expiry", "ancestor_revoked", "jti"])
def test_given_one_limit_denies_then_no_counter_of_any_other_limit_moves(field: str) -> None:
    book, clock = new_book()
    root = package(book, 100, TokenLimits(rate=RateLimit(rate=1.0, burst=1)))
    kid = child(
        book,
        root,
        50,
        TokenLimits(
            models=normalize_models(["parts"]),
            ips=normalize_ips(["10.0.0.0/8"]),
            expires_at=clock.t + 100,
            rate=RateLimit(rate=1.0, burst=1),
        ),
    )
    mid = child(book, kid, 10)
    if field == "rate":
        assert admit(book, mid).code is Code.OK
    before = counters(book)
    pending = dict(book.pending)
    if field == "expiry":
        clock.advance(101)
        before = counters(book)
    if field == "ancestor_revoked":
        kid.status = Status.REVOKED
        before = counters(book)
    expected = {
        "rate": Code.RATE_LIMITED,
        "model": Code.MODEL_NOT_ALLOWED,
        "ip": Code.IP_NOT_ALLOWED,
        "expiry": Code.EXPIRED_TOKEN,
        "ancestor_revoked": Code.REVOKED_TOKEN,
        "jti": Code.REVOKED_TOKEN,
    }[field]
    model = "other@1" if field == "model" else "parts@1"
    ip = "192.168.1.1" if field == "ip" else "10.1.2.3"
    d = admit(book, mid, model=model, ip=ip, jti="rotated-out" if field == "jti" else None)
    assert d.code is expected
    assert d.units == 0
    assert counters(book) == before
    assert book.pending == pending
    if field == "rate":
        assert d.retry_after is not None and d.retry_after >= 1


def test_given_rate_buckets_on_ancestors_when_a_child_spends_then_the_parent_bucket_limits_it() -> None:
    book, clock = new_book()
    root = package(book, 100, TokenLimits(rate=RateLimit(rate=2.0, burst=2)))
    a = child(book, root, 10)
    b = child(book, root, 10)
    assert [admit(book, a).code, admit(book, b).code, admit(book, a).code] == [Code.OK, Code.OK, Code.RATE_LIMITED]
    clock.advance(0.5)
    assert admit(book, b).code is Code.OK


def test_given_a_quota_denial_then_rate_tokens_are_not_consumed() -> None:
    book, _ = new_book()
    root = package(book, 1, TokenLimits(rate=RateLimit(rate=1.0, burst=3)))
    admit(book, root)
    level = root.bucket.level  # type: ignore[union-attr]
    assert admit(book, root).code is Code.QUOTA_EXHAUSTED
    assert root.bucket.level == level  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "limits",
    [
        TokenLimits(expires_at=2_000_000.0),
        TokenLimits(models=normalize_models(["parts", "yolov8n"])),
        TokenLimits(models=normalize_models(["yolov8n@1"])),
        TokenLimits(ips=normalize_ips(["10.0.0.0/7"])),
        TokenLimits(ips=normalize_ips(["192.168.0.1"])),
        TokenLimits(rate=RateLimit(rate=20.0, burst=20)),
        TokenLimits(rate=RateLimit(rate=5.0, burst=100)),
    ],
)
def test_given_a_narrow_parent_when_a_child_asks_for_wider_limits_then_refused(limits: TokenLimits) -> None:
    book, clock = new_book()
    root = package(
        book,
        100,
        TokenLimits(
            expires_at=clock.t + 1000,
            models=normalize_models(["parts"]),
            ips=normalize_ips(["10.0.0.0/8"]),
            rate=RateLimit(rate=10.0, burst=20),
        ),
    )
    before = counters(book)
    with pytest.raises(OperationRefused) as e:
        child(book, root, 10, limits)
    assert e.value.code is Code.LIMIT_WIDENING
    assert counters(book) == before


def test_given_a_narrow_parent_when_a_child_narrows_every_limit_then_allowed_and_expiry_inherited() -> None:
    book, clock = new_book()
    root = package(
        book,
        100,
        TokenLimits(
            expires_at=clock.t + 1000,
            models=normalize_models(["parts"]),
            ips=normalize_ips(["10.0.0.0/8"]),
            rate=RateLimit(rate=10.0, burst=20),
        ),
    )
    kid = child(
        book,
        root,
        10,
        TokenLimits(
            models=normalize_models(["parts@1"]), ips=normalize_ips(["10.1.0.0/16"]), rate=RateLimit(rate=1.0, burst=2)
        ),
    )
    assert kid.expires_at == clock.t + 1000
    assert admit(book, kid, model="parts@1", ip="10.1.9.9").code is Code.OK
    assert admit(book, kid, model="parts@2", ip="10.1.9.9").code is Code.MODEL_NOT_ALLOWED


def test_given_an_idempotency_key_when_replayed_then_charged_once_and_conflict_on_other_body() -> None:
    book, _ = new_book()
    root = package(book, 10)
    first = admit(book, root, key="k1", body="h1")
    assert first.code is Code.OK
    assert admit(book, root, key="k1", body="h1").code is Code.IDEMPOTENCY_IN_PROGRESS
    book.settle(Settlement(first.request_id, root.id, success=True, result='{"n":1}'))
    replay = admit(book, root, key="k1", body="h1")
    assert (replay.code, replay.replay, replay.units) == (Code.REPLAY, '{"n":1}', 0)
    assert admit(book, root, key="k1", body="other").code is Code.IDEMPOTENCY_CONFLICT
    assert root.used == 1


def test_given_a_failed_idempotent_request_when_retried_then_it_is_charged_again_once() -> None:
    book, _ = new_book()
    root = package(book, 10)
    d = admit(book, root, key="k", body="h")
    book.settle(Settlement(d.request_id, root.id, success=False))
    assert root.used == 0
    assert admit(book, root, key="k", body="h").code is Code.OK
    assert root.used == 1


def test_given_an_admitted_request_id_when_admitted_again_then_no_second_debit() -> None:
    book, _ = new_book()
    root = package(book, 10)
    d1 = admit(book, root, rid="same")
    d2 = admit(book, root, rid="same")
    assert (d1.code, d2.code, d2.replayed, root.used) == (Code.OK, Code.OK, True, 1)
    book.settle(Settlement("same", root.id, success=True))
    assert admit(book, root, rid="same").code is Code.REPLAY
    assert root.used == 1


def test_given_a_refunded_request_id_when_delivered_again_then_admitted_and_charged_once() -> None:
    book, _ = new_book()
    root = package(book, 10)
    admit(book, root, rid="again")
    assert book.settle(Settlement("again", root.id, success=False)) is Code.OK
    assert root.used == 0
    d = admit(book, root, rid="again")  # the refunded attempt cost nothing: this one is a new charge
    assert (d.code, d.replayed, root.used) == (Code.OK, False, 1)
    book.settle(Settlement("again", root.id, success=True))
    assert admit(book, root, rid="again").code is Code.REPLAY
    assert root.used == 1


def test_given_another_tokens_pending_request_id_then_refused_and_neither_balance_moves() -> None:
    book, _ = new_book()
    a = package(book, 10)
    b = package(book, 10)
    admit(book, a, rid="shared")
    d = admit(book, b, rid="shared")
    assert (d.code, d.admitted, a.used, b.used) == (Code.INVALID_REQUEST, False, 1, 0)
    assert book.settle(Settlement("shared", b.id, success=False)) is Code.NOT_FOUND
    assert book.settle(Settlement("shared", a.id, success=True)) is Code.OK
    assert a.used == 1


def test_given_a_pending_id_when_redelivered_for_another_model_or_units_then_refused() -> None:
    book, _ = new_book()
    root = package(book, 10)
    admit(book, root, rid="same", model="parts@1", units=1)
    assert admit(book, root, rid="same", model="big@9", units=1).code is Code.INVALID_REQUEST
    assert admit(book, root, rid="same", model="parts@1", units=16).code is Code.INVALID_REQUEST
    assert root.used == 1


def test_given_a_pending_id_when_redelivered_then_status_model_and_ip_are_checked_again() -> None:
    book, _ = new_book()
    root = package(book, 10, TokenLimits(models=normalize_models(["parts@1"]), ips=normalize_ips(["10.0.0.1/32"])))
    admit(book, root, rid="r-ip")
    assert admit(book, root, rid="r-ip", ip="6.6.6.6").code is Code.IP_NOT_ALLOWED
    kid = child(book, root, 5)
    admit(book, kid, rid="r-rev")
    book.tree.revoke(root.id)
    assert admit(book, kid, rid="r-rev").code is Code.REVOKED_TOKEN
    assert book.tree.invariant_violations() == []


def test_given_a_pending_id_when_redelivered_then_no_rate_token_is_taken() -> None:
    book, _ = new_book()
    root = package(book, 10, TokenLimits(rate=RateLimit.parse("1/min:1")))
    assert admit(book, root, rid="once").code is Code.OK
    again = admit(book, root, rid="once")
    assert (again.code, again.replayed, root.used) == (Code.OK, True, 1)


def test_given_ids_or_keys_too_long_for_their_columns_then_refused_without_a_usage_row() -> None:
    book, _ = new_book()
    root = package(book, 10)
    book.drain()
    assert admit(book, root, rid="x" * 65).code is Code.INVALID_REQUEST
    assert admit(book, root, key="k" * 256, body="h").code is Code.INVALID_REQUEST
    assert admit(book, root, rid="x" * 64, key="k" * 255, body="h").code is Code.OK
    assert len(book.drain().usage) == 1 and root.used == 1


def test_given_a_partial_settlement_then_only_the_charged_units_are_kept() -> None:
    book, _ = new_book()
    root = package(book, 10)
    d = admit(book, root, units=4)
    book.settle(Settlement(d.request_id, root.id, success=True, charged=1))
    assert (root.used, root.free) == (1, 9)
    assert book.settle(Settlement(d.request_id, root.id, success=True)) is Code.NOT_FOUND


def test_given_a_token_actor_then_it_sees_and_steers_only_its_own_subtree() -> None:
    book, _ = new_book()
    a = package(book, 100)
    b = package(book, 100)
    a1 = child(book, a, 10)
    for op in (
        lambda: book.node(b.id, by_token=a1.id),
        lambda: book.tree.revoke(a.id, by_token=a1.id),
        lambda: book.tree.top_up(b.id, 1, by_token=a.id),
        lambda: child(book, b, 1, by_token=a.id),
    ):
        with pytest.raises(OperationRefused) as e:
            op()
        assert e.value.code is Code.NOT_FOUND
    with pytest.raises(OperationRefused) as e:
        book.tree.top_up(a1.id, 1, by_token=a1.id)
    assert e.value.code is Code.FORBIDDEN
    assert [v.id for v in book.tree.views(by_token=a1.id)] == [a1.id]
    assert book.tree.top_up(a1.id, 5, by_token=a.id).allocation == 15


@pytest.mark.parametrize("units", [0, -1, 1.5, True, 10**13])
def test_given_bad_units_then_invalid_request_and_nothing_moves(units: object) -> None:
    book, _ = new_book()
    root = package(book, 10)
    before = counters(book)
    assert admit(book, root, units=units).code is Code.INVALID_REQUEST  # type: ignore[arg-type]
    assert counters(book) == before


def test_given_rate_specs_then_tiers_and_custom_rates_parse() -> None:
    assert RateLimit.parse("pro").rate == 10.0
    assert RateLimit.parse("300/min") == RateLimit(rate=5.0, burst=300)
    assert RateLimit.parse("5/s:10") == RateLimit(rate=5.0, burst=10)
    with pytest.raises(OperationRefused):
        RateLimit.parse("fast")


def test_given_a_refusal_when_pickled_across_processes_then_its_code_survives() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(OperationRefused("nope", Code.NOT_FOUND)))
    assert (type(err), err.code, err.message) == (OperationRefused, Code.NOT_FOUND, "nope")


def test_given_an_expired_idempotency_key_when_reused_then_the_new_request_replaces_it(tmp_path: Any) -> None:
    store = Store(f"sqlite:///{tmp_path / 'l.db'}")
    store.migrate()
    book, clock = new_book()
    root = package(book, 10)
    d = admit(book, root, key="k", body="h")
    book.settle(Settlement(d.request_id, root.id, success=True, result="{}"))
    store.commit(book.drain())
    clock.advance(IDEMPOTENCY_TTL_S + 1)
    assert admit(book, root, key="k", body="other").code is Code.OK  # a new request, not a conflict
    store.commit(book.drain())  # the old row is deleted before the new one is written
    again = QuotaBook(clock)
    again.load(*store.load(clock.t, 3600, 120))
    assert again.idem[(root.id, "k")].body_hash == "other"


def test_given_admit_and_failed_settle_in_one_commit_then_no_idempotency_row_is_left(tmp_path: Any) -> None:
    store = Store(f"sqlite:///{tmp_path / 'l.db'}")
    store.migrate()
    book, clock = new_book()
    root = package(book, 10)
    d = admit(book, root, key="k", body="h")
    book.settle(Settlement(d.request_id, root.id, success=False))
    store.commit(book.drain())
    again = QuotaBook(clock)
    again.load(*store.load(clock.t, 3600, 120))
    assert again.idem == {}


def test_given_stale_unsettled_admissions_when_pruned_then_plain_ones_stay_charged_idempotent_ones_refunded() -> None:
    book, clock = new_book()
    root = package(book, 10)
    admit(book, root, rid="plain")
    admit(book, root, key="k", body="h")
    clock.advance(3601)
    book.prune(settle_window_s=3600)
    assert book.pending == {}
    assert root.used == 1  # the plain one stays charged: its caller never settled it
    # the idempotent one was never answered (its result is stored before the answer): refunded,
    # so the retry with the same key is its one charge
    assert admit(book, root, key="k", body="h").code is Code.OK
    assert root.used == 2


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0, 10.0**17])
def test_given_an_impossible_expiry_then_refused_before_anything_changes(bad: float) -> None:
    with pytest.raises(OperationRefused) as e:
        TokenSpec.build("x", 1, expires_at=bad)
    assert e.value.code is Code.INVALID_REQUEST


def test_given_an_expiry_less_than_a_second_ahead_then_refused() -> None:
    book, clock = new_book()
    root = package(book, 10)
    with pytest.raises(OperationRefused):
        child(book, root, 1, TokenLimits(expires_at=clock.t + 0.5))


def test_given_a_fractional_charge_then_it_is_ignored_and_the_debit_kept_whole() -> None:
    book, _ = new_book()
    root = package(book, 10)
    d = admit(book, root, units=3)
    book.settle(Settlement(d.request_id, root.id, success=True, charged=1.5))  # type: ignore[arg-type]
    assert root.used == 3
