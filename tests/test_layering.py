"""The layering contract (.importlinter, docs/architecture.md) holds, and it is not a contract that cannot fail: a
wrong-way import planted in a copy of the package breaks it. Module size and private imports are checked too."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "radar"
MAX_MODULE_LINES = 425  # "about 400"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with `root` first on the path, so it analyses that copy of the package."""
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                           "lint_imports_command()", str(ROOT / ".importlinter"), "--no-cache"],
                          cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_layering_contract_holds():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("module, wrong_import", [
    ("decoding/tree.py", "from radar.controller import policy"),  # the engine reaching up to the controller
    ("controller/train.py", "import mlflow"),  # the controller depending on tracking
    ("ops/bench.py", "from radar.cli import app"),  # an operation calling the CLI
])
def test_a_wrong_way_import_breaks_the_contract(tmp_path, module, wrong_import):
    shutil.copytree(PACKAGE, tmp_path / "radar", ignore=shutil.ignore_patterns("__pycache__", "data"))
    planted = tmp_path / "radar" / module
    planted.write_text(planted.read_text() + f"\n\ndef _planted():\n    {wrong_import}\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_the_size_limit(path):
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES


def test_no_private_name_is_imported_across_modules():
    crossings = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("radar"):
                crossings += [f"{path.relative_to(PACKAGE)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert crossings == []
