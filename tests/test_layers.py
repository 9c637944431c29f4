"""The import contracts of DESIGN §2 (pyproject.toml, `make lint`) catch the imports they forbid.

`lint-imports` runs the project's own contracts against a small tree in tmp_path that has the
modules they name: first as it is (every contract kept), then with one forbidden import added.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
CONTRACTS = {c["id"]: c for c in CONFIG["contracts"]}

# a tree that keeps every contract, shaped like the real one
TREE = {
    "ledger/__init__.py": "from ledger.core import book\n",
    "ledger/core/book.py": "from ledger.core import codes\n",
    "ledger/core/codes.py": "import enum\n",
    "ledger/store/models.py": "import sqlalchemy\n",
    "ledger/store/repository.py": "from ledger.core import book\nfrom ledger.store import models\n",
    "ledger/shard/core.py": "from ledger.core import book\nfrom ledger.store import repository\n",
    "ledger/shard/actors.py": "import ray\n\nfrom ledger.shard import core\n",  # a Ray shell
    "ledger/client/holder.py": "from ledger.core import book\n",
    "ledger/client/over_ray.py": "import ray\n\nfrom ledger.shard import actors\n",
    "ledger/cli.py": "import ray\n\nfrom ledger.client import over_ray\n",
    "serve_app/app.py": "import fastapi\nimport ray\n\nfrom ledger import book\nfrom serve_app.engine import yolo\n",
    "serve_app/cli.py": "from ledger import cli\n",
    "serve_app/engine/yolo.py": "import torch\nimport ultralytics\n\nfrom serve_app import imaging\n",
    "ui/app.py": "import streamlit\n\nfrom ledger import book\n",
}


def write_tree(root: Path) -> None:
    for name, text in TREE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    named = {m for c in CONTRACTS.values() for m in c.get("source_modules", []) if "*" not in m}
    named |= {i.split(" -> ")[1] for c in CONTRACTS.values() for i in c.get("ignore_imports", [])}
    for module in named:  # every module a contract names exists (as a package where TREE makes one)
        path = root / module.replace(".", "/")
        if not path.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".py").touch()
    for pkg in {p.parent for p in root.rglob("*.py")}:
        (pkg / "__init__.py").touch()
    (root / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    # cwd first on sys.path: the tree in tmp_path, not the installed packages of the same names
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=root,
        env={"PATH": str(LINT_IMPORTS.parent), "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    write_tree(tmp_path)
    return tmp_path


def test_given_a_tree_that_follows_design_2_then_every_contract_is_kept(tree: Path) -> None:
    done = lint_imports(tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract", "shown"),
    [
        ("ledger/core/book.py", "import ray", "pure-without-ray", "ledger.core.book -> ray"),
        # indirect: the shard core reaches Ray through its actor shell (same layer: only this contract)
        ("ledger/shard/core.py", "from ledger.shard import actors", "pure-without-ray", "ledger.shard.actors -> ray"),
        ("ledger/core/codes.py", "from ray import cloudpickle", "pure-without-ray", "ledger.core.codes -> ray"),
        ("serve_app/engine/yolo.py", "from ray import serve", "pure-without-ray", "serve_app.engine.yolo -> ray"),
        ("serve_app/imaging.py", "import ray", "pure-without-ray", "serve_app.imaging -> ray"),
        ("ledger/core/codes.py", "import fastapi", "ledger-standalone", "ledger.core.codes -> fastapi"),
        ("ledger/store/models.py", "import serve_app.imaging", "ledger-standalone",
         "ledger.store.models -> serve_app.imaging"),
        ("ledger/client/over_ray.py", "import torch", "ledger-standalone", "ledger.client.over_ray -> torch"),
        ("ledger/cli.py", "import streamlit", "ledger-standalone", "ledger.cli -> streamlit"),
        ("ledger/store/repository.py", "import ui.app", "ledger-standalone", "ledger.store.repository -> ui.app"),
        # each layer imports only those below it
        ("ledger/core/book.py", "from ledger.store import models", "ledger-layers",
         "ledger.core.book -> ledger.store.models"),
        ("ledger/store/repository.py", "from ledger.shard import core", "ledger-layers",
         "ledger.store.repository -> ledger.shard.core"),
        ("ledger/shard/core.py", "from ledger.client import holder", "ledger-layers",
         "ledger.shard.core -> ledger.client.holder"),
        ("ledger/client/over_ray.py", "import ledger.cli", "ledger-layers", "ledger.client.over_ray -> ledger.cli"),
        # serve_app and ui: the package root only
        ("serve_app/app.py", "from ledger.client import over_ray", "serve-app-ledger-root",
         "serve_app.app -> ledger.client.over_ray"),
        ("serve_app/app.py", "from ledger.core.codes import Code", "serve-app-ledger-root",
         "serve_app.app -> ledger.core.codes"),
        ("ui/app.py", "from ledger.store import models", "ui-public-ledger-api", "ui.app -> ledger.store.models"),
        ("ui/app.py", "from ledger import cli", "ui-public-ledger-api", "ui.app -> ledger.cli"),
        ("ui/app.py", "import serve_app.app", "ui-public-ledger-api", "ui.app -> serve_app.app"),
    ],
)  # fmt: skip
def test_given_a_forbidden_import_then_its_contract_is_broken(
    tree: Path, module: str, line: str, contract: str, shown: str
) -> None:
    path = tree / module
    path.write_text(path.read_text() + line + "\n")
    done = lint_imports(tree)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"Contracts: {len(CONTRACTS) - 1} kept, 1 broken." in done.stdout, done.stdout
    broken = " ".join(done.stdout.split("Broken contracts", 1)[1].split())  # undo the report's line wrapping
    assert broken.startswith(f"{'-' * 16} {CONTRACTS[contract]['name']} ---"), broken
    assert shown in broken, broken


def test_given_the_pure_modules_when_imported_then_ray_is_not() -> None:
    """At run time too: importing a module runs its packages' `__init__` first, which the contracts
    do not follow (`ledger/__init__.py` names its Ray-backed parts lazily)."""
    pure = CONTRACTS["pure-without-ray"]["source_modules"]
    code = f"import importlib, sys\nfor m in {pure!r}:\n    importlib.import_module(m)\nprint(sorted(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    assert "'ray'" not in done.stdout
