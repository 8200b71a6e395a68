"""The algorithm core (``peel_fed``) never imports the Flower/Ray layers and has no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import peel_fed

CORE = Path(peel_fed.__file__).parent
UPPER_LAYERS = ("clients", "strategies", "sim", "flwr", "ray")


def _core_files() -> list[Path]:
    # cli.py is moving to sim/ (issue 11); it is the one core module that still reaches up
    return sorted(p for p in CORE.glob("*.py") if p.name != "cli.py")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_core_never_imports_the_upper_layers():
    reaching_up = {
        p.name: sorted(m for m in _imports(p) if m.split(".")[0] in UPPER_LAYERS)
        for p in _core_files()
    }
    assert {k: v for k, v in reaching_up.items() if v} == {}


def test_the_core_has_no_import_cycle():
    graph = {
        p.stem: {m.split(".")[1] for m in _imports(p) if m.startswith("peel_fed.")}
        for p in _core_files()
    }
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module) :]))
        if module in done or module not in graph:
            return
        for dep in sorted(graph[module]):
            visit(dep, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())
