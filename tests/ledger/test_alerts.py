"""Alerts delivered for real: an aiosmtpd SMTP server and an HTTP webhook receiver on 127.0.0.1,
the real ledger actor on SQLite and PostgreSQL. Each threshold fires once and each channel gets it
exactly once, failed channels are retried with backoff, and the audit prune keeps the window."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from ledger.client.over_ray import LedgerClient
from ledger.client.service import launch, stop
from ledger.core.codes import Code
from ledger.core.credentials import Verifier
from ledger.core.entities import Admission, TokenSpec, contact_problems
from ledger.core.errors import OperationRefused
from ledger.core.settings import LedgerSettings
from ledger.store.repository import Store

pytestmark = pytest.mark.ray


class Inbox:
    """aiosmtpd handler: keeps every message it is handed."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


@dataclasses.dataclass
class Hooks:
    url: str
    received: list[tuple[dict[str, Any], dict[str, str]]]
    fail_next: list[int]  # answer 500 to this many requests first


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox = Inbox()
    with socket.socket() as probe:  # aiosmtpd needs a concrete port: it connects to it to start
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctl = Controller(inbox, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        yield inbox, port
    finally:
        ctl.stop()


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    state = Hooks("", [], [0])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if state.fail_next[0] > 0:
                state.fail_next[0] -= 1
                self.send_response(500)
                self.end_headers()
                return
            state.received.append((json.loads(body), {k.lower(): v for k, v in self.headers.items()}))
            state.received[-1][1]["_raw"] = body.decode()
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/alerts"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def alerting(ray_cluster: None, settings: LedgerSettings, smtp: tuple[Inbox, int]) -> Iterator[LedgerClient]:
    s = dataclasses.replace(
        settings,
        smtp_host="127.0.0.1",
        smtp_port=smtp[1],
        smtp_sender="alerts@localhost",
        alert_emails=("ops@localhost",),  # the operator's catch-all
        webhook_secret="s3cret",
        alert_backoff_s=0.0,  # retry at the next pass
        alert_max_attempts=3,
    )
    client = launch(s)
    yield client
    stop(client)


def spend(client: LedgerClient, token_id: str, jti: str, units: int) -> None:
    rows = [Admission(uuid.uuid4().hex, token_id, jti, 1, "parts@1") for _ in range(units)]
    assert {d.code for d in client.admit_sync(rows)} == {Code.OK}


def test_given_thresholds_crossed_then_each_fires_once_and_each_channel_gets_it_exactly_once(
    alerting: LedgerClient, smtp: tuple[Inbox, int], hooks: Hooks
) -> None:
    inbox, _ = smtp
    pkg = alerting.create_package(
        TokenSpec.build("factory-a", 20, meta={"alert_emails": ["pm@example.com"], "alert_webhooks": [hooks.url]})
    )
    root = pkg.token.id
    team = alerting.split(root, TokenSpec.build("front-end", 10))  # no contacts: inherits the package's
    tid = team.token.id
    jti = Verifier(alerting.public_keys()).verify(team.credential).jti
    spend(alerting, tid, jti, 8)  # team 80 % (package 40 %)
    assert alerting.deliver_alerts()["sent"] == 3  # pm e-mail, ops catch-all, webhook
    spend(alerting, tid, jti, 2)  # team 95 % and 100 %, package 50 %
    alerting.deliver_alerts()
    for _ in range(3):  # further passes send nothing again
        assert alerting.deliver_alerts()["sent"] == 0

    alerts = sorted(alerting.alerts(), key=lambda a: a["threshold"])
    assert [(a["token_id"], a["threshold"], a["status"]) for a in alerts] == [
        (tid, 80, "delivered"),
        (tid, 95, "delivered"),
        (tid, 100, "delivered"),
    ]
    subjects = sorted((m["To"], m["Subject"]) for m in inbox.messages)
    assert len(subjects) == 6 and len(set(subjects)) == 6
    assert {to for to, _ in subjects} == {"pm@example.com", "ops@localhost"}
    assert {m["Message-ID"] for m in inbox.messages} == {f"<alert-{a['id']}@yolo-tokens>" for a in alerts}
    assert sorted(p["threshold"] for p, _ in hooks.received) == [80, 95, 100]
    payload, headers = hooks.received[0]
    assert payload["token_id"] == tid and payload["package_id"] == root and payload["allocation"] == 10
    expected = hmac.new(b"s3cret", headers["_raw"].encode(), hashlib.sha256).hexdigest()
    assert headers["x-yt-signature"] == f"sha256={expected}"
    assert headers["idempotency-key"] == f"alert-{payload['alert_id']}"

    assert alerting.acknowledge_alert(alerts[0]["id"], "pm") is True
    assert alerting.acknowledge_alert(alerts[0]["id"], "pm") is False
    assert next(a for a in alerting.alerts() if a["id"] == alerts[0]["id"])["acknowledged_by"] == "pm"


def test_given_a_failing_webhook_then_it_is_retried_until_delivered_and_email_is_not_resent(
    alerting: LedgerClient, smtp: tuple[Inbox, int], hooks: Hooks
) -> None:
    inbox, _ = smtp
    hooks.fail_next[0] = 2
    pkg = alerting.create_package(TokenSpec.build("retry", 5, meta={"alert_webhooks": [hooks.url]}))
    tid = pkg.token.id
    spend(alerting, tid, Verifier(alerting.public_keys()).verify(pkg.credential).jti, 4)  # 80 %
    passes = [alerting.deliver_alerts() for _ in range(3)]
    assert [p["failed_attempts"] for p in passes] == [1, 1, 0]
    (alert,) = alerting.alerts()
    assert alert["status"] == "delivered" and alert["channels"][f"webhook:{hooks.url}"]["attempts"] == 3
    assert alert["channels"]["email:ops@localhost"]["attempts"] == 1
    assert len(hooks.received) == 1 and len(inbox.messages) == 1


def test_given_an_unreachable_channel_then_it_gives_up_after_max_attempts(
    alerting: LedgerClient, smtp: tuple[Inbox, int]
) -> None:
    pkg = alerting.create_package(TokenSpec.build("dead", 5, meta={"alert_webhooks": ["http://127.0.0.1:9/none"]}))
    spend(alerting, pkg.token.id, Verifier(alerting.public_keys()).verify(pkg.credential).jti, 5)
    for _ in range(5):
        alerting.deliver_alerts()
    alerts = alerting.alerts()
    assert len(alerts) == 3 and {a["status"] for a in alerts} == {"failed"}
    assert all(a["channels"]["webhook:http://127.0.0.1:9/none"]["attempts"] == 3 for a in alerts)
    assert all("Connection refused" in a["last_error"] or "URLError" in a["last_error"] for a in alerts)
    assert len(smtp[0].messages) == 3  # the e-mail channel of each was delivered once regardless


def test_given_bad_contacts_then_the_token_is_refused() -> None:
    assert contact_problems({"alert_emails": ["x"], "alert_webhooks": ["file:///etc/passwd"]})
    assert contact_problems({"alert_emails": "ops@example.com"})
    with pytest.raises(OperationRefused):
        from ledger.core.book import QuotaBook

        QuotaBook(time.time).tree.create_package(
            "t1", "j1", TokenSpec.build("p", 5, meta={"alert_webhooks": ["gopher://x"]})
        )


def test_given_old_and_new_audit_rows_then_the_prune_deletes_only_those_outside_the_window(
    ledger: LedgerClient, settings: LedgerSettings
) -> None:
    pkg = ledger.create_package(TokenSpec.build("audit", 10))
    tid = pkg.token.id
    jti = Verifier(ledger.public_keys()).verify(pkg.credential).jti
    spend(ledger, tid, jti, 4)
    store = Store(settings.database_url)
    try:
        day = 86400.0
        with store.engine.begin() as conn:  # age two usage rows and the admin event past 90 days
            from sqlalchemy import text

            ids = [r[0] for r in conn.execute(text("SELECT id FROM usage_events ORDER BY id"))]
            conn.execute(text("UPDATE usage_events SET ts = ts - :d, state = 'settled' WHERE id IN (:a, :b)"),
                         {"d": 91 * day, "a": ids[0], "b": ids[1]})  # fmt: skip
            conn.execute(text("UPDATE usage_events SET ts = ts - :d WHERE id = :c"), {"d": 89 * day, "c": ids[2]})
            conn.execute(text("UPDATE admin_events SET ts = ts - :d"), {"d": 91 * day})
        deleted = ledger.prune_audit()
        assert deleted["usage_events"] == 2 and deleted["admin_events"] == 1
        with store.engine.connect() as conn:
            left = [r[0] for r in conn.execute(text("SELECT id FROM usage_events ORDER BY id"))]
        assert left == ids[2:]
        assert ledger.token(tid).used == 4  # balances never come from the audit rows
    finally:
        store.close()


def test_given_a_token_expiring_within_a_week_then_one_expiry_alert_rearmed_by_a_new_expiry() -> None:
    from ledger.core.entities import TokenLimits
    from tests.ledger.book_helpers import new_book, package

    book, clock = new_book()
    day = 86400.0
    n = package(book, 10, TokenLimits(expires_at=clock.t + 10 * day))
    book.drain()
    assert book.tree.warn_expiring(7 * day) == [] and book.drain().alerts == []
    clock.advance(3.5 * day)  # 6.5 days left
    assert book.tree.warn_expiring(7 * day) == [n.id]
    (alert,) = book.drain().alerts
    assert (alert["kind"], alert["threshold"], alert["token_id"]) == ("expiry", 7, n.id)
    assert book.tree.warn_expiring(7 * day) == []  # once
    book.tree.update_limits(n.id, TokenLimits(expires_at=clock.t + 30 * day))
    clock.advance(24 * day)  # 6 days left of the new expiry: warned again
    assert book.tree.warn_expiring(7 * day) == [n.id]
