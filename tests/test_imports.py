"""No module of engine/ or models/ takes another module's private names.

A leading underscore says "this module's own business": what another module needs
is made public, under a name that says what it is. Checked on the sources (ast):
`from x import _y`, and `x._y` where `x` names an imported project module. A
module whose own name starts with an underscore (the C helpers, engine.ingest._seen)
is a module, not a private name, and may be imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "models")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_project_module(name: str) -> bool:
    """A module or package of the project, Python or C (by its source or build)."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return False
    folder, leaf = ROOT.joinpath(*parts[:-1]), parts[-1]
    if (folder / leaf).is_dir():
        return True
    return folder.is_dir() and any(p.name.split(".")[0] == leaf for p in folder.iterdir())


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """Each use in `source` (the module `module`) of another project module's private
    name, as `line: what`."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: list[str] = []
    # Local names bound to project modules: `import x.y as z`, `from x import y`.
    modules: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not is_project_module(alias.name):
                    continue
                if alias.asname:
                    modules[alias.asname] = alias.name
                else:
                    head = alias.name.split(".")[0]
                    modules[head] = head
        elif isinstance(node, ast.ImportFrom):
            source_module = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source_module = ".".join([*base, source_module] if source_module else base)
            if not is_project_module(source_module) or source_module == module:
                continue
            for alias in node.names:
                full = f"{source_module}.{alias.name}"
                if is_project_module(full):
                    modules[alias.asname or alias.name] = full
                elif is_private(alias.name):
                    found.append(f"{node.lineno}: from {source_module} import {alias.name}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not is_private(node.attr):
            continue
        dotted = _dotted(node.value)
        if dotted is None:
            continue
        head, _, rest = dotted.partition(".")
        if head not in modules:
            continue
        owner = ".".join(filter(None, [modules[head], rest]))
        if (
            owner != module
            and is_project_module(owner)
            and not is_project_module(f"{owner}.{node.attr}")
        ):
            found.append(f"{node.lineno}: {dotted}.{node.attr}")
    return found


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_no_module_takes_another_modules_private_names() -> None:
    offenders = []
    for path in sources():
        uses = private_uses(
            path.read_text(encoding="utf-8"),
            module_name(path),
            is_package=path.name == "__init__.py",
        )
        offenders.extend(f"{path.relative_to(ROOT)}:{use}" for use in uses)
    assert sources(), "no sources found: the check would pass on nothing"
    assert offenders == [], "\n".join(offenders)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from engine.lake.parquet import Lake, _write_atomic\n", ["1: from engine.lake.parquet"]),
        ("from ..lake.parquet import _write_atomic\n", ["1: from engine.lake.parquet"]),
        ("import engine.lake.parquet\nengine.lake.parquet._write_atomic(1, 2)\n", ["2: engine"]),
        ("import engine.lake.parquet as p\np._write_atomic(1, 2)\n", ["2: p._write_atomic"]),
        ("from engine.lake import parquet\nparquet._write_atomic(1, 2)\n", ["2: parquet._"]),
        ("from models.base import ModelFinding\n", []),
        ("from engine.ingest import _seen\n", []),  # a C helper: a module
        ("from engine.ingest._rows import take_rows as _take_rows\n", []),
        ("import engine.ingest._fastio\n", []),
        ("from engine.detect import __doc__\n", []),
        ("import json\njson._default_encoder\n", []),  # not the project's
        ("def f(self):\n    return self._state\n", []),  # an object's own, not a module's
    ],
)
def test_the_check_tells_private_names_from_modules(source: str, expected: list[str]) -> None:
    uses = private_uses(source, "engine.alerts.example")
    assert len(uses) == len(expected), uses
    for use, start in zip(uses, expected, strict=True):
        assert use.startswith(start), (use, start)
