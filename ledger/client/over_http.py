"""`HttpLedger`: the ledger API over the service's admin route, for the CLI (no Ray in the caller).

A CLI call over Ray joins the cluster first (about 4 s: a driver, its worker, the GCS handshake);
over HTTP it is one request to `POST /v1/admin/ops/{op}` of a running service, made with an admin
credential (`yolo-tokens serve` writes one for the local user, see `AdminFile`). Arguments and
results cross as JSON by the protocol's own hints (`ledger.core.wire`); a refusal comes back from the
service's one error table and is raised as the ledger's own exception. No Ray here.
"""

from __future__ import annotations

import json
import os
import stat
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ledger.core import ops, wire
from ledger.core.api import LedgerApi
from ledger.core.codes import Code
from ledger.core.errors import LedgerUnavailable, OperationRefused

ADMIN_ROUTE = "/v1/admin/ops/"
CLI_ADMIN_TTL_S = 7 * 86400.0  # what `serve` writes; it writes a fresh one every CLI_ADMIN_REFRESH_S
CLI_ADMIN_REFRESH_S = 86400.0


R = TypeVar("R")


class HttpLedger(LedgerApi):
    """Implements `LedgerApi` as an admin over HTTP: each record crosses as JSON (`ledger.core.wire`).
    The standard library's client: httpx would add a tenth of a second of imports to each call."""

    def __init__(self, url: str, credential: str, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {credential}", "Content-Type": "application/json"}
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxies

    def call(self, op: ops.Call[R]) -> R:
        body = json.dumps(wire.encode_call(op)).encode()
        req = urllib.request.Request(self.url + ADMIN_ROUTE + op.name, data=body, headers=self._headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            raise LedgerUnavailable(f"no answer from the service at {self.url} ({exc})") from exc
        try:
            doc = json.loads(raw)
        except ValueError:
            raise LedgerUnavailable(f"the service at {self.url} answered {status} without JSON") from None
        if status != 200:
            raise _error(status, doc)
        return wire.decode_result(op, doc)


def _error(status: int, doc: Any) -> OperationRefused | LedgerUnavailable:
    err = doc.get("error") if isinstance(doc, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    message = str(err.get("message", "")) if isinstance(err, dict) else f"HTTP {status}"
    if code == Code.LEDGER_UNAVAILABLE.value or status >= 500:
        return LedgerUnavailable(message or f"HTTP {status}")
    try:
        return OperationRefused(message, Code(str(code)))
    except ValueError:  # a code of the service's table the ledger does not have (payload_too_large, ...)
        return OperationRefused(f"{code}: {message}", Code.INVALID_REQUEST)


@dataclass(frozen=True, slots=True)
class AdminFile:
    """Where the CLI finds the service and an admin credential: a JSON file only its user can read,
    written by `yolo-tokens serve` (`~/.yolo-tokens/admin.json`, or `$YT_ADMIN_FILE`)."""

    path: Path

    @classmethod
    def default(cls) -> AdminFile:
        env = os.environ.get("YT_ADMIN_FILE")
        return cls(Path(env) if env else Path.home() / ".yolo-tokens" / "admin.json")

    def write(self, url: str, credential: str, expires_at: float) -> None:
        if self.path.exists() and not self.path.is_file():  # $YT_ADMIN_FILE=/dev/null, say: never replaced
            raise OSError(f"{self.path} is not a regular file: not writing an admin credential there")
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"url": url, "credential": credential, "expires_at": expires_at, "pid": os.getpid()}, fh)
        os.replace(tmp, self.path)

    def read(self) -> tuple[str, str] | None:
        """(url, credential), or None when there is no usable file: absent, expired, or readable by
        others (a credential another user could have read is not used)."""
        try:
            st = self.path.stat()
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or not isinstance(doc, dict):
            return None
        url, credential, expires_at = doc.get("url"), doc.get("credential"), doc.get("expires_at")
        if not (isinstance(url, str) and isinstance(credential, str) and isinstance(expires_at, int | float)):
            return None
        return (url, credential) if expires_at > time.time() + 60 else None

    def remove_if_mine(self) -> None:
        """Removed at the end of the `serve` that wrote it (a later start's file is left alone)."""
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError, AttributeError):
            pass
