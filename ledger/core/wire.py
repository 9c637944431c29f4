"""The ledger API as JSON: every operation's record and result, by the records' own type hints.

`ledger.client.over_http.HttpLedger` (the CLI over the service's admin route) and the ingress's
`POST /v1/admin/ops/{op}` share this module, so both ends read one declaration (`ledger.core.ops`):
a record crosses as its fields, decoded by their hints; a result by the record's `Call[R]`.
A value that does not fit its hint is an `OperationRefused(INVALID_REQUEST)`, never a half-built
object. No Ray, no HTTP here.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import ipaddress
import pickle
import types
from collections.abc import Sequence
from functools import cache
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints, is_typeddict

from ledger.core import ops
from ledger.core.codes import Code
from ledger.core.entities import AdmissionRow, SettlementRow
from ledger.core.errors import OperationRefused

_NETWORKS = (ipaddress.IPv4Network, ipaddress.IPv6Network)
MAX_DEPTH = 16  # a hint nests at most a few levels; a deeper document is refused, not recursed into


def encode(value: Any) -> Any:
    """A JSON-ready form of a ledger value (dataclasses by field, sets and tuples as lists, bytes as
    base64, networks and enums as their text)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple | frozenset | set):
        items = [encode(v) for v in value]
        return sorted(items) if isinstance(value, frozenset | set) else items
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, _NETWORKS):
        return str(value)
    return value


def decode(hint: Any, value: Any, depth: int = 0) -> Any:
    """`value` (from `encode`, over JSON) as the type `hint` names; refuses what does not fit."""
    if depth > MAX_DEPTH:
        raise _bad("the document nests too deeply")
    origin, params = get_origin(hint), get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (Union, types.UnionType):
        return _union(params, value, depth)
    if hint is type(None):
        if value is not None:
            raise _bad(f"expected null, got {type(value).__name__}")
        return None
    if origin in (list, tuple, frozenset, set):
        if not isinstance(value, list):
            raise _bad(f"expected a list, got {type(value).__name__}")
        if origin is tuple and params and params[-1] is not Ellipsis:  # tuple[int, int, str]: by position
            if len(value) != len(params):
                raise _bad(f"expected {len(params)} items, got {len(value)}")
            return tuple(decode(h, v, depth + 1) for h, v in zip(params, value, strict=True))
        item = params[0] if params else Any
        items = [decode(item, v, depth + 1) for v in value]
        return items if origin is list else tuple(items) if origin is tuple else frozenset(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(f"expected an object, got {type(value).__name__}")
        key, val = params or (Any, Any)
        return {decode(key, k, depth + 1): decode(val, v, depth + 1) for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _dataclass(hint, value, depth)
    if is_typeddict(hint):
        return _typeddict(hint, value, depth)
    if hint is bytes:
        if not isinstance(value, str):
            raise _bad("expected base64 text")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _bad("bad base64") from None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise _bad(f"{value!r} is not a {hint.__name__}") from None
    if hint in _NETWORKS:
        return _network(value)
    if hint is float:
        if type(value) not in (int, float):
            raise _bad(f"expected a number, got {type(value).__name__}")
        return float(value)
    if hint in (int, str, bool):
        if type(value) is not hint:
            raise _bad(f"expected {hint.__name__}, got {type(value).__name__}")
        return value
    raise _bad(f"no wire form for {hint!r}")


def _union(params: tuple[Any, ...], value: Any, depth: int) -> Any:
    if value is None:
        if type(None) in params:
            return None
        raise _bad("null is not allowed here")
    rest = [p for p in params if p is not type(None)]
    if rest and all(p in _NETWORKS for p in rest):
        return _network(value)
    problems = []
    for p in rest:
        try:
            return decode(p, value, depth + 1)
        except OperationRefused as exc:
            problems.append(exc.message)
    raise _bad("; ".join(problems) or "no type fits")


def _network(value: Any) -> Any:
    if not isinstance(value, str):
        raise _bad("a network is text, e.g. 10.0.0.0/8")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _bad(f"{value[:60]!r} is not an IP network") from None


def _dataclass(cls: type, value: Any, depth: int) -> Any:
    if not isinstance(value, dict):
        raise _bad(f"{cls.__name__} is an object, got {type(value).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = set(value) - set(fields)
    if unknown:
        raise _bad(f"{cls.__name__} has no field {sorted(unknown)[0]!r}")
    kwargs = {name: decode(hints[name], v, depth + 1) for name, v in value.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise _bad(f"{cls.__name__}: {exc}") from None


def _typeddict(cls: Any, value: Any, depth: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(f"{cls.__name__} is an object, got {type(value).__name__}")
    hints = _hints(cls)
    return {k: decode(hints.get(k, Any), v, depth + 1) for k, v in value.items()}


@cache
def _hints(cls: Any) -> dict[str, Any]:
    return get_type_hints(cls)


R = TypeVar("R")


@cache
def _answer_hint(cls: type) -> Any:
    """R of a record class `Call[R]`."""
    for base in getattr(cls, "__orig_bases__", ()):
        if get_origin(base) is ops.Call:
            return get_args(base)[0]
    raise TypeError(f"{cls.__name__} does not say what it answers")


def _bad(message: str) -> OperationRefused:
    return OperationRefused(f"bad wire value: {message}", Code.INVALID_REQUEST)


# ------------------------------------------------------------------ one operation's call and answer
def encode_call(op: ops.Call[Any]) -> dict[str, Any]:
    """The JSON body of a call: its record's fields (an admin's call: never `by_token`)."""
    return {"kwargs": {f.name: encode(getattr(op, f.name)) for f in dataclasses.fields(op) if f.name != "by_token"}}


def decode_call(name: str, body: Any) -> ops.Call[Any]:
    """The record of a call from its name and JSON body. Unknown operations and fields are refused;
    `by_token` is not taken from a body (the route decides who acts)."""
    cls = ops.CALLS.get(name)
    if cls is None:
        raise OperationRefused(f"unknown ledger operation {name!r}", Code.INVALID_REQUEST)
    kwargs = body.get("kwargs", {}) if isinstance(body, dict) else None
    if not isinstance(kwargs, dict):
        raise _bad('the body is {"kwargs": {...}}')
    if "by_token" in kwargs:
        raise OperationRefused("`by_token` is set by the route, not by the caller", Code.INVALID_REQUEST)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in kwargs:
        if key not in fields:
            raise OperationRefused(f"{name} has no argument {key!r}", Code.INVALID_REQUEST)
    record: ops.Call[Any] = _dataclass(cls, kwargs, 0)
    return record


def encode_result(value: Any) -> dict[str, Any]:
    return {"result": encode(value)}


def decode_result(op: ops.Call[R], body: Any) -> R:
    if not isinstance(body, dict) or "result" not in body:
        raise _bad('the answer is {"result": ...}')
    cls: type = type(op)
    value: R = decode(_answer_hint(cls), body["result"])
    return value


# ------------------------------------------------------------------ hot-path batches over Ray
def pack(batch: Sequence[Any]) -> bytes:
    """A batch of hot-path records (`AdmissionRow`s, `Decision`s, `LeaseAsk`s, `LeaseGrant`s) as ONE
    bytes object for an actor call between the ledger's own processes: Ray serializes a bytes
    argument without walking it, which is what keeps a 4,096-row batch one cheap call. Both ends
    hold the capability (the actor checks it before it unpacks anything)."""
    return pickle.dumps(flat(batch), protocol=pickle.HIGHEST_PROTOCOL)


def flat(batch: Sequence[Any]) -> list[Any]:
    """Admission and settlement rows as their plain tuples, everything else as it is. A NamedTuple
    pickles through two Python-level calls per row (`__getnewargs__`, `__new__`): 2.7 µs against
    0.6 µs for the same row as a tuple (measured, 4,096 rows; docs/BENCHMARKS.md). The receiver
    rebuilds from position (`Admission.from_row`, `Settlement.from_row`)."""
    return [tuple(r) if type(r) in _ROWS else r for r in batch]


_ROWS = (AdmissionRow, SettlementRow)


def unpack(blob: bytes) -> list[Any]:
    """The batch `pack` made (anything else: an empty one). The receiver checks each record
    (`Admission.from_row`, ...)."""
    batch = pickle.loads(blob)
    return batch if isinstance(batch, list) else []


__all__ = ["decode", "decode_call", "decode_result", "encode", "encode_call", "encode_result", "flat", "pack", "unpack"]
