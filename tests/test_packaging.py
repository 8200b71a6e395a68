"""peel-fed installs the top-level names ``clients``, ``strategies`` and ``sim`` (the design's
folders). They are generic, so this checks that nothing else in the environment provides them:
no other distribution declares them, no stray module sits in site-packages, the standard library
has none, and importing them reaches this repository's folders."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import site
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTION = "peel-fed"
TOP_LEVEL_NAMES = ("clients", "strategies", "sim")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _module_name(entry: Path) -> str | None:
    """The import name a site-packages entry provides (``sim/``, ``sim.py``, ``sim.cpython-311-
    x86_64-linux-gnu.so``), or ``None`` for metadata and other files."""
    if entry.is_dir():
        return entry.name if entry.name.isidentifier() else None
    if entry.suffix in (".py", ".pyc", ".so", ".pyd"):
        return entry.name.split(".")[0]
    return None


def _own_files() -> set[Path]:
    """Every file the installed peel-fed distribution wrote (none if it is not installed)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return set()
    return {Path(dist.locate_file(f)).resolve() for f in dist.files or []}


def site_dirs() -> list[Path]:
    """This interpreter's site-packages folders (and the user's, when enabled)."""
    dirs = [*site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [Path(d) for d in dirs if Path(d).is_dir()]


def other_providers(names: tuple[str, ...], dirs: list[Path]) -> dict[str, list[str]]:
    """For each import name, whatever else provides it: another distribution declaring it as a
    top-level name, an entry in ``dirs`` that peel-fed did not install, or a standard-library
    module. Empty lists mean the names are peel-fed's alone."""
    found: dict[str, list[str]] = {name: [] for name in names}
    for name, dists in importlib.metadata.packages_distributions().items():
        if name in found:
            found[name] += sorted(
                f"distribution {d}" for d in set(dists) if _canonical(d) != DISTRIBUTION
            )
    own = _own_files()
    for folder in dirs:
        for entry in sorted(folder.iterdir()):
            name = _module_name(entry)
            if name not in found:
                continue
            path = entry.resolve()
            owned = path in own or any(path in f.parents for f in own)
            if not owned:
                found[name].append(str(entry))
    for name in names:
        if name in sys.stdlib_module_names:
            found[name].append("the standard library")
    return found


def test_no_other_package_provides_the_top_level_names():
    assert other_providers(TOP_LEVEL_NAMES, site_dirs()) == {n: [] for n in TOP_LEVEL_NAMES}


@pytest.mark.parametrize("name", TOP_LEVEL_NAMES)
def test_the_top_level_names_import_from_this_repository(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO / name


def test_a_planted_distribution_and_a_stray_module_are_found(tmp_path, monkeypatch):
    """A site folder with a distribution declaring ``sim`` and a bare ``strategies.py``."""
    info = tmp_path / "fake_sim-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-sim\nVersion: 1.0\n")
    (info / "top_level.txt").write_text("sim\n")
    (info / "RECORD").write_text("sim/__init__.py,,\nfake_sim-1.0.dist-info/METADATA,,\n")
    (tmp_path / "sim").mkdir()
    (tmp_path / "sim" / "__init__.py").write_text("")
    (tmp_path / "strategies.py").write_text("")
    monkeypatch.setattr(sys, "path", [*sys.path, str(tmp_path)])  # found, never imported first
    got = other_providers(TOP_LEVEL_NAMES, [*site_dirs(), tmp_path])
    assert got == {
        "clients": [],
        "strategies": [str(tmp_path / "strategies.py")],
        "sim": ["distribution fake-sim", str(tmp_path / "sim")],
    }


def test_every_console_script_names_a_function_of_this_repository():
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"peel-fed": "sim.cli:main"}  # the CLI is outside the core
    for target in scripts.values():
        module, _, attr = target.partition(":")
        function = getattr(importlib.import_module(module), attr)
        assert callable(function) and Path(function.__code__.co_filename).is_relative_to(REPO)
