"""Typed application arguments: what `ray_config.yaml`'s `args:` and `build_app` accept.

Built once at the edge (Serve's config loader, `make serve`, tests) and passed in.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ledger import HolderConfig, LedgerSettings
from serve_app.engine.protocol import Backend
from serve_app.engine.scheduler import Policy, SchedulerConfig

DEMO_WEIGHTS = Path(__file__).resolve().parent / "demo" / "weights" / "parts_v1.pt"


class Autoscaling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=4.0, gt=0)
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)

    def serve_config(self) -> dict[str, Any]:
        return self.model_dump()


class SchedulerArgs(BaseModel):
    """`scheduler:` of a model version: how its replicas choose the next batch (DESIGN §3c)."""

    model_config = ConfigDict(extra="forbid")

    # fair: priority levels, then fair share among packages and teams; fifo: arrival order
    policy: Policy = "fair"
    # the longest a request may expect to queue (at its share of the replica's measured rate):
    # past it the request is refused at once with 503 model_busy and Retry-After, refunded
    queue_s: float = Field(default=1.0, gt=0, le=600)
    # each lower priority level's guaranteed share of the images while it has work queued
    min_share: float = Field(default=0.1, gt=0, le=0.5)
    # images queued in one replica in all (memory), and the requests Serve hands a replica at once
    max_queued: int = Field(default=4096, ge=1, le=1_000_000)
    max_ongoing: int = Field(default=1024, ge=1, le=100_000)


class ModelSpec(BaseModel):
    """One model version = one Detector deployment."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    version: str = Field(default="1", pattern=r"^[A-Za-z0-9_.\-]+$")
    weights: Path
    backend: Backend = "torch"  # a name in serve_app.engine.registry.BACKENDS
    imgsz: int = Field(default=640, ge=32, le=4096)
    half: bool = False
    cost_units: int = Field(default=1, ge=1)
    num_gpus: float = Field(default=0.0, ge=0)
    num_cpus: float = Field(default=1.0, ge=0)
    max_batch_size: int = Field(default=8, ge=1, le=256)
    batch_wait_timeout_s: float = Field(default=0.005, ge=0)
    # a request this version has not answered within this many seconds (queueing for a replica and
    # a cold start included) gets 503 model_unavailable with Retry-After, and is refunded
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # how long Serve lets a stopping replica finish its requests before it kills it (Serve's default)
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0, le=3600)
    autoscaling: Autoscaling = Autoscaling()
    scheduler: SchedulerArgs = SchedulerArgs()

    @model_validator(mode="after")
    def _queue_within_timeout(self) -> ModelSpec:
        """A queue bound the caller's timeout cuts short is a configuration error when it was set;
        the default is cut to half the timeout (`scheduler_config`)."""
        if "queue_s" in self.scheduler.model_fields_set and self.scheduler.queue_s >= self.timeout_s:
            raise ValueError(
                f"scheduler.queue_s ({self.scheduler.queue_s:g}) must be below timeout_s ({self.timeout_s:g})"
            )
        if self.scheduler.max_queued < self.max_batch_size:
            raise ValueError("scheduler.max_queued must be at least max_batch_size")
        self.scheduler_config()  # what the replicas will build: refused here, not in a replica's __init__
        return self

    def scheduler_config(self) -> SchedulerConfig:
        s = self.scheduler
        queue_s = s.queue_s if "queue_s" in s.model_fields_set else min(s.queue_s, self.timeout_s / 2)
        return SchedulerConfig(
            s.policy, queue_s, self.max_batch_size, self.batch_wait_timeout_s, s.min_share, s.max_queued
        )

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def deployment_name(self) -> str:
        return f"Detector-{self.name}-{self.version}".replace(".", "_")

    def check_weights(self) -> None:
        """A missing weights file is a clear startup error naming the path."""
        if not self.weights.is_file():
            raise FileNotFoundError(f"model {self.key}: weights file not found: {self.weights.resolve()}")

    def deployment_options(self) -> dict[str, Any]:
        return {
            "name": self.deployment_name,
            "ray_actor_options": {
                "num_cpus": self.num_cpus,
                "num_gpus": self.num_gpus,
                # whatever shell started the cluster: ultralytics in a replica never downloads
                "runtime_env": {"env_vars": {"YOLO_OFFLINE": "1"}},
            },
            "autoscaling_config": self.autoscaling.serve_config(),
            # requests wait in the replica's scheduler, not in the callers' FIFO routers
            "max_ongoing_requests": self.scheduler.max_ongoing,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }


class RequestLimits(BaseModel):
    """What the ingress accepts in one request (body, pixels, images) and whose forwarded address it believes."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(default=40_000_000, ge=1024)
    max_images: int = Field(default=16, ge=1, le=256)
    # a frame stream (gRPC DetectStream, WebSocket /v1/detect/stream): frames of one session in
    # detection at once; a frame beyond them is refused at once as model_busy (never charged)
    stream_window: int = Field(default=8, ge=1, le=256)
    # answers of one session computed and not yet taken by its client: past them the session stops
    # reading frames (flow control slows the client) until the client reads
    stream_unsent: int = Field(default=32, ge=1, le=4096)
    # peers whose X-Forwarded-For is believed; nobody's by default
    trusted_proxies: list[str] = []


_LEDGER = LedgerSettings()  # the defaults, from their one definition


class LedgerArgs(BaseModel):
    """`ledger:` of ray_config.yaml: how the ledger is laid out on the cluster, and its quota
    leases. The defaults and checks are `LedgerSettings`' and `HolderConfig`'s own: these args are
    checked by building those, so a value is refused here exactly as the ledger would refuse it."""

    model_config = ConfigDict(extra="forbid")

    # shards (named actors), each owning the packages whose root maps to it; change it only with
    # the whole ledger stopped
    shards: int = _LEDGER.shards
    # custom Ray resources every shard asks for (shards hold no files: any node with them will do)
    shard_resources: dict[str, float] = {}
    # quota leases of ingress replicas (DESIGN §3a): a replica silent this long loses its lease;
    # its units in doubt are refunded (never charged without an answer) or charged
    lease_ttl_s: float = _LEDGER.lease_ttl_s
    lost_lease_policy: Literal["refund", "charge"] = "refund"
    # a grant takes at most 1/lease_max_share of a token's free units; tokens with fewer free
    # units than lease_strict_below admit at the shard
    lease_max_share: int = _LEDGER.lease_max_share
    lease_strict_below: int = _LEDGER.lease_strict_below
    # each ingress replica's lease holder: report interval, refill sizes, idle release, ...
    lease_holder: HolderConfig = HolderConfig()
    # the tier table at the detectors (DESIGN §3c): changes to the built-in levels and weights,
    # e.g. {pro: {level: 1, weight: 3}, custom: {level: 0}}; the names are the four tiers
    tiers: dict[str, dict[str, float]] = {}

    @model_validator(mode="after")
    def _as_the_ledger_checks(self) -> LedgerArgs:
        self.apply(_LEDGER)  # ConfigError (a ValueError) names every value the ledger refuses
        return self

    def apply(self, settings: LedgerSettings) -> LedgerSettings:
        return replace(
            settings,
            shards=self.shards,
            shard_resources=dict(self.shard_resources),
            lease_ttl_s=self.lease_ttl_s,
            lost_lease_policy=self.lost_lease_policy,
            lease_max_share=self.lease_max_share,
            lease_strict_below=self.lease_strict_below,
            tiers={k: dict(v) for k, v in self.tiers.items()},
        )


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    database_url: str = _LEDGER.database_url
    data_dir: Path = _LEDGER.data_dir
    ledger_name: str = _LEDGER.actor_name
    namespace: str = _LEDGER.namespace
    # custom resources of the node that holds data_dir (cluster/): the ledger actor is placed there
    ledger_resources: dict[str, float] = {}
    ledger: LedgerArgs = Field(default=LedgerArgs())
    default_model: str = "parts"
    # HTTP/handle ingress replicas: each verifies, decodes, admits from its own quota leases and
    # calls the detectors; `ingress_autoscaling` (if set) replaces the fixed count
    ingress_replicas: int = Field(default=1, ge=1, le=64)
    ingress_autoscaling: Autoscaling | None = None
    # requests one ingress replica holds at once. A request the detectors queue (DESIGN §3c) holds
    # its ingress slot while it waits: past this, Serve's proxy queues requests in FIFO order in front
    # of the ingress, whoever sends them, so keep it above what the detectors' queues hold
    # (`scheduler.queue_s` x their rate); each held request keeps its decoded images in memory
    ingress_max_ongoing: int = Field(default=1024, ge=1, le=100_000)
    models: list[ModelSpec] = [ModelSpec(name="parts", version="1", weights=DEMO_WEIGHTS, imgsz=320)]
    limits: RequestLimits = RequestLimits()

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        keys = [m.key for m in models]
        if len(set(keys)) != len(keys) or not models:
            raise ValueError(f"model versions must be unique and at least one: {keys}")
        return models

    @field_validator("ingress_autoscaling")
    @classmethod
    def _serving(cls, a: Autoscaling | None) -> Autoscaling | None:
        if a is not None and a.min_replicas < 1:
            raise ValueError("the ingress needs min_replicas >= 1: with none, nothing answers HTTP")
        return a

    def ingress_options(self) -> dict[str, Any]:
        ongoing = {"max_ongoing_requests": self.ingress_max_ongoing}
        if self.ingress_autoscaling is not None:
            return {"autoscaling_config": self.ingress_autoscaling.serve_config(), **ongoing}
        return {"num_replicas": self.ingress_replicas, **ongoing}

    def ledger_settings(self, env: LedgerSettings | None = None) -> LedgerSettings:
        """The ledger's settings: these args for where it lives and its leases; alert delivery and
        retention (SMTP server, webhook secret, catch-all recipients) from `env`, the environment
        read once at the edge (`LedgerSettings.from_env()` when not given). Build it once per app."""
        base = replace(
            env if env is not None else LedgerSettings.from_env(),
            database_url=self.database_url,
            data_dir=self.data_dir,
            actor_name=self.ledger_name,
            namespace=self.namespace,
            actor_resources=dict(self.ledger_resources),
            known_models=tuple(m.key for m in self.models),
        )
        return self.ledger.apply(base).resolved()
