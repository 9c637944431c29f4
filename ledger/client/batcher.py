"""Batcher: concurrent callers of ONE event loop share one call per batch. No Ray, no I/O of its own.

Used by the ledger client (admissions and settlements per shard) and the lease holder (lease
asks per shard): throughput does not pay one round trip per item.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class Batcher:
    """Collects items from concurrent coroutines of ONE event loop and sends them in batches."""

    def __init__(self, send: Callable[[list[Any]], Awaitable[list[Any]]], max_batch: int, max_inflight: int) -> None:
        self.send = send
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self.queue: list[tuple[Any, asyncio.Future[Any]]] = []
        self.inflight = 0

    async def submit(self, row: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.append((row, fut))
        if self.inflight < self.max_inflight:
            self.inflight += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self.queue:
                batch = self.queue[: self.max_batch]
                del self.queue[: self.max_batch]
                try:
                    results = await self.send([r for r, _ in batch])
                except BaseException as exc:  # deliver, never lose a waiter
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), res in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(res)
        finally:
            self.inflight -= 1
