"""The fixes of issue 17, reverted one at a time, to show the simulator catches each defect.

`apply(name)` patches the real classes and returns an undo. Used by `python -m tests.sim.run
--mutation NAME` and `tests/sim/test_sim.py::test_mutations`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MUTATIONS: dict[str, Callable[[], Callable[[], None]]] = {}


def _patch(obj: Any, name: str, value: Any) -> Callable[[], None]:
    old = obj.__dict__[name]
    setattr(obj, name, value)
    return lambda: setattr(obj, name, old)


def apply(name: str) -> Callable[[], None]:
    return MUTATIONS[name]()
