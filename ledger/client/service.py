"""The ledger's one launch step, and how everyone else attaches.

`launch(settings)` creates the coordinator and the shards (named, detached, restarting actors),
once: `yolo-tokens serve` runs it, and so does the app builder (`serve run ray_config.yaml`),
idempotently. A ledger already running with other settings is a `ConfigError`, never a silent
"the first caller's settings win". Gateways, the CLI and the console only `attach`.

The actors answer only callers holding the ledger's capability (`ledger.core.capability`): `launch`
creates it in the key directory and hands it to the actors; `attach` reads it there unless it is
given one (the serving replicas get theirs from the app builder, on nodes without the key directory).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from ledger.client.over_ray import LedgerClient
from ledger.core.capability import Capability
from ledger.core.errors import ConfigError, LedgerUnavailable
from ledger.core.settings import LedgerSettings
from ledger.shard.actors import CoordinatorActor, ShardActor, shard_name

ACTOR_OPTIONS: dict[str, Any] = {
    "lifetime": "detached",
    "get_if_exists": True,
    "max_restarts": -1,
    "max_task_retries": 0,
    "max_concurrency": 10_000,
}


def launch(settings: LedgerSettings, **client_options: Any) -> LedgerClient:
    """Start the ledger's actors if they are not running; attach to them either way."""
    settings = settings.resolved()
    capability = _capability(settings)
    coordinator: Any = CoordinatorActor.options(  # type: ignore[attr-defined]
        name=settings.actor_name,
        namespace=settings.namespace,
        resources=dict(settings.actor_resources),
        **ACTOR_OPTIONS,
    ).remote(settings, settings.shards, capability)
    try:
        running = ray.get(coordinator.describe.remote(capability))
    except RayTaskError as exc:  # its describe() takes no capability: an older version's actor
        raise ConfigError(
            f"ledger {settings.actor_name!r} was started by an older version of yolo-tokens: stop it "
            "(yolo-tokens serve stops it on Ctrl-C; or ray stop) and start again"
        ) from exc
    if "settings" not in running:  # a ledger by that name launched with another key directory
        raise ConfigError(
            f"ledger {settings.actor_name!r} already runs with another capability (another key directory "
            f"than {settings.key_dir}): stop it first, or use its settings"
        )
    # the deployed models are the serving side's: another app may share this ledger with other
    # models (the running ledger keeps the list it started with)
    if replace(running["settings"], known_models=()) != replace(settings, known_models=()):
        theirs, ours = asdict(running["settings"]), asdict(settings)
        differ = sorted(k for k in ours if ours[k] != theirs.get(k) and k != "known_models")
        raise ConfigError(
            f"ledger {settings.actor_name!r} already runs with other settings ({', '.join(differ)}): "
            "stop it first, or use its settings"
        )
    shards = [
        ShardActor.options(  # type: ignore[attr-defined]
            name=shard_name(settings, i),
            namespace=settings.namespace,
            resources=dict(settings.shard_resources),
            # shards on as many nodes as can hold them: losing a node pauses fewer packages
            scheduling_strategy="SPREAD",
            **ACTOR_OPTIONS,
        ).remote(settings, i, settings.shards, capability)
        for i in range(settings.shards)
    ]
    for i, stats in enumerate(ray.get([s.stats.remote(capability) for s in shards])):
        if (stats["shard"], stats["count"]) != (i, settings.shards):  # an older ledger's shard by that name
            raise ConfigError(
                f"{shard_name(settings, i)} runs as shard {stats['shard']} of {stats['count']}, not {i} of "
                f"{settings.shards}: stop the whole ledger before changing its shard count"
            )
    return attach(settings, capability=capability, **client_options)


def _capability(settings: LedgerSettings) -> Capability:
    """The ledger's capability, created on first launch beside the signing keys: here, or on the node
    that holds them when the ledger is pinned to one (`actor_resources`: `serve deploy` may build the
    app on any node)."""
    if not settings.actor_resources:
        return _kept_capability(settings.key_dir)
    task: Any = ray.remote(num_cpus=0, max_retries=3)(_kept_capability)
    capability: Capability = ray.get(task.options(resources=dict(settings.actor_resources)).remote(settings.key_dir))
    return capability


def _kept_capability(key_dir: Path) -> Capability:
    capability = Capability.load(key_dir, create=True)
    if capability is None:  # create=True never answers None
        raise ConfigError(f"no ledger capability could be kept in {key_dir}")
    return capability


def attach(
    settings: LedgerSettings, *, capability: Capability | None = None, wait_s: float = 30.0, **client_options: Any
) -> LedgerClient:
    """A client of the running ledger named by `settings` (its name and namespace); the shard
    count is the running ledger's. Waits up to `wait_s` while the coordinator restarts.
    Without `capability`, the one in `settings.key_dir` if this process can read it; a client
    without one is refused every call (`OperationRefused`, FORBIDDEN)."""
    if capability is None:
        capability = Capability.load(settings.resolved().key_dir)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            coordinator: Any = ray.get_actor(settings.actor_name, namespace=settings.namespace)
            running: dict[str, Any] = ray.get(coordinator.describe.remote(), timeout=wait_s)
            count = int(running["shards"])
            shards = [ray.get_actor(shard_name(settings, i), namespace=settings.namespace) for i in range(count)]
            break
        except ValueError:
            raise LedgerUnavailable(
                f"no ledger {settings.actor_name!r} in namespace {settings.namespace!r}: is the service running?"
            ) from None
        except (RayError, TimeoutError) as exc:  # the coordinator is restarting
            if time.monotonic() > deadline:
                raise LedgerUnavailable(f"ledger coordinator unavailable: {type(exc).__name__}") from exc
            time.sleep(0.5)
    return LedgerClient(coordinator, shards, capability=capability, **client_options)


def stop(client: LedgerClient) -> None:
    """Kill the ledger's actors for good (tests, `yolo-tokens` teardown)."""
    for actor in (*client.shard_actors, client.coordinator):
        ray.kill(actor, no_restart=True)
