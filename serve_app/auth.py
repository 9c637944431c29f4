"""Credential checks of the serving side: signatures verified locally against the ledger's public keys.

`KeyedVerifier` holds the public key ring and fetches it on first need (a fresh replica starts
with none) and when a credential names a kid it lacks (a key rotated in): single-flight, each kid
at most once per `KEY_REFRESH_INTERVAL_S`, and all kids together at most once per
`KEY_REFRESH_INTERVAL_S / 25`, so random kids cannot flood the ledger while a real new key is
picked up by the first request that needs it (each ingress replica holds its own ring, and
none may refuse a fresh credential because another fetched a moment before). Revocation,
expiry of ancestors and quota are NOT decided here: the ledger decides them at admission.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from ledger import Claims, Code, CredentialError, Verifier
from serve_app.errors import ApiCode, ApiError

KEY_REFRESH_INTERVAL_S = 5.0
log = logging.getLogger(__name__)

KeySource = Callable[[], Awaitable[Mapping[str, bytes]]]


class KeyedVerifier:
    """Plain object, one per replica; `fetch` returns the ledger's public key ring."""

    def __init__(self, fetch: KeySource, public_keys: Mapping[str, bytes] | None = None) -> None:
        self.fetch = fetch
        self.verifier = Verifier(public_keys or {})
        # -inf: the first credential with a kid we lack fetches the ring at once
        self.keys_at = float("-inf")
        self._key_fetch: asyncio.Future[None] | None = None
        self._kid_tried: dict[str, float] = {}

    async def verify(self, credential: str | None, typ: str = "access") -> Claims:
        """The credential's verified claims, or `ApiError` (401 codes, `forbidden` for the wrong type,
        `ledger_unavailable` while no key could be fetched yet)."""
        try:
            claims = self.verifier.verify(credential)
        except CredentialError as exc:
            # an unknown kid may be a key rotated in after we loaded ours (or we have none yet)
            if exc.code is not Code.INVALID_TOKEN:
                raise ApiError.from_code(exc.code, exc.message) from None
            kid = self.verifier.unknown_kid(credential)
            if kid is None and self.verifier.has_keys:  # a known key refused it: fetching cannot help
                raise ApiError.from_code(exc.code, exc.message) from None
            await self.refresh_keys(kid)
            try:
                claims = self.verifier.verify(credential)
            except CredentialError as again:
                raise ApiError.from_code(again.code, again.message) from None
        if claims.typ != typ:
            raise ApiError(ApiCode.FORBIDDEN, f"a {claims.typ} credential cannot be used here")
        return claims

    async def refresh_keys(self, kid: str | None = None) -> None:
        """Fetch the public key ring for `kid` (None: no particular one), single-flight and bounded."""
        now = time.monotonic()
        idle = self._key_fetch is None or self._key_fetch.done()
        if kid is None:
            due = now - self.keys_at > KEY_REFRESH_INTERVAL_S
        else:
            due = now - self._kid_tried.get(kid, float("-inf")) > KEY_REFRESH_INTERVAL_S
            due = due and now - self.keys_at >= KEY_REFRESH_INTERVAL_S / 25
        if self._key_fetch is None or (idle and due):
            if kid is not None:
                if len(self._kid_tried) > 10_000:
                    self._kid_tried.clear()
                self._kid_tried[kid] = now
            self.keys_at = now
            self._key_fetch = asyncio.ensure_future(self._fetch_keys())
        await asyncio.shield(self._key_fetch)
        if not self.verifier.has_keys:
            raise ApiError(ApiCode.LEDGER_UNAVAILABLE, "signing keys are not available yet; retry shortly")

    async def _fetch_keys(self) -> None:
        try:
            self.verifier.update_keys(await self.fetch())
        except Exception as exc:  # the ledger restarting: keep the keys we have, try again next interval
            log.warning("public key refresh failed: %s", type(exc).__name__)
