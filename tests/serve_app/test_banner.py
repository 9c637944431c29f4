"""What `make serve` prints of the demo package (issue 18 §15): a restart says what is left and that
the credential was rotated; the curl example names a sample image the clone has."""

from __future__ import annotations

from pathlib import Path

from serve_app.cli import SAMPLE, demo_banner

ROOT = Path(__file__).resolve().parents[2]


def view(**kw: int) -> dict[str, object]:
    t = {"id": "pkg_1", "name": "demo", "allocation": 10_000, "granted": 10_000, "used": 0, "delegated": 0,
         "expires_at": None}  # fmt: skip
    return {**t, **kw}


def test_given_a_first_start_and_a_restart_then_the_banner_says_which() -> None:
    first = demo_banner({"token": view(), "credential": "eyJ.a.b", "rotated": False})
    assert first.startswith("token pkg_1 (demo): 10000 units") and first.endswith("eyJ.a.b")
    again = demo_banner({"token": view(used=3), "credential": "eyJ.c.d", "rotated": True})
    assert "9997 of 10000 units left" in again and "rotated" in again and again.endswith("eyJ.c.d")
    assert (ROOT / SAMPLE).is_file()
