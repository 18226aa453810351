"""Layer rules, enforced: metadata/ and compute/ never import Qt; only compute/backend.py imports cupy;
compute/ and metadata/ never import app/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QT = {"PyQt6", "PyQt5", "PySide6", "PySide2", "pyqtgraph", "qtpy", "superqt"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def violations(repo: Path) -> list[str]:
    bad = []
    for pkg in ("compute", "metadata"):
        for f in sorted((repo / pkg).rglob("*.py")):
            roots = imported_roots(f)
            rel = f.relative_to(repo)
            for q in sorted(roots & QT):
                bad.append(f"{rel}: imports {q} (Qt is only allowed in app/gui)")
            if "app" in roots:
                bad.append(f"{rel}: imports app (layers point down)")
    for pkg in ("app", "compute", "metadata"):
        for f in sorted((repo / pkg).rglob("*.py")):
            rel = f.relative_to(repo)
            if "cupy" in imported_roots(f) and rel.as_posix() != "compute/backend.py":
                bad.append(f"{rel}: imports cupy (only compute/backend.py may)")
    for f in sorted((repo / "app").rglob("*.py")):
        rel = f.relative_to(repo)
        if rel.parts[1] != "gui" and imported_roots(f) & QT:
            bad.append(f"{rel}: imports Qt outside app/gui")
    return bad


def test_layers_are_respected():
    assert violations(REPO) == []


@pytest.mark.parametrize("line", ["from PyQt6 import QtCore", "import pyqtgraph as pg",
                                  "import cupy", "from app.cli import main"])
def test_contract_catches_a_bad_import(tmp_path, line):
    """The checker itself must fail when a forbidden import is added to compute/."""
    for pkg in ("app", "compute", "metadata"):
        (tmp_path / pkg).mkdir()
    (tmp_path / "app" / "gui").mkdir()
    (tmp_path / "compute" / "kernel.py").write_text(f"{line}\n")
    (tmp_path / "app" / "gui" / "w.py").write_text("from PyQt6 import QtWidgets\n")
    found = violations(tmp_path)
    assert len(found) == 1 and found[0].startswith("compute/kernel.py")


def test_compute_and_metadata_import_without_qt():
    """Importing every compute/metadata module must not pull Qt into the process."""
    import importlib
    import subprocess
    import sys

    mods = []
    for pkg in ("compute", "metadata"):
        for f in sorted((REPO / pkg).rglob("*.py")):
            mods.append(".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"))
    code = ("import sys, importlib\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            f"{sorted(QT | {'cupy'})!r}]\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    del importlib
