"""`yolo-tokens` against a running cluster: in-process for most commands, as a real binary for some."""

from __future__ import annotations

import asyncio
import calendar
import csv
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import ray

from ledger.cli import main, parse_duration
from ledger.core.leases import LeaseAsk, LeaseGrant
from ledger.core.settings import LedgerSettings
from ledger.store.repository import iso_utc
from tests.conftest import _pg_database

pytestmark = pytest.mark.ray


# One ledger per database for the whole module (launching one took 4-10 s, 26 times): each test
# works on packages of its own and reads only what it made (alerts of its token, report rows of its
# team, a model's units as a difference).
@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('cli') / 'ledger.db'}"
    else:
        yield from _pg_database()


@pytest.fixture(scope="module")
def settings(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> LedgerSettings:
    return LedgerSettings(
        database_url=db_url,
        data_dir=tmp_path_factory.mktemp("cli-data"),
        actor_name=f"ledger-{uuid.uuid4().hex[:8]}",
        namespace="yt-tests",
        sweep_interval_s=0,
        shards=3,  # the CLI's merged reads (token list, doctor) over several shards
    )


@pytest.fixture(scope="module")
def ledger(ray_cluster: None, settings: LedgerSettings) -> Iterator[Any]:
    from ledger.client.service import launch, stop

    client = launch(settings)
    yield client
    stop(client)


@pytest.fixture
def cli(ledger: Any, settings: LedgerSettings, capsys: pytest.CaptureFixture[str]) -> Any:
    def run(*argv: str) -> tuple[int, Any, str]:
        code = main(list(argv), settings=settings)
        out, err = capsys.readouterr()
        try:
            return code, json.loads(out), err
        except json.JSONDecodeError:
            return code, out, err

    return run


def test_given_a_cluster_when_a_package_is_created_and_split_then_the_tree_shows_it(cli: Any) -> None:
    code, pkg, _ = cli(
        "package",
        "create",
        "--name",
        "acme",
        "--quota",
        "10000",
        "--expires-in",
        "30d",
        "--rate",
        "pro",
        "--models",
        "parts",
        "--ip",
        "10.0.0.0/8",
        "--json",
    )
    assert code == 0
    root = pkg["token"]["id"]
    assert pkg["credential"].count(".") == 2
    code, child, _ = cli("token", "split", root, "--name", "frontend", "--quota", "3000", "--rate", "basic", "--json")
    assert code == 0 and child["token"]["parent_id"] == root
    code, tree, _ = cli("token", "list", "--package", root, "--json")
    assert {t["name"]: t["free"] for t in tree} == {"acme": 7000, "frontend": 3000}
    code, text, _ = cli("token", "list", "--package", root)
    assert "frontend" in text and "7000" in text


def test_given_refused_operations_then_the_cli_exits_non_zero_with_the_code(cli: Any) -> None:
    _, pkg, _ = cli("package", "create", "--name", "small", "--quota", "10", "--rate", "basic", "--json")
    root = pkg["token"]["id"]
    code, _, err = cli("token", "split", root, "--name", "big", "--quota", "11")
    assert code == 2 and "quota_exhausted" in err
    code, _, err = cli("token", "split", root, "--name", "fast", "--quota", "1", "--rate", "pro")
    assert code == 2 and "limit_widening" in err
    code, _, err = cli("token", "show", "tok_does_not_exist", "--json")
    assert code == 2 and json.loads(err)["error"]["code"] == "not_found"


def test_given_a_child_when_rotated_reclaimed_and_revoked_then_balances_follow(cli: Any) -> None:
    _, pkg, _ = cli("package", "create", "--name", "p", "--quota", "100", "--json")
    root = pkg["token"]["id"]
    _, child, _ = cli("token", "split", root, "--name", "c", "--quota", "40", "--json")
    cid = child["token"]["id"]
    _, rotated, _ = cli("token", "rotate", cid, "--json")
    assert rotated["credential"] != child["credential"]
    _, rec, _ = cli("token", "reclaim", cid, "--units", "15", "--json")
    assert rec["returned"] == 15 and rec["token"]["allocation"] == 25
    _, rev, _ = cli("token", "revoke", cid, "--json")
    assert rev["returned"] == 25 and rev["token"]["status"] == "revoked"
    _, shown, _ = cli("token", "show", root, "--json")
    assert shown["token"]["free"] == 100
    actions = [e["action"] for e in cli("token", "show", cid, "--json")[1]["events"]]
    assert actions == ["token.revoke", "token.reclaim", "token.rotate", "token.split"]
    code, doctor, _ = cli("doctor", "--json")
    assert code == 0 and doctor["healthy"]
    code, keys, _ = cli("keys", "rotate", "--json")
    assert code == 0 and keys["active_kid"].startswith("key_")


def test_given_the_installed_binary_then_it_talks_to_the_running_cluster(
    ledger: Any, settings: LedgerSettings, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "YT_DATABASE_URL": settings.resolved().database_url,
        "YT_DATA_DIR": str(settings.data_dir),
        "YT_LEDGER_NAME": settings.actor_name,
        "YT_NAMESPACE": settings.namespace,
    }
    address = ray.get_runtime_context().gcs_address
    exe = Path(sys.executable).parent / "yolo-tokens"
    done = subprocess.run(
        [str(exe), "--address", address, "package", "create", "--name", "bin", "--quota", "5", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    token_id = json.loads(done.stdout)["token"]["id"]
    assert ledger.token(token_id).allocation == 5
    bad = subprocess.run(
        [str(exe), "--address", address, "token", "split", token_id, "--name", "x", "--quota", "6"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: quota_exhausted: parent has 5 free units, 6 requested"


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 2592000), ("12h", 43200), ("90m", 5400), ("45", 45), ("2w", 1209600)]
)
def test_given_durations_then_they_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_given_usage_and_alert_contacts_then_audit_export_writes_csv_and_alerts_are_listed_and_acked(
    cli: Any, ledger: Any, tmp_path: Any
) -> None:
    from ledger.core.credentials import Verifier
    from ledger.core.entities import Admission

    code, pkg, _ = cli("package", "create", "--name", "csv", "--quota", "3", "--alert-email", "pm@example.com",
                       "--alert-webhook", "http://127.0.0.1:9/x", "--json")  # fmt: skip
    assert code == 0, pkg
    code, _, err = cli("package", "create", "--name", "bad", "--quota", "5", "--alert-email", "nope", "--json")
    assert code == 2 and "alert_emails" in err
    tid = pkg["token"]["id"]
    jti = Verifier(ledger.public_keys()).verify(pkg["credential"]).jti
    decisions = ledger.admit_sync([Admission(f"csv-{i}", tid, jti, 1, "parts@1", "10.0.0.7") for i in range(4)])
    assert [d.code.value for d in decisions] == ["ok", "ok", "ok", "quota_exhausted"]
    out = tmp_path / "audit.csv"
    code, summary, _ = cli("audit", "export", "--token", tid, "--out", str(out), "--json")
    assert code == 0 and summary == {"rows": 4, "out": str(out)}
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["outcome"] for r in rows) == ["ok", "ok", "ok", "quota_exhausted"]
    assert {r["client_ip"] for r in rows} == {"10.0.0.7"}
    code, alerts, _ = cli("alerts", "list", "--json")
    alerts = [a for a in alerts if a["token_id"] == tid]
    assert code == 0 and sorted(a["threshold"] for a in alerts) == [80, 95, 100]
    code, acked, _ = cli("alerts", "ack", str(alerts[0]["id"]), "--by", "pm", "--json")
    assert code == 0 and acked == {"acknowledged": alerts[0]["id"], "by": "pm"}
    code, _, err = cli("alerts", "ack", str(alerts[0]["id"]))
    assert code == 2 and "already acknowledged" in err


def test_given_usage_then_report_costs_groups_units_by_team_cost_centre_and_model(cli: Any, ledger: Any) -> None:
    from ledger.core.credentials import Verifier
    from ledger.core.entities import Admission

    def model_row() -> tuple[int, int]:
        rows = cli("report", "costs", "--by", "model", "--json")[1]
        return next(((r["requests"], r["units"]) for r in rows if r["model"] == "parts@1"), (0, 0))

    code, pkg, _ = cli("package", "create", "--name", "rep", "--quota", "9", "--team", "qa-report", "--cost-centre",
                       "CC-7", "--json")  # fmt: skip
    assert code == 0, pkg
    before = model_row()
    jti = Verifier(ledger.public_keys()).verify(pkg["credential"]).jti
    ledger.admit_sync([Admission(f"rep-{i}", pkg["token"]["id"], jti, 1, "parts@1") for i in range(3)])
    for by, key in (("team", "qa-report"), ("cost_centre", "CC-7")):
        code, rows, _ = cli("report", "costs", "--by", by, "--json")
        assert code == 0 and [(r["requests"], r["units"]) for r in rows if r[by] == key] == [(3, 3)], rows
    after = model_row()
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3)


ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_given_epoch_seconds_then_iso_utc_prints_them_to_the_millisecond() -> None:
    assert iso_utc(1796107212.345) == "2026-12-01T06:40:12.345Z"
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(None) is None


def test_given_usage_then_usage_and_audit_export_print_iso_utc_times_and_json_keeps_numbers(
    cli: Any, ledger: Any, tmp_path: Path
) -> None:
    from ledger.core.credentials import Verifier
    from ledger.core.entities import Admission, Settlement

    _, pkg, _ = cli("package", "create", "--name", "times", "--quota", "5", "--json")
    tid = pkg["token"]["id"]
    jti = Verifier(ledger.public_keys()).verify(pkg["credential"]).jti
    ledger.admit_sync([Admission(f"t-{i}", tid, jti, 1, "parts@1") for i in range(2)])
    ledger.settle_sync([Settlement("t-0", tid, True)])
    code, text, _ = cli("usage", "--token", tid)
    assert code == 0
    lines = text.strip().splitlines()
    assert lines[0].split()[0] == "TS" and len(lines) == 3
    assert all(ISO_UTC.match(line.split()[0]) for line in lines[1:]), text
    code, rows, _ = cli("usage", "--token", tid, "--json")
    assert code == 0 and all(isinstance(r["ts"], float) for r in rows)
    assert "body_hash" not in rows[0]
    out = tmp_path / "audit.csv"
    assert cli("audit", "export", "--token", tid, "--out", str(out), "--json")[0] == 0
    exported = list(csv.DictReader(out.open()))
    assert all(ISO_UTC.match(r["ts"]) for r in exported)
    assert [r["settled_at"] for r in exported if r["request_id"] == "t-1"] == [""]
    assert all(ISO_UTC.match(r["settled_at"]) for r in exported if r["request_id"] == "t-0")
    assert abs(time.time() - calendar.timegm(time.strptime(exported[0]["ts"][:19], "%Y-%m-%dT%H:%M:%S"))) < 600
    assert "body_hash" not in exported[0]


def test_given_package_create_strict_then_the_package_is_marked_and_never_leased(cli: Any, ledger: Any) -> None:
    """Given `package create --strict`, then its meta says so and a lease ask for it is answered
    `strict` (every request admitted synchronously at the shard), while a plain package leases."""
    code, strict_pkg, _ = cli("package", "create", "--name", "audited", "--quota", "1000", "--strict", "--json")
    assert code == 0 and strict_pkg["token"]["meta"] == {"strict": True}
    code, plain_pkg, _ = cli("package", "create", "--name", "plain", "--quota", "1000", "--json")
    assert code == 0 and plain_pkg["token"]["meta"] == {}

    def ask(pkg: dict[str, Any]) -> LeaseGrant:
        view = pkg["token"]
        jti = jwt.decode(pkg["credential"], options={"verify_signature": False})["jti"]
        shard = ledger.shard_of(view["root_id"])
        asks = [LeaseAsk(view["id"], jti, view["root_id"], "cli-test", want=10)]
        grant: LeaseGrant = asyncio.run(ledger.lease_sync(shard, asks))[0]
        return grant

    strict, leased = ask(strict_pkg), ask(plain_pkg)
    assert strict.strict and strict.granted == 0
    assert not leased.strict and leased.granted == 10
    assert ledger.token(plain_pkg["token"]["id"]).leased == 10


def test_given_a_revoked_child_then_its_granted_allocation_and_what_went_back_read_in_list_and_show(cli: Any) -> None:
    """Issue 18 §2-3: `used + free` did not add up (no leased column), and a revoked token's
    allocation read as its used units (300 -> 16). Every balance shows granted, used, leased,
    free, delegated and returned, and they add up."""
    _, pkg, _ = cli("package", "create", "--name", "plant", "--quota", "1000", "--json")
    root = pkg["token"]["id"]
    _, child, _ = cli("token", "split", root, "--name", "algo", "--quota", "300", "--json")
    cid = child["token"]["id"]
    code, rec, _ = cli("token", "reclaim", cid, "--units", "400")
    assert code == 2 and "invalid_request: only 300 units are unspent and free, 400 requested" in rec + _
    code, text, _ = cli("token", "reclaim", cid, "--units", "50")
    assert code == 0 and text.startswith("50 units returned to the parent") and "RETURNED" in text
    code, text, _ = cli("token", "revoke", cid)
    assert code == 0 and text.startswith("250 units returned to the parent")
    _, shown, _ = cli("token", "show", cid, "--json")
    t = shown["token"]
    assert (t["granted"], t["allocation"], t["returned"], t["used"], t["status"]) == (300, 0, 300, 0, "revoked")
    _, rows, _ = cli("token", "list", "--package", root, "--json")
    for r in rows:
        assert r["granted"] == r["used"] + r["leased"] + r["free"] + r["delegated"] + r["returned"] + r["written_off"]
    code, text, _ = cli("token", "list", "--package", root)
    header = text.splitlines()[0].split()
    assert header[:10] == [
        "ID",
        "NAME",
        "TEAM",
        "PARENT_ID",
        "GRANTED",
        "USED",
        "LEASED",
        "FREE",
        "DELEGATED",
        "RETURNED",
    ]
    code, text, _ = cli("token", "show", cid)
    assert "granted: 300" in text and "returned: 300" in text and "leased: 0" in text


def test_given_a_cost_centre_and_team_on_the_package_then_three_levels_of_splits_inherit_them(
    cli: Any, ledger: Any
) -> None:
    """Issue 18 §4: after `package create --cost-centre CC-100` and three splits, `report costs --by
    cost_centre` said `(none)`. The nearest ancestor that sets one gives it, unless a child sets its own."""
    from ledger.core.credentials import Verifier
    from ledger.core.entities import Admission

    _, pkg, _ = cli("package", "create", "--name", "line", "--quota", "100", "--team", "vision", "--cost-centre",
                    "CC-100", "--json")  # fmt: skip
    parent, issued = pkg["token"]["id"], pkg
    for depth in range(3):
        _, issued, _ = cli(
            "token", "split", parent, "--name", f"level-{depth}", "--quota", str(50 - 10 * depth), "--json"
        )
        parent = issued["token"]["id"]
    _, own, _ = cli("token", "split", pkg["token"]["id"], "--name", "own", "--quota", "5", "--team", "qa",
                    "--cost-centre", "CC-200", "--json")  # fmt: skip
    verify = Verifier(ledger.public_keys()).verify
    for who, n in ((issued, 3), (own, 2)):
        jti = verify(who["credential"]).jti
        tid = who["token"]["id"]
        ledger.admit_sync([Admission(f"{tid}-{i}", tid, jti, 1, "parts@1") for i in range(n)])
    for by, want in (("cost_centre", {"CC-100": 3, "CC-200": 2}), ("team", {"vision": 3, "qa": 2})):
        _, rows, _ = cli("report", "costs", "--by", by, "--json")
        got = {r[by]: r["units"] for r in rows if r[by] in want}
        assert got == want, rows
    _, shown, _ = cli("token", "show", parent, "--json")
    assert shown["inherited"]["cost_centre"] == {"value": "CC-100", "from": pkg["token"]["id"]}
    _, text, _ = cli("token", "show", parent)
    assert f"cost_centre: CC-100 (inherited from {pkg['token']['id']})" in text


def test_given_token_limits_then_the_cli_narrows_rate_models_ips_and_expiry_as_the_console_does(cli: Any) -> None:
    _, pkg, _ = cli("package", "create", "--name", "lim", "--quota", "100", "--json")
    tid = pkg["token"]["id"]
    code, _, err = cli("token", "limits", tid, "--json")
    assert code == 2 and "nothing to change" in err
    code, view, _ = cli("token", "limits", tid, "--rate", "basic", "--models", "parts", "--ip", "10.0.0.0/8",
                        "--expires-in", "7d", "--json")  # fmt: skip
    assert code == 0 and (view["rate"], view["models"], view["ips"]) == ("basic", ["parts"], ["10.0.0.0/8"])
    assert 6.9 * 86400 < view["expires_at"] - time.time() <= 7 * 86400
    code, text, _ = cli("token", "limits", tid, "--ip", "10.1.0.0/16")
    assert code == 0 and "10.1.0.0/16" in text and text.splitlines()[0].split()[:3] == ["ID", "NAME", "GRANTED"]
    _, kid, _ = cli("token", "split", tid, "--name", "kid", "--quota", "10", "--json")
    code, _, err = cli("token", "limits", kid["token"]["id"], "--ip", "0.0.0.0/0")  # wider than its parent's
    assert code == 2 and "limit_widening" in err
