"""`ray_config.yaml`'s typed args are the one source of the ledger's shard and lease settings and of
each ingress replica's lease holder: checked by the ledger's own rules when the file is read (no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from ledger import HolderConfig, LedgerSettings
from serve_app.config import AppArgs

ROOT = Path(__file__).resolve().parents[2]


def args(**ledger: Any) -> AppArgs:
    return AppArgs.model_validate({"ledger": ledger})


@pytest.mark.parametrize(
    ("ledger", "named"),
    [
        ({"lease_ttl_s": 0.5}, "lease_ttl_s must be 1-3600 s"),
        ({"lost_lease_policy": "forgive"}, "lost_lease_policy"),
        ({"shards": 0}, "shards must be 1-1024"),
        ({"lease_max_share": 0}, "lease_max_share must be >= 1"),
        ({"lease_holder": {"report_interval_s": 0}}, "report_interval_s must be in (0, 3600] s"),
        ({"lease_holder": {"min_want": 50, "max_want": 10}}, "min_want must be 1 to max_want"),
        ({"lease_holder": {"report_every": 1}}, "report_every"),
        ({"lease_holder": {"max_want": "lots"}}, "max_want"),
    ],
)
def test_given_a_value_the_ledger_refuses_then_the_config_is_refused_when_read(
    ledger: dict[str, Any], named: str
) -> None:
    with pytest.raises(ValidationError) as err:
        args(**ledger)
    assert named in str(err.value)


def test_given_lease_settings_in_the_config_then_the_ledger_and_the_holder_get_them() -> None:
    a = args(lease_ttl_s=30, lease_max_share=8, lease_strict_below=4,
             lease_holder={"report_interval_s": 0.25, "max_want": 500})  # fmt: skip
    assert a.ledger.lease_holder == HolderConfig(report_interval_s=0.25, max_want=500)
    env = LedgerSettings(smtp_host="mail.internal", audit_retention_days=30)  # as read from the environment
    s = a.ledger_settings(env)
    assert (s.lease_ttl_s, s.lease_max_share, s.lease_strict_below) == (30.0, 8, 4)
    assert (s.smtp_host, s.audit_retention_days) == ("mail.internal", 30)  # the environment's, untouched
    assert s.known_models == ("parts@1",) and s.data_dir.is_absolute()


def test_given_no_ledger_args_then_the_defaults_are_the_ledgers_own() -> None:
    a, default = AppArgs(), LedgerSettings()
    s = a.ledger_settings(default)
    for name in ("shards", "lease_ttl_s", "lost_lease_policy", "lease_max_share", "lease_strict_below", "actor_name"):
        assert getattr(s, name) == getattr(default, name), name
    assert a.ledger.lease_holder == HolderConfig()


def test_given_the_shipped_ray_config_then_it_reads_and_names_the_lease_holder() -> None:
    doc = yaml.safe_load((ROOT / "ray_config.yaml").read_text())
    a = AppArgs.model_validate(doc["applications"][0]["args"])
    assert a.ledger.lease_holder.report_interval_s == 0.1


def test_given_the_shipped_file_then_each_version_has_a_fair_scheduler_and_the_tier_table_reaches_the_ledger() -> None:
    app = yaml.safe_load((ROOT / "ray_config.yaml").read_text())["applications"][0]["args"]
    parsed = AppArgs.model_validate({**app, "ledger": {**app["ledger"], "tiers": {"pro": {"weight": 3}}}})
    config = parsed.models[0].scheduler_config()
    assert (config.policy, config.queue_s, config.min_share, config.max_batch) == ("fair", 1.0, 0.1, 8)
    assert parsed.models[0].deployment_options()["max_ongoing_requests"] == 1024
    assert parsed.ingress_options()["max_ongoing_requests"] == 1024  # above what the detectors queue
    assert parsed.ledger_settings(LedgerSettings()).tiers == {"pro": {"weight": 3}}


def test_given_scheduler_settings_then_a_queue_bound_beyond_the_timeout_is_refused_and_the_default_is_cut() -> None:
    base = {"name": "m", "weights": __file__, "timeout_s": 1.0}
    with pytest.raises(ValidationError, match="queue_s"):
        AppArgs.model_validate({"models": [{**base, "scheduler": {"queue_s": 1.0}}], "default_model": "m"})
    with pytest.raises(ValidationError, match="fair"):
        AppArgs.model_validate({"models": [{**base, "scheduler": {"policy": "lifo"}}], "default_model": "m"})
    cut = AppArgs.model_validate({"models": [base], "default_model": "m"}).models[0]
    assert cut.scheduler_config().queue_s == 0.5  # the default 1 s, cut to half of a 1 s timeout
    with pytest.raises(ValidationError, match="not a tier"):
        args(tiers={"gold": {"level": 2}})
