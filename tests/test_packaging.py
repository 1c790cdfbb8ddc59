"""The installed namespace and the floors: every shipped folder is listed once, nothing imports the bare folder
names, and no floor imports a higher one (kernels < cmvae < engine < bench < the command line, engine/cli, which
ties the others together)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ["kernels", "cmvae", "engine", "bench"]
PREFIX = "cmvae_engine."


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in a file, function bodies included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "cmvae_engine":  # `from cmvae_engine import kernels`
                found += [(node.lineno, f"cmvae_engine.{a.name}") for a in node.names]
    return found


def _sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py") if "_build" not in p.parts)


def test_every_shipped_package_is_listed_and_mapped():
    tool = _pyproject()["tool"]["setuptools"]
    listed = set(tool["packages"])
    on_disk = {PREFIX + ".".join(p.parent.relative_to(ROOT).parts) for p in _sources(*FLOORS)
               if p.name == "__init__.py"}
    assert listed == on_disk, f"pyproject packages {sorted(listed ^ on_disk)} differ from the folders"
    assert tool["package-dir"] == {PREFIX + f: f for f in FLOORS}
    assert not (ROOT / "tools" / "__init__.py").exists(), "tools/ holds scripts, not an importable package"


def test_no_bare_folder_imports():
    bad = [f"{p.relative_to(ROOT)}:{line} imports {mod}" for p in _sources(*FLOORS, "tests", "tools")
           for line, mod in _imports(p) if mod.split(".")[0] in FLOORS + ["tools"]]
    assert not bad, "\n".join(bad)


CLI = "engine/cli"


def test_floors_never_import_upwards():
    bad = []
    for i, floor in enumerate([*FLOORS, CLI]):
        higher = {PREFIX + f.replace("/", ".") for f in [*FLOORS, CLI][i + 1:]}
        files = _sources(floor)
        if floor == "engine":
            files = [p for p in files if CLI not in p.relative_to(ROOT).as_posix()]
        for p in files:
            for line, mod in _imports(p):
                if any(mod == h or mod.startswith(h + ".") for h in higher):
                    bad.append(f"{p.relative_to(ROOT)}:{line} ({floor}) imports {mod}")
    assert not bad, "\n".join(bad)
