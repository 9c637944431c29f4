"""Ingress: the token-check deployment (DESIGN §1) — the FastAPI routes of DESIGN §5 and the handle API.

Every replica verifies credentials, decodes images, admits from its own quota leases (a
`LeaseHolder`, no ledger round trip on the hot path) and sends admitted images straight to the
model version's Detector replicas. Replicas autoscale; no single replica sees every request.
Routes stay thin: they parse the transport and call `IngressSteps`. Every failure leaves
through the one error table.

A handle call reaches `detect` and `stats` only (`__surface__`, enforced by serve_app.surface):
never `__del__`, `__init__`, a private helper or a route method with a request the caller built.
"""

# No `from __future__ import annotations` here: FastAPI resolves route annotations at runtime,
# and the methods Serve rebinds for @serve.ingress no longer see this module's globals.

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import time
import uuid
from dataclasses import asdict
from typing import Any, TypeVar

import ray
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.context import _get_serve_request_context

from ledger import Capability, Decision, LeaseHolder, LedgerSettings, OperationRefused, TokenSpec, attach, ops
from serve_app import grpc_api, proxy_hooks, surface
from serve_app.catalog import placement_problem
from serve_app.config import AppArgs
from serve_app.errors import ApiCode, ApiError, QuietDenials
from serve_app.http import client_ip, forwarded_client, images_from_body, plain, read_body
from serve_app.ingress_steps import DetectCall, IngressSteps, check_idempotency_key, check_params, new_request_id
from serve_app.metering import Meter
from serve_app.metrics import IngressMetrics, TeamLabels
from serve_app.proto.yolo_tokens.v1 import detect_pb2 as pb
from serve_app.results import InferenceParams
from serve_app.streams import FrameIn, FrameOut, FrameSession, MeteredFrames

_SERVE_ID = re.compile(r"[\x21-\x7e]{1,64}")  # fits the ledger's request_id column (fullmatch)
ADMIN_BODY_LIMIT = 1 << 20  # an admin call's JSON arguments (a token spec at most)
log = logging.getLogger(__name__)
R = TypeVar("R")

api = FastAPI(title="yolo-tokens", version="1", description="YOLO detection paid from token packages.")


class SplitBody(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    quota: int = Field(ge=1)
    expires_in_s: float | None = Field(None, gt=0)
    models: list[str] | None = None
    ips: list[str] | None = None
    rate: str | None = None
    team: str | None = None


class ReclaimBody(BaseModel):
    units: int | None = Field(None, ge=1)


async def _ws_close(websocket: WebSocket, exc: ApiError, final: bool = True) -> None:
    """End a WebSocket session on an error: a last `{"error": ...}` message, then close 1008 with the code."""
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        if final:
            await websocket.send_text(json.dumps(exc.body("")))
        await websocket.close(code=1008, reason=str(exc.code))


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    rid = getattr(request.state, "request_id", "")
    headers: dict[str, str] = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(math.ceil(exc.retry_after))  # whole seconds (RFC 9110), never early
    headers.update(exc.headers)
    return JSONResponse(exc.body(rid), status_code=exc.status, headers=headers)


# async: it awaits detectors, so many requests may be in flight per replica (default 5)
@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    # what a handle call may name (DESIGN §5, docs/SECURITY.md); HTTP from Serve's proxy reaches the routes
    __surface__ = surface.Surface(
        handle=frozenset({"detect", "stats"}), grpc=frozenset({"Detect", "Models", "DetectStream"})
    )

    def __init__(
        self, settings: LedgerSettings, detectors: dict[str, Any], args: AppArgs, capability: Capability
    ) -> None:
        surface.install()  # before any request can reach this replica
        self.args = args
        self.trusted = [ipaddress.ip_network(p, strict=False) for p in args.limits.trusted_proxies]
        # the app builder launched the ledger; replicas only attach, with the capability it gave them
        self.ledger = attach(settings, capability=capability)
        self.metrics = IngressMetrics()
        self.teams = TeamLabels()
        holder_id = f"{serve.get_replica_context().replica_id.unique_id}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.holder = LeaseHolder(self.ledger, holder_id, args.ledger.lease_holder, on_admit=self._admitted)
        # no keys yet: the first credential fetches them
        self.steps = IngressSteps(
            args, self.ledger, Meter(self.holder), detectors, detector_key=capability.derive(surface.DETECTOR_KEY)
        )
        self.gauges: asyncio.Task[None] | None = None
        self.mark = proxy_hooks.MarkSecret()
        self.warned_unmarked = False
        self._status: tuple[float, dict[str, dict[str, Any]]] = (float("-inf"), {})
        QuietDenials.install()  # a denial over a handle is a warning line, not a traceback

    async def __del__(self) -> None:
        """Serve's graceful shutdown: report and release this replica's leases (a replica that
        dies without this loses them: the ledger settles them after their TTL)."""
        if self.gauges is not None:
            self.gauges.cancel()
        await self.holder.close()

    def _model_tag(self, requested: str | None) -> str:
        """A catalog key, never the caller's text: a metric tag must not grow a series per typo."""
        try:
            return self.steps.resolve_model(requested).key
        except ApiError:
            return "unknown"

    def _start_gauges(self) -> None:
        if self.gauges is None:
            self.gauges = asyncio.get_running_loop().create_task(self._gauge_loop())

    async def _gauge_loop(self) -> None:
        """Leases held and report lag, every second (and Ray's gauges kept alive)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                self.metrics.leases(*self.holder.outstanding())
                self.metrics.report_lag(self.holder.report_lag())
                self.metrics.refresh()
                await self.teams.resolve(self._package_tree)
            except Exception:  # metrics must never take the replica down
                log.exception("ingress gauges failed")

    async def _package_tree(self, package: str) -> Any:
        return await self.ledger.acall(ops.Tokens(package))

    def _admitted(self, decision: Decision, model: str, package: str, local: bool) -> None:
        team = self.teams.label(decision.token_id, package)
        self.metrics.admission(decision.code.value, model, package, local, team)
        if decision.admitted:
            self.metrics.units_used(decision.units, model, package, team)

    def stats(self) -> dict[str, Any]:
        """This replica's lease holder: admissions by path, leases, report lag (operators, tests,
        benchmarks). Read-only counters: part of the handle API."""
        leases, units = self.holder.outstanding()
        return {
            "holder": self.holder.holder_id,
            "closed": self.holder.closed,
            **asdict(self.holder.stats),
            "leases": leases,
            "units": units,
            "report_lag_s": self.holder.report_lag(),
            "pid": os.getpid(),
        }

    # ------------------------------------------------------------ helpers
    def _request_id(self, request: Request) -> str:
        """Serve's id of this HTTP request, which Ray keeps when it redelivers the request to
        another replica: the ledger charges a request id once. Used only when the proxy middleware
        (serve_app/proxy_hooks.py) marked the request, i.e. Ray and not the client chose the id."""
        if self.mark.matches(request.headers.get(proxy_hooks.MARK.decode())):
            rid = _get_serve_request_context().request_id
            if rid and _SERVE_ID.fullmatch(rid):
                return rid
        elif not self.warned_unmarked:
            self.warned_unmarked = True
            log.warning(
                "requests arrive without the proxy middleware's mark (set %s=%s for every Ray "
                "process): request ids are drawn per call, so a request Ray redelivers is charged again",
                proxy_hooks.CALLBACK_VAR,
                proxy_hooks.CALLBACK,
            )
        return new_request_id()

    def _start(self, request: Request) -> str:
        rid = self._request_id(request)
        request.state.request_id = rid
        return rid

    async def _claims(self, request: Request, typ: str = "access") -> Any:
        return await self.steps.verify(request.headers.get("authorization"), typ)

    async def _ledger(self, op: ops.Call[R], request: Request) -> R:
        """A ledger operation on behalf of the calling token (its id AND current credential id)."""
        return await self.steps.token_call(request.headers.get("authorization"), op)

    async def _model_status(self) -> dict[str, dict[str, Any]]:
        """Per model version: Serve's deployment status and replicas, and whether any node of the
        cluster can hold a replica at all (a version that cannot be scheduled says why)."""
        now = time.monotonic()
        if now - self._status[0] < 2.0:
            return self._status[1]
        try:
            status, nodes = await asyncio.gather(asyncio.to_thread(serve.status), asyncio.to_thread(ray.nodes))
        except Exception as exc:  # the controller restarting: report what we know
            log.warning("serve status unavailable: %r", exc)
            return {}
        capacity = [dict(n.get("Resources") or {}) for n in nodes if n.get("Alive")]
        deployments = {}
        for app in status.applications.values():
            deployments.update(app.deployments)
        out: dict[str, dict[str, Any]] = {}
        for m in self.steps.catalog.specs:
            dep = deployments.get(m.deployment_name)
            problem = placement_problem({"CPU": m.num_cpus, "GPU": m.num_gpus}, capacity)
            out[m.key] = {
                "status": "unschedulable" if problem else (str(dep.status.value) if dep else "unknown"),
                "replicas": dict(dep.replica_states) if dep else {},
                "message": problem or (dep.message if dep else ""),
            }
        self._status = (now, out)
        return out

    # ------------------------------------------------------------ routes
    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/v1/detect")
    async def detect_http(
        self, request: Request, model: str | None = None, conf: float = 0.25, iou: float = 0.7, max_det: int = 300
    ) -> JSONResponse:
        t0 = time.perf_counter()
        self._start_gauges()
        status = 500
        try:
            response = await self._detect_http(request, model, conf, iou, max_det)
            status = response.status_code
            return response
        except ApiError as exc:
            status = exc.status
            raise
        finally:
            self.metrics.request(time.perf_counter() - t0, self._model_tag(model), status)

    async def _detect_http(
        self, request: Request, model: str | None, conf: float, iou: float, max_det: int
    ) -> JSONResponse:
        rid = self._start(request)
        check_params(InferenceParams(conf, iou, max_det))
        idem = request.headers.get("idempotency-key")
        check_idempotency_key(idem)
        credential = request.headers.get("authorization")
        await self.steps.verify(credential)  # 401 before reading a byte of the body
        body = await read_body(request, self.args.limits.max_body_bytes)
        call = DetectCall(
            rid,
            credential,
            images_from_body(request.headers.get("content-type", ""), body, self.args.limits.max_images),
            model,
            InferenceParams(conf, iou, max_det),
            client_ip(request, self.trusted),
            idem,
        )
        out = await self.steps.detect(call)
        return JSONResponse(out.body, headers=out.headers)

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._start(request)
        await self._claims(request)
        return self.steps.catalog.listing(await self._model_status())

    @api.get("/v1/usage")
    async def usage(self, request: Request, limit: int = 100) -> dict[str, Any]:
        self._start(request)
        tree = await self._ledger(ops.Tokens(), request)
        events = await self._ledger(ops.Usage(limit=max(1, min(limit, 1000))), request)
        return {"tokens": [plain(t) for t in tree], "events": events}

    @api.get("/v1/tokens/{token_id}")
    async def token(self, request: Request, token_id: str) -> dict[str, Any]:
        self._start(request)
        return plain(await self._ledger(ops.Token(token_id), request))

    @api.post("/v1/tokens", status_code=201)
    async def split(self, request: Request, body: SplitBody) -> dict[str, Any]:
        self._start(request)
        claims = await self._claims(request)
        try:
            spec = TokenSpec.build(
                body.name,
                body.quota,
                models=body.models,
                ips=body.ips,
                rate=body.rate,
                team=body.team,
                expires_at=time.time() + body.expires_in_s if body.expires_in_s else None,
            )
        except OperationRefused as exc:
            raise ApiError.from_code(exc.code, exc.message) from None
        out = await self._ledger(ops.Split(claims.sub, spec), request)
        return {"token": plain(out.token), "credential": out.credential}

    @api.post("/v1/tokens/{token_id}/revoke")
    async def revoke(self, request: Request, token_id: str) -> dict[str, Any]:
        self._start(request)
        out = await self._ledger(ops.Revoke(token_id), request)
        return {"returned": out.returned, "token": plain(out.token)}

    @api.post("/v1/tokens/{token_id}/reclaim")
    async def reclaim(self, request: Request, token_id: str, body: ReclaimBody | None = None) -> dict[str, Any]:
        self._start(request)
        out = await self._ledger(ops.Reclaim(token_id, body.units if body else None), request)
        return {"returned": out.returned, "token": plain(out.token)}

    @api.post("/v1/tokens/{token_id}/rotate")
    async def rotate(self, request: Request, token_id: str) -> dict[str, Any]:
        self._start(request)
        out = await self._ledger(ops.Rotate(token_id), request)
        return {"token": plain(out.token), "credential": out.credential}

    @api.post("/v1/admin/ops/{op}", include_in_schema=False)
    async def admin_op(self, request: Request, op: str) -> dict[str, Any]:
        """A ledger operation for an admin credential (the CLI: ledger/client/over_http.py)."""
        self._start(request)
        credential = request.headers.get("authorization")
        await self.steps.verify(credential, "admin")  # 401/403 before reading the body
        raw = await read_body(request, ADMIN_BODY_LIMIT)
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError(ApiCode.INVALID_REQUEST, "body is not valid JSON") from None
        return await self.steps.admin_call(credential, op, body)

    # ------------------------------------------------------------ frame stream over WebSocket
    @api.websocket("/v1/detect/stream")
    async def detect_stream_ws(
        self,
        websocket: WebSocket,
        model: str | None = None,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
    ) -> None:
        """A frame stream for browsers and simple clients (docs in README): the credential in the
        `Authorization` header or, where a client cannot set one (a browser), as the first text
        message `{"authorization": "Bearer ..."}`; then every binary message is one frame (an
        encoded image), numbered from 0, answered by a text message `{"seq", "result"}` or
        `{"seq", "error": {code, message, request_id, retry_after}}`, in order. A session that cannot
        start, or whose credential fails mid-stream, ends with close code 1008 and the error's code
        as the reason, after a last `{"error": ...}` message."""
        await websocket.accept()
        self._start_gauges()
        ip = client_ip(websocket, self.trusted)
        frames_params = InferenceParams(conf, iou, max_det)
        session = FrameSession(
            MeteredFrames(self.steps, ip), self.args.limits.stream_window, self.args.limits.stream_unsent
        )
        try:
            credential = websocket.headers.get("authorization")
            if credential is None:
                first = await websocket.receive_text()
                try:
                    credential = json.loads(first).get("authorization")
                except (ValueError, AttributeError):
                    credential = None
            check_params(frames_params)
            await session.open(credential)
        except ApiError as exc:
            await _ws_close(websocket, exc)
            return
        except WebSocketDisconnect:
            return

        async def frames() -> Any:
            seq = 0
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                data = msg.get("bytes")
                if data is None:  # a text message mid-stream is not a frame
                    data = b""
                yield FrameIn(seq, data, model, frames_params)
                seq += 1

        async def send(out: FrameOut) -> None:
            await websocket.send_text(json.dumps(out.to_json()))

        try:
            await session.run(frames(), send)
        except (WebSocketDisconnect, RuntimeError):  # the client left (Starlette raises RuntimeError after close)
            return
        if session.ended is not None:
            await _ws_close(websocket, session.ended, final=False)
        else:
            with contextlib.suppress(RuntimeError, WebSocketDisconnect):
                await websocket.close()

    # ------------------------------------------------------------ gRPC (Serve's gRPC proxy)
    def _grpc_call(self, context: Any) -> tuple[dict[str, str], str | None]:
        md = grpc_api.metadata(context)
        ip = forwarded_client(grpc_api.peer_ip(context), [md.get("x-forwarded-for", "")], self.trusted)
        return md, ip

    async def Detect(self, request: pb.DetectRequest, grpc_context: Any) -> pb.DetectReply:
        """`DetectService.Detect`: as POST /v1/detect (the credential and the idempotency key in metadata)."""
        t0 = time.perf_counter()
        self._start_gauges()
        rid = new_request_id()
        md, ip = self._grpc_call(grpc_context)
        status = 500
        try:
            model = request.model or None
            call = DetectCall(
                rid, md.get("authorization"), list(request.images), model, grpc_api.params(request), ip,
                md.get("idempotency-key"),
            )  # fmt: skip
            out = await self.steps.detect(call)
            status = 200
            return grpc_api.reply(out.body, replayed="Idempotent-Replayed" in out.headers)
        except ApiError as exc:
            status = exc.status
            grpc_api.fail(grpc_context, exc, rid)
            return pb.DetectReply()
        finally:
            self.metrics.request(time.perf_counter() - t0, self._model_tag(request.model or None), status)

    async def Models(self, request: pb.ModelsRequest, grpc_context: Any) -> pb.ModelsReply:
        """`DetectService.Models`: as GET /v1/models."""
        md, _ = self._grpc_call(grpc_context)
        try:
            await self.steps.verify(md.get("authorization"))
        except ApiError as exc:
            grpc_api.fail(grpc_context, exc, new_request_id())
            return pb.ModelsReply()
        return grpc_api.models_reply(self.steps.catalog.listing(await self._model_status()))

    async def DetectStream(self, frames: Any, grpc_context: Any) -> Any:
        """`DetectService.DetectStream`: a frame stream (serve_app/streams.py); each frame's answer or
        refusal is a `FrameResult`, in order. The session ends with UNAUTHENTICATED (and the table's
        code in the trailers) when its credential fails, at the start or mid-stream."""
        self._start_gauges()
        md, ip = self._grpc_call(grpc_context)
        session = FrameSession(
            MeteredFrames(self.steps, ip), self.args.limits.stream_window, self.args.limits.stream_unsent
        )
        try:
            await session.open(md.get("authorization"))
        except ApiError as exc:
            # the status travels with a message (Serve sends the context with each one): one that says why
            grpc_api.fail(grpc_context, exc, new_request_id())
            yield pb.FrameResult(error=grpc_api.frame_error(exc), ends_session=True)
            return
        out: asyncio.Queue[pb.FrameResult | None] = asyncio.Queue(1)

        async def incoming() -> Any:
            async for msg in frames:
                yield grpc_api.frame_in(msg)

        async def send(answer: FrameOut) -> None:
            if answer.error is not None and answer.ends_session:  # the status rides on this last message
                grpc_api.fail(grpc_context, answer.error, answer.request_id)
            await out.put(grpc_api.frame_result(answer))

        async def run() -> None:
            try:
                await session.run(incoming(), send)
            finally:
                await out.put(None)

        task = asyncio.ensure_future(run())
        try:
            while (item := await out.get()) is not None:
                yield item
            await task
        finally:
            task.cancel()  # the client left: the session gives back what it did not answer
            with contextlib.suppress(BaseException):
                await task

    # ------------------------------------------------------------ handle API (Ray jobs)
    async def detect(
        self,
        token: str,
        images: list[bytes],
        model: str | None = None,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Same checks and accounting as HTTP. `request_id` is the idempotency key of handle calls.
        Denials raise `ApiError` (its `code` and `status` from the one error table)."""
        # a fresh id per call: a handle caller's request context (its own Serve request, say) is
        # shared by all its calls, so Serve's id would merge them; `request_id` is the retry key
        images = list(images) if isinstance(images, list | tuple) else images  # anything else: invalid_request
        call = DetectCall(new_request_id(), token, images, model, InferenceParams(conf, iou, max_det), None, request_id)
        return (await self.steps.detect(call)).body
