"""TokenGate: the token-check deployment (DESIGN §1). A thin shell over `LedgerClient`.

All ingress replicas send their admissions and settlements here, so the client's
micro-batcher merges them into few ledger-actor calls. Signatures are verified by the
ingress with the public keys this gate hands out; revocation, expiry, limits and quota are
decided by the ledger at admission.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from ledger.client import LedgerClient
from ledger.codes import Code
from ledger.entities import Admission, Decision, Settlement
from ledger.settings import LedgerSettings


@serve.deployment(name="TokenGate", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
class TokenGate:
    def __init__(self, settings: LedgerSettings) -> None:
        self.client = LedgerClient.connect(settings)

    async def admit(self, admission: Admission) -> Decision:
        return await self.client.admit(admission)

    async def settle(self, settlement: Settlement) -> Code:
        return await self.client.settle(settlement)

    async def public_keys(self) -> dict[str, bytes]:
        keys: dict[str, bytes] = await self.client.acall("public_keys")
        return keys

    async def call(self, op: str, kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """Token-scoped tree operations and reads for the HTTP routes (`actor` is always set by the caller).
        Returns the ledger's reply tuple; the caller unwraps it (`ledger.client.unwrap`)."""
        return await self.client.acall_reply(op, **kwargs)
