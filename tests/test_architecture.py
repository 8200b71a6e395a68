"""The house rules, checked on the source: the core never reaches up, no import cycles, short files.

``peel_fed/`` is the algorithm and must import neither the Flower adapters (``clients/``,
``strategies/``), the runners (``sim/``) nor Flower or Ray themselves. Modules of the project may
not import each other in a circle (counting imports inside functions too: a lazy import hides a
cycle, it does not remove it; only ``if TYPE_CHECKING:`` imports, never run, are left out).
A module over ``MAX_LINES`` lines says why in its docstring, in a sentence that starts with
``Long file:``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("peel_fed", "clients", "strategies", "sim")
CORE_MAY_NOT_IMPORT = {"clients", "strategies", "sim", "flwr", "ray"}
MAX_LINES = 400


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    out = {}
    for package in PACKAGES:
        if not (root / package / "__init__.py").is_file():
            raise FileNotFoundError(f"no package {package}/ under {root}")
        for path in sorted((root / package).rglob("*.py")):
            out[module_name(path, root)] = path
    return out


def imported_names(path: Path, name: str) -> set[str]:
    """Dotted names a module imports anywhere in its body (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for inner in ast.walk(node)
    }
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            out.add(prefix)
            out.update(f"{prefix}.{alias.name}" for alias in node.names)
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Edges between project modules (an import of a package counts as its ``__init__``)."""
    graph = {}
    for name, path in modules.items():
        graph[name] = {dep for dep in imported_names(path, name) if dep in modules} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def core_violations(modules: dict[str, Path]) -> list[str]:
    out = []
    for name, path in modules.items():
        if not name.startswith("peel_fed"):
            continue
        for dep in sorted(imported_names(path, name)):
            if dep.split(".")[0] in CORE_MAY_NOT_IMPORT:
                out.append(f"{name} imports {dep}")
    return out


def long_files_without_reason(modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    out = []
    for path in modules.values():
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        if lines > MAX_LINES and "Long file:" not in (ast.get_docstring(ast.parse(text)) or ""):
            out.append(f"{path.relative_to(root)} ({lines} lines)")
    return out


def test_core_never_imports_adapters_runners_flower_or_ray():
    assert core_violations(project_modules()) == []


def test_no_import_cycle():
    assert find_cycle(import_graph(project_modules())) is None


def test_long_files_state_their_reason():
    assert long_files_without_reason(project_modules()) == []


@pytest.fixture
def planted(tmp_path):
    """A tiny copy of the layout with a core module that reaches up and a two-module cycle."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "peel_fed" / "a.py").write_text("from . import b\n")
    (tmp_path / "peel_fed" / "c.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from peel_fed.d import D\n"
    )
    (tmp_path / "peel_fed" / "d.py").write_text("from peel_fed.c import C\n")
    (tmp_path / "peel_fed" / "b.py").write_text(
        '"""B."""\n\ndef f():\n    from peel_fed.a import x\n    from sim.cli import main\n'
    )
    (tmp_path / "sim" / "cli.py").write_text("import flwr\n" + "x = 1\n" * (MAX_LINES + 1))
    return tmp_path


def test_checks_catch_planted_violations(planted):
    modules = project_modules(planted)
    assert core_violations(modules) == [
        "peel_fed.b imports sim.cli",
        "peel_fed.b imports sim.cli.main",
    ]
    graph = import_graph(modules)
    assert find_cycle(graph) == ["peel_fed.a", "peel_fed.b", "peel_fed.a"]
    assert graph["peel_fed.c"] == set()  # a type-only import is never run
    assert long_files_without_reason(modules, planted) == ["sim/cli.py (402 lines)"]
    # sim/ may import Flower (only the core may not), and the core may import itself
    assert not [v for v in core_violations(modules) if "flwr" in v or "peel_fed.a" in v]


def test_random_streams_are_apart():
    """Every ``*_STREAM`` constant of the core names its own random stream; most get a round,
    pass or layer added, so they must lie far apart (validation negatives once shared the
    elastic budgets' stream)."""
    import importlib

    import numpy as np

    streams: dict[str, int] = {}  # name -> value (a constant imported elsewhere is one stream)
    for path in sorted((ROOT / "peel_fed").glob("*.py")):
        module = importlib.import_module(f"peel_fed.{path.stem}")
        for name, value in vars(module).items():
            if name.endswith("_STREAM") and isinstance(value, int):
                assert streams.setdefault(name, value) == value, name
    assert len(streams) >= 10
    values = sorted(streams.values())
    assert len(set(values)) == len(values), streams
    assert np.diff(values).min() >= 50_000, streams
