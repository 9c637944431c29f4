"""The hostile suite runs against the same live app as the serving tests (one per session)."""

from tests.serve_app.conftest import live_app  # noqa: F401 (a fixture, registered by import)
