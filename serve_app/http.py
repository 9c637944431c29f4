"""HTTP plumbing for the ingress: bounded body reading, image extraction, client IP."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from starlette.requests import Request

from serve_app.errors import ApiError


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it (or its declared length) passes `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError("invalid_request", "bad Content-Length")
        if int(declared) > limit:
            raise ApiError("payload_too_large", f"body of {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError("payload_too_large", f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def images_from_body(content_type: str, body: bytes) -> list[bytes]:
    """Raw image bytes, multipart field(s) `image`, or JSON {"image": b64} / {"images": [b64, ...]}."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype == "multipart/form-data":
        msg = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
        )
        if not msg.is_multipart():
            raise ApiError("invalid_request", "malformed multipart body")
        out = []
        for part in msg.iter_parts():
            if part.get_param("name", header="content-disposition") == "image":
                payload = part.get_payload(decode=True)
                if isinstance(payload, bytes):
                    out.append(payload)
        if not out:
            raise ApiError("invalid_request", "multipart body has no `image` field")
        return out
    if ctype == "application/json":
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError("invalid_request", "body is not valid JSON") from None
        items = (
            doc.get("images")
            if isinstance(doc, dict) and "images" in doc
            else [doc.get("image")]
            if isinstance(doc, dict)
            else None
        )
        if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
            raise ApiError("invalid_request", 'JSON body must be {"image": "<base64>"} or {"images": [...]}')
        try:
            return [base64.b64decode(x, validate=True) for x in items]
        except (binascii.Error, ValueError):
            raise ApiError("invalid_request", "image is not valid base64") from None
    return [body]


def client_ip(request: Request, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str | None:
    """The peer address, or — only when the peer is a trusted proxy — the first untrusted hop of X-Forwarded-For."""
    peer = request.client.host if request.client else None
    if peer is None or not trusted or not _in(peer, trusted):
        return peer
    # several X-Forwarded-For lines are one list (RFC 9110 §5.3): a proxy that adds its own line
    # must not leave the client's first line to be read as the client's address
    joined = ",".join(request.headers.getlist("x-forwarded-for"))
    hops = [h.strip() for h in joined.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            return hop if _valid(hop) else peer
    return peer


def _valid(ip: str) -> bool:
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return False
    return True


def _in(ip: str, nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr.version == n.version and addr in n for n in nets)


def plain(view: Any) -> dict[str, Any]:
    """A slots dataclass (e.g. `TokenView`) or mapping as a JSON-ready dict."""
    return {k: getattr(view, k) for k in view.__slots__} if hasattr(view, "__slots__") else dict(view)
