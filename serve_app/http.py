"""HTTP plumbing for the ingress: bounded body reading, image extraction, client IP."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from typing import Any

from starlette.requests import HTTPConnection, Request

from serve_app.errors import ApiCode, ApiError


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it (or its declared length) passes `limit`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(ApiCode.INVALID_REQUEST, "bad Content-Length")
        if int(declared) > limit:
            raise ApiError(ApiCode.PAYLOAD_TOO_LARGE, f"body of {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(ApiCode.PAYLOAD_TOO_LARGE, f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# RFC 2046 §5.1.1: 1-70 characters from this set, not ending in a space
_BOUNDARY = re.compile(r'boundary="?([0-9A-Za-z\'()+_,\-./:=? ]{0,69}[0-9A-Za-z\'()+_,\-./:=?])"?(?:;|$)', re.I)
_NAME = re.compile(rb'(?:^|;)\s*name\s*=\s*(?:"([^"]*)"|([^;\s]+))', re.I)
MAX_PART_HEADERS = 8 * 1024


def images_from_body(content_type: str, body: bytes, max_items: int = 256) -> list[bytes]:
    """Raw image bytes, multipart field(s) `image`, or JSON {"image": b64} / {"images": [b64, ...]}.

    Linear in the body and bounded in items: a body of many tiny parts or deeply nested JSON is a
    400, not seconds of a replica's event loop (the stdlib `email` parser took 25 s on 2 MB of empty
    parts and raised IndexError on some malformed headers)."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype == "multipart/form-data":
        return _multipart_images(content_type, body, max_items)
    if ctype == "application/json":
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError(ApiCode.INVALID_REQUEST, "body is not valid JSON") from None
        items = (
            doc.get("images")
            if isinstance(doc, dict) and "images" in doc
            else [doc.get("image")]
            if isinstance(doc, dict)
            else None
        )
        if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
            raise ApiError(ApiCode.INVALID_REQUEST, 'JSON body must be {"image": "<base64>"} or {"images": [...]}')
        if len(items) > max_items:
            raise ApiError(ApiCode.INVALID_REQUEST, f"at most {max_items} images per request")
        try:
            return [base64.b64decode(x, validate=True) for x in items]
        except (binascii.Error, ValueError):
            raise ApiError(ApiCode.INVALID_REQUEST, "image is not valid base64") from None
    return [body]


def _multipart_images(content_type: str, body: bytes, max_items: int) -> list[bytes]:
    """The `image` fields of a multipart/form-data body (binary parts, as browsers and curl send)."""
    m = _BOUNDARY.search(content_type.split(";", 1)[1] if ";" in content_type else "")
    if m is None:
        raise ApiError(ApiCode.INVALID_REQUEST, "multipart body needs a valid boundary parameter")
    delimiter = b"--" + m.group(1).encode("ascii")
    if not body.startswith(delimiter):  # skip a preamble
        start = body.find(b"\r\n" + delimiter)
        body = body[start + 2 :] if start >= 0 else b""
    if not body:
        raise ApiError(ApiCode.INVALID_REQUEST, "malformed multipart body")
    # parts lie between "--boundary" lines; the last delimiter is "--boundary--"
    chunks = body.split(b"\r\n" + delimiter)
    chunks[0] = chunks[0][len(delimiter) :]
    out: list[bytes] = []
    for parts, chunk in enumerate(chunks, 1):
        if chunk.startswith(b"--"):
            break  # the closing delimiter; what follows is epilogue
        if parts > max_items + 16:  # a few non-image fields are fine; thousands are not
            raise ApiError(ApiCode.INVALID_REQUEST, f"multipart body has more than {max_items + 16} parts")
        if not chunk.lstrip(b" \t").startswith(b"\r\n"):  # the delimiter line ends (after optional padding)
            raise ApiError(ApiCode.INVALID_REQUEST, "malformed multipart delimiter line")
        head_end = chunk.find(b"\r\n\r\n")
        if head_end < 0 or head_end > MAX_PART_HEADERS:
            raise ApiError(ApiCode.INVALID_REQUEST, "malformed multipart part headers")
        if _field_name(chunk[:head_end]) == b"image":
            out.append(chunk[head_end + 4 :])
    if not out:
        raise ApiError(ApiCode.INVALID_REQUEST, "multipart body has no `image` field")
    if len(out) > max_items:
        raise ApiError(ApiCode.INVALID_REQUEST, f"at most {max_items} images per request")
    return out


def _field_name(headers: bytes) -> bytes | None:
    for line in headers.split(b"\r\n"):
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == b"content-disposition":
            kind, _, params = value.partition(b";")
            if kind.strip().lower() != b"form-data":
                return None
            m = _NAME.search(b";" + params)
            return None if m is None else (m.group(1) if m.group(1) is not None else m.group(2))
    return None


def client_ip(request: HTTPConnection, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str | None:
    """The peer address, or — only when the peer is a trusted proxy — the first untrusted hop of X-Forwarded-For."""
    peer = request.client.host if request.client else None
    return forwarded_client(peer, request.headers.getlist("x-forwarded-for"), trusted)


def forwarded_client(
    peer: str | None, forwarded: list[str], trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> str | None:
    """`peer`, or — only when `peer` is a trusted proxy — the first untrusted hop of its
    X-Forwarded-For lines (HTTP headers, or gRPC metadata)."""
    if peer is None or not trusted or not _in(peer, trusted):
        return peer
    # several X-Forwarded-For lines are one list (RFC 9110 §5.3): a proxy that adds its own line
    # must not leave the client's first line to be read as the client's address
    joined = ",".join(forwarded)
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
