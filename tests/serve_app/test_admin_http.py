"""The CLI over the service's HTTP admin route (issue 18 §11): every command answers what it answers
over Ray, refusals keep their codes, and only an admin credential gets in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ledger import TokenSpec
from ledger.cli import main
from ledger.client.over_http import AdminFile
from tests.serve_app.conftest import LiveApp

pytestmark = pytest.mark.ray


@pytest.fixture
def admin(live_app: LiveApp, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    credential: str = live_app.ledger.issue_admin("cli-test", 600)
    monkeypatch.setenv("YT_ADMIN_TOKEN", credential)
    yield credential


def run(capsys: pytest.CaptureFixture[str], live_app: LiveApp, *argv: str) -> tuple[int, Any, str]:
    code = main(list(argv), settings=live_app.args.ledger_settings())
    out, err = capsys.readouterr()
    try:
        return code, json.loads(out), err
    except json.JSONDecodeError:
        return code, out, err


def test_given_an_admin_credential_then_every_command_over_http_answers_as_over_ray(
    live_app: LiveApp, admin: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def http(*argv: str) -> tuple[int, Any, str]:
        return run(capsys, live_app, "--url", live_app.url, *argv)

    def over_ray(*argv: str) -> tuple[int, Any, str]:
        return run(capsys, live_app, "--address", "auto", *argv)

    code, pkg, err = http("package", "create", "--name", "http-cli", "--quota", "500", "--team", "vision",
                          "--cost-centre", "CC-7", "--rate", "pro", "--models", "parts", "--ip", "10.0.0.0/8",
                          "--expires-in", "30d", "--json")  # fmt: skip
    assert code == 0, err
    root = pkg["token"]["id"]
    assert pkg["credential"].count(".") == 2 and pkg["token"]["meta"] == {"cost_centre": "CC-7"}
    assert pkg["token"]["ips"] == ["10.0.0.0/8"] and pkg["token"]["models"] == ["parts"]
    code, kid, err = http("token", "split", root, "--name", "kid", "--quota", "120", "--json")
    assert code == 0, err
    child = kid["token"]["id"]

    # reads: the same document either way
    for argv in (["token", "list", "--package", root], ["token", "show", child], ["token", "show", root]):
        assert http(*argv, "--json")[1] == over_ray(*argv, "--json")[1], argv
        assert http(*argv)[1] == over_ray(*argv)[1], argv  # the human tables too
    # writes, one of each, seen over Ray afterwards
    assert http("token", "limits", child, "--rate", "basic", "--json")[1]["rate"] == "basic"
    assert http("token", "top-up", child, "--units", "30", "--json")[1]["allocation"] == 150
    code, _, err = http("token", "reclaim", child, "--units", "1000", "--json")
    assert code == 2 and json.loads(err)["error"]["code"] == "invalid_request" and "unspent" in err
    code, back, _ = http("token", "reclaim", child, "--units", "50", "--json")
    assert code == 0 and back["returned"] == 50 and back["token"]["allocation"] == 100
    code, rotated, _ = http("token", "rotate", child, "--json")
    assert code == 0 and rotated["credential"] != kid["credential"]
    code, gone, _ = http("token", "revoke", child, "--json")
    assert code == 0 and gone["token"]["status"] == "revoked"
    assert over_ray("token", "show", child, "--json")[1]["token"]["status"] == "revoked"
    # refusals keep the ledger's code and exit status
    code, _, err = http("token", "split", root, "--name", "big", "--quota", "100000")
    assert code == 2 and err.startswith("error: quota_exhausted:")
    code, _, err = http("token", "show", "tok_nosuch")
    assert code == 2 and err.startswith("error: not_found:")
    code, _, err = http("package", "create", "--name", "m", "--quota", "5", "--models", "yolov8n@1")
    assert code == 2 and err.startswith("error: unknown_model:"), err
    # the admin-wide commands
    assert isinstance(http("usage", "--token", root, "--json")[1], list)
    assert isinstance(http("alerts", "list", "--json")[1], list)
    code, report, _ = http("report", "costs", "--by", "cost_centre", "--json")
    assert code == 0 and report == over_ray("report", "costs", "--by", "cost_centre", "--json")[1]
    out = tmp_path / "audit.csv"
    assert http("audit", "export", "--token", root, "--out", str(out), "--json")[0] == 0
    assert out.read_text().startswith("id,")
    code, doctor, _ = http("doctor", "--json")
    assert code == 0 and doctor["healthy"] is True
    code, issued, _ = http("admin", "issue", "--name", "second", "--ttl", "1h", "--json")
    assert code == 0 and issued["credential"].count(".") == 2


def test_given_no_admin_credential_then_the_route_refuses_and_changes_nothing(
    live_app: LiveApp, admin: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pkg = live_app.ledger.create_package(TokenSpec.build("route-guard", 10))
    before = live_app.ledger.token(pkg.token.id)
    url = f"{live_app.url}/v1/admin/ops/top_up"
    body = {"kwargs": {"token_id": pkg.token.id, "units": 5}}
    cases = [
        ({}, 401, "missing_token"),
        ({"Authorization": f"Bearer {pkg.credential}"}, 403, "forbidden"),  # a token credential is not an admin's
        ({"Authorization": "Bearer not.a.jwt"}, 401, "invalid_token"),
    ]
    for headers, status, code in cases:
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    auth = {"Authorization": f"Bearer {admin}"}
    for bad, why in (
        ({"kwargs": {"token_id": pkg.token.id, "units": "5"}}, "expected int"),
        ({"kwargs": {"token_id": pkg.token.id, "units": 5, "by_token": pkg.token.id}}, "by_token"),
        ({"kwargs": {"token_id": pkg.token.id, "units": 5, "extra": 1}}, "no argument"),
        ({"kwargs": []}, "kwargs"),
    ):
        r = httpx.post(url, json=bad, headers=auth, timeout=30)
        assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
    r = httpx.post(url, content=b"{not json", headers=auth, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    r = httpx.post(f"{live_app.url}/v1/admin/ops/admit", json={"kwargs": {}}, headers=auth, timeout=30)
    assert r.status_code == 400 and "unknown ledger operation" in r.json()["error"]["message"]
    assert live_app.ledger.token(pkg.token.id) == before
    # and the right call does what it says
    r = httpx.post(url, json=body, headers=auth, timeout=30)
    assert r.status_code == 200 and r.json()["result"]["allocation"] == 15


def test_given_the_file_serve_writes_then_the_binary_uses_it_unless_it_is_readable_by_others(
    live_app: LiveApp, admin: str, tmp_path: Path
) -> None:
    """The installed `yolo-tokens`, in a shell with no Ray address and no admin variable: the file
    `serve` writes takes it over HTTP (no Ray in the process); a file others may read is ignored."""
    name = live_app.ledger.create_package(TokenSpec.build("from-the-file", 10)).token.name
    file = AdminFile(tmp_path / "admin.json")
    file.write(live_app.url, admin, time.time() + 600)
    env = {k: v for k, v in os.environ.items() if k != "YT_ADMIN_TOKEN"} | {"YT_ADMIN_FILE": str(file.path)}
    code = "import sys; sys.argv = ['yolo-tokens', 'token', 'list', '--json']; " \
           "from serve_app.__main__ import main; rc = main(); " \
           "print('RAY-IMPORTED' if 'ray' in sys.modules else 'NO-RAY', file=sys.stderr); sys.exit(rc)"  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "NO-RAY" in done.stderr and name in [t["name"] for t in json.loads(done.stdout)]
    assert oct(file.path.stat().st_mode & 0o777) == "0o600"
    file.path.chmod(0o644)  # another user could have read it: not used (the CLI would go over Ray)
    assert file.read() is None
