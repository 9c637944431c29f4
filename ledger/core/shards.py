"""How packages map to ledger shards (DESIGN §1): pure, no I/O.

A package root hashes to one of `SLOTS` slots, stored with each of its tokens (`tokens.slot`);
shard `i` of `n` owns the slots `s` with `s % n == i`, so a shard loads and commits only its
own packages' rows. Usage row ids are assigned by the shard that writes the row: the ids of
shard `i` are `i (mod ID_STRIDE)`, so shards never collide, whatever `n` was when a row was
written. Changing `n` needs every shard stopped first (the fence is per shard index).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

SLOTS = 4096
ID_STRIDE = 1024  # the most shards a ledger can have


def slot_of(root_id: str) -> int:
    """The slot of a package root: stable across processes, versions and machines."""
    return zlib.crc32(root_id.encode()) % SLOTS


@dataclass(frozen=True, slots=True)
class ShardMap:
    """`count` shards; shard `index` owns the slots congruent to it."""

    count: int = 1

    def __post_init__(self) -> None:
        if type(self.count) is not int or not 1 <= self.count <= ID_STRIDE:
            raise ValueError(f"a ledger has 1..{ID_STRIDE} shards, not {self.count!r}")

    def of_slot(self, slot: int) -> int:
        return slot % self.count

    def of_root(self, root_id: str) -> int:
        return self.of_slot(slot_of(root_id))


@dataclass(frozen=True, slots=True)
class ShardScope:
    """One shard's share of the database: what it loads, owns and numbers."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        ShardMap(self.count)  # validates count
        if type(self.index) is not int or not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index!r} outside 0..{self.count - 1}")

    def owns_root(self, root_id: str) -> bool:
        return ShardMap(self.count).of_root(root_id) == self.index

    def first_row_id(self, last_row_id: int) -> int:
        """The first usage row id of this shard above every id written so far (by any shard)."""
        base = (last_row_id // ID_STRIDE + 1) * ID_STRIDE
        return base + self.index
