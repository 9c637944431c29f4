"""The width of every text column the ledger writes, defined once: `ledger.store.models` builds
its tables from these, and the checks that refuse a value before anything is recorded (the book,
the lease desk, the admission rules, the serving side's header checks) read the same numbers, so
a value that passes a check always fits its column.

They live in the core, not in `store/`, because the core's checks need them and the core imports
nothing above it (the `ledger-layers` contract). The migrations keep their own literal widths:
they describe the schema as each version wrote it.
"""

from __future__ import annotations

TOKEN_ID = 40  # tokens.id/root_id/parent_id, every *.token_id and *.root_id, leases.id
JTI = 64  # tokens.jti: a credential's id
NAME = 200  # tokens.name, tokens.team
STATUS = 16  # tokens.status, usage_events.state, alerts.status, idempotency.state
REQUEST_ID = 64  # usage_events.request_id, idempotency.request_id
MODEL = 200  # usage_events.model: a model name or name@version
OUTCOME = 40  # usage_events.outcome
CLIENT_IP = 64  # usage_events.client_ip
BODY_HASH = 128  # usage_events.body_hash, idempotency.body_hash
IDEMPOTENCY_KEY = 255  # idempotency.key: an Idempotency-Key header
ADMIN = 80  # admin_events.actor (who acted: a token id, an admin's name, "ledger"), alerts.acknowledged_by
ACTION = 40  # admin_events.action
ALERT_KIND = 20  # alerts.kind
HOLDER = 120  # leases.holder (a LeaseHolder's id), ledger_shards.holder (the fence owner), request_copies.copy
