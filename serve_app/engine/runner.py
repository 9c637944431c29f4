"""BatchRunner: a Detector replica's scheduler (serve_app.engine.scheduler) around its engine.

`submit` queues one call (its images, its parameters, whose it is) and awaits its reply; one loop
forms each batch from the scheduler, runs `Engine.detect` on it in a worker thread, one batch at a
time (torch releases the GIL: calls keep arriving and queue for the next batch meanwhile), and
splits the result per call (serve_app.engine.batching). In place of `@serve.batch`, with the
same reply format, shape grouping and idle wait (`batch_wait_s`) for a batch to fill.

A refused call raises `Busy` at once; a call whose caller is cancelled before its batch starts
leaves the queue; an engine failure fails every call of its batch (the ingress refunds them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from serve_app.engine.batching import Call, merge_calls, split_result
from serve_app.engine.protocol import BatchResult
from serve_app.engine.scheduler import Busy, Job, Scheduler, SchedulerConfig, Tenant
from serve_app.results import InferenceParams

Detect = Callable[[list[np.ndarray], list[InferenceParams]], BatchResult]


class BatchRunner:
    """One per Detector replica: `submit` queues a call and awaits its reply; one loop forms the
    batches and runs the engine in a worker thread, one batch at a time."""

    def __init__(
        self,
        detect: Detect,
        config: SchedulerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_batch: Callable[[list[Job], float, float], None] | None = None,
    ) -> None:
        self.detect = detect
        self.scheduler = Scheduler(config)
        self.clock = clock
        self.on_batch = on_batch  # (batch, seconds, when it was formed): the replica's metrics
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def submit(
        self, images: list[np.ndarray], params: InferenceParams, service: Tenant, timeout_s: float
    ) -> dict[str, Any]:
        """The call's reply (serve_app.engine.batching's format); `Busy` if refused or not started in time."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        job = self.scheduler.offer(service, len(images), self.clock(), timeout_s, (images, params, future))
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._loop())
        self.wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            self.scheduler.cancel(job)  # not started yet: it leaves the queue (started: its batch goes on)
            raise

    async def _loop(self) -> None:
        while True:
            if not self.scheduler.queued:
                self.wake.clear()
                await self.wake.wait()
            await self._fill()
            started = self.clock()
            batch, expired = self.scheduler.next_batch(started)
            saturated = self.scheduler.queued > 0
            for job in expired:
                retry = self.scheduler.retry_after(job.cost, 1.0)
                _fail(job, Busy("this model is busy: the request could not start before its timeout", retry))
            batch = [j for j in batch if not j.payload[2].done()]
            if not batch:
                continue
            calls: list[Call] = [(j.payload[0], j.payload[1]) for j in batch]
            t0 = time.perf_counter()
            try:
                images, params = merge_calls(calls)
                result = await asyncio.to_thread(self.detect, images, params)
                seconds = time.perf_counter() - t0
                replies = split_result(calls, result, seconds * 1000)
            except Exception as exc:  # the engine failed this batch: each of its callers gets the error
                for j in batch:
                    _fail(j, exc)
                continue
            self.scheduler.done(batch, seconds, saturated)
            if self.on_batch is not None:
                self.on_batch(batch, seconds, started)
            for j, reply in zip(batch, replies, strict=True):
                if not j.payload[2].done():
                    j.payload[2].set_result(reply)

    async def _fill(self) -> None:
        """An idle engine waits up to `batch_wait_s` for a full batch (as `@serve.batch` did)."""
        c = self.scheduler.config
        if c.batch_wait_s <= 0 or self.scheduler.queued >= c.max_batch:
            return
        deadline = self.clock() + c.batch_wait_s
        while self.scheduler.queued < c.max_batch:
            left = deadline - self.clock()
            if left <= 0:
                return
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), left)
            except TimeoutError:
                return


def _fail(job: Job, exc: BaseException) -> None:
    future = job.payload[2]
    if not future.done():
        future.set_exception(exc)


__all__ = ["BatchRunner", "Detect"]
