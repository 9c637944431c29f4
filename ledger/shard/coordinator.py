"""CoordinatorCore: what the ledger owns once, beside its shards. No Ray here.

The key ring (signing every credential the shards mint, admin credentials, rotation), reads
across the whole database (audit, admin events, alerts), where a token lives (`root_of`),
alert bookkeeping and audit retention. It never writes quota state: that is the shards' alone.
The coordinator actor (ledger/shard/actors.py) runs the periodic jobs that use it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from ledger.core.codes import Code
from ledger.core.credentials import MAX_CLAIM_CHARS, KeyRing, issue, new_jti
from ledger.core.errors import LedgerUnavailable, OperationRefused
from ledger.core.results import AdminEvent, AlertRecord, KeyRotation, UsageEvent
from ledger.core.settings import LedgerSettings
from ledger.shard.notify import DELIVERED, FAILED, PENDING, Notifier, channels_for, next_attempt_delay
from ledger.store.repository import Store, UsageQuery

log = logging.getLogger(__name__)
MAX_ADMIN_TTL_S = 366 * 86400.0
# (meta of the token and each ancestor, {"name", "team"} of the token): from the shard that owns it
AlertContext = tuple[list[dict[str, Any]], dict[str, Any]]


def no_context(token_id: str) -> AlertContext:
    return [], {"name": token_id, "team": None}


class CoordinatorCore:
    """`context_of` asks the owning shard for a token's alert contacts; its owner sets it."""

    def __init__(
        self,
        settings: LedgerSettings,
        clock: Callable[[], float] = time.time,
        context_of: Callable[[str], AlertContext] = no_context,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.context_of = context_of
        self.store = Store(settings.database_url)
        self.ring = KeyRing.open(settings.key_dir, clock=clock)
        self.notifier = Notifier(settings)
        self.delivering = threading.Lock()  # passes never overlap

    def start(self) -> None:
        """Bring the schema up to date (the shards do too; migrations are idempotent)."""
        try:
            self.store.migrate()
        except LedgerUnavailable:
            raise
        except Exception as exc:
            log.exception("ledger database migration failed")
            raise LedgerUnavailable(f"database migration failed: {type(exc).__name__}") from exc

    def close(self) -> None:
        self.store.close()

    # ---------------------------------------------------------------- credentials
    def sign(self, claims: Mapping[str, Any]) -> str:
        """The credential for claims a shard minted (`ShardCore.Unsigned.claims`)."""
        return issue(
            self.ring,
            sub=claims["sub"],
            pkg=claims["pkg"],
            jti=claims["jti"],
            typ=claims["typ"],
            exp=claims["exp"],
        )

    def issue_admin(self, name: str, ttl_s: float = 12 * 3600.0) -> str:
        """An admin credential (typ=admin) for the console and admin routes."""
        if type(name) is not str or not 0 < len(name) <= MAX_CLAIM_CHARS - 6:
            raise OperationRefused("admin name must be a short non-empty string", Code.INVALID_REQUEST)
        if type(ttl_s) not in (int, float) or not (1.0 <= ttl_s <= MAX_ADMIN_TTL_S):
            raise OperationRefused(f"ttl must be 1 s .. {MAX_ADMIN_TTL_S:.0f} s", Code.INVALID_REQUEST)
        return issue(self.ring, sub=f"admin:{name}", pkg="*", jti=new_jti(), typ="admin", exp=int(self.clock() + ttl_s))

    def public_keys(self) -> dict[str, bytes]:
        return self.ring.public_keys()

    def rotate_keys(self) -> KeyRotation:
        kid = self.ring.rotate()
        return KeyRotation(kid, self.ring.prune())

    # ---------------------------------------------------------------- whole-database reads
    def root_of(self, token_id: str) -> str | None:
        return self.store.root_of(token_id)

    def usage(
        self,
        *,
        token_id: str | None = None,
        model: str | None = None,
        outcome: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        by_token: str | None = None,
    ) -> list[UsageEvent]:
        if by_token is not None:  # a token's own reads go to its shard, which checks its subtree
            raise OperationRefused("token-scoped audit reads go to the token's shard", Code.FORBIDDEN)
        rows = self.store.usage(
            UsageQuery(token_id=token_id, model=model, outcome=outcome, since=since, until=until, limit=limit)
        )
        return cast("list[UsageEvent]", rows)

    def admin_events(self, token_id: str | None = None, limit: int = 1000) -> list[AdminEvent]:
        return cast("list[AdminEvent]", self.store.admin_events(token_id, limit))

    def alerts(self, limit: int = 1000) -> list[AlertRecord]:
        return cast("list[AlertRecord]", self.store.alerts(limit))

    # ---------------------------------------------------------------- alert bookkeeping, retention
    def acknowledge_alert(self, alert_id: int, by: str) -> bool:
        return self.store.acknowledge_alert(alert_id, by, self.clock())

    def prune_audit(self) -> dict[str, int]:
        """Delete audit rows older than the retention window (DESIGN §3: 90 days by default)."""
        return self.store.prune_audit(self.clock() - self.settings.audit_retention_days * 86400)

    def deliver_alerts(self, limit: int = 100) -> dict[str, int]:
        """One delivery pass over the due alerts (blocking network I/O: run it off any event loop);
        returns counts by outcome of this pass. Each channel of an alert is sent until it is
        delivered (then never again) or has failed `alert_max_attempts` times."""
        counts = {"alerts": 0, "sent": 0, "failed_attempts": 0}
        with self.delivering:
            for alert in self.store.due_alerts(self.clock(), limit):
                counts["alerts"] += 1
                chain, token = self.context_of(alert["token_id"])
                channels: dict[str, dict[str, Any]] = alert["channels"] or {
                    c: {"status": PENDING, "attempts": 0, "error": None, "at": None}
                    for c in channels_for(chain, self.settings)
                }
                for channel, st in channels.items():
                    if st["status"] != PENDING:
                        continue
                    err = self.notifier.send(channel, alert, token)
                    st["attempts"] += 1
                    st["at"] = time.time()
                    st["error"] = err
                    if err is None:
                        st["status"] = DELIVERED
                        counts["sent"] += 1
                    else:
                        counts["failed_attempts"] += 1
                        if st["attempts"] >= self.settings.alert_max_attempts:
                            st["status"] = FAILED
                self.store.record_delivery(alert["id"], **self._outcome(channels))
        return counts

    def _outcome(self, channels: dict[str, dict[str, Any]]) -> dict[str, Any]:
        states = {st["status"] for st in channels.values()}
        attempts = max((st["attempts"] for st in channels.values()), default=0)
        errors = [f"{c}: {st['error']}" for c, st in channels.items() if st["error"]]
        if not channels:
            status = "no_channel"
        elif PENDING in states:
            status = PENDING
        else:
            status = FAILED if FAILED in states else DELIVERED
        fields: dict[str, Any] = {
            "channels": channels,
            "status": status,
            "attempts": attempts,
            "last_error": "; ".join(errors)[:2000] or None,
            "next_attempt_at": (
                time.time() + next_attempt_delay(attempts, self.settings.alert_backoff_s) if status == PENDING else None
            ),
        }
        if status == DELIVERED:
            fields["delivered_at"] = time.time()
        return fields
