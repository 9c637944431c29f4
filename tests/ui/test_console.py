"""The Streamlit console, page by page, with Streamlit's AppTest against the in-process ledger
(`FakeLedger`: the ledger's real rules, no Ray). The console on the running service, in a real
browser, is tests/ui/browser.py's."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from ledger.client.fake import FakeLedger
from ledger.core.credentials import Verifier
from ledger.core.entities import Admission, TokenSpec

APP = str(Path(__file__).resolve().parents[2] / "ui" / "app.py")


@pytest.fixture
def console_ledger(tmp_path: Path) -> Iterator[FakeLedger]:
    fake = FakeLedger(tmp_path / "ledger")
    yield fake
    fake.close()


def console(client: FakeLedger) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["ledger_api"] = client  # the console's collaborator, passed in
    return at


def signed_in(client: FakeLedger, page: str) -> AppTest:
    at = console(client)
    at.run()
    at.text_input(key="credential").input(client.issue_admin("alice"))
    at.button(key="signin").click().run()
    assert not at.exception, at.exception
    at.sidebar.radio(key="page").set_value(page).run()
    assert not at.exception, at.exception
    return at


def spend(client: FakeLedger, credential: str, units: int, team_token: str) -> None:
    jti = Verifier(client.public_keys()).verify(credential).jti
    rows = [Admission(uuid.uuid4().hex, team_token, jti, 1, "parts@1") for _ in range(units)]
    client.admit_sync(rows)


def button(at: AppTest, label: str) -> Any:
    return next(b for b in at.button if b.label == label)


def test_given_no_admin_credential_then_nothing_but_the_sign_in_form(console_ledger: FakeLedger) -> None:
    pkg = console_ledger.create_package(TokenSpec.build("secret-pkg", 10))
    at = console(console_ledger)
    at.run()
    assert len(at.sidebar.radio) == 0 and len(at.dataframe) == 0
    at.text_input(key="credential").input(pkg.credential)  # a token credential is not an admin's
    at.button(key="signin").click().run()
    assert "not an admin credential" in at.error[0].value and len(at.sidebar.radio) == 0
    at.text_input(key="credential").input("garbage.not.a.jwt")
    at.button(key="signin").click().run()
    assert "invalid_token" in at.error[0].value and len(at.sidebar.radio) == 0
    assert "secret-pkg" not in str([e.value for e in at.markdown])


def test_given_usage_then_overview_leads_with_a_team_table_that_adds_up_forecast_and_costs(
    console_ledger: FakeLedger,
) -> None:
    """Issue 18 §6: a per-team table (allocation, used, leased, remaining, progress, burn rate, days
    to exhaustion, the next alert); teams inherited and named, never `None`; a warning under 72 h."""
    pkg = console_ledger.create_package(TokenSpec.build("plant-7", 1000, team="pm"))
    team = console_ledger.split(pkg.token.id, TokenSpec.build("vision", 200, team="algo"))
    console_ledger.split(pkg.token.id, TokenSpec.build("nightly", 100))  # no team: the package's
    lone = console_ledger.create_package(TokenSpec.build("spare", 10))
    spend(console_ledger, team.credential, 70, team.token.id)
    spend(console_ledger, lone.credential, 9, lone.token.id)
    at = signed_in(console_ledger, "Overview")
    frame = at.dataframe[0].value.set_index("team")
    assert list(frame.index) == ["algo", "pm", "spare (no team)"]
    algo = frame.loc["algo"]
    assert (algo["allocation"], algo["used"], algo["leased"], algo["remaining"], algo["used_pct"]) == (
        200,
        70,
        0,
        130,
        35.0,
    )
    assert algo["burn_per_day"] == 10.0 and algo["days_to_exhaustion"] == 13.0  # 70 units over the 7-day window
    assert algo["next_alert"] == "80 %"
    assert (frame.loc["pm", "allocation"], frame.loc["pm", "tokens"]) == (800, 2), "nightly inherits the team pm"
    assert frame.loc["spare (no team)", "next_alert"] == "95 %"  # 80 fired at 9 of 10
    assert at.metric[0].value == "3" and at.metric[1].value == "931" and at.metric[2].value == "79"
    warnings = [w.value for w in at.warning]
    assert len(warnings) == 1 and warnings[0].startswith("spare (no team): projected exhaustion in 19 h")
    costs = at.dataframe[1].value
    assert costs.set_index("team").loc["algo", "units"] == 70


def test_given_the_token_tree_page_then_create_split_top_up_revoke_work_and_credentials_show_once(
    console_ledger: FakeLedger,
) -> None:
    at = console(console_ledger)
    at.run()
    at.text_input(key="credential").input(console_ledger.issue_admin("bob"))
    at.button(key="signin").click().run()
    at.sidebar.radio(key="page").set_value("Token tree").run()
    at.text_input(key="new_name").input("line-3")
    at.number_input(key="new_quota").set_value(500)
    at.text_input(key="new_team").input("pm")
    button(at, "Create").click().run()
    assert not at.error, [e.value for e in at.error]
    cred = at.code[0].value
    assert Verifier(console_ledger.public_keys()).verify(cred).typ == "access"
    root = next(t for t in console_ledger.tokens() if t.name == "line-3")
    at.text_input(key="split_name").input("qa")
    at.number_input(key="split_units").set_value(120)
    button(at, "Split").click().run()
    assert not at.error and len(at.code) == 1  # only the new child's credential; the package's is gone
    child = next(t for t in console_ledger.tokens() if t.name == "qa")
    assert child.parent_id == root.id and child.allocation == 120
    at.run()  # the next interaction: the credential is gone, the child is in the lists
    assert len(at.code) == 0
    at.selectbox(key="topup_token").set_value(child.id)
    at.number_input(key="topup_units").set_value(30)
    button(at, "Top up").click().run()
    assert console_ledger.token(child.id).allocation == 150
    at.selectbox(key="revoke_token").set_value(child.id)
    at.radio(key="revoke_action").set_value("revoke (subtree stops now)")
    button(at, "Apply").click().run()
    assert console_ledger.token(child.id).status == "revoked"
    assert console_ledger.token(root.id).free == 500
    at.run()
    tree = at.table[0].value
    assert list(tree["id"]) == [root.id, child.id] and list(tree["status"]) == ["active", "revoked"]
    at.number_input(key="split_units").set_value(10_000)  # more than the package holds: refused, clearly
    at.text_input(key="split_name").input("greedy")
    button(at, "Split").click().run()
    assert len(at.error) == 1 and "greedy" not in {t.name for t in console_ledger.tokens()}


def test_given_a_crossed_threshold_then_the_alerts_page_lists_it_and_acknowledges_it(
    console_ledger: FakeLedger,
) -> None:
    pkg = console_ledger.create_package(TokenSpec.build("alerted", 10))
    spend(console_ledger, pkg.credential, 8, pkg.token.id)
    at = signed_in(console_ledger, "Alerts")
    frame = at.dataframe[0].value
    assert list(frame["threshold %"]) == [80] and list(frame["status"]) == ["pending"]
    at.button(key="ack").click().run()
    (alert,) = console_ledger.alerts()
    assert alert["acknowledged_by"] == "alice" and alert["acknowledged_at"] is not None


def test_given_usage_then_the_audit_page_filters_and_exports(console_ledger: FakeLedger) -> None:
    pkg = console_ledger.create_package(TokenSpec.build("audited", 3, team="qa"))
    spend(console_ledger, pkg.credential, 5, pkg.token.id)  # 3 admitted, 2 denied
    at = signed_in(console_ledger, "Audit")
    assert len(at.dataframe[0].value) == 5
    at.selectbox(key="au_outcome").set_value("quota_exhausted").run()
    assert list(at.dataframe[0].value["outcome"]) == ["quota_exhausted"] * 2
    at.selectbox(key="au_team").set_value("qa").run()
    assert len(at.dataframe[0].value) == 2
    assert any(b.label == "Export CSV" for b in at.get("download_button"))


def test_given_the_models_page_then_it_reports_serve_or_says_it_is_not_running(console_ledger: FakeLedger) -> None:
    at = signed_in(console_ledger, "Models")
    shown = [d.value for d in at.dataframe] + [i.value for i in at.info] + [w.value for w in at.warning]
    assert shown, "the Models page must show deployments or say why it cannot"


def test_given_actor_options_then_unplaceable_says_what_no_node_has() -> None:
    from ui.data import unplaceable

    nodes = [{"CPU": 4.0, "GPU": 0.0}, {"CPU": 16.0, "GPU": 1.0, "accel": 2.0}]
    assert unplaceable({"num_cpus": 2, "num_gpus": 1}, nodes) == ""
    assert unplaceable({}, nodes) == ""
    why = unplaceable({"num_cpus": 64}, nodes)
    assert "CPU 64" in why and "largest node: 16" in why
    assert "GPU 2" in unplaceable({"num_cpus": 1, "num_gpus": 2}, nodes)
    assert "accel 3" in unplaceable({"resources": {"accel": 3}}, nodes)
    assert unplaceable({"num_cpus": 1}, []) != ""  # no live node at all
