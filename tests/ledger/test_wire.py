"""The ledger API as JSON (ledger/core/wire.py): what crosses the HTTP admin route comes back as it left,
and what does not fit the protocol's hints is refused (no Ray)."""

from __future__ import annotations

import dataclasses
import json
import pickle
from typing import Any

import pytest

from ledger.client.inprocess import InProcessLedger
from ledger.core import ops, wire
from ledger.core.changes import USAGE_COLUMNS, UsageRow
from ledger.core.codes import Code
from ledger.core.entities import Admission, AdmissionRow, Settlement, SettlementRow, TokenSpec
from ledger.core.errors import OperationRefused
from ledger.core.results import Consistency, Issued, KeyRotation, Returned
from ledger.core.settings import LedgerSettings


def over_json(value: Any) -> Any:
    return json.loads(json.dumps(wire.encode(value)))


def test_given_every_operation_then_its_fields_and_result_have_a_wire_form() -> None:
    for name, cls in ops.CALLS.items():  # a new operation the wire cannot read fails here, not at a call
        assert cls.name == name
        assert wire._answer_hint(cls) is not None, name  # Call[R] says what it answers
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields <= set(wire._hints(cls)), name  # every field's hint resolves


def test_given_a_token_spec_with_every_limit_then_it_crosses_unchanged() -> None:
    spec = TokenSpec.build("line-3", 250, expires_at=1.8e9, models=["parts@1", "parts"], ips=["10.0.0.0/8", "::1"],
                           rate="5/s:10", team="vision", thresholds=[50, 100],
                           meta={"cost_centre": "CC-1"})  # fmt: skip
    body = json.loads(json.dumps(wire.encode_call(ops.Split("tok_parent", spec))))
    assert wire.decode_call("split", body) == ops.Split("tok_parent", spec)


def test_given_real_results_then_each_decodes_to_what_the_ledger_returned(tmp_path: Any) -> None:
    ledger = InProcessLedger(LedgerSettings(database_url=f"sqlite:///{tmp_path / 'l.db'}", data_dir=tmp_path))
    issued = ledger.create_package(TokenSpec.build("p", 100, rate="pro", team="t"))
    kid = ledger.split(issued.token.id, TokenSpec.build("k", 10))
    reclaimed = ledger.reclaim(kid.token.id, 4)
    rotation = ledger.rotate_keys()
    results: list[tuple[ops.Call[Any], Any]] = [
        (ops.CreatePackage(TokenSpec("x", 1)), issued),
        (ops.Split("p", TokenSpec("x", 1)), kid),
        (ops.Reclaim("t"), reclaimed),
        (ops.Tokens(), ledger.tokens()),
        (ops.ConsistencyCheck(), ledger.consistency()),
        (ops.RotateKeys(), rotation),
        (ops.PublicKeys(), ledger.public_keys()),
        (ops.AdminEvents(), ledger.admin_events()),
        (ops.Usage(), ledger.usage()),
    ]
    for op, value in results:
        assert wire.decode_result(op, over_json(wire.encode_result(value))) == value, op
    assert isinstance(wire.decode_result(ops.Reclaim("t"), over_json(wire.encode_result(reclaimed))), Returned)
    assert isinstance(wire.decode_result(ops.CreatePackage(TokenSpec("x", 1)), over_json(wire.encode_result(issued))),
                      Issued)  # fmt: skip
    assert isinstance(wire.decode_result(ops.RotateKeys(), over_json(wire.encode_result(rotation))), KeyRotation)
    c = Consistency({"a": (1, 2, "active")}, {"a": (1, 2, "active")}, [])
    assert wire.decode_result(ops.ConsistencyCheck(), over_json(wire.encode_result(c))) == c


@pytest.mark.parametrize(
    ("op", "body", "why"),
    [
        ("top_up", {"kwargs": {"token_id": "t", "units": "5"}}, "expected int"),
        ("top_up", {"kwargs": {"token_id": "t", "units": True}}, "expected int"),
        ("top_up", {"kwargs": {"token_id": "t", "units": 5, "by_token": "t"}}, "by_token"),
        ("top_up", {"kwargs": {"token_id": "t", "nope": 1}}, "no argument"),
        ("top_up", {"kwargs": ["t", 5]}, "kwargs"),
        ("admit", {"kwargs": {}}, "unknown ledger operation"),
        ("split", {"kwargs": {"parent_id": "p", "spec": {"name": "x", "allocation": 1, "evil": 1}}}, "no field"),
        ("split", {"kwargs": {"parent_id": "p", "spec": {"name": "x"}}}, "allocation"),
        ("split", {"kwargs": {"parent_id": "p", "spec": {"name": "x", "allocation": 1,
                                                         "limits": {"ips": ["999.1.1.1/8"]}}}}, "not an IP network"),
        ("split", {"kwargs": {"parent_id": "p", "spec": {"name": "x", "allocation": 1,
                                                         "limits": {"rate": {"rate": 1e12, "burst": 1}}}}}, "rate"),
    ],
)  # fmt: skip
def test_given_a_value_that_does_not_fit_then_it_is_refused_as_invalid(op: str, body: Any, why: str) -> None:
    with pytest.raises(OperationRefused) as err:
        wire.decode_call(op, body)
    assert err.value.code is Code.INVALID_REQUEST and why in err.value.message


def test_given_hot_path_records_then_they_cross_a_packed_batch_as_typed_tuples() -> None:
    a = Admission("r1", "tok", "jti", 2, "parts@1", "10.0.0.1", "idem", "h" * 64, 1234, "pkg", "c#1", True)
    s = Settlement("r1", "tok", True, 2, 12.5, 3, 4.0, '{"boxes": []}', "pkg", "c#1")
    rows = wire.unpack(wire.pack([a.row(), a.row()]))
    assert rows == [a.row(), a.row()] and type(rows[0]) is tuple  # crosses as its plain tuple (cheaper to pickle)
    assert a.row().model == "parts@1" and wire.flat([a.row(), "x"]) == [tuple(a.row()), "x"]
    assert Admission.from_row(rows[0]) == a and Admission.from_row(tuple(rows[0])) == a  # a plain tuple too
    assert Settlement.from_row(wire.unpack(wire.pack([s.row()]))[0]) == s
    assert wire.unpack(pickle.dumps({"not": "a batch"})) == []  # not a batch: an empty one
    assert AdmissionRow._fields == tuple(f.name for f in dataclasses.fields(Admission))
    assert SettlementRow._fields == tuple(f.name for f in dataclasses.fields(Settlement))


def test_given_the_usage_record_then_its_fields_are_the_tables_columns() -> None:
    from ledger.store.models import UsageEventRow

    assert set(USAGE_COLUMNS) <= set(UsageEventRow.__table__.columns.keys())
    assert UsageRow._fields == USAGE_COLUMNS
