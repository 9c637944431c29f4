"""Ledger settings: the ONE place that reads environment variables for `ledger`.

Build once at the edge (`LedgerSettings.from_env()` or explicit arguments) and pass in.
Variables (all optional):
    YT_DATABASE_URL   sqlite:///./var/ledger.db | postgresql+psycopg://user@host:port/db
    YT_DATA_DIR       ./var          (key ring lives in $YT_DATA_DIR/keys, mode 0700/0600)
    YT_LEDGER_NAME    yolo-tokens-ledger   (the coordinator actor; shards are <name>-shard-<i>)
    YT_LEDGER_SHARDS  1                    (ledger shards; change only with the whole ledger stopped)
    YT_NAMESPACE      yolo-tokens          (Ray namespace)
    YT_SMTP_HOST, YT_SMTP_PORT (25), YT_SMTP_STARTTLS (0|1), YT_SMTP_SENDER, YT_SMTP_USER,
    YT_SMTP_PASSWORD  alert e-mail; no host = e-mail channels fail with a clear error
    YT_ALERT_EMAILS, YT_ALERT_WEBHOOKS   comma-separated catch-all recipients of every alert
    YT_WEBHOOK_SECRET HMAC-SHA256 key for the X-YT-Signature header of webhook alerts
    YT_AUDIT_RETENTION_DAYS  90    usage/admin events older than this are pruned
    YT_URL            http://127.0.0.1:8000   (service URL for `yolo-tokens detect` and the console)
    YT_RAY_ADDRESS    auto                    (Ray cluster the console attaches to)
    YT_TOKEN          credential for `yolo-tokens detect` (keeps it off the command line)
    YT_ADMIN_TOKEN    admin credential for the CLI over HTTP (default: the one `serve` wrote to
                      ~/.yolo-tokens/admin.json, or $YT_ADMIN_FILE)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ledger.core.errors import ConfigError
from ledger.core.service import service_table

DEFAULT_DATA_DIR = Path("var")
LOST_LEASE_POLICIES = ("refund", "charge")


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    database_url: str = f"sqlite:///{DEFAULT_DATA_DIR / 'ledger.db'}"
    data_dir: Path = DEFAULT_DATA_DIR
    actor_name: str = "yolo-tokens-ledger"
    namespace: str = "yolo-tokens"
    # ledger shards (named, detached actors), each owning the packages whose root maps to it
    shards: int = 1
    # admissions per actor call sent by one client; the actor commits all queued calls together
    max_batch: int = 4096
    # unsettled admissions older than this are kept charged and no longer refundable after a restart
    settle_window_s: float = 3600.0
    # settled request ids remembered so that a retried request is not charged twice
    recent_window_s: float = 120.0
    # credential lifetime for tokens that have no expiry of their own
    default_credential_ttl_s: float = 365 * 24 * 3600.0
    # how often the actor sweeps expired tokens and prunes idempotency records
    sweep_interval_s: float = 30.0
    # levels a token tree may have (a package root alone is one); deeper splits are refused
    max_tree_depth: int = 16
    # an Idempotency-Key admission unsettled this long was never answered: it is refunded and the
    # key freed (must exceed the serving side's detector timeout, 30 s)
    idem_pending_timeout_s: float = 120.0
    # custom Ray resources the ledger actor asks for, e.g. {"ledger_host": 0.001}: on a cluster this
    # pins it to the node that holds data_dir (the signing keys); empty = anywhere (one-node runs)
    actor_resources: dict[str, float] = field(default_factory=dict)
    # custom Ray resources every shard asks for (shards hold no files: any node will do)
    # the model versions the serving side deploys (name@version): token allowlists may name only
    # these (`unknown_model` otherwise); empty = not known (a ledger on its own takes any name)
    known_models: tuple[str, ...] = ()
    shard_resources: dict[str, float] = field(default_factory=dict)
    # alert delivery (ledger/shard/notify.py), run by the actor's periodic loop
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_sender: str = "yolo-tokens@localhost"
    smtp_user: str | None = None
    smtp_password: str | None = None
    alert_emails: tuple[str, ...] = ()
    alert_webhooks: tuple[str, ...] = ()
    webhook_secret: str | None = None
    notify_timeout_s: float = 10.0
    alert_max_attempts: int = 6
    alert_backoff_s: float = 2.0
    # an `expiry` alert goes out this many days before a token expires
    expiry_warning_days: float = 7.0
    # audit retention: older usage and admin events are deleted by the periodic loop
    audit_retention_days: float = 90.0
    prune_interval_s: float = 3600.0
    # quota leases of ingress replicas (DESIGN §3a): a holder silent this long loses its lease, and
    # the units in doubt are settled by `lost_lease_policy` (refund: never charged without an
    # answer; charge: never served unpaid); a grant takes at most 1/lease_max_share of `free`, and
    # tokens with fewer free units than lease_strict_below admit synchronously at the shard
    lease_ttl_s: float = 10.0
    lost_lease_policy: str = "refund"
    lease_max_share: int = 4
    lease_strict_below: int = 16
    # the tier table's priority levels and weights at the detectors (DESIGN §3c), as changes to the
    # built-in one (ledger.core.service.SERVICE_CLASSES): {"pro": {"level": 1, "weight": 3}}
    tiers: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """The ONE check of the shard and lease settings: `ray_config.yaml`'s `ledger:` args are
        checked by building these (serve_app.config.LedgerArgs), the environment's at `from_env`."""
        problems = [
            f"{name} must be {rule}"
            for name, ok, rule in (
                ("shards", 1 <= self.shards <= 1024, "1-1024"),
                ("max_batch", self.max_batch >= 1, ">= 1"),
                ("lease_ttl_s", 1.0 <= self.lease_ttl_s <= 3600.0, "1-3600 s"),
                ("lost_lease_policy", self.lost_lease_policy in LOST_LEASE_POLICIES, f"one of {LOST_LEASE_POLICIES}"),
                ("lease_max_share", self.lease_max_share >= 1, ">= 1"),
                ("lease_strict_below", self.lease_strict_below >= 0, ">= 0"),
            )
            if not ok
        ]
        if problems:
            raise ConfigError("ledger settings: " + "; ".join(problems))
        service_table(self.tiers)  # ConfigError names a bad tier

    @property
    def key_dir(self) -> Path:
        return self.data_dir / "keys"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> LedgerSettings:
        env = os.environ if env is None else env
        default = cls()
        data_dir = Path(env.get("YT_DATA_DIR", str(DEFAULT_DATA_DIR)))
        s = replace(
            default,
            database_url=env.get("YT_DATABASE_URL", f"sqlite:///{data_dir / 'ledger.db'}"),
            data_dir=data_dir,
            actor_name=env.get("YT_LEDGER_NAME", default.actor_name),
            namespace=env.get("YT_NAMESPACE", default.namespace),
            shards=int(env.get("YT_LEDGER_SHARDS", default.shards)),
            smtp_host=env.get("YT_SMTP_HOST") or None,
            smtp_port=int(env.get("YT_SMTP_PORT", default.smtp_port)),
            smtp_starttls=env.get("YT_SMTP_STARTTLS", "0").lower() in ("1", "true", "yes"),
            smtp_sender=env.get("YT_SMTP_SENDER", default.smtp_sender),
            smtp_user=env.get("YT_SMTP_USER") or None,
            smtp_password=env.get("YT_SMTP_PASSWORD") or None,
            alert_emails=_csv(env.get("YT_ALERT_EMAILS")),
            alert_webhooks=_csv(env.get("YT_ALERT_WEBHOOKS")),
            webhook_secret=env.get("YT_WEBHOOK_SECRET") or None,
            audit_retention_days=float(env.get("YT_AUDIT_RETENTION_DAYS", default.audit_retention_days)),
            lease_ttl_s=float(env.get("YT_LEASE_TTL_S", default.lease_ttl_s)),
            lost_lease_policy=env.get("YT_LOST_LEASE_POLICY", default.lost_lease_policy),
        )
        return replace(s, **overrides)  # type: ignore[arg-type]

    def resolved(self) -> LedgerSettings:
        """Absolute paths, so an actor started from another working directory finds the same files."""
        url = self.database_url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
            url = prefix + str(Path(url[len(prefix) :]).resolve())
        return replace(self, database_url=url, data_dir=self.data_dir.resolve())


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What an HTTP client of a running service (`yolo-tokens detect`) takes from the environment."""

    url: str = "http://127.0.0.1:8000"
    token: str | None = None
    ray_address: str = "auto"  # the console and CLI attach to this Ray cluster
    admin_token: str | None = None  # the CLI over HTTP (`--url`): an admin credential

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientSettings:
        env = os.environ if env is None else env
        default = cls()
        return cls(
            url=env.get("YT_URL", default.url),
            token=env.get("YT_TOKEN") or None,
            ray_address=env.get("YT_RAY_ADDRESS", default.ray_address),
            admin_token=env.get("YT_ADMIN_TOKEN") or None,
        )


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())
