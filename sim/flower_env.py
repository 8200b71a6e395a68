"""Flower's settings for this project's scripts, tests and the processes they start."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path

FLOWER_SETTINGS: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
"""No telemetry, no update check, no dependency installs; Ray keeps ``CUDA_VISIBLE_DEVICES``
as it is for actors given zero GPUs."""


def configure_flower_env(
    environ: MutableMapping[str, str] | None = None,
    flwr_home: str | Path | None = None,
    keep_set: bool = True,
) -> MutableMapping[str, str]:
    """Put ``FLOWER_SETTINGS`` and ``FLWR_HOME`` into ``environ`` (default ``os.environ``).

    Parameters
    ----------
    environ
        The environment to change in place (a child process's ``env`` dict, say).
    flwr_home
        ``FLWR_HOME`` to set; ``None`` keeps one already set, else makes a fresh temporary
        folder (Flower writes there even with telemetry off: not into the user's home; use
        :func:`flower_env` to have it removed after a run).
    keep_set
        Keep settings already in ``environ`` (a user's own choice); ``False`` overrides them
        (the deployment's processes must not install dependencies, whatever the shell says).

    Returns
    -------
    The same ``environ``.
    """
    env = os.environ if environ is None else environ
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    elif "FLWR_HOME" not in env:
        env["FLWR_HOME"] = tempfile.mkdtemp(prefix="peel-fed-flwr-")
    for key, value in FLOWER_SETTINGS.items():
        if not keep_set or key not in env:
            env[key] = value
    return env


@contextmanager
def flower_env() -> Iterator[MutableMapping[str, str]]:
    """:func:`configure_flower_env` on ``os.environ`` for a block: a ``FLWR_HOME`` it had to make
    is removed afterwards (with whatever Flower wrote there), also on failure, and unset again."""
    made = "FLWR_HOME" not in os.environ
    env = configure_flower_env()
    home = env["FLWR_HOME"]
    try:
        yield env
    finally:
        if made:
            shutil.rmtree(home, ignore_errors=True)
            if os.environ.get("FLWR_HOME") == home:
                del os.environ["FLWR_HOME"]
