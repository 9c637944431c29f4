"""Frame streams (DESIGN §5): one session carries many frames, each admitted, detected, charged and
answered (or refused) on its own, in the order sent. Transport-free: the gRPC `DetectStream` and the
WebSocket route `/v1/detect/stream` of the ingress both run a `FrameSession`.

    frames ─► reader ─┬─ window full? ─► refused at once: model_busy (never admitted, never charged)
                      └─ a task per frame: verify (cached) · decode · admit · detect  ─► Held answer
    answers, in order ─► send ─► commit (charged only once handed to the connection)

* **The credential** is verified once when the session opens (a failure ends it before any frame).
  Every frame is then admitted by the same steps as an HTTP request, so the token's policy is
  checked per frame (revocation, expiry, narrowing, quota, rate: DESIGN §3a).
* **Back-pressure, both ways bounded.** At most `window` frames of a session are in detection at
  once; a frame beyond them is answered at once as `model_busy` with a `retry_after` (a camera
  drops frames, not its connection). At most `unsent` answers wait for a slow client; past that the
  session stops reading frames, so the transport's flow control slows the client down.
* **Accounting.** Each frame is one request to the ledger: one usage row and one audit row, like
  an HTTP request, so `report costs`, alerts and the console need nothing new. A frame's units are
  committed only after its answer was handed to the connection; if the client hangs up, frames
  in detection are cancelled and answers not yet sent are given back: exactly the answered frames
  are charged.
* **Revocation** reaches a session within DESIGN §3a's bound: each answer is re-checked against
  the token's cached policy just before it is sent, and one whose token was revoked or expired
  meanwhile is not sent but given back, its frame answered with the refusal.
* **Errors.** A refused frame is answered with its code and the session goes on, except for the
  credential's own failures (revoked, expired, invalid: `ENDS_SESSION`): that frame's answer says
  why and the session ends with that error.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve_app.config import ModelSpec
from serve_app.errors import ApiCode, ApiError
from serve_app.ingress_steps import DetectCall, Held, Infer, IngressSteps, new_request_id
from serve_app.results import InferenceParams

# the credential's own failures: no later frame of the session could be admitted
ENDS_SESSION = frozenset({ApiCode.MISSING_TOKEN, ApiCode.INVALID_TOKEN, ApiCode.EXPIRED_TOKEN, ApiCode.REVOKED_TOKEN})
MIN_RETRY_AFTER_S = 0.01
DEFAULT_PARAMS = InferenceParams()


@dataclass(frozen=True, slots=True)
class FrameIn:
    seq: int
    image: bytes
    model: str | None = None
    params: InferenceParams = DEFAULT_PARAMS
    idempotency_key: str | None = None


@dataclass(slots=True)
class FrameOut:
    """One frame's answer: `body` (the HTTP result body) or `error`."""

    seq: int
    request_id: str
    body: dict[str, Any] | None = None
    error: ApiError | None = None

    @property
    def ends_session(self) -> bool:
        return self.error is not None and self.error.code in ENDS_SESSION

    def to_json(self) -> dict[str, Any]:
        if self.body is not None:
            return {"seq": self.seq, "result": self.body}
        assert self.error is not None
        err: dict[str, Any] = self.error.body(self.request_id)["error"]
        if self.error.retry_after is not None:
            err["retry_after"] = round(self.error.retry_after, 3)
        return {"seq": self.seq, "error": err}


@dataclass(frozen=True, slots=True)
class Computed:
    """A frame's answer, computed and not yet sent nor charged."""

    seq: int
    held: Held


class FrameWork(Protocol):
    """What a session does with a frame: the metered steps (`MeteredFrames`), or in the benchmarks
    the same hops unmetered."""

    async def open(self, credential: str | None) -> None: ...

    async def held(self, frame: FrameIn, request_id: str) -> Held: ...

    async def commit(self, held: Held) -> None: ...

    def recheck(self, held: Held) -> ApiError | None: ...

    def release(self, held: Held) -> None: ...


class Coalescer:
    """A session's frames go to the detector together: the first frame goes at once, and the frames
    admitted while a detector call is in flight go in the next call, as one request of several images
    (at most `max_images`; the same model version, parameters and tenant), each frame getting its own
    images' detections and its share of the forward time. One call in flight per session: a Ray call
    per batch of frames instead of per frame, which is most of a frame's serving cost (issue 22's
    stream benchmark). A failure or a refusal of the call is each of its frames' own."""

    def __init__(self, infer: Infer, max_images: int = 16) -> None:
        self.infer = infer
        self.max_images = max(1, max_images)
        self.pending: list[tuple[tuple[Any, ...], ModelSpec, list[Any], InferenceParams, Any, asyncio.Future[Any]]] = []
        self.pump: asyncio.Future[None] | None = None
        self.busy = False  # a detector call of this session is in flight
        self.calls = 0  # detector calls made (the benchmark's and the tests' view)

    async def __call__(
        self, spec: ModelSpec, pixels: list[Any], params: InferenceParams, service: Any
    ) -> dict[str, Any]:
        if not self.busy:  # nothing in flight: this frame goes at once, from its own task
            self.busy = True
            self.calls += 1
            try:
                return await self.infer(spec, pixels, params, service)
            finally:
                self.busy = False
                if self.pending:
                    self.pump = asyncio.ensure_future(self._pump())
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending.append(((spec.key, params, service), spec, pixels, params, service, fut))
        return await fut  # cancelled: the call goes on for the others (the steps refund this frame)

    async def _pump(self) -> None:
        self.busy = True
        try:
            await self._send_pending()
        finally:
            self.busy = False

    async def _send_pending(self) -> None:
        while self.pending:
            key = self.pending[0][0]
            group: list[Any] = []
            rest: list[Any] = []
            n = 0
            for item in self.pending:
                if (item[0] == key and not item[5].done() and n + len(item[2]) <= self.max_images) or not group:
                    group.append(item)
                    n += len(item[2])
                elif not item[5].done():
                    rest.append(item)
            self.pending = rest
            group = [g for g in group if not g[5].done()]  # frames cancelled while they waited
            if not group:
                continue
            _, spec, _, params, service, _ = group[0]
            self.calls += 1
            try:
                result = await self.infer(spec, [p for g in group for p in g[2]], params, service)
            except BaseException as exc:
                for g in group:
                    if not g[5].done():
                        g[5].set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
                if not isinstance(exc, Exception):
                    raise
                continue
            for g, part in zip(group, _split(result, [len(g[2]) for g in group]), strict=True):
                if not g[5].done():
                    g[5].set_result(part)


def _split(result: dict[str, Any], counts: list[int]) -> list[dict[str, Any]]:
    """One detector reply over several frames' images, as each frame's own reply."""
    if "refused" in result:
        return [result] * len(counts)
    total = sum(counts) or 1
    out, i = [], 0
    for c in counts:
        out.append(
            {**result, "detections": result["detections"][i : i + c], "gpu_ms": float(result["gpu_ms"]) * c / total}
        )
        i += c
    return out


class MeteredFrames:
    """Frames through the ingress's own steps: verified, priced, admitted and settled as requests;
    their detector calls coalesced (`Coalescer`)."""

    def __init__(self, steps: IngressSteps, client_ip: str | None) -> None:
        self.steps = steps
        self.client_ip = client_ip
        self.credential: str | None = None
        self.coalescer = Coalescer(steps.infer, steps.args.limits.max_images)

    async def open(self, credential: str | None) -> None:
        await self.steps.verify(credential)
        self.credential = credential

    async def held(self, frame: FrameIn, request_id: str) -> Held:
        call = DetectCall(
            request_id,
            self.credential,
            [frame.image],
            frame.model,
            frame.params,
            self.client_ip,
            frame.idempotency_key,
        )
        return await self.steps.detect_held(call, self.coalescer)

    async def commit(self, held: Held) -> None:
        await self.steps.commit(held)

    def recheck(self, held: Held) -> ApiError | None:
        return self.steps.recheck(held)

    def release(self, held: Held) -> None:
        self.steps.release(held)


@dataclass(slots=True)
class SessionTally:
    frames: int = 0
    answered: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    window_refused: int = 0
    released: int = 0  # answers computed but never sent (the client left): given back


class FrameSession:
    """One stream. `run(frames, send)` reads frames, answers each through `send` in order, and
    returns when the frames end (after the last answer), the session ends on a credential failure,
    or `send` raises (the client left); cancelling `run` also ends it. Units are never charged for
    an answer `send` did not take."""

    def __init__(self, work: FrameWork, window: int = 8, unsent: int = 32) -> None:
        if window < 1 or unsent < 1:
            raise ValueError("window and unsent must be at least 1")
        self.work = work
        self.window = window
        self.unsent = unsent
        self.tally = SessionTally()
        self.in_flight = 0
        self.frame_s = 0.05  # recent time a frame takes, for a refused frame's retry_after
        self.ended: ApiError | None = None  # the error that ended the session, if one did
        self.unqueued: list[asyncio.Future[Any]] = []  # a frame's task the reader could not queue

    async def open(self, credential: str | None) -> None:
        """Verify the session's credential (ApiError: the session does not start)."""
        await self.work.open(credential)

    async def run(self, frames: AsyncIterator[FrameIn], send: Callable[[FrameOut], Awaitable[None]]) -> SessionTally:
        answers: asyncio.Queue[asyncio.Future[Computed | FrameOut] | None] = asyncio.Queue(self.unsent)
        reader = asyncio.ensure_future(self._read(frames, answers))
        try:
            await self._write(answers, send)
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            await self._give_back(answers)
        if not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()  # type: ignore[misc]  # the frames' source failed (not the client leaving)
        return self.tally

    async def _read(self, frames: AsyncIterator[FrameIn], answers: asyncio.Queue[Any]) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for frame in frames:
                self.tally.frames += 1
                if self.in_flight >= self.window:
                    refused: asyncio.Future[Computed | FrameOut] = loop.create_future()
                    refused.set_result(self._busy(frame))
                    self.tally.window_refused += 1
                    await answers.put(refused)  # blocks while `unsent` answers wait: flow control
                    continue
                self.in_flight += 1
                task = asyncio.ensure_future(self._frame(frame))
                task.add_done_callback(self._done)
                try:
                    await answers.put(task)  # blocks while `unsent` answers wait: flow control
                except BaseException:
                    self.unqueued.append(task)  # the session ended meanwhile: given back with the queued ones
                    raise
        except Exception:
            await answers.put(None)  # the frames' source failed: answer what was read, then end
            raise
        # no more frames: the writer ends after the answers queued before this (the writer keeps
        # taking answers while it runs; if it stopped, this task is cancelled)
        await answers.put(None)

    def _done(self, _task: asyncio.Future[Any]) -> None:
        self.in_flight -= 1

    def _busy(self, frame: FrameIn) -> FrameOut:
        wait = max(MIN_RETRY_AFTER_S, self.frame_s)
        err = ApiError(
            ApiCode.MODEL_BUSY,
            f"{self.window} frames of this stream are in detection already; this frame was dropped, "
            "nothing was charged",
            retry_after=wait,
        )
        return FrameOut(frame.seq, new_request_id(), error=err)

    async def _frame(self, frame: FrameIn) -> Computed | FrameOut:
        rid = new_request_id()
        t0 = time.perf_counter()
        try:
            held = await self.work.held(frame, rid)
        except ApiError as exc:
            return FrameOut(frame.seq, rid, error=exc)
        self.frame_s += 0.2 * ((time.perf_counter() - t0) - self.frame_s)
        return Computed(frame.seq, held)

    async def _write(self, answers: asyncio.Queue[Any], send: Callable[[FrameOut], Awaitable[None]]) -> None:
        while True:
            item = await answers.get()
            if item is None:
                return
            got = await item
            if isinstance(got, FrameOut):
                await send(got)
                self._count(got)
                if got.ends_session:
                    self.ended = got.error
                    return
                continue
            held = got.held
            out = FrameOut(got.seq, str(held.outcome.body.get("request_id", "")), held.outcome.body)
            late = self.work.recheck(held)
            if late is not None:
                # revoked (or expired) while this frame was in detection: not served, not charged
                self.work.release(held)
                self.tally.released += 1
                out = FrameOut(got.seq, out.request_id, error=late)
                await send(out)
                self._count(out)
                if out.ends_session:
                    self.ended = late
                    return
                continue
            if held.stored:
                await self.work.commit(held)  # an idempotency key's answer is stored before it is sent
                await send(out)
            else:
                try:
                    await send(out)
                except BaseException:
                    self.work.release(held)
                    self.tally.released += 1
                    raise
                await self.work.commit(held)
            self._count(out)

    def _count(self, out: FrameOut) -> None:
        if out.error is None:
            self.tally.answered += 1
        else:
            code = str(out.error.code)
            self.tally.refused[code] = self.tally.refused.get(code, 0) + 1

    async def _give_back(self, answers: asyncio.Queue[Any]) -> None:
        """The session ended with answers not sent: frames still in detection are cancelled (the
        steps refund them) and computed answers are released."""
        pending, self.unqueued = list(self.unqueued), []
        while not answers.empty():
            item = answers.get_nowait()
            if item is not None:
                pending.append(item)
        for p in pending:
            p.cancel()
        for p in pending:
            with contextlib.suppress(BaseException):
                got = await p
                if isinstance(got, Computed) and got.held.success is not None:
                    self.work.release(got.held)
                    self.tally.released += 1
