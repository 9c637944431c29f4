"""Credentials: EdDSA-signed JWTs, the key ring that signs them, the verifier (DESIGN §4).

The ledger signs with the ring's active key (header `kid`); claims are iss, aud, sub (token id),
pkg (package root id), jti (credential id), iat, exp, typ. Gateways hold public keys only.
`Verifier.verify` does NOT check revocation or quota: the ledger does, at admission. Retired keys
verify until `prune` sees their last credential expire. The ring assumes one writer process.

Errors: `verify` raises only `CredentialError`, whatever its input; an unusable key ring raises
`ConfigError`; bad arguments from calling code (a bug) raise `ValueError` or `TypeError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeGuard

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ledger.core.codes import Code
from ledger.core.errors import ConfigError, CredentialError

ISSUER = "yolo-tokens"
AUDIENCE = "yolo-tokens-api"
ALGORITHMS = ("EdDSA",)
TOKEN_TYPES = frozenset({"access", "admin"})
REQUIRED_CLAIMS = ("exp", "iat", "sub", "jti", "iss", "aud")
MAX_CREDENTIAL_CHARS = 4096
MAX_CLAIM_CHARS = 256
_MAX_TIME = 2**53  # epoch seconds: exact as float and JSON number, far beyond any real expiry

_KID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9]{0,15}")
_BEARER = "bearer "
_INDEX = "index.json"
_INDEX_VERSION = 1
# what hostile input can raise from base64/json/number parsing inside PyJWT
_UNPARSABLE = (jwt.PyJWTError, ValueError, TypeError, RecursionError, OverflowError)
_BAD_KEY = (ValueError, TypeError, UnsupportedAlgorithm)


def new_id(prefix: str) -> str:
    """Return `prefix` + "_" + 20 url-safe random chars (120 bits), e.g. "tok_3hN...".
    `prefix`: 1-16 ASCII letters/digits starting with a letter; a trailing "_" is fine."""
    bare = prefix.removesuffix("_")
    if not _PREFIX.fullmatch(bare):
        raise ValueError("id prefix must be 1-16 ASCII letters/digits")
    return f"{bare}_{secrets.token_urlsafe(15)}"


def new_jti() -> str:
    """Return a fresh credential id (a token gets a new one on every rotation)."""
    return new_id("jti")


@dataclass(frozen=True, slots=True)
class Claims:
    """Claims of a credential whose signature, audience, issuer and times checked out."""

    sub: str  # token id
    pkg: str  # package root id
    jti: str  # credential id (changes on rotate)
    typ: str  # "access" or "admin"
    iat: int
    exp: int
    kid: str


@dataclass(frozen=True, slots=True)
class _KeyEntry:
    created_at: float
    retired_at: float | None
    last_exp: int | None  # latest exp of any credential signed with this key

    def well_typed(self) -> bool:
        return _is_time(self.created_at) and _is_time(self.retired_at or 0) and _is_int_time(self.last_exp or 0)


class KeyRing:
    """Ed25519 signing keys kept in a directory; each private key a PEM file mode 0600 (directory 0700),
    plus a small JSON index (also 0600) with per-kid created_at, retired_at and `last_exp` (the latest exp
    of any credential signed with that kid). Writes are atomic; `sign` makes `last_exp` durable before it
    returns, so `prune` never drops a key that still has live credentials."""

    def __init__(self, directory: Path, clock: Callable[[], float]) -> None:
        self._dir = directory
        self._clock = clock
        self._keys: dict[str, Ed25519PrivateKey] = {}
        self._entries: dict[str, _KeyEntry] = {}
        self._active = ""
        self._lock = threading.Lock()

    @classmethod
    def open(cls, directory: Path, *, clock: Callable[[], float] = time.time) -> KeyRing:
        """Open the ring in `directory`, creating it (mode 0700) and a first key if empty.
        Raises `ConfigError` if anything is unreadable, malformed or open to group/others."""
        ring = cls(directory, clock)
        index = directory / _INDEX
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
            if not index.exists():
                if any(directory.glob("*.pem")):
                    raise ConfigError(f"key ring {directory}: keys but no {_INDEX}")
                ring._add_key()
                return ring
            ring._active, ring._entries = _parse_index(index.read_bytes(), index)
            ring._keys = {k: _load_private_key(directory / f"{k}.pem") for k in ring._entries}
        except OSError as exc:
            raise ConfigError(f"key ring {directory}: {exc.strerror}") from exc
        return ring

    @property
    def active_kid(self) -> str:
        """Key id that `sign` uses now."""
        return self._active

    @property
    def clock(self) -> Callable[[], float]:
        """The ring's time source (seconds since the epoch)."""
        return self._clock

    def rotate(self) -> str:
        """Make and return a new active kid; the old key is retired but still verifies."""
        with self._lock:
            return self._add_key()

    def prune(self) -> list[str]:
        """Delete retired keys whose `last_exp` has passed (or never signed); return kids."""
        with self._lock:
            now, entries = self._clock(), self._entries
            retired = {k: e for k, e in entries.items() if k != self._active and e.retired_at is not None}
            gone = [k for k, e in retired.items() if e.last_exp is None or e.last_exp < now]
            if not gone:
                return []
            # index first: a crash leaves an orphan file, never an entry without its key
            kept = {k: e for k, e in entries.items() if k not in gone}
            self._save_index(self._active, kept)
            self._entries, self._keys = kept, {k: v for k, v in self._keys.items() if k not in gone}
            try:
                for kid in gone:
                    (self._dir / f"{kid}.pem").unlink(missing_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot delete a retired key: {exc.strerror}") from exc
            return gone

    def public_keys(self) -> dict[str, bytes]:
        """Return kid -> PEM public key (SubjectPublicKeyInfo) for every verifying key."""
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        with self._lock:
            keys = dict(self._keys)
        return {k: v.public_key().public_bytes(serialization.Encoding.PEM, spki) for k, v in keys.items()}

    def sign(self, claims: Mapping[str, object]) -> str:
        """Sign `claims` with the active key (header `kid`), first recording the int
        `claims["exp"]` durably; raises `ConfigError` if the index cannot be written."""
        exp = claims.get("exp")
        if not _is_int_time(exp):
            raise TypeError("claims['exp'] must be an int of epoch seconds")
        with self._lock:
            kid, entry = self._active, self._entries[self._active]
            if entry.last_exp is None or exp > entry.last_exp:
                entries = {**self._entries, kid: replace(entry, last_exp=exp)}
                self._save_index(kid, entries)
                self._entries = entries
            key = self._keys[kid]
        return jwt.encode(dict(claims), key, ALGORITHMS[0], headers={"kid": kid})

    def _add_key(self) -> str:
        """Create, persist and activate a new key; retire the active one. Lock held."""
        now, kid, key = self._clock(), new_id("key"), Ed25519PrivateKey.generate()
        pkcs8, plain = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        pem = key.private_bytes(serialization.Encoding.PEM, pkcs8, plain)
        entries = {**self._entries, kid: _KeyEntry(created_at=now, retired_at=None, last_exp=None)}
        if self._active:
            entries[self._active] = replace(entries[self._active], retired_at=now)
        # key file first: the index never names a key that is not on disk
        _write_private(self._dir / f"{kid}.pem", pem)
        self._save_index(kid, entries)
        self._keys[kid] = key
        self._entries = entries
        self._active = kid
        return kid

    def _save_index(self, active: str, entries: Mapping[str, _KeyEntry]) -> None:
        keys = {kid: asdict(e) for kid, e in entries.items()}
        doc = {"version": _INDEX_VERSION, "active": active, "keys": keys}
        _write_private(self._dir / _INDEX, json.dumps(doc, indent=1).encode())


def issue(ring: KeyRing, *, sub: str, pkg: str, jti: str, typ: str, exp: int, now: int | None = None) -> str:
    """Sign a credential with iss/aud/sub/pkg/jti/iat/exp/typ; `now` (iat) defaults to
    the ring's clock. Raises `ValueError` on bad arguments, `ConfigError` as `sign`."""
    iat = int(ring.clock()) if now is None else now
    if not all(_is_claim_str(v) for v in (sub, pkg, jti)):
        raise ValueError(f"sub, pkg, jti must be 1-{MAX_CLAIM_CHARS} char strings")
    if typ not in TOKEN_TYPES:
        raise ValueError(f"typ must be one of {sorted(TOKEN_TYPES)}")
    if not _is_int_time(exp) or not _is_int_time(iat) or exp <= iat:
        raise ValueError("exp and iat must be ints with exp > iat")
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "pkg": pkg, "jti": jti}
    return ring.sign({**claims, "iat": iat, "exp": exp, "typ": typ})


class Verifier:
    """Verifies credentials against public keys only. Revocation and quota are NOT checked here (the
    ledger checks them at admission); `exp`, `iat`, `nbf` are checked against `clock`, with `leeway_s`.

    Verified credentials are remembered (at most `cache_size`, the oldest forgotten first), keyed by
    the whole credential string, so a credential seen before costs a dictionary lookup instead of
    an Ed25519 verification. A forged credential is never found there: any change to the header,
    claims or signature is another string. A remembered credential is still refused once its `exp`
    has passed, or once its key is no longer in the ring (`update_keys` forgets them all).
    Revocation never came from here: it is the policy's, at admission."""

    CACHE_SIZE = 16384  # about 10 MB of credentials and claims at most

    def __init__(
        self,
        public_keys: Mapping[str, bytes],
        *,
        issuer: str = ISSUER,
        audience: str = AUDIENCE,
        leeway_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Raises `ConfigError` for a bad leeway, a malformed kid or a non-Ed25519 key."""
        if not 0 <= leeway_s < _MAX_TIME:  # also refuses NaN and inf
            raise ConfigError("leeway_s must be a finite number >= 0")
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_s
        self._clock = clock
        self._keys = _load_public_keys(public_keys)
        self._verified: dict[str, Claims] = {}  # bare credential -> its claims, oldest first
        # times are checked in _claims against our clock, not PyJWT's wall clock
        self._options: jwt.types.Options = {"require": list(REQUIRED_CLAIMS), "strict_aud": True}
        self._options |= {"verify_exp": False, "verify_iat": False, "verify_nbf": False}

    @property
    def has_keys(self) -> bool:
        return bool(self._keys)

    def unknown_kid(self, credential: str | None) -> str | None:
        """The well-formed key id a credential names when this verifier lacks that key, else None:
        whether fetching the key ring again could make the credential verify."""
        try:
            kid = _header(_strip(credential)).get("kid")
        except CredentialError:
            return None
        if not isinstance(kid, str) or not _KID.fullmatch(kid) or kid in self._keys:
            return None
        return kid

    def update_keys(self, public_keys: Mapping[str, bytes]) -> None:
        """Replace the known keys (after a rotation or prune); atomic for readers. Remembered
        credentials are forgotten: a pruned key's credentials must not verify from memory."""
        self._keys = _load_public_keys(public_keys)
        self._verified = {}

    def verify(self, credential: str | None) -> Claims:
        """Return the verified claims of `credential` (a `Bearer ` prefix is stripped).

        Raises `CredentialError` and nothing else: MISSING_TOKEN when absent or empty, EXPIRED_TOKEN
        when `exp` has passed, INVALID_TOKEN otherwise; messages never echo the credential.
        Does not check revocation: the ledger does, at admission."""
        token = _strip(credential)
        known = self._verified.get(token)
        if known is not None:
            if known.exp <= self._clock() - self._leeway:
                del self._verified[token]
                raise CredentialError("credential has expired", Code.EXPIRED_TOKEN)
            return known
        claims = self._verify(token)
        verified = self._verified
        if len(verified) >= self.CACHE_SIZE:
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):  # another thread got there first
                del verified[next(iter(verified))]
        verified[token] = claims
        return claims

    def _verify(self, token: str) -> Claims:
        header = _header(token)
        kid = header.get("kid")
        if not isinstance(kid, str) or not _KID.fullmatch(kid):
            raise _invalid("credential has a missing or malformed key id")
        key = self._keys.get(kid)
        if key is None:
            raise _invalid("credential is signed with an unknown key id")
        aud, iss, leeway = self._audience, self._issuer, self._leeway
        try:
            payload = jwt.decode(token, key, list(ALGORITHMS), self._options, audience=aud, issuer=iss, leeway=leeway)
        except jwt.InvalidSignatureError:
            raise _invalid("credential signature is invalid") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise _invalid("credential is for another audience or from another issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _invalid(f"credential lacks required claim {exc.claim!r}") from None
        except _UNPARSABLE:
            raise _invalid("credential is malformed or invalid") from None
        return self._claims(payload, kid)

    def _claims(self, payload: Mapping[str, object], kid: str) -> Claims:
        sub, pkg, jti, typ = (payload.get(c) for c in ("sub", "pkg", "jti", "typ"))
        if not (_is_claim_str(sub) and _is_claim_str(pkg) and _is_claim_str(jti)):
            raise _invalid("credential sub, pkg and jti must be non-empty strings")
        if not isinstance(typ, str) or typ not in TOKEN_TYPES:
            raise _invalid("credential has a missing or unknown typ")
        iat, exp, nbf = (payload.get(c, 0) for c in ("iat", "exp", "nbf"))
        if not (_is_int_time(iat) and _is_int_time(exp) and _is_time(nbf)):
            raise _invalid("credential iat, exp and nbf must be epoch seconds")
        now = self._clock()
        if iat > now + self._leeway:
            raise _invalid("credential is issued in the future")
        if nbf > now + self._leeway:
            raise _invalid("credential is not valid yet")
        if exp <= now - self._leeway:
            raise CredentialError("credential has expired", Code.EXPIRED_TOKEN)
        return Claims(sub=sub, pkg=pkg, jti=jti, typ=typ, iat=iat, exp=exp, kid=kid)


def _invalid(message: str) -> CredentialError:
    return CredentialError(message, Code.INVALID_TOKEN)


def _strip(credential: object) -> str:
    """Return the bare token; the shape check keeps hostile input away from parsers."""
    if credential is None:
        raise CredentialError("no credential given", Code.MISSING_TOKEN)
    if not isinstance(credential, str):
        raise _invalid("credential must be a string")
    if credential[: len(_BEARER)].lower() == _BEARER:
        credential = credential[len(_BEARER) :]
    token = credential.strip(" \t\r\n")
    if not token:
        raise CredentialError("no credential given", Code.MISSING_TOKEN)
    if len(token) > MAX_CREDENTIAL_CHARS:
        raise _invalid("credential is too long")
    if not _SHAPE.fullmatch(token):
        raise _invalid("credential is not three base64url segments")
    return token


def _header(token: str) -> dict[str, object]:
    try:
        header = jwt.get_unverified_header(token)
    except _UNPARSABLE:
        raise _invalid("credential header is malformed") from None
    alg = header.get("alg")
    # an exact allowlist: refuses "none", HS256 keyed with our public PEM, RS256, ...
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise _invalid("credential algorithm is not allowed")
    return header


def _is_int_time(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_TIME


def _is_time(value: object) -> TypeGuard[int | float]:
    return _is_int_time(value) or (isinstance(value, float) and 0 <= value < _MAX_TIME)


def _is_claim_str(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= MAX_CLAIM_CHARS


def _load_public_keys(pems: Mapping[str, bytes]) -> dict[str, Ed25519PublicKey]:
    keys: dict[str, Ed25519PublicKey] = {}
    for kid, pem in pems.items():
        if not isinstance(kid, str) or not _KID.fullmatch(kid):
            raise ConfigError("public key ids must match [A-Za-z0-9_-]{1,64}")
        try:
            key = serialization.load_pem_public_key(pem)
        except _BAD_KEY as exc:
            raise ConfigError(f"public key {kid} is not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"public key {kid} is not Ed25519")
        keys[kid] = key
    return keys


def _load_private_key(path: Path) -> Ed25519PrivateKey:
    mode = path.lstat().st_mode
    if not stat.S_ISREG(mode) or mode & 0o077:
        raise ConfigError(f"key file {path} must be a regular file, mode 0600 (not a link, not group/other)")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except _BAD_KEY as exc:
        raise ConfigError(f"key file {path} is not a plain PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"key file {path} is not an Ed25519 key")
    return key


def _parse_index(raw: bytes, path: Path) -> tuple[str, dict[str, _KeyEntry]]:
    """Parse and validate the index; kids are checked so it cannot name other paths."""
    bad = ConfigError(f"key ring index {path} is malformed")
    try:
        doc = json.loads(raw)
        active, entries = doc["active"], {kid: _KeyEntry(**meta) for kid, meta in doc["keys"].items()}
        ok = doc["version"] == _INDEX_VERSION and entries[active].retired_at is None
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise bad from exc
    if not (ok and all(_KID.fullmatch(k) and e.well_typed() for k, e in entries.items())):
        raise bad
    return active, entries


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, mode 0600, fsynced; `ConfigError` (old content kept) on failure."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from exc
