"""The ledger's operations as records (ledger/core/ops.py): one table says where each call goes and
what runs it, every record has its typed `LedgerApi` method, and a token runs only scoped ones (no Ray)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from ledger import HttpLedger, LedgerApi
from ledger.core import ops
from ledger.core.codes import Code
from ledger.core.entities import TokenSpec
from ledger.core.errors import OperationRefused
from ledger.core.shards import ShardMap

THREE = ShardMap(3)


def test_given_every_record_then_ledger_api_has_its_typed_method_and_the_table_names_it_once() -> None:
    assert len(ops.CALLS) == len({c.name for c in ops.CALLS.values()}) == 20
    for name, cls in ops.CALLS.items():
        method = getattr(LedgerApi, name)  # a real method: go-to-definition lands on it
        assert inspect.isfunction(method) and f"ops.{cls.__name__}(" in inspect.getsource(method), name
        has_actor = "by_token" in {f.name for f in dataclasses.fields(cls)}
        assert has_actor == cls.routing.scoped, name  # a token may run exactly the records that carry it


@pytest.mark.parametrize(
    ("op", "acting_root", "root", "where"),
    [
        (ops.Sweep(), None, None, [0, 1, 2]),  # every shard, merged
        (ops.ConsistencyCheck(), None, None, [0, 1, 2]),
        (ops.Tokens(), None, None, [0, 1, 2]),  # no root named: the fallback, every shard
        (ops.Tokens("pkg_x"), None, "pkg_x", [THREE.of_root("pkg_x")]),
        (ops.Tokens(), "pkg_y", None, [THREE.of_root("pkg_y")]),  # a token: its own package's shard
        (ops.Usage(), None, None, [None]),  # an admin's usage: the coordinator's whole-database read
        (ops.Usage(by_token="tok_a"), "pkg_y", None, [THREE.of_root("pkg_y")]),
        (ops.PublicKeys(), None, None, [None]),
        (ops.CreatePackage(TokenSpec("p", 1)), None, None, [7 % 3]),  # any shard, by turn
        (ops.TopUp("tok_a", 5), None, "pkg_z", [THREE.of_root("pkg_z")]),
    ],
)
def test_given_a_record_then_its_routing_sends_it_where_the_table_says(
    op: ops.Call[object], acting_root: str | None, root: str | None, where: list[int | None]
) -> None:
    assert ops.targets(op, THREE, acting_root, root, turn=7) == where


def test_given_a_token_owned_call_without_its_package_then_it_is_not_found_not_guessed() -> None:
    with pytest.raises(OperationRefused) as err:
        ops.targets(ops.Revoke("tok_unknown"), THREE, None, None)
    assert err.value.code is Code.NOT_FOUND


def test_given_a_token_then_it_runs_only_scoped_records_and_the_merge_is_declared_per_record() -> None:
    assert ops.Split("p", TokenSpec("k", 1)).as_token("tok_a") == ops.Split("p", TokenSpec("k", 1), "tok_a")
    for unscoped in (ops.IssueAdmin("me"), ops.Sweep(), ops.RotateKeys(), ops.PruneAudit()):
        with pytest.raises(OperationRefused) as err:
            unscoped.as_token("tok_a")
        assert err.value.code is Code.FORBIDDEN
    assert ops.Tokens().merge([[], []]) == []
    with pytest.raises(TypeError):
        ops.Token("t").merge([])  # one shard's answer, never merged
    with pytest.raises(OperationRefused):
        ops.known(("split", "p"))  # only the table's records run in an actor


def test_given_an_admin_transport_then_it_does_not_act_for_tokens() -> None:
    with pytest.raises(OperationRefused) as err:
        HttpLedger("http://127.0.0.1:9", "credential").acting_as("tok_a", "jti", "pkg_a")
    assert err.value.code is Code.FORBIDDEN
