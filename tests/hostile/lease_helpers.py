"""HTTP load for the lease tests (issue 12 §4): client processes of their own, each one httpx client.

    python -m tests.hostile.lease_helpers SPEC.json     one client process; writes SPEC.json.out

`Load` starts the processes, which all begin at `start_at` (the wall clock, which every process on
this machine shares) and send until their request budget is spent or `stop_at` has passed. Each
request is one `Shot`: when it was sent and answered (wall clock), its HTTP status, its error code
and, for a 200, its request id. A status of 0 is no HTTP answer at all (connection lost, timeout).

This module imports the standard library and httpx only: a client process starts in a fraction
of a second and leaves the machine's cores to the service it loads.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import httpx

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ClientSpec:
    url: str  # the detect route
    credential: str
    image: str  # a file holding the request body (JPEG)
    requests: int  # at most this many
    concurrency: int  # requests in flight at once
    start_at: float  # wall clock
    stop_at: float | None = None  # no request is sent after this (wall clock)
    gap_s: float = 0.0  # each in-flight slot waits this long between its requests (pacing)
    timeout_s: float = 120.0


@dataclass(frozen=True, slots=True)
class Shot:
    sent: float
    done: float
    status: int  # 0: no HTTP answer
    code: str  # the error code of a refusal ("" for a 200)
    request_id: str  # of a 200 ("" otherwise)


# ---------------------------------------------------------------- the client process
async def shoot(spec: ClientSpec) -> list[Shot]:
    """Send `spec`'s requests; every one of them becomes a Shot."""
    body = Path(spec.image).read_bytes()
    headers = {"Authorization": f"Bearer {spec.credential}", "Content-Type": "image/jpeg"}
    shots: list[Shot] = []
    budget = [spec.requests]
    limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency)

    async def slot(client: httpx.AsyncClient) -> None:
        while budget[0] > 0 and (spec.stop_at is None or time.time() < spec.stop_at):
            budget[0] -= 1
            sent = time.time()
            try:
                r = await client.post(spec.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                shots.append(Shot(sent, time.time(), 0, type(exc).__name__, ""))
            else:
                shots.append(answered(r, sent))
            if spec.gap_s:
                await asyncio.sleep(spec.gap_s)

    async with httpx.AsyncClient(timeout=spec.timeout_s, limits=limits) as client:
        await asyncio.sleep(max(0.0, spec.start_at - time.time()))
        await asyncio.gather(*(slot(client) for _ in range(spec.concurrency)))
    return shots


def answered(r: httpx.Response, sent: float) -> Shot:
    done = time.time()
    try:
        body = r.json()
    except ValueError:
        return Shot(sent, done, r.status_code, r.text[:40] or "no body", "")
    if r.status_code == 200:
        return Shot(sent, done, 200, "", str(body["request_id"]))
    error = body.get("error") if isinstance(body, dict) else None
    code = str(error.get("code")) if isinstance(error, dict) else str(body)[:40]
    return Shot(sent, done, r.status_code, code, "")


def main(spec_path: str) -> None:
    spec = ClientSpec(**json.loads(Path(spec_path).read_text()))
    shots = asyncio.run(shoot(spec))
    Path(spec_path + ".out").write_text(json.dumps([asdict(s) for s in shots]))


# ---------------------------------------------------------------- the test's side
class Load:
    """Client processes, started together; `wait()` gathers every Shot."""

    def __init__(self, specs: Sequence[ClientSpec], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.paths = [workdir / f"client-{os.getpid()}-{time.monotonic_ns()}-{i}.json" for i in range(len(specs))]
        for path, spec in zip(self.paths, specs, strict=True):
            path.write_text(json.dumps(asdict(spec)))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "tests.hostile.lease_helpers"]
        self.procs = [
            subprocess.Popen([*cmd, str(p)], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for p in self.paths
        ]

    def wait(self, timeout_s: float = 300.0) -> list[Shot]:
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise
            assert proc.returncode == 0, f"load client failed: {err[-2000:]}"
        return [Shot(**s) for p in self.paths for s in json.loads(Path(str(p) + ".out").read_text())]

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def spread(template: ClientSpec, clients: int) -> list[ClientSpec]:
    """`template`'s requests and in-flight slots split over `clients` processes."""
    return [
        replace(
            template,
            requests=template.requests // clients + (1 if i < template.requests % clients else 0),
            concurrency=max(1, template.concurrency // clients),
        )
        for i in range(clients)
    ]


def body_file(workdir: Path, body: bytes) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "body.jpg"
    path.write_bytes(body)
    return str(path)


# ---------------------------------------------------------------- tallies
def statuses(shots: Iterable[Shot]) -> dict[str, int]:
    """`"200"`, `"429 quota_exhausted"`, ...: how many of each answer."""
    return dict(Counter(str(s.status) if s.status == 200 else f"{s.status} {s.code}" for s in shots))


def ok_ids(shots: Iterable[Shot]) -> list[str]:
    return [s.request_id for s in shots if s.status == 200]


def wait_until(
    probe: Callable[[], T],
    done: Callable[[T], bool],
    timeout_s: float,
    what: str,
    passing: tuple[type[Exception], ...] = (),
) -> T:
    """`probe()` until `done` says yes (a `passing` exception counts as not yet); past `timeout_s`
    the last value fails the test."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = probe()
        except passing as exc:
            assert time.monotonic() < deadline, f"{what}: still {exc!r} after {timeout_s:g} s"
        else:
            if done(value):
                return value
            assert time.monotonic() < deadline, f"{what}: still {value!r} after {timeout_s:g} s"
        time.sleep(0.25)


if __name__ == "__main__":
    main(sys.argv[1])
