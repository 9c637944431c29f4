"""`yolo-tokens`: the command line over the ledger's public API (a running service or cluster).

Two ways to the ledger, one set of commands: over the service's HTTP admin route (`--url`, with the
admin credential `yolo-tokens serve` writes to `~/.yolo-tokens/admin.json` or `$YT_ADMIN_TOKEN`;
well under a second a call), or over Ray (`--address`, or when no admin credential is found; a few
seconds a call, most of them joining the cluster).

Every command takes `--json`. Failures print `error: CODE: message` on stderr and exit
non-zero (2 refused, 3 ledger unavailable). Credentials are printed once, never stored.
The Ray environment (loopback, token auth) is the entry point's: `yolo-tokens` applies it before
this module imports Ray; `python -m ledger.cli` runs with the caller's environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

from ledger.client.over_http import AdminFile, HttpLedger
from ledger.core.api import LedgerApi
from ledger.core.codes import Code
from ledger.core.entities import TokenSpec
from ledger.core.errors import LedgerError, LedgerUnavailable, OperationRefused
from ledger.core.reports import GROUPINGS, INHERITED, cost_report, inherited, iso_utc
from ledger.core.settings import ClientSettings, LedgerSettings

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

Handler = Callable[[argparse.Namespace, Any], Any]


def parse_duration(text: str) -> float:
    """`30d`, `12h`, `90m`, `45s`, `2w` or plain seconds."""
    m = _DURATION.match(text)
    if m is None or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use a positive amount, e.g. 30d, 12h, 90m, 45s")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def _expires_at(args: argparse.Namespace) -> float | None:
    return time.time() + args.expires_in if getattr(args, "expires_in", None) else None


def to_plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    return value


def _when(ts: float | None) -> str:
    return "never" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts)) + "Z"


# columns holding epoch seconds: human output shows them as ISO-8601 UTC (`--json` keeps the numbers)
TIME_COLUMNS = frozenset(
    {"ts", "settled_at", "created_at", "delivered_at", "next_attempt_at", "acknowledged_at", "expires_at"}
)


def _cell(col: str, value: Any) -> str:
    if value is None:
        return "-"
    if col in TIME_COLUMNS and isinstance(value, int | float) and not isinstance(value, bool):
        return iso_utc(float(value)) or "-"
    return str(value)


def _table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    cells = [[_cell(c, r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def show_issued(result: dict[str, Any]) -> str:
    t = result["token"]
    return (
        f"token {t['id']} ({t['name']}): {t['allocation']} units, expires {_when(t['expires_at'])}\n"
        f"credential (shown once, store it now):\n{result['credential']}"
    )


def _limit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expires-in", type=parse_duration, help="e.g. 30d, 12h")
    p.add_argument("--rate", help="tier (basic, pro, enterprise) or N/s, N/min with optional :BURST")
    p.add_argument("--models", nargs="+", help="allowed models: name or name@version")
    p.add_argument("--ip", nargs="+", dest="ips", help="allowed client IPs or CIDRs")
    p.add_argument("--alert-email", nargs="+", dest="alert_emails", help="who gets this token's quota alerts")
    p.add_argument("--alert-webhook", nargs="+", dest="alert_webhooks", help="http(s) URLs that get them as JSON")
    p.add_argument("--cost-centre", dest="cost_centre", help="for cost reports (`report costs --by cost_centre`)")


# ------------------------------------------------------------------ handlers
def _spec(a: argparse.Namespace) -> TokenSpec:
    meta = {k: v for k in ("alert_emails", "alert_webhooks", "cost_centre") if (v := getattr(a, k, None))}
    return TokenSpec.build(
        a.name, a.quota, expires_at=_expires_at(a), models=a.models, ips=a.ips, rate=a.rate, team=a.team, meta=meta
    )


def cmd_package_create(a: argparse.Namespace, c: LedgerApi) -> Any:
    spec = _spec(a)
    if a.strict:  # every request admitted synchronously at the shard: no quota leases (DESIGN §3a)
        spec = TokenSpec.build(
            spec.name,
            spec.allocation,
            expires_at=spec.limits.expires_at,
            models=a.models,
            ips=a.ips,
            rate=a.rate,
            team=a.team,
            meta={**spec.meta, "strict": True},
        )
    return c.create_package(spec)


def cmd_split(a: argparse.Namespace, c: LedgerApi) -> Any:
    return c.split(a.parent, _spec(a))


def cmd_list(a: argparse.Namespace, c: LedgerApi) -> Any:
    return c.tokens(root_id=a.package)


def cmd_show(a: argparse.Namespace, c: LedgerApi) -> Any:
    token = to_plain(c.token(a.token_id))
    tree = {t["id"]: t for t in to_plain(c.tokens(root_id=token["root_id"]))}
    inherits = {}
    for key in INHERITED:
        value, source = inherited(tree, token["id"], key)
        inherits[key] = {"value": value, "from": source}
    return {"token": token, "inherited": inherits, "events": c.admin_events(a.token_id, limit=20)}


def cmd_revoke(a: argparse.Namespace, c: LedgerApi) -> Any:
    return c.revoke(a.token_id)


def cmd_reclaim(a: argparse.Namespace, c: LedgerApi) -> Any:
    return c.reclaim(a.token_id, a.units)


def cmd_rotate(a: argparse.Namespace, c: LedgerApi) -> Any:
    return c.rotate(a.token_id)


def cmd_top_up(a: argparse.Namespace, c: LedgerApi) -> Any:
    return c.top_up(a.token_id, a.units)


def cmd_limits(a: argparse.Namespace, c: LedgerApi) -> Any:
    """Narrow (or, on a root, change) a token's limits, as the console's Limits form does."""
    if not any(getattr(a, k) for k in ("rate", "models", "ips", "expires_in")):
        raise OperationRefused("nothing to change: give --rate, --models, --ip or --expires-in", Code.INVALID_REQUEST)
    return c.update_limits(a.token_id, expires_at=_expires_at(a), models=a.models, ips=a.ips, rate=a.rate)


def cmd_usage(a: argparse.Namespace, c: LedgerApi) -> Any:
    since = time.time() - a.since if a.since else None
    return c.usage(token_id=a.token, model=a.model, outcome=a.outcome, since=since, limit=a.limit)


def cmd_alerts_list(a: argparse.Namespace, c: LedgerApi) -> Any:
    return c.alerts(limit=a.limit)


def cmd_alerts_deliver(a: argparse.Namespace, c: LedgerApi) -> Any:
    return c.deliver_alerts()


def cmd_alerts_ack(a: argparse.Namespace, c: LedgerApi) -> Any:
    if not c.acknowledge_alert(a.alert_id, a.by):
        raise OperationRefused(f"alert {a.alert_id} not found or already acknowledged", Code.NOT_FOUND)
    return {"acknowledged": a.alert_id, "by": a.by}


def cmd_audit_export(a: argparse.Namespace, c: LedgerApi) -> Any:
    from ledger.store.repository import usage_csv  # SQLAlchemy: only this command needs it

    since = time.time() - a.since if a.since else None
    until = time.time() - a.until if a.until else None
    rows = c.usage(token_id=a.token, model=a.model, outcome=a.outcome, since=since, until=until, limit=a.limit)
    lines = usage_csv(rows)
    if a.out == "-":
        sys.stdout.writelines(lines)
        return {"rows": len(rows), "out": "-"}
    with open(a.out, "w", newline="") as fh:
        fh.writelines(lines)
    return {"rows": len(rows), "out": a.out}


def cmd_audit_prune(a: argparse.Namespace, c: LedgerApi) -> Any:
    return c.prune_audit()


def cmd_report_costs(a: argparse.Namespace, c: LedgerApi) -> Any:
    since = time.time() - a.since
    return cost_report(c.usage(since=since, limit=1_000_000), c.tokens(), a.by)


def cmd_admin_issue(a: argparse.Namespace, c: LedgerApi) -> Any:
    return {"admin": a.name, "expires_in_s": a.ttl, "credential": c.issue_admin(a.name, a.ttl)}


def cmd_keys_rotate(a: argparse.Namespace, c: LedgerApi) -> Any:
    return c.rotate_keys()


def cmd_doctor(a: argparse.Namespace, c: LedgerApi) -> Any:
    report = c.consistency()
    return {
        "tokens": len(report.book),
        "mismatched": report.mismatched,
        "violations": report.violations,
        "healthy": not report.mismatched and not report.violations,
    }


# a balance everywhere: allocation as granted = used + leased + free + delegated + returned (+ written off)
BALANCE = ["granted", "used", "leased", "free", "delegated", "returned"]


def _with_inherited(rows: list[dict[str, Any]], scope: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Rows for the tables: a team or cost centre inherited from an ancestor is shown, marked."""
    known = {r["id"]: r for r in rows} if scope is None else scope
    out = []
    for row in rows:
        r = dict(row)
        for key in ("team", "cost_centre"):
            value, source = inherited(known, r["id"], key)
            r[key] = None if value is None else f"{value} (inherited)" if source else value
        out.append(r)
    return out


def render(command: str, value: Any) -> str:
    """Human output for each command."""
    v = to_plain(value)
    if command in ("package create", "token split", "token rotate"):
        return show_issued(v)
    if command == "token list":
        return _table(_with_inherited(v), ["id", "name", "team", "parent_id", *BALANCE, "status", "rate"])
    if command in ("token revoke", "token reclaim"):
        return f"{v['returned']} units returned to the parent\n" + _table(
            [v["token"]], ["id", "name", *BALANCE, "status"]
        )
    if command in ("token top-up", "token limits"):
        cols = ["id", "name", *BALANCE, "status"] + (
            ["rate", "models", "ips", "expires_at"] if "limits" in command else []
        )
        return _table([v], cols)
    if command == "token show":
        t = v["token"]
        body = "\n".join(
            f"{k:>11}: {t[k]}"
            for k in (
                "id",
                "name",
                "team",
                "parent_id",
                "root_id",
                "status",
                "granted",
                "allocation",
                "used",
                "leased",
                "delegated",
                "free",
                "returned",
                "consumed",
                "models",
                "ips",
                "rate",
                "children",
            )
        )
        for key, got in v.get("inherited", {}).items():
            if got["from"] is not None:
                body += f"\n{key:>11}: {got['value']} (inherited from {got['from']})"
            elif key not in ("team",) and got["value"] is not None:
                body += f"\n{key:>11}: {got['value']}"
        return (
            body + f"\n{'expires':>11}: {_when(t['expires_at'])}\n\n" + _table(v["events"], ["ts", "actor", "action"])
        )
    if command == "admin issue":
        return f"admin credential for {v['admin']} (shown once, valid {v['expires_in_s']:.0f} s):\n{v['credential']}"
    if command == "report costs":
        return _table(v, [next(iter(v[0])) if v else "team", "requests", "units", "gpu_ms"])
    if command == "alerts list":
        return _table(v, ["id", "ts", "kind", "token_id", "threshold", "consumed", "allocation", "status", "attempts"])
    if command == "audit export" and v["out"] == "-":
        return ""
    if command == "usage":
        return _table(v, ["ts", "token_id", "request_id", "model", "units", "state", "outcome", "client_ip"])
    return json.dumps(v, indent=2, default=str)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="yolo-tokens", description=__doc__)
    ap.add_argument(
        "--address", help="over Ray: the cluster's address ('auto': the running local one); default: over HTTP"
    )
    ap.add_argument("--url", help="over HTTP: the service (default: the one `serve` recorded, or $YT_URL)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    sub = ap.add_subparsers(dest="group", required=True)

    pkg = sub.add_parser("package", help="token packages").add_subparsers(dest="cmd", required=True)
    p = pkg.add_parser("create", parents=[common], help="create a package; prints its credential once")
    p.add_argument("--name", required=True)
    p.add_argument("--quota", type=int, required=True, help="units (calls) granted")
    p.add_argument("--team")
    p.add_argument(
        "--strict",
        action="store_true",
        help="admit every request synchronously at the ledger shard (no quota leases in ingress replicas)",
    )
    _limit_args(p)
    p.set_defaults(handler=cmd_package_create, command="package create")

    tok = sub.add_parser("token", help="tokens of a package").add_subparsers(dest="cmd", required=True)
    p = tok.add_parser("split", parents=[common], help="carve a child token out of a parent's free quota")
    p.add_argument("parent")
    p.add_argument("--name", required=True)
    p.add_argument("--quota", type=int, required=True)
    p.add_argument("--team")
    _limit_args(p)
    p.set_defaults(handler=cmd_split, command="token split")
    p = tok.add_parser("list", parents=[common])
    p.add_argument("--package", help="one package's tree")
    p.set_defaults(handler=cmd_list, command="token list")
    for name, handler, text in (
        ("show", cmd_show, "one token and its recent admin events"),
        ("revoke", cmd_revoke, "revoke a token and its subtree"),
        ("rotate", cmd_rotate, "issue a new credential; the old one stops working"),
    ):
        p = tok.add_parser(name, parents=[common], help=text)
        p.add_argument("token_id")
        p.set_defaults(handler=handler, command=f"token {name}")
    p = tok.add_parser("reclaim", parents=[common], help="return a child's unspent units to its parent")
    p.add_argument("token_id")
    p.add_argument("--units", type=int, help="default: all unspent")
    p.set_defaults(handler=cmd_reclaim, command="token reclaim")
    p = tok.add_parser("top-up", parents=[common], help="add units (root) or move them from the parent (child)")
    p.add_argument("token_id")
    p.add_argument("--units", type=int, required=True)
    p.set_defaults(handler=cmd_top_up, command="token top-up")
    p = tok.add_parser("limits", parents=[common], help="narrow a token's rate, models, client IPs or expiry")
    p.add_argument("token_id")
    p.add_argument("--expires-in", type=parse_duration, help="e.g. 30d, 12h")
    p.add_argument("--rate", help="tier (basic, pro, enterprise) or N/s, N/min with optional :BURST")
    p.add_argument("--models", nargs="+", help="allowed models: name or name@version")
    p.add_argument("--ip", nargs="+", dest="ips", help="allowed client IPs or CIDRs")
    p.set_defaults(handler=cmd_limits, command="token limits")

    p = sub.add_parser("usage", parents=[common], help="usage events (admitted and denied)")
    p.add_argument("--token")
    p.add_argument("--model")
    p.add_argument("--outcome")
    p.add_argument("--since", type=parse_duration, help="e.g. 1h")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=cmd_usage, command="usage")

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(dest="cmd", required=True)
    p = keys.add_parser("rotate", parents=[common], help="new signing key; old ones verify until their tokens expire")
    p.set_defaults(handler=cmd_keys_rotate, command="keys rotate")

    al = sub.add_parser("alerts", help="quota alerts: fired, delivered, failed, acknowledged").add_subparsers(
        dest="cmd", required=True
    )
    p = al.add_parser("list", parents=[common])
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=cmd_alerts_list, command="alerts list")
    p = al.add_parser("deliver", parents=[common], help="run one delivery pass now (also runs periodically)")
    p.set_defaults(handler=cmd_alerts_deliver, command="alerts deliver")
    p = al.add_parser("ack", parents=[common], help="acknowledge an alert")
    p.add_argument("alert_id", type=int)
    p.add_argument("--by", default="admin", help="who acknowledges (recorded)")
    p.set_defaults(handler=cmd_alerts_ack, command="alerts ack")

    ad = sub.add_parser("admin", help="admin credentials (console sign-in)").add_subparsers(dest="cmd", required=True)
    p = ad.add_parser("issue", parents=[common], help="issue an admin credential; printed once")
    p.add_argument("--name", required=True, help="who it is for (recorded as its subject)")
    p.add_argument("--ttl", type=parse_duration, default=12 * 3600, help="lifetime, e.g. 12h (default), 7d")
    p.set_defaults(handler=cmd_admin_issue, command="admin issue")

    rp = sub.add_parser("report", help="reports").add_subparsers(dest="cmd", required=True)
    p = rp.add_parser("costs", parents=[common], help="units, requests and GPU-ms per team, cost centre or model")
    p.add_argument("--by", choices=GROUPINGS, default="team")
    p.add_argument("--since", type=parse_duration, default=30 * 86400, help="window, e.g. 30d (default)")
    p.set_defaults(handler=cmd_report_costs, command="report costs")

    au = sub.add_parser("audit", help="audit trail").add_subparsers(dest="cmd", required=True)
    p = au.add_parser("export", parents=[common], help="usage events (admitted and denied) as CSV")
    p.add_argument("--out", default="-", help="file, or - for stdout")
    p.add_argument("--token")
    p.add_argument("--model")
    p.add_argument("--outcome")
    p.add_argument("--since", type=parse_duration, help="e.g. 7d: events of the last 7 days")
    p.add_argument("--until", type=parse_duration, help="e.g. 1d: events older than 1 day")
    p.add_argument("--limit", type=int, default=100_000)
    p.set_defaults(handler=cmd_audit_export, command="audit export")
    p = au.add_parser("prune", parents=[common], help="delete events older than the retention window now")
    p.set_defaults(handler=cmd_audit_prune, command="audit prune")

    p = sub.add_parser("doctor", parents=[common], help="compare the in-memory book with the database")
    p.set_defaults(handler=cmd_doctor, command="doctor")
    return ap


def connect(address: str, settings: LedgerSettings) -> LedgerApi:
    """Join the running cluster (unless this process already has) and attach to the ledger."""
    from ledger.client.service import attach  # Ray only on this path

    join(address, settings)
    return attach(settings)


def open_ledger(args: argparse.Namespace, settings: LedgerSettings) -> LedgerApi:
    """The ledger this command talks to: over HTTP with an admin credential ($YT_ADMIN_TOKEN, or
    the file `serve` writes), unless `--address` asks for Ray or no credential is found."""
    if args.address is None:
        recorded = AdminFile.default().read()
        credential = ClientSettings.from_env().admin_token or (recorded[1] if recorded else None)
        if credential:
            url = args.url or (recorded[0] if recorded else None) or ClientSettings.from_env().url
            return HttpLedger(url, credential)
        if args.url:
            raise OperationRefused(
                "no admin credential for --url: set $YT_ADMIN_TOKEN (yolo-tokens admin issue)", Code.MISSING_TOKEN
            )
    return connect(args.address or "auto", settings)


def join(address: str, settings: LedgerSettings) -> None:
    """Join the Ray cluster at `address`, unless this process already has."""
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address, namespace=settings.namespace, log_to_driver=False, logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError) as exc:
            raise LedgerUnavailable(
                f"no running Ray cluster at {address!r} ({exc}); start one with `make serve`"
            ) from exc


def main(argv: Sequence[str] | None = None, settings: LedgerSettings | None = None) -> int:
    return run(build_parser().parse_args(argv), settings or LedgerSettings.from_env())


def run(args: argparse.Namespace, settings: LedgerSettings) -> int:
    """Run one parsed ledger command against the running cluster; returns the exit code."""
    try:
        client = open_ledger(args, settings)
        result = args.handler(args, client)
    except OperationRefused as exc:
        _fail(args, exc)
        return 2
    except LedgerError as exc:
        _fail(args, exc)
        return 3
    if args.json:
        csv_on_stdout = args.command == "audit export" and args.out == "-"  # keep stdout pure CSV
        print(json.dumps(to_plain(result), indent=2, default=str), file=sys.stderr if csv_on_stdout else sys.stdout)
    elif text := render(args.command, result):
        print(text)
    if args.command == "doctor" and not result["healthy"]:
        return 1
    return 0


def _fail(args: argparse.Namespace, exc: LedgerError) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": exc.code.value, "message": exc.message}}), file=sys.stderr)
    else:
        print(f"error: {exc.code.value}: {exc.message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
