"""Item 10 (part): schemathesis generates requests for every operation of /openapi.json, sent with a
valid token; the service never answers 5xx (bounded here; raise YT_FUZZ_EXAMPLES for longer runs)."""

from __future__ import annotations

import json
import os
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from ledger.core.entities import TokenSpec
from tests.serve_app.conftest import LiveApp

pytestmark = pytest.mark.ray
EXAMPLES = int(os.environ.get("YT_FUZZ_EXAMPLES", "25"))


def test_given_generated_requests_for_every_operation_then_never_a_5xx(live_app: LiveApp) -> None:
    pkg = live_app.ledger.create_package(TokenSpec.build(f"fuzz-{time.monotonic_ns()}", 10_000))
    auth = {"Authorization": f"Bearer {pkg.credential}"}
    schema = schemathesis.openapi.from_url(f"{live_app.url}/openapi.json")
    counts: dict[str, dict[int, int]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        seen = counts.setdefault(operation.label, {})

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy())
        def fuzz(case: schemathesis.Case) -> None:
            response = case.call(base_url=live_app.url, headers=auth, timeout=60)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1  # noqa: B023 (called in-loop)
            assert response.status_code < 500, (case.method, case.formatted_path, response.text[:300])

        fuzz()
    assert len(counts) >= 8 and all(counts.values())
    print(json.dumps({"hostile": "schemathesis", "examples_per_operation": EXAMPLES, "responses": counts}))
