"""The ledger capability: what makes an in-cluster caller the ledger's operator (DESIGN §3d).

The ledger's actors (its shards and its coordinator) answer only callers that present it: the
launcher, the serving replicas (which act for tokens whose credentials they verified), the CLI over
Ray and the console. It is 32 random bytes kept beside the signing keys, `<key_dir>/capability`
(mode 0600, created once by the launcher). Reading it needs exactly the trust that reading the
signing keys needs, and whoever can read those can sign any credential anyway: it adds no new root
of trust, only makes the one there is explicit. A team's Ray job holds a token credential, not this:
it reaches the ledger through the API (HTTP or the app handle), which meters it.

`Capability` never shows its secret in a repr, a log line or a traceback. Keys derived from it
(`derive`) let other deployments check their callers without holding the capability itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ledger.core.codes import Code
from ledger.core.errors import ConfigError, OperationRefused

FILE_NAME = "capability"
_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 bytes, url-safe base64 without padding


@dataclass(frozen=True, slots=True)
class Capability:
    secret: str = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, str) or not _SHAPE.fullmatch(self.secret):
            raise ValueError("a ledger capability is 43 url-safe characters")

    def __repr__(self) -> str:
        return "Capability(<hidden>)"

    def admits(self, presented: object) -> bool:
        """Whether `presented` is this capability (constant time; anything else is False)."""
        return isinstance(presented, Capability) and hmac.compare_digest(presented.secret, self.secret)

    def derive(self, purpose: str) -> str:
        """A key for one purpose (e.g. the detectors' caller key): knowing it reveals nothing of the
        capability, and the same capability always derives the same key (redeploys agree)."""
        return hmac.new(self.secret.encode(), purpose.encode(), hashlib.sha256).hexdigest()

    @classmethod
    def generate(cls) -> Capability:
        return cls(secrets.token_urlsafe(32))

    @classmethod
    def load(cls, key_dir: Path, *, create: bool = False) -> Capability | None:
        """The capability kept in `key_dir`; None when there is none (or, with `create`, a new one
        written atomically: two launchers racing end with the same one). `ConfigError` when the file
        is open to group or others, not a regular file, or malformed."""
        path = key_dir / FILE_NAME
        try:
            return cls._read(path)
        except FileNotFoundError:
            if not create:
                return None
        except PermissionError:
            return None  # another user's service: this process is not its operator
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = key_dir / f".{FILE_NAME}.{secrets.token_hex(6)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(cls.generate().secret)
                    fh.flush()
                    os.fsync(fh.fileno())
                with contextlib.suppress(FileExistsError):  # another launcher was first: theirs wins
                    os.link(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            return cls._read(path)
        except OSError as exc:
            raise ConfigError(f"cannot create {path}: {exc.strerror}") from exc

    @classmethod
    def _read(cls, path: Path) -> Capability:
        mode = path.lstat().st_mode
        if not stat.S_ISREG(mode) or mode & 0o077:
            raise ConfigError(f"{path} must be a regular file, mode 0600 (not a link, not group/other)")
        try:
            return cls(path.read_text().strip())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not a ledger capability") from exc


def require(expected: Capability, presented: object, what: str) -> None:
    """Refuse (FORBIDDEN, nothing changed) a call to a ledger actor without the capability."""
    if not expected.admits(presented):
        raise OperationRefused(
            f"{what} needs the ledger's capability, which operators' tools read from the service's key "
            "directory (YT_DATA_DIR/keys); other in-cluster callers use the API (HTTP or the app handle) "
            "with a token credential (docs/SECURITY.md)",
            Code.FORBIDDEN,
        )
