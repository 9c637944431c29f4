"""The launcher's environment rules: what they set, and that every entry point applies them before
Ray is imported (Ray reads part of them once, at import)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from serve_app import launcher, proxy_hooks

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RULE_VARS = (*launcher.ENFORCED, *launcher.DEFAULTS, launcher.LOOPBACK_VAR)


def bare_env() -> dict[str, str]:
    """This process's environment without any of the rules (as a fresh shell would have it)."""
    return {k: v for k, v in os.environ.items() if k not in RULE_VARS}


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, env=bare_env(), capture_output=True, text=True, timeout=120, check=False)


def test_given_any_shell_then_the_rules_hold_and_the_shell_keeps_its_own_defaults() -> None:
    shell = {"FORWARDED_ALLOW_IPS": "*", proxy_hooks.CALLBACK_VAR: "x:y", "YOLO_OFFLINE": "0", "HOME": "/h"}
    env = launcher.environment(shell)
    assert env["FORWARDED_ALLOW_IPS"] == "" and proxy_hooks.installed(env)  # enforced over the shell's
    assert env[launcher.LOOPBACK_VAR] == "0" and env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["YOLO_OFFLINE"] == "0" and env["HOME"] == "/h"
    assert shell["FORWARDED_ALLOW_IPS"] == "*"  # the caller's mapping is not touched


def test_given_a_driver_of_a_cluster_then_node_address_and_auth_mode_are_left_to_ray() -> None:
    env = launcher.environment({}, local=False)
    assert launcher.LOOPBACK_VAR not in env and "RAY_AUTH_MODE" not in env
    assert proxy_hooks.installed(env) and env["YOLO_OFFLINE"] == "1"


def test_given_ray_already_imported_when_a_rule_it_reads_would_change_then_nothing_is_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    env: dict[str, str] = {}
    with pytest.raises(launcher.LaunchError, match="RAY_AUTH_MODE"):
        launcher.apply_environment(env=env)
    assert env == {}
    applied = launcher.environment({})
    assert launcher.apply_environment(env=applied) == {}  # applied already: a second call is a no-op


def test_given_a_bare_shell_when_yolo_tokens_starts_then_the_rules_come_before_ray() -> None:
    """The commands module imports no Ray (only `serve` does, after the rules), so it starts from a
    bare shell too; serve_app.cli.main() re-applies the rules, which raises if Ray came first."""
    done = run([str(BIN / "yolo-tokens"), "--help"])
    assert done.returncode == 0, done.stderr
    direct = run([sys.executable, "-c", "import sys, serve_app.cli; assert 'ray' not in sys.modules, 'ray imported'"])
    assert direct.returncode == 0, direct.stderr
    late = run([sys.executable, "-c", "import ray; from serve_app import cli; cli.main(['--help'])"])
    assert late.returncode != 0 and "LaunchError" in late.stderr


@pytest.mark.parametrize("script", ["bench.hops", "bench.ledger", "bench.serving"])
def test_given_a_bare_shell_when_a_benchmark_starts_then_the_rules_come_before_ray(script: str) -> None:
    """`python -m bench.X --help`; then, in the same process: the rules were applied (a second call
    changes nothing) and Ray, imported by the script, is there (so they came before it)."""
    code = f"""
import runpy, sys
sys.argv = ["{script}", "--help"]
try:
    runpy.run_module("{script}", run_name="__main__")
except SystemExit as exit:
    assert not exit.code, exit.code
from serve_app import launcher
assert "ray" in sys.modules and launcher.apply_environment() == {{}}
"""
    done = run([sys.executable, "-c", code])
    assert done.returncode == 0, done.stderr


def _writes_environ(node: ast.AST) -> bool:
    """`os.environ[...] = `, `os.environ.setdefault/update/pop(...)`, `os.putenv(...)`."""
    environ = "os.environ"
    if isinstance(node, ast.Assign | ast.AugAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(isinstance(t, ast.Subscript) and ast.unparse(t.value) == environ for t in targets)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        owner = ast.unparse(node.func.value)
        return (owner == environ and node.func.attr in {"setdefault", "update", "pop", "clear"}) or (
            owner == "os" and node.func.attr == "putenv"
        )
    return False


def _module_level(tree: ast.Module) -> list[ast.AST]:
    """Every node that runs when the module is imported (not inside a function or a class body's methods)."""
    out: list[ast.AST] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def test_given_every_module_then_none_writes_the_environment_when_imported() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for package in ("ledger", "serve_app", "ui", "bench", "cluster", "tests")
        for path in sorted((ROOT / package).rglob("*.py"))
        for node in _module_level(ast.parse(path.read_text(), str(path)))
        if _writes_environ(node) and isinstance(node, ast.stmt | ast.expr)
    ]
    assert offenders == [], "write os.environ through serve_app.launcher at the entry point instead"
