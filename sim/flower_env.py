"""Flower's settings for this project's scripts, tests and the processes they start."""

from __future__ import annotations

import os
import tempfile
from collections.abc import MutableMapping
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
        folder (Flower writes there even with telemetry off: not into the user's home).
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
