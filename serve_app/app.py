"""The composition root: the ONLY place deployments are bound (DESIGN §2).

`serve run ray_config.yaml` calls `build_app` with the typed `args:` of that file.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application, Deployment

from ledger import launch
from serve_app.board import QueueBoard
from serve_app.config import AppArgs
from serve_app.detector_deployment import Detector
from serve_app.ingress import Ingress
from serve_app.launcher import APP_NAME
from serve_app.surface import DETECTOR_KEY

__all__ = ["APP_NAME", "build_app"]


def build_app(args: AppArgs | dict[str, Any]) -> Application:
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    for m in args.models:
        m.check_weights()  # fail at startup, naming the path, not at the first request
    # the ledger's one launch step (idempotent; other settings than the running ledger's are an
    # error): the ingress replicas then only attach, with the ledger's capability, which lets them
    # act for the tokens whose credentials they verify (docs/SECURITY.md)
    settings = args.ledger_settings()  # the environment, read once here
    capability = launch(settings).capability
    if capability is None:
        raise RuntimeError("the ledger launched without a capability")
    detector = deployment(Detector)
    key = capability.derive(DETECTOR_KEY)  # the detectors answer the ingress only
    board = deployment(QueueBoard).bind(key)  # their schedulers' queues, for the console
    detectors = {m.key: detector.options(**m.deployment_options()).bind(m, key, board) for m in args.models}
    # the ingress is the token-check deployment: each replica admits from its own quota leases and
    # sends admitted images straight to the version's detectors (no middle replica)
    return deployment(Ingress).options(**args.ingress_options()).bind(settings, detectors, args, capability)


def deployment(decorated: object) -> Deployment:
    """A `@serve.deployment` class as what it is at run time, a `Deployment` (type checkers keep
    the undecorated class type, since they do not apply class decorators)."""
    if not isinstance(decorated, Deployment):
        raise TypeError(f"{decorated!r} is not a @serve.deployment")
    return decorated
