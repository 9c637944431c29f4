"""Validate before mutating: every malformed input to the tree operations is a 400 invalid_request
with nothing changed (no counter, no admin event, no outbox entry); rates are finite and bounded."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ledger.core.book import QuotaBook
from ledger.core.codes import Code
from ledger.core.entities import Admission, Settlement, TokenLimits, TokenSpec, make_token_limits
from ledger.core.errors import OperationRefused
from ledger.core.limits import MAX_BURST, MAX_RATE, RateLimit, normalize_models
from ledger.core.settings import LedgerSettings
from ledger.core.tree import MAX_BALANCE, MAX_UNITS, MIN_LIFETIME_S
from ledger.shard.coordinator import CoordinatorCore
from ledger.shard.core import ShardCore
from tests.ledger.book_helpers import child, counters, new_book, package


def refused_with_nothing_changed(book: QuotaBook, op: Callable[[], Any]) -> OperationRefused:
    book.drain()
    before = counters(book)
    jtis = {n.id: n.jti for n in book.nodes.values()}
    with pytest.raises(OperationRefused) as e:
        op()
    assert e.value.code is Code.INVALID_REQUEST, e.value.message
    assert counters(book) == before
    assert {n.id: n.jti for n in book.nodes.values()} == jtis
    assert not book.drain(), "no admin event, no outbox entry"
    return e.value


@pytest.mark.parametrize("left_s", [0.2, 0.5, MIN_LIFETIME_S])
def test_given_a_token_expiring_within_a_second_when_rotated_then_refused_and_nothing_changes(left_s: float) -> None:
    book, clock = new_book()
    root = package(book, 100)
    kid = child(book, root, 10, TokenLimits(expires_at=clock.t + 10))
    clock.advance(10 - left_s)
    refused_with_nothing_changed(book, lambda: book.tree.rotate(kid.id, "new-jti"))


def test_given_an_ancestor_expiring_within_a_second_when_a_child_is_rotated_or_split_then_refused() -> None:
    book, clock = new_book()
    root = package(book, 100, TokenLimits(expires_at=clock.t + 10))
    kid = child(book, root, 10, TokenLimits(expires_at=clock.t + 10))
    kid.expires_at = None  # its own expiry gone (as stored by an older version): the ancestor's still counts
    clock.advance(9.5)
    refused_with_nothing_changed(book, lambda: book.tree.rotate(kid.id, "new-jti"))
    refused_with_nothing_changed(book, lambda: child(book, kid, 1))


def test_given_a_token_with_time_left_when_rotated_then_allowed() -> None:
    book, clock = new_book()
    root = package(book, 100, TokenLimits(expires_at=clock.t + 10))
    clock.advance(8.5)
    assert book.tree.rotate(root.id, "fresh").jti == "fresh"


@pytest.mark.parametrize(
    "build",
    [
        lambda: TokenSpec.build("n" * 201, 1),
        lambda: TokenSpec.build("ok", 1, team="t" * 201),
        lambda: TokenSpec.build("ok", 1, models=["m" * 201]),
        lambda: TokenSpec.build("ok", 1, models=[f"m{i}" for i in range(257)]),
        lambda: TokenSpec.build("ok", 1, models="parts"),
        lambda: TokenSpec.build("ok", 1, ips=["10.0.0.1"] * 257),
        lambda: TokenSpec.build("ok", 1, ips=["1" * 100]),
        lambda: TokenSpec.build("ok", 1, thresholds=[50] * 11),
        lambda: TokenSpec.build("ok", 1, thresholds=[0]),
        lambda: TokenSpec.build("ok", 1, meta={"x": float("nan")}),
        lambda: TokenSpec.build("ok", 1, meta={"x": "y" * 20000}),
        lambda: TokenSpec.build("ok", 1, meta={"alert_emails": "pm@example.com"}),
        lambda: TokenSpec.build("ok", 1, rate="9" * 400 + "/s"),
        lambda: TokenSpec.build("ok", 1, rate="9" * 20 + "/s"),
        lambda: TokenSpec.build("ok", 1, rate="1/s:" + "9" * 5000),
        lambda: TokenSpec.build("ok", 1, rate="1e400/s"),
        lambda: TokenSpec.build("ok", 1, rate="inf/s"),
        lambda: TokenSpec.build("ok", 1, rate="1/s:0"),
        lambda: TokenSpec.build("ok", 1, expires_at=float("nan")),
        lambda: TokenSpec.build("ok", 1, expires_at=float("inf")),
        lambda: TokenSpec.build("ok", 1, expires_at=True),  # type: ignore[arg-type]
        lambda: make_token_limits(expires_at=float("-inf")),
    ],
)
def test_given_values_that_do_not_fit_when_a_spec_is_built_then_invalid_request(build: Callable[[], Any]) -> None:
    with pytest.raises(OperationRefused) as e:
        build()
    assert e.value.code is Code.INVALID_REQUEST
    assert len(e.value.message) < 400, "a huge input is not echoed back whole"


@pytest.mark.parametrize(
    ("rate", "burst"),
    [
        (math.inf, 1),
        (math.nan, 1),
        (-1.0, 1),
        (0.0, 1),
        (1e-9, 1),
        (MAX_RATE * 2, 1),
        (1.0, 0),
        (1.0, MAX_BURST + 1),
        (1.0, 1.5),
        (1.0, True),
        ("1", 1),
    ],
)
def test_given_a_rate_that_is_not_finite_and_bounded_then_refused_also_when_loaded(rate: Any, burst: Any) -> None:
    with pytest.raises(OperationRefused) as e:
        RateLimit(rate=rate, burst=burst)
    assert e.value.code is Code.INVALID_REQUEST
    with pytest.raises(OperationRefused):
        RateLimit.from_json({"rate": rate, "burst": burst, "name": None})


@pytest.mark.parametrize(
    "stored", [{"rate": "Infinity", "burst": 1}, {"rate": 1.0}, {"burst": 1}, {"rate": 1.0, "burst": "2"}]
)
def test_given_a_malformed_stored_rate_when_loaded_then_refused(stored: dict[str, Any]) -> None:
    with pytest.raises(OperationRefused):
        RateLimit.from_json(stored)


def test_given_sane_rates_then_they_parse_and_round_trip() -> None:
    for spec in ("1/s", "1/h", "300/min:600", "1000000/s", "pro"):
        rate = RateLimit.parse(spec)
        assert RateLimit.from_json(rate.to_json()) == rate
        assert math.isfinite(rate.rate) and rate.burst <= MAX_BURST


@pytest.mark.parametrize(
    "spec",
    [
        TokenSpec("n" * 201, 1),
        TokenSpec("ok", 1, team="t" * 201),
        TokenSpec(123, 1),  # type: ignore[arg-type]
        TokenSpec("ok", 1, TokenLimits(expires_at=math.nan)),
        TokenSpec("ok", 1, TokenLimits(expires_at=math.inf)),
        TokenSpec("ok", 1, TokenLimits(models=frozenset({"m" * 300}))),
        TokenSpec("ok", 1, TokenLimits(ips=("10.0.0.0/8",))),  # type: ignore[arg-type]
        TokenSpec("ok", 1, TokenLimits(rate={"rate": 1e400})),  # type: ignore[arg-type]
        TokenSpec("ok", 1, thresholds=(80.5,)),  # type: ignore[arg-type]
        TokenSpec("ok", 1, meta={"bad": math.inf}),
        TokenSpec("ok", 1, meta=["not", "a", "dict"]),  # type: ignore[arg-type]
    ],
)
def test_given_a_spec_built_directly_when_the_tree_gets_it_then_refused_before_anything_changes(
    spec: TokenSpec,
) -> None:
    book, _ = new_book()
    root = package(book, 100)
    refused_with_nothing_changed(book, lambda: book.tree.split(root.id, "tok_x", "jx", spec))
    refused_with_nothing_changed(book, lambda: book.tree.create_package("pkg_x", "jy", spec))
    assert "tok_x" not in book.nodes and "pkg_x" not in book.nodes


@pytest.mark.parametrize(
    "limits",
    [
        TokenLimits(expires_at=math.nan),
        TokenLimits(expires_at=math.inf),
        TokenLimits(expires_at=-5.0),
        TokenLimits(models=frozenset({"bad name!"})),
        TokenLimits(models=["parts"]),  # type: ignore[arg-type]
        TokenLimits(ips=("10.0.0.1",)),  # type: ignore[arg-type]
        TokenLimits(rate=5.0),  # type: ignore[arg-type]
    ],
)
def test_given_malformed_limits_when_updated_then_refused_and_nothing_changes(limits: TokenLimits) -> None:
    book, clock = new_book()
    root = package(book, 100, TokenLimits(expires_at=clock.t + 1000))
    kid = child(book, root, 10)
    refused_with_nothing_changed(book, lambda: book.tree.update_limits(kid.id, limits))
    refused_with_nothing_changed(book, lambda: book.tree.update_limits(root.id, limits))


def test_given_a_top_up_beyond_the_largest_balance_then_refused() -> None:
    book, _ = new_book()
    root = package(book, MAX_UNITS)
    for _ in range(MAX_BALANCE // MAX_UNITS - 1):
        book.tree.top_up(root.id, MAX_UNITS)
    assert root.allocation == MAX_BALANCE
    refused_with_nothing_changed(book, lambda: book.tree.top_up(root.id, 1))


@pytest.mark.parametrize("token_id", [["a"], {"a": 1}, None, 5])
def test_given_a_token_id_that_is_not_a_string_then_not_found_not_a_type_error(token_id: Any) -> None:
    book, _ = new_book()
    package(book, 10)
    for op in (
        lambda: book.tree.revoke(token_id),
        lambda: book.node(token_id),
        lambda: book.tree.rotate(token_id, "j"),
    ):
        with pytest.raises(OperationRefused) as e:
            op()
        assert e.value.code is Code.NOT_FOUND
    assert book.check_credential(token_id, "j") is Code.INVALID_TOKEN


@pytest.fixture
def core(tmp_path: Path) -> ShardCore:
    c = ShardCore(LedgerSettings(database_url=f"sqlite:///{tmp_path / 'l.db'}", data_dir=tmp_path))
    c.start()
    return c


@pytest.mark.parametrize(
    "row",
    [
        ("r", "t", True),
        ("r", "t", "yes", None, 0.0, 0, 0.0, None),
        ("r", "t", True, None, math.nan, 0, 0.0, None),
        ("r", "t", True, None, math.inf, 0, 0.0, None),
        ("r", "t", True, None, 0.0, 2**40, 0.0, None),
        ("r", "t", True, None, 0.0, 0, 0.0, 12),
        ("r", "t", True, 1.5, 0.0, 0, 0.0, None),
        None,
    ],
)
def test_given_a_malformed_settlement_row_then_it_alone_is_invalid(core: ShardCore, row: Any) -> None:
    pkg = core.create_package(TokenSpec("p", 10))
    tid = pkg.token.id
    core.admit_rows([Admission("r", tid, core.book.nodes[tid].jti, 1, "parts@1").row()])
    core.commit()
    good = Settlement("r", tid, True).row()
    assert core.settle_rows([row, good]) == [Code.INVALID_REQUEST.value, Code.OK.value]
    core.commit()


def test_given_batches_that_are_not_lists_then_empty_not_a_crash(core: ShardCore) -> None:
    assert core.admit_rows(None) == []  # type: ignore[arg-type]
    assert core.settle_rows("abc") == []
    assert core.admit_rows([("r", "t", "j", 1, "m@1", None, None, None, 2**70, "")])[0].code is Code.INVALID_REQUEST


@pytest.mark.parametrize(("name", "ttl"), [("ops", math.inf), ("ops", math.nan), ("ops", 0), ("", 60), ("x" * 300, 60)])
def test_given_a_bad_admin_credential_request_then_invalid_request(tmp_path: Path, name: str, ttl: float) -> None:
    coordinator = CoordinatorCore(LedgerSettings(database_url=f"sqlite:///{tmp_path / 'l.db'}", data_dir=tmp_path))
    with pytest.raises(OperationRefused) as e:
        coordinator.issue_admin(name, ttl)
    assert e.value.code is Code.INVALID_REQUEST


def test_given_normalized_models_then_they_still_round_trip_through_the_tree_check() -> None:
    book, _ = new_book()
    root = package(book, 10, TokenLimits(models=normalize_models(["parts", "yolo@2"])))
    assert root.models == frozenset({"parts", "yolo@2"})
