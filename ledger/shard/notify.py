"""Alert delivery: SMTP e-mail and JSON webhooks (stdlib only; no Ray, no database).

    alert row (fired once per threshold by the book) ──► channels of the token
        (its own `meta.alert_emails` / `meta.alert_webhooks`, else the nearest ancestor's,
         plus the operator's catch-all from settings)
    ──► one attempt per due channel ──► per-channel status, recorded by the ledger actor

Each channel of an alert is delivered once: a delivered channel is never sent again, a failed
one is retried with exponential backoff up to `alert_max_attempts`. Receivers can drop the rare
duplicate (a crash between sending and recording) by the alert's id: the e-mail's Message-ID
and the webhook's `Idempotency-Key` header are derived from it. Webhook bodies are signed with
HMAC-SHA256 when a secret is configured (`X-YT-Signature: sha256=<hex>`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import smtplib
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from email.message import EmailMessage
from typing import Any

from ledger.core.settings import LedgerSettings

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


def channels_for(chain: Sequence[Mapping[str, Any]], settings: LedgerSettings) -> list[str]:
    """Channel ids (`email:<addr>`, `webhook:<url>`) for a token whose meta chain is given from
    the token up to its root: the nearest node that names contacts, plus the catch-all."""
    out: list[str] = []
    for meta in chain:
        emails, hooks = meta.get("alert_emails") or [], meta.get("alert_webhooks") or []
        if emails or hooks:
            out += [f"email:{e}" for e in emails] + [f"webhook:{u}" for u in hooks]
            break
    out += [f"email:{e}" for e in settings.alert_emails] + [f"webhook:{u}" for u in settings.alert_webhooks]
    return list(dict.fromkeys(out))  # de-duplicated, order kept


def describe(alert: Mapping[str, Any], token: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Subject, plain-text body and JSON payload of one alert."""
    name = token.get("name", alert["token_id"])
    if alert["kind"] == "expiry":
        subject = f"[yolo-tokens] token {name!r} expires in {alert['threshold']} days"
        text = f"Token {name} ({alert['token_id']}, package {alert['root_id']}) expires soon."
    else:
        pct = alert["threshold"]
        subject = f"[yolo-tokens] token {name!r} has used {pct}% of its quota"
        text = (
            f"Token {name} ({alert['token_id']}, package {alert['root_id']}) has consumed "
            f"{alert['consumed']} of {alert['allocation']} units ({pct}% threshold crossed)."
        )
    payload = {
        "alert_id": alert["id"],
        "kind": alert["kind"],
        "token_id": alert["token_id"],
        "token_name": name,
        "team": token.get("team"),
        "package_id": alert["root_id"],
        "threshold": alert["threshold"],
        "consumed": alert["consumed"],
        "allocation": alert["allocation"],
        "fired_at": alert["ts"],
    }
    return subject, text, payload


class Notifier:
    """Sends one alert to one channel; returns None on success or the error text."""

    def __init__(self, settings: LedgerSettings) -> None:
        self.s = settings

    def send(self, channel: str, alert: Mapping[str, Any], token: Mapping[str, Any]) -> str | None:
        subject, text, payload = describe(alert, token)
        kind, _, target = channel.partition(":")
        try:
            if kind == "email":
                self._email(target, subject, text, alert["id"])
            elif kind == "webhook":
                self._webhook(target, payload, alert["id"])
            else:
                return f"unknown channel kind {kind!r}"
        except (OSError, smtplib.SMTPException, urllib.error.URLError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        return None

    def _email(self, to: str, subject: str, text: str, alert_id: int) -> None:
        if not self.s.smtp_host:
            raise ValueError("no SMTP server configured (YT_SMTP_HOST)")
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = self.s.smtp_sender, to, subject
        msg["Message-ID"] = f"<alert-{alert_id}@yolo-tokens>"
        msg.set_content(text)
        with smtplib.SMTP(self.s.smtp_host, self.s.smtp_port, timeout=self.s.notify_timeout_s) as smtp:
            if self.s.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
            if self.s.smtp_user:
                smtp.login(self.s.smtp_user, self.s.smtp_password or "")
            smtp.send_message(msg)

    def _webhook(self, url: str, payload: Mapping[str, Any], alert_id: int) -> None:
        body = json.dumps(payload, sort_keys=True).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "yolo-tokens-alerts",
            "Idempotency-Key": f"alert-{alert_id}",
        }
        if self.s.webhook_secret:
            digest = hmac.new(self.s.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
            headers["X-YT-Signature"] = f"sha256={digest}"
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.s.notify_timeout_s) as resp:
            if not 200 <= resp.status < 300:
                raise ValueError(f"webhook answered {resp.status}")


def next_attempt_delay(attempts: int, base_s: float) -> float:
    """Backoff after `attempts` failed tries: base, 2·base, 4·base, … capped at one hour."""
    return float(min(3600.0, base_s * 2 ** max(0, attempts - 1)))
