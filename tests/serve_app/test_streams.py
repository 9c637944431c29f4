"""Frame sessions (serve_app/streams.py) with a fake `FrameWork`: no Ray, no sockets, no clock.

Every test orders things with events, never with time: the fake's `held` can be held at a gate per
frame, or made to raise, and it records each frame it saw, how each ended (returned, raised,
cancelled), and every `commit`, `release` and `send` in one event list, so the charging rules are
checked exactly: a frame is committed only once its answer was handed to `send` (an idempotency
key's answer: stored first), and every computed answer that was not sent is released; a frame
still in detection when the session ends is cancelled.
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest

from serve_app.errors import ApiCode, ApiError
from serve_app.ingress_steps import DetectOutcome, Held
from serve_app.streams import FrameIn, FrameOut, FrameSession, SessionTally

LIMIT_S = 10.0  # no test waits on the clock; this only keeps a bug from hanging the suite

Send = Callable[[FrameOut], Awaitable[None]]


@dataclass(frozen=True)
class Settlement:
    """Stands in for the ledger's settlement: only `is not None` matters to the session."""

    seq: int


@dataclass(frozen=True)
class Admission:
    seq: int


@dataclass
class FakeWork:
    """A `FrameWork` whose `held` answers at once unless told otherwise: `gated` frames wait for
    `gate(seq)`; `failing[seq]` is raised (after the gate, if any); `before[seq]` is awaited
    first (a test's own ordering); `stored` frames carry an idempotency key; `late[seq]` is
    what `recheck` returns for that frame's answer."""

    gated: set[int] = field(default_factory=set)
    failing: dict[int, ApiError] = field(default_factory=dict)
    before: dict[int, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    stored: set[int] = field(default_factory=set)
    late: dict[int, ApiError] = field(default_factory=dict)
    events: list[tuple[str, int]] = field(default_factory=list)
    credentials: list[str | None] = field(default_factory=list)
    request_ids: dict[int, str] = field(default_factory=dict)
    entered: list[int] = field(default_factory=list)
    returned: list[int] = field(default_factory=list)
    raised: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    gates: dict[int, asyncio.Event] = field(default_factory=dict)

    def gate_of(self, seq: int) -> asyncio.Event:
        return self.gates.setdefault(seq, asyncio.Event())

    def gate(self, seq: int) -> None:
        self.gate_of(seq).set()

    def open_all(self) -> None:
        for seq in self.gated:
            self.gate(seq)

    async def open(self, credential: str | None) -> None:
        self.credentials.append(credential)

    async def held(self, frame: FrameIn, request_id: str) -> Held:
        seq = frame.seq
        self.entered.append(seq)
        self.request_ids[seq] = request_id
        try:
            if seq in self.before:
                await self.before[seq]()
            if seq in self.gated:
                await self.gate_of(seq).wait()
        except asyncio.CancelledError:
            self.cancelled.append(seq)
            raise
        if seq in self.failing:
            self.raised.append(seq)
            raise self.failing[seq]
        self.returned.append(seq)
        body = {"request_id": request_id, "seq": seq, "images": []}
        return Held(
            DetectOutcome(body),
            success=Settlement(seq),  # type: ignore[arg-type]
            stored=seq in self.stored,
            admission=Admission(seq),  # type: ignore[arg-type]
            decision=None,
        )

    async def commit(self, held: Held) -> None:
        self.events.append(("commit", seq_of(held)))

    def recheck(self, held: Held) -> ApiError | None:
        return self.late.get(seq_of(held))

    def release(self, held: Held) -> None:
        self.events.append(("release", seq_of(held)))

    # what the events say
    def committed(self) -> list[int]:
        return [s for kind, s in self.events if kind == "commit"]

    def released(self) -> list[int]:
        return [s for kind, s in self.events if kind == "release"]

    def sent(self) -> list[int]:
        return [s for kind, s in self.events if kind == "send"]


def seq_of(held: Held) -> int:
    seq = held.outcome.body["seq"]
    assert isinstance(seq, int)
    return seq


@dataclass
class Source:
    """An async frame source that counts the frames it handed out; it may fail after them."""

    seqs: Iterable[int]
    fail: BaseException | None = None
    yielded: int = 0

    async def frames(self) -> AsyncIterator[FrameIn]:
        for seq in self.seqs:
            self.yielded += 1
            yield FrameIn(seq, b"img-%d" % seq)
        if self.fail is not None:
            raise self.fail


class Client:
    """The connection: records each answer (and a "send" event in the work's list) and may block
    on a per-seq gate or raise for a given seq."""

    def __init__(self, work: FakeWork) -> None:
        self.work = work
        self.outs: list[FrameOut] = []
        self.blocked: dict[int, asyncio.Event] = {}
        self.raising: dict[int, BaseException] = {}
        self.sending: dict[int, asyncio.Event] = {}
        self.before_raise: dict[int, Callable[[], Awaitable[None]]] = {}

    def sending_of(self, seq: int) -> asyncio.Event:
        return self.sending.setdefault(seq, asyncio.Event())

    async def send(self, out: FrameOut) -> None:
        self.sending_of(out.seq).set()
        if out.seq in self.blocked:
            await self.blocked[out.seq].wait()
        if out.seq in self.raising:
            if out.seq in self.before_raise:
                await self.before_raise[out.seq]()
            raise self.raising[out.seq]
        self.outs.append(out)
        self.work.events.append(("send", out.seq))

    def by_seq(self) -> dict[int, FrameOut]:
        return {o.seq: o for o in self.outs}


async def until(cond: Callable[[], bool]) -> None:
    """Let the loop run until `cond` holds (bounded: a bug fails the test instead of hanging it)."""

    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0)

    await asyncio.wait_for(poll(), LIMIT_S)


async def settle(rounds: int = 50) -> None:
    """Let every ready callback and task run for a while (what could still happen, happens)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def run_session(session: FrameSession, source: Source, send: Send) -> SessionTally:
    await session.open("Bearer t")
    return await asyncio.wait_for(session.run(source.frames(), send), LIMIT_S)


def start(session: FrameSession, source: Source, send: Send) -> asyncio.Task[SessionTally]:
    return asyncio.ensure_future(session.run(source.frames(), send))


async def finished(task: asyncio.Task[Any]) -> None:
    """Wait for a session's task to end, without its outcome (a CancelledError) reaching the test."""
    done, _ = await asyncio.wait([task], timeout=LIMIT_S)
    assert task in done, "the session did not end"


def each_once_after_send(work: FakeWork, seqs: Iterable[int]) -> None:
    for seq in seqs:
        assert work.committed().count(seq) == 1, f"frame {seq} committed {work.committed().count(seq)} times"
        assert work.events.index(("send", seq)) < work.events.index(("commit", seq)), f"frame {seq}"


# --------------------------------------------------------------------------------------- ordering


async def test_given_later_frames_finishing_first_then_answers_keep_order_and_each_is_committed_once_after_send() -> (
    None
):
    work = FakeWork(gated={0, 1, 2, 3, 4})
    client = Client(work)
    session = FrameSession(work, window=8, unsent=8)
    await session.open("Bearer t")
    assert work.credentials == ["Bearer t"]
    task = start(session, Source(range(5)), client.send)
    await until(lambda: sorted(work.entered) == [0, 1, 2, 3, 4])
    for seq in (4, 3, 2, 1, 0):  # the last frame finishes first
        work.gate(seq)
        await until(partial(operator.contains, work.returned, seq))
        await settle()
        if seq:
            assert client.outs == []  # nothing overtakes frame 0
    await finished(task)
    tally = task.result()

    assert work.returned == [4, 3, 2, 1, 0]
    assert [o.seq for o in client.outs] == [0, 1, 2, 3, 4]
    assert work.committed() == [0, 1, 2, 3, 4]
    each_once_after_send(work, range(5))
    assert work.released() == []
    for out in client.outs:
        assert out.error is None and out.body is not None
        assert out.request_id == work.request_ids[out.seq] == out.body["request_id"]
        assert out.to_json() == {"seq": out.seq, "result": out.body}
    assert (tally.frames, tally.answered, tally.refused, tally.window_refused, tally.released) == (5, 5, {}, 0, 0)
    assert session.ended is None


# ---------------------------------------------------------------------------------- refused frames


async def test_given_a_frame_refused_by_its_steps_then_it_is_answered_with_the_error_and_the_session_goes_on() -> None:
    refusal = ApiError(ApiCode.RATE_LIMITED, "slow down", retry_after=1.25)
    work = FakeWork(failing={1: refusal})
    client = Client(work)
    session = FrameSession(work, window=4, unsent=4)

    tally = await run_session(session, Source(range(3)), client.send)

    assert [o.seq for o in client.outs] == [0, 1, 2]
    out = client.by_seq()[1]
    assert out.error is refusal and out.body is None and not out.ends_session
    assert out.request_id == work.request_ids[1]
    assert out.to_json() == {
        "seq": 1,
        "error": {
            "code": "rate_limited",
            "message": "slow down",
            "request_id": work.request_ids[1],
            "retry_after": 1.25,
        },
    }
    assert work.committed() == [0, 2]
    each_once_after_send(work, [0, 2])
    assert work.released() == []
    assert (tally.answered, tally.refused, tally.released) == (2, {"rate_limited": 1}, 0)
    assert session.ended is None


async def test_given_more_frames_than_the_window_then_the_extra_ones_are_refused_busy_never_detected_nor_charged() -> (
    None
):
    work = FakeWork(gated={0, 1})
    client = Client(work)
    session = FrameSession(work, window=2, unsent=8)
    task = start(session, Source(range(5)), client.send)
    await until(lambda: session.tally.frames == 5 and sorted(work.entered) == [0, 1])
    assert session.tally.window_refused == 3
    work.open_all()
    await finished(task)
    tally = task.result()

    assert [o.seq for o in client.outs] == [0, 1, 2, 3, 4]
    assert sorted(work.entered) == [0, 1]  # frames 2..4 never reached the steps
    for out in client.outs[2:]:
        assert out.error is not None and out.error.code is ApiCode.MODEL_BUSY
        assert out.error.retry_after is not None and out.error.retry_after > 0
        assert not out.ends_session
        assert out.to_json()["error"]["retry_after"] > 0
    assert len({o.request_id for o in client.outs}) == 5
    assert work.committed() == [0, 1]
    each_once_after_send(work, [0, 1])
    assert (tally.frames, tally.answered, tally.window_refused, tally.refused) == (5, 2, 3, {"model_busy": 3})
    assert session.in_flight == 0


async def test_given_window_or_unsent_below_one_then_the_session_is_not_made() -> None:
    with pytest.raises(ValueError):
        FrameSession(FakeWork(), window=0)
    with pytest.raises(ValueError):
        FrameSession(FakeWork(), window=1, unsent=0)


# ----------------------------------------------------------------------------------- flow control


async def test_given_a_client_that_does_not_take_answers_then_the_session_stops_reading_frames_until_it_does() -> None:
    work = FakeWork()
    client = Client(work)
    client.blocked[0] = asyncio.Event()
    window, unsent = 4, 2
    session = FrameSession(work, window=window, unsent=unsent)
    source = Source(range(40))
    task = start(session, source, client.send)
    await until(lambda: client.sending_of(0).is_set())
    await settle(200)  # everything the reader could still do, it does

    # one answer in send, `unsent` queued, one more read and waiting for room: then no more reads
    assert source.yielded <= window + unsent + 2
    held_back = source.yielded
    await settle(200)
    assert source.yielded == held_back
    assert work.committed() == []

    client.blocked[0].set()
    await finished(task)
    tally = task.result()
    assert source.yielded == 40
    assert [o.seq for o in client.outs] == list(range(40))
    assert work.committed() == list(range(40))
    each_once_after_send(work, range(40))
    assert tally.answered == 40 and tally.released == 0


# ------------------------------------------------------------------------------ the client leaves


@pytest.mark.parametrize("hang_up", [ConnectionError("reset by peer"), asyncio.CancelledError()], ids=repr)
async def test_given_send_failing_mid_stream_then_no_unsent_answer_is_charged_and_frames_in_detection_are_cancelled(
    hang_up: BaseException,
) -> None:
    # 0 sent; 1 fails in send; 2 and 5 computed and queued; 3 and 4 still in detection
    work = FakeWork(gated={3, 4})
    client = Client(work)
    client.raising[1] = hang_up
    client.before_raise[1] = lambda: until(
        lambda: sorted(work.entered) == list(range(6)) and {2, 5} <= set(work.returned)
    )
    session = FrameSession(work, window=8, unsent=8)
    task = start(session, Source(range(6)), client.send)
    await finished(task)
    await settle()

    if isinstance(hang_up, asyncio.CancelledError):
        assert task.cancelled()
    else:
        assert isinstance(task.exception(), ConnectionError)
    assert [o.seq for o in client.outs] == [0]
    assert work.committed() == [0]
    assert sorted(work.released()) == [1, 2, 5]
    assert sorted(work.cancelled) == [3, 4]
    assert session.tally.released == 3
    assert session.tally.answered == 1
    assert session.in_flight == 0


@pytest.mark.parametrize("where", ["in send", "awaiting detection"])
async def test_given_the_session_task_cancelled_mid_stream_then_nothing_unsent_is_charged(where: str) -> None:
    # 0 sent; then either 1's answer is in a send that never returns, or frame 1 is in detection;
    # 2 computed and queued; 3 still in detection
    work = FakeWork(gated={3} | ({1} if where == "awaiting detection" else set()))
    client = Client(work)
    if where == "in send":
        client.blocked[1] = asyncio.Event()  # never set
    session = FrameSession(work, window=8, unsent=8)
    task = start(session, Source(range(4)), client.send)
    await until(lambda: sorted(work.entered) == [0, 1, 2, 3] and 2 in work.returned and client.outs != [])
    if where == "in send":
        await until(lambda: client.sending_of(1).is_set())
    else:
        await settle()
    task.cancel()
    await finished(task)
    await settle()

    assert task.cancelled()
    assert [o.seq for o in client.outs] == [0]
    assert work.committed() == [0]
    if where == "in send":
        assert sorted(work.released()) == [1, 2]
        assert work.cancelled == [3]
        assert session.tally.released == 2
    else:
        assert work.released() == [2]
        assert sorted(work.cancelled) == [1, 3]
        assert session.tally.released == 1
    assert session.in_flight == 0


@pytest.mark.parametrize("frame_2", ["in detection", "computed"])
async def test_given_a_hang_up_while_reading_is_held_back_then_no_frame_is_left_running_or_unreleased(
    frame_2: str,
) -> None:
    # unsent=1: frame 0's answer is in send, frame 1 queued (in detection), frame 2 read and its
    # task made, the reader waiting for room in the queue when the client leaves
    work = FakeWork(gated={1, 2} if frame_2 == "in detection" else {1})
    client = Client(work)
    client.raising[0] = ConnectionError("reset by peer")
    if frame_2 == "in detection":
        client.before_raise[0] = lambda: until(lambda: sorted(work.entered) == [0, 1, 2])
    else:
        client.before_raise[0] = lambda: until(lambda: 2 in work.returned)
    session = FrameSession(work, window=8, unsent=1)
    task = start(session, Source(range(4)), client.send)
    await finished(task)
    await settle()

    assert isinstance(task.exception(), ConnectionError)
    assert work.committed() == []
    try:
        # every frame that reached the steps ends charged, given back, or cancelled
        if frame_2 == "in detection":
            assert work.released() == [0]
            assert sorted(work.cancelled) == [1, 2], (
                f"frames in detection when the client left: cancelled {sorted(work.cancelled)}, "
                f"still running {sorted(set(work.entered) - set(work.cancelled) - set(work.returned))}"
            )
            assert session.tally.released == 1
        else:
            assert work.cancelled == [1]
            assert sorted(work.released()) == [0, 2], "frame 2's computed answer was neither sent nor given back"
            assert session.tally.released == 2
    finally:
        work.open_all()  # what still waits (a bug) finishes
        await settle()
    assert set(work.entered) <= set(work.committed()) | set(work.released()) | set(work.cancelled)


# ------------------------------------------------------------------------------ the credential fails


async def test_given_a_revoked_credential_at_frame_k_then_its_answer_ends_the_session_and_later_are_given_back() -> (
    None
):
    revoked = ApiError(ApiCode.REVOKED_TOKEN, "this token was revoked")
    work = FakeWork(gated={5}, failing={2: revoked})
    work.before[2] = lambda: until(lambda: {3, 4} <= set(work.returned))
    client = Client(work)
    session = FrameSession(work, window=8, unsent=8)

    tally = await run_session(session, Source(range(6)), client.send)

    assert [o.seq for o in client.outs] == [0, 1, 2]
    last = client.outs[-1]
    assert last.error is revoked and last.ends_session
    assert last.to_json()["error"]["code"] == "revoked_token"
    assert session.ended is revoked
    assert work.committed() == [0, 1]
    each_once_after_send(work, [0, 1])
    assert sorted(work.released()) == [3, 4]
    assert work.cancelled == [5]
    assert (tally.answered, tally.refused, tally.released) == (2, {"revoked_token": 1}, 2)
    assert session.in_flight == 0


async def test_given_a_token_revoked_during_detection_then_the_answer_is_released_and_the_refusal_sent() -> None:
    revoked = ApiError(ApiCode.REVOKED_TOKEN, "this token was revoked")
    work = FakeWork(late={1: revoked})
    work.before[1] = lambda: until(lambda: {2, 3} <= set(work.returned))
    client = Client(work)
    session = FrameSession(work, window=8, unsent=8)

    tally = await run_session(session, Source(range(4)), client.send)

    assert [o.seq for o in client.outs] == [0, 1]
    out = client.outs[1]
    assert out.error is revoked and out.body is None and out.ends_session
    assert out.request_id == work.request_ids[1]
    assert session.ended is revoked
    assert work.committed() == [0]
    assert sorted(work.released()) == [1, 2, 3]
    assert work.events.index(("release", 1)) < work.events.index(("send", 1))
    assert (tally.answered, tally.refused, tally.released) == (1, {"revoked_token": 1}, 3)


async def test_given_a_recheck_refusal_that_does_not_end_the_session_then_that_answer_is_released_and_it_goes_on() -> (
    None
):
    late = ApiError(ApiCode.QUOTA_EXHAUSTED, "no units left")
    work = FakeWork(late={1: late})
    client = Client(work)
    session = FrameSession(work, window=8, unsent=8)

    tally = await run_session(session, Source(range(3)), client.send)

    assert [o.seq for o in client.outs] == [0, 1, 2]
    assert client.outs[1].error is late and not client.outs[1].ends_session
    assert work.committed() == [0, 2]
    assert work.released() == [1]
    assert session.ended is None
    assert (tally.answered, tally.refused, tally.released) == (2, {"quota_exhausted": 1}, 1)


# ---------------------------------------------------------------------------------- idempotency


async def test_given_a_stored_answer_then_it_is_committed_before_it_is_sent_and_others_after() -> None:
    work = FakeWork(stored={0})
    client = Client(work)
    session = FrameSession(work, window=8, unsent=8)

    await run_session(session, Source(range(2)), client.send)

    assert work.events == [("commit", 0), ("send", 0), ("send", 1), ("commit", 1)]


# ------------------------------------------------------------------------------ the source fails


async def test_given_the_frame_source_failing_then_the_frames_read_are_answered_and_run_raises_its_error() -> None:
    work = FakeWork()
    client = Client(work)
    session = FrameSession(work, window=8, unsent=8)
    source = Source(range(3), fail=RuntimeError("camera gone"))

    with pytest.raises(RuntimeError, match="camera gone"):
        await run_session(session, source, client.send)

    assert [o.seq for o in client.outs] == [0, 1, 2]
    assert work.committed() == [0, 1, 2]
    each_once_after_send(work, range(3))
    assert work.released() == []
    assert session.tally.answered == 3


# ------------------------------------------------------------------ the per-session coalescer
async def test_given_frames_admitted_while_a_call_is_in_flight_then_they_go_to_the_detector_together() -> None:
    from serve_app.config import DEMO_WEIGHTS, ModelSpec
    from serve_app.results import InferenceParams
    from serve_app.streams import Coalescer

    spec = ModelSpec(name="m", weights=DEMO_WEIGHTS)
    calls: list[list[str]] = []
    gate = asyncio.Event()

    async def infer(spec: Any, pixels: list[Any], params: Any, service: Any) -> dict[str, Any]:
        calls.append(list(pixels))
        if len(calls) == 1:
            await gate.wait()
        return {"detections": [[p] for p in pixels], "gpu_ms": 10.0 * len(pixels)}

    co = Coalescer(infer, max_images=3)
    params = InferenceParams()
    first = asyncio.ensure_future(co(spec, ["a"], params, None))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(co(spec, [x], params, None)) for x in "bcde"]
    await asyncio.sleep(0)
    rest[1].cancel()  # a frame whose session ended while it waited: never sent
    gate.set()
    got = await asyncio.wait_for(asyncio.gather(first, *rest, return_exceptions=True), 10)
    assert calls == [["a"], ["b", "d", "e"]]  # one call in flight; then the waiting frames, at most 3 images
    assert got[0] == {"detections": [["a"]], "gpu_ms": 10.0}
    assert got[1]["detections"] == [["b"]] and got[1]["gpu_ms"] == 10.0
    assert isinstance(got[2], asyncio.CancelledError)
    assert [g["detections"] for g in got[3:]] == [[["d"]], [["e"]]]
    assert co.calls == 2


async def test_given_a_coalesced_call_that_fails_or_is_refused_then_each_frame_gets_it() -> None:
    from serve_app.config import DEMO_WEIGHTS, ModelSpec
    from serve_app.results import InferenceParams
    from serve_app.streams import Coalescer

    spec = ModelSpec(name="m", weights=DEMO_WEIGHTS)
    busy = {"refused": "model_busy", "message": "full", "retry_after": 1.0}
    replies: list[Any] = [TimeoutError("slow"), busy, busy]

    async def infer(spec: Any, pixels: list[Any], params: Any, service: Any) -> dict[str, Any]:
        await asyncio.sleep(0)
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    co = Coalescer(infer)
    params = InferenceParams()
    failed = await asyncio.gather(co(spec, [1], params, None), return_exceptions=True)
    assert isinstance(failed[0], TimeoutError)
    refused = await asyncio.wait_for(
        asyncio.gather(co(spec, [1], params, None), co(spec, [2], params, None), co(spec, [3], params, None)), 10
    )
    assert [r["refused"] for r in refused] == ["model_busy"] * 3
    assert co.calls == 3 and not replies  # the first alone, then the two that waited, together
