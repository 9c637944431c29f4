"""The Detector replica's scheduler without Ray (serve_app.engine.scheduler, DESIGN §3c): order,
weights, levels and their minimum share, bounds, deadlines; and the runner's batches against the
engine's own answers. The same scheduler under Serve: test_isolation_served.py."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ledger import Service
from serve_app.engine.fake import FakeEngine
from serve_app.engine.runner import BatchRunner
from serve_app.engine.scheduler import OTHER, Busy, Scheduler, SchedulerConfig
from serve_app.results import InferenceParams


def svc(
    package: str, team: str | None = None, level: int = 1, weight: float = 1.0, team_weight: float = 1.0
) -> Service:
    return Service("t", level, weight, package, weight, team or package, team_weight)


def served_shares(s: Scheduler, batches: int, key=lambda j: j.service.package) -> dict[str, float]:  # type: ignore[no-untyped-def]
    count: Counter[str] = Counter()
    for i in range(batches):
        batch, _ = s.next_batch(float(i))
        for j in batch:
            count[key(j)] += j.cost
    total = sum(count.values())
    return {k: v / total for k, v in count.items()}


def flood(s: Scheduler, services: list[Service], n: int, cost: int = 1) -> None:
    for _ in range(n):
        for x in services:
            s.offer(x, cost, 0.0, timeout_s=3600)


def test_given_fifo_then_batches_follow_arrival_order() -> None:
    s = Scheduler(SchedulerConfig(policy="fifo", max_batch=4))
    order = [svc("a"), svc("a"), svc("b"), svc("c"), svc("a")]
    jobs = [s.offer(x, 1, 0.0, 60) for x in order]
    batch, expired = s.next_batch(0.0)
    assert batch == jobs[:4] and expired == []
    assert s.next_batch(0.0)[0] == jobs[4:]


def test_given_three_equal_packages_flooding_unequally_then_each_gets_a_third() -> None:
    # given: a floods 6x as much as c, b 3x; fifo would serve 6:3:1 of what arrived first
    s = Scheduler(SchedulerConfig(max_batch=8, max_queued=10_000))
    for _ in range(600):
        s.offer(svc("a"), 1, 0.0, 3600)
    for _ in range(300):
        s.offer(svc("b"), 1, 0.0, 3600)
    for _ in range(100):
        s.offer(svc("c"), 1, 0.0, 3600)
    # when: 30 batches (240 images), all three still backlogged
    shares = served_shares(s, 30)
    # then
    assert shares == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, abs=0.02)


def test_given_weights_2_1_1_then_shares_are_half_quarter_quarter() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, max_queued=10_000))
    flood(s, [svc("a", weight=2), svc("b"), svc("c")], 300)
    assert served_shares(s, 50) == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.25}, abs=0.02)


def test_given_a_package_with_two_teams_then_they_split_its_share_not_the_level() -> None:
    # given: package p has teams p1 (weight 3) and p2 (weight 1); package q has one team
    s = Scheduler(SchedulerConfig(max_batch=8, max_queued=10_000))
    flood(s, [svc("p", "p1", team_weight=3), svc("p", "p2"), svc("q")], 300)
    shares = served_shares(s, 50, key=lambda j: j.service.team)
    assert shares == pytest.approx({"p1": 0.375, "p2": 0.125, "q": 0.5}, abs=0.02)


def test_given_requests_of_many_images_then_shares_count_images_not_requests() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, max_queued=100_000))
    for _ in range(200):
        s.offer(svc("big"), 4, 0.0, 3600)
        s.offer(svc("small"), 1, 0.0, 3600)
        s.offer(svc("small"), 1, 0.0, 3600)
    assert served_shares(s, 40) == pytest.approx({"big": 0.5, "small": 0.5}, abs=0.05)


def test_given_a_higher_level_flooding_then_a_lower_level_keeps_its_minimum_share() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, min_share=0.1, max_queued=100_000))
    flood(s, [svc("pro", level=2), svc("basic", level=0)], 2000)
    shares = served_shares(s, 100)
    assert shares["basic"] == pytest.approx(0.1, abs=0.02)
    assert shares["pro"] == pytest.approx(0.9, abs=0.02)


def test_given_the_higher_level_idle_then_the_lower_level_gets_everything() -> None:
    # work-conserving: a lower level is not held to its minimum share when nothing above waits
    s = Scheduler(SchedulerConfig(max_batch=8, max_queued=10_000))
    flood(s, [svc("basic", level=0)], 200)
    assert served_shares(s, 10) == {"basic": 1.0}


def test_given_a_higher_level_request_arriving_then_it_goes_in_the_next_batch_ahead_of_the_queue() -> None:
    s = Scheduler(SchedulerConfig(max_batch=4, max_queued=10_000))
    flood(s, [svc("flood", level=0)], 100)
    urgent = s.offer(svc("prod", level=2), 1, 0.0, 60)
    batch, _ = s.next_batch(0.0)
    assert batch[0] is urgent


def test_given_a_flow_idle_for_a_while_then_it_does_not_bank_service() -> None:
    # given: a is served alone for 20 batches, then b arrives
    s = Scheduler(SchedulerConfig(max_batch=8, max_queued=10_000))
    flood(s, [svc("a")], 1000)
    served_shares(s, 20)
    flood(s, [svc("b")], 1000)
    # then: they share from now on; b is owed one batch of credit (8 images), not the 160 a had alone
    assert served_shares(s, 20) == pytest.approx({"a": 76 / 160, "b": 84 / 160}, abs=0.01)


def measured(s: Scheduler, images_per_s: float = 320.0, who: Service | None = None, batches: int = 3) -> None:
    """Run `batches` saturated batches of max_batch images of `who` at `images_per_s`."""
    n = s.config.max_batch
    for _ in range(batches):
        for _ in range(n):
            s.offer(who or svc("warm"), 1, 0.0, 60)
        batch, _ = s.next_batch(0.0)
        s.done(batch, n / images_per_s, saturated=True)


def test_given_a_flooding_tenant_then_past_its_share_of_queue_s_it_is_refused_and_others_are_not() -> None:
    # given: 320 images/s drain, queue_s 0.5: one tenant alone may queue 160 images
    s = Scheduler(SchedulerConfig(max_batch=8, queue_s=0.5))
    measured(s)
    assert s.drain == pytest.approx(320, rel=0.05)
    accepted = 0
    with pytest.raises(Busy) as busy:
        for _ in range(1000):
            s.offer(svc("flood"), 1, 0.0, 30)
            accepted += 1
    assert 150 <= accepted <= 170
    assert busy.value.retry_after > 0
    # when: another tenant arrives, it is accepted (its own share), and the flood is refused at once
    s.offer(svc("prod"), 1, 0.0, 30)
    with pytest.raises(Busy):
        s.offer(svc("flood"), 1, 0.0, 30)
    assert s.tally[(1, "flood", "flood")].refused == 2


def test_given_a_lower_level_behind_a_busy_higher_one_then_its_bound_shrinks_to_what_it_gets() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, queue_s=0.5, min_share=0.1, max_queued=100_000))
    # given: the level above has had every recent batch, and still has work queued
    measured(s, who=svc("pro", level=2), batches=12)
    flood(s, [svc("pro", level=2)], 100)
    accepted = 0
    with pytest.raises(Busy):
        for _ in range(1000):
            s.offer(svc("basic", level=0), 1, 0.0, 30)
            accepted += 1
    # 0.5 s at its minimum share (10 % of 320/s) is 16 images
    assert 8 <= accepted <= 20


def test_given_the_total_bound_then_every_tenant_is_refused_past_it() -> None:
    s = Scheduler(SchedulerConfig(max_batch=4, max_queued=10))
    flood(s, [svc("a")], 10)
    with pytest.raises(Busy):
        s.offer(svc("b"), 1, 0.0, 30)


def test_given_queued_requests_past_their_deadline_then_the_next_batch_returns_them_expired() -> None:
    s = Scheduler(SchedulerConfig(max_batch=2))
    late = [s.offer(svc("a"), 1, 0.0, timeout_s=1.0) for _ in range(3)]
    ok = s.offer(svc("b"), 1, 5.0, timeout_s=10.0)
    batch, expired = s.next_batch(5.0)
    assert expired == late and batch == [ok]
    assert s.queued == 0 and s.tally[(1, "a", "a")].expired == 3


def test_given_a_cancelled_request_then_it_leaves_the_queue() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8))
    a, b = s.offer(svc("a"), 2, 0.0, 60), s.offer(svc("b"), 1, 0.0, 60)
    s.cancel(a)
    assert s.queued == 1 and s.next_batch(0.0)[0] == [b]
    s.cancel(a)  # twice is harmless
    assert s.queued == 0


def test_given_a_request_larger_than_a_batch_then_it_runs_alone() -> None:
    s = Scheduler(SchedulerConfig(max_batch=4))
    small, big = s.offer(svc("a"), 1, 0.0, 60), s.offer(svc("b"), 6, 0.0, 60)
    assert s.next_batch(0.0)[0] == [small]
    assert s.next_batch(0.0)[0] == [big]


def test_given_many_packages_then_the_snapshot_keeps_the_top_and_sums_the_rest_as_other() -> None:
    s = Scheduler(SchedulerConfig(max_batch=8, max_queued=10_000))
    for i in range(15):
        for _ in range(i + 1):
            s.offer(svc(f"p{i:02d}"), 1, 0.0, 60)
    rows = s.snapshot(top=3)
    assert [r["package"] for r in rows] == [OTHER, "p12", "p13", "p14"]
    assert sum(r["queued"] for r in rows) == s.queued == 120


def test_given_bad_config_then_it_is_refused() -> None:
    with pytest.raises(ValueError, match="fair or fifo"):
        SchedulerConfig(policy="lifo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="queue_s"):
        SchedulerConfig(queue_s=0)


# ---------------------------------------------------------------- the runner around an engine
def frame(w: int, h: int, value: int) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


async def test_given_concurrent_calls_of_mixed_shapes_then_each_gets_what_the_engine_answers_alone() -> None:
    engine = FakeEngine(Path("fake.pt"), imgsz=320, max_batch=4)
    runner = BatchRunner(engine.detect, SchedulerConfig(max_batch=4, batch_wait_s=0.02))
    calls = [
        ([frame(1280, 720, 1), frame(640, 640, 2)], InferenceParams(conf=0.5), svc("a")),
        ([frame(1280, 720, 3)], InferenceParams(conf=0.8), svc("b", level=2)),
        ([frame(100, 700, 4), frame(1280, 720, 5), frame(640, 640, 6)], InferenceParams(conf=0.1), svc("c")),
        ([frame(33, 17, 7)], InferenceParams(max_det=1), svc("a")),
    ]
    replies = await asyncio.gather(*[runner.submit(ims, p, s, 10.0) for ims, p, s in calls])
    for (ims, p, _), reply in zip(calls, replies, strict=True):
        alone = FakeEngine(Path("fake.pt"), imgsz=320).detect(ims, p).detections
        assert reply["detections"] == alone
    # one batch filled to 4 images (b's priority first), then the rest: shapes grouped per pass
    assert sum(n for n, _, _ in engine.passes) == 7
    assert replies[1]["batch_images"] <= 4


async def test_given_a_flood_then_refusals_are_immediate_and_the_engine_keeps_serving() -> None:
    engine = FakeEngine(Path("fake.pt"), imgsz=64, max_batch=2)
    runner = BatchRunner(engine.detect, SchedulerConfig(max_batch=2, max_queued=4, batch_wait_s=0))
    one = InferenceParams()
    tasks = [asyncio.ensure_future(runner.submit([frame(64, 64, i)], one, svc("a"), 10.0)) for i in range(10)]
    done = await asyncio.gather(*tasks, return_exceptions=True)
    busy = [d for d in done if isinstance(d, Busy)]
    served = [d for d in done if isinstance(d, dict)]
    assert busy and served and len(busy) + len(served) == 10


async def test_given_an_engine_failure_then_every_call_of_its_batch_gets_the_error() -> None:
    def broken(images: object, params: object) -> object:
        raise RuntimeError("CUDA error")

    runner = BatchRunner(broken, SchedulerConfig(max_batch=4, batch_wait_s=0.01))  # type: ignore[arg-type]
    out = await asyncio.gather(
        *[runner.submit([frame(8, 8, 0)], InferenceParams(), svc("a"), 10.0) for _ in range(3)],
        return_exceptions=True,
    )
    assert all(isinstance(o, RuntimeError) for o in out)


async def test_given_a_caller_cancelled_while_queued_then_its_call_leaves_the_queue() -> None:
    gate = asyncio.Event()
    engine = FakeEngine(Path("fake.pt"), imgsz=64, max_batch=1)

    def slow(images, params):  # type: ignore[no-untyped-def]
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(5)
        return engine.detect(images, params)

    loop = asyncio.get_running_loop()
    runner = BatchRunner(slow, SchedulerConfig(max_batch=1, batch_wait_s=0))
    first = asyncio.ensure_future(runner.submit([frame(8, 8, 0)], InferenceParams(), svc("a"), 10.0))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(runner.submit([frame(8, 8, 1)], InferenceParams(), svc("a"), 10.0))
    await asyncio.sleep(0.01)
    assert runner.scheduler.queued == 1
    second.cancel()
    await asyncio.sleep(0.01)
    assert runner.scheduler.queued == 0
    gate.set()
    assert (await first)["batch_images"] == 1
