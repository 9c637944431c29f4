"""Coverage-guided fuzzing (atheris / libFuzzer) of what parses untrusted bytes before a charge.

    python -m tests.hostile.fuzz_targets TARGET CORPUS_DIR [libFuzzer flags, e.g. -runs=N -max_total_time=S]

Targets (each input must end in the documented outcome; anything else is a crash):
  image       raw bytes -> `decode_image`: a bounded RGB array, or an `ApiError` from the table
  body        content type + body -> `images_from_body` -> `decode_image`: the same
  credential  raw strings, structured JWTs (odd algs, kids, claim types; signed with the ring's key
              or not) and one-character tampering of a valid credential -> `Verifier.verify`:
              `Claims` only for what the ring's key signed, else `CredentialError`
  limits      split-request limits -> `RateLimit.parse`, `normalize_ips`, `normalize_models`:
              a value or `OperationRefused`

`tests/hostile/test_fuzz.py` runs each for a bounded number of inputs in `make test` and writes the
seed corpora; `make fuzz FUZZ_SECONDS=600` runs them longer.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import atheris

with atheris.instrument_imports(include=["ledger", "serve_app", "PIL", "jwt"]):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from ledger.core.codes import Code
    from ledger.core.credentials import AUDIENCE, ISSUER, Claims, Verifier
    from ledger.core.errors import CredentialError, OperationRefused
    from ledger.core.limits import RateLimit, normalize_ips, normalize_models
    from serve_app.errors import ApiError
    from serve_app.http import images_from_body
    from serve_app.imaging import ImageLimits, decode_image

MAX_IMAGES = 16  # the service's default `limits.max_images`
LIMITS = ImageLimits(max_bytes=2 * 1024 * 1024, max_pixels=4_000_000, max_side=4096)
IMAGE_CODES = {"invalid_image", "unsupported_media_type", "image_too_large", "payload_too_large", "invalid_request"}
NOW = 1_800_000_000
KID = "fuzzkid"
# a fixed key: inputs replay the same way in every run (the private half never leaves this module)
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PEM = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
PUBLIC = {KID: KEY.public_key().public_bytes(*PEM)}
VERIFIER = Verifier(PUBLIC, clock=lambda: float(NOW))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(header: dict[str, Any], payload: dict[str, Any]) -> str:
    head = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{head}.{b64(KEY.sign(head.encode()))}"


GOOD_CLAIMS = {
    "sub": "tok_1", "pkg": "tok_1", "jti": "j1", "typ": "access",
    "iat": NOW - 10, "exp": NOW + 3600, "iss": ISSUER, "aud": AUDIENCE,
}  # fmt: skip
GOOD = sign({"alg": "EdDSA", "typ": "JWT", "kid": KID}, GOOD_CLAIMS)


# ---------------------------------------------------------------- images
def check_image(blob: bytes) -> None:
    try:
        img = decode_image(blob, LIMITS)
    except ApiError as exc:
        assert exc.code in IMAGE_CODES and 400 <= exc.status < 500, exc.code
        return
    h, w, c = img.pixels.shape
    assert c == 3 and img.pixels.dtype.name == "uint8" and 0 < w <= LIMITS.max_side and 0 < h <= LIMITS.max_side
    assert w * h <= LIMITS.max_pixels


def fuzz_image(data: bytes) -> None:
    check_image(data)


CONTENT_TYPES = ("image/jpeg", "application/json", "multipart/form-data; boundary=b", "text/plain")


def fuzz_body(data: bytes) -> None:
    if not data:
        return
    # byte 0 picks the content type (the seed corpus relies on this layout); past the list, the
    # next (byte 0 - 4) % 64 bytes are a content type of their own
    if data[0] < len(CONTENT_TYPES):
        ctype, body = CONTENT_TYPES[data[0]], data[1:]
    else:
        n = 1 + (data[0] - len(CONTENT_TYPES)) % 64
        ctype, body = data[1 : 1 + n].decode("latin-1"), data[1 + n :]
    try:
        blobs = images_from_body(ctype, body, MAX_IMAGES)
    except ApiError as exc:
        assert exc.code == "invalid_request", exc.code
        return
    assert isinstance(blobs, list) and 0 < len(blobs) <= MAX_IMAGES and all(isinstance(b, bytes) for b in blobs)
    for blob in blobs[:4]:
        check_image(blob)


# ---------------------------------------------------------------- credentials
def fuzz_value(fdp: Any) -> Any:
    kind = fdp.ConsumeIntInRange(0, 11)
    return [
        lambda: fdp.ConsumeUnicodeNoSurrogates(24),
        lambda: fdp.ConsumeInt(8),
        lambda: fdp.ConsumeIntInRange(NOW - 100_000, NOW + 100_000),
        fdp.ConsumeFloat,
        lambda: fdp.PickValueInList([math.nan, math.inf, -math.inf, -0.0, 1e308]),
        fdp.ConsumeBool,
        lambda: None,
        lambda: [fdp.ConsumeUnicodeNoSurrogates(8)],
        lambda: {"k": fdp.ConsumeUnicodeNoSurrogates(8)},
        lambda: 10 ** fdp.ConsumeIntInRange(20, 400),
        lambda: fdp.PickValueInList(["access", "admin", ISSUER, AUDIENCE, "tok_1", ""]),
        lambda: "MISSING",
    ][kind]()


def expect_refused(credential: str) -> None:
    try:
        VERIFIER.verify(credential)
    except CredentialError as exc:
        assert exc.code in (Code.INVALID_TOKEN, Code.EXPIRED_TOKEN, Code.MISSING_TOKEN), exc.code
        bare = credential.strip()
        assert len(bare) < 16 or bare not in exc.message  # never echoed
        return
    raise AssertionError("a credential not signed by the ring's key was accepted")


def fuzz_credential(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:  # anything at all in the Authorization header
        expect_refused(fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes()))
    elif mode == 1:  # a well-formed JWT with fuzzed header and claims, signed or not
        header: dict[str, Any] = {"alg": fdp.PickValueInList(["EdDSA", "none", "HS256", "RS256", "ES256", "eddsa"])}
        header["kid"] = KID if fdp.ConsumeBool() else fuzz_value(fdp)
        claims = dict(GOOD_CLAIMS)
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            name = fdp.PickValueInList([*GOOD_CLAIMS, "nbf"])
            value = fuzz_value(fdp)
            if value == "MISSING":
                claims.pop(name, None)
            else:
                claims[name] = value
        try:
            credential = sign(header, claims)
        except ValueError:  # json.dumps refuses nothing here, but stay total
            return
        if not fdp.ConsumeBool():  # a signature that is not ours
            head = credential.rsplit(".", 1)[0]
            credential = f"{head}.{b64(fdp.ConsumeBytes(64))}"
            expect_refused(credential)
            return
        try:
            got = VERIFIER.verify(credential)
        except CredentialError as exc:
            assert exc.code in (Code.INVALID_TOKEN, Code.EXPIRED_TOKEN), exc.code
            return
        # accepted: only our own key's signature over EdDSA with our kid, with well-typed claims
        assert header["alg"] == "EdDSA" and header["kid"] == KID
        assert isinstance(got, Claims) and all(isinstance(v, str) and v for v in (got.sub, got.pkg, got.jti))
        assert got.typ in ("access", "admin") and got.exp > NOW - 5 and got.iat <= NOW + 5
    else:  # one character of a valid credential changed
        pos = fdp.ConsumeIntInRange(0, len(GOOD) - 1)
        ch = chr(fdp.ConsumeIntInRange(0x21, 0x7E))
        tampered = GOOD[:pos] + ch + GOOD[pos + 1 :]
        try:
            got = VERIFIER.verify(tampered)
        except CredentialError as exc:
            assert exc.code is Code.INVALID_TOKEN, exc.code
            return
        # base64url's last character carries spare bits: the same bytes may decode from it
        assert got == VERIFIER.verify(GOOD), "a tampered credential was accepted with other claims"


# ---------------------------------------------------------------- split limits
def fuzz_limits(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    checks: list[Callable[[], object]] = [
        lambda: RateLimit.parse(fdp.ConsumeUnicodeNoSurrogates(40)),
        lambda: normalize_ips([fdp.ConsumeUnicodeNoSurrogates(50) for _ in range(fdp.ConsumeIntInRange(0, 4))]),
        lambda: normalize_models([fdp.ConsumeUnicodeNoSurrogates(30) for _ in range(fdp.ConsumeIntInRange(0, 4))]),
    ]
    try:
        out = checks[fdp.ConsumeIntInRange(0, len(checks) - 1)]()
    except OperationRefused as exc:
        assert exc.code is Code.INVALID_REQUEST
        return
    if isinstance(out, RateLimit):
        assert out.rate > 0 and out.burst >= 1 and math.isfinite(out.rate)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "image": fuzz_image,
    "body": fuzz_body,
    "credential": fuzz_credential,
    "limits": fuzz_limits,
}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.hostile.fuzz_targets {{{','.join(TARGETS)}}} [CORPUS] [libFuzzer flags]")
    atheris.Setup([argv[0], *argv[2:]], TARGETS[argv[1]])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
