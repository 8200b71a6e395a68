"""Atomic file writes: write to a temporary file in the same folder, then rename over the target.

A crash or Ctrl-C mid-write leaves the previous file (or none), never a truncated one. New files
get the mode a plain ``open()`` would give them (0o666 less the umask), not ``mkstemp``'s 0o600.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np


def portable_path(path: str | Path | None) -> str | None:
    """``path`` as a results file should record it: relative to the working directory (the
    repository, for every command here), so no committed report holds this machine's absolute
    paths (``/work/shared/data/yelp2018`` from ``/work/main`` is ``../shared/data/yelp2018``).
    None and empty stay as they are; a path on another drive stays absolute."""
    if path is None or not str(path):
        return path
    try:
        return os.path.relpath(Path(path).expanduser().absolute())
    except ValueError:  # Windows: another drive
        return str(path)


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0o666 less the process umask."""
    umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(
    path: str | Path, write: Callable[[IO[bytes]], None], mode: int | None = None
) -> Path:
    """Call ``write(fh)`` on a temporary binary file, fsync it, and rename it to ``path``.

    The file gets ``mode`` (default :func:`default_file_mode`) before anything is written, so a
    private file (``0o600``) is never readable by others, not even for a moment.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), default_file_mode() if mode is None else mode)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_report(path: str | Path, report: Any, markdown: str) -> Path:
    """A benchmark's figures: ``report`` as JSON at ``path`` and ``markdown`` beside it
    (``.md``), each written atomically; returns the markdown's path."""
    write_json_atomic(path, report)
    return write_text_atomic(Path(path).with_suffix(".md"), markdown)


def to_jsonable(obj: Any) -> Any:
    """``obj`` with tuples as lists and numpy scalars as Python numbers, for :mod:`json`."""
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
