"""The composition root: the ONLY place deployments are bound (DESIGN §2).

`serve run ray_config.yaml` calls `build_app` with the typed `args:` of that file.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.config import AppArgs
from serve_app.detector import Detector
from serve_app.gate import TokenGate
from serve_app.ingress import Ingress

APP_NAME = "yolo-tokens"


def build_app(args: AppArgs | dict[str, Any]) -> Application:
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    for m in args.models:
        m.check_weights()  # fail at startup, naming the path, not at the first request
    detectors = {m.key: Detector.options(**m.deployment_options()).bind(m) for m in args.models}
    # every detection is routed through the gate, which verifies and prices it itself
    gate = TokenGate.bind(args.ledger_settings(), detectors, args.models, args.default_model)
    return Ingress.options(num_replicas=args.ingress_replicas).bind(gate, args)
