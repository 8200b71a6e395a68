"""Names renamed in 0.2 for one vocabulary, and the warning an old name gives until 0.3.

Run-config keys follow the Python names (``num_blocks`` is ``num-blocks``), and every
pretraining key carries the ``pretrain-`` prefix as every PEE-learning key carries ``pee-``.
Command-line options are listed in ``sim.cli``.
"""

from __future__ import annotations

import warnings

RENAMED_RUN_CONFIG_KEYS: dict[str, str] = {
    "item-groups": "num-item-groups",
    "blocks": "num-blocks",
    "user-groups": "num-user-groups",
    "cohort-fraction": "pretrain-cohort-fraction",
    "local-steps": "pretrain-local-steps",
    "server-lr": "pretrain-server-lr",
    "user-lr": "pretrain-user-lr",
}
"""Run-config keys (old -> new). ``flwr run`` checks keys against ``pyproject.toml`` and so knows
only the new ones; ``peel-fed simulate`` and ``deploy`` accept both."""

RENAMED_NODE_CONFIG_KEYS: dict[str, str] = {"budget-bytes": "device-budget"}
"""SuperNode node-config keys (old -> new)."""


def with_current_keys(config: dict, renamed: dict[str, str], what: str) -> dict:
    """``config`` with every old key replaced by its new name (a warning each); a config that
    gives a key under both names is a ``ValueError``."""
    out: dict = {}
    for given, value in config.items():
        key = renamed_key(given, renamed, what)
        if key != given and key in config:
            raise ValueError(f"{what}s give both {given!r} and its new name {key!r}")
        out[key] = value
    return out


def renamed_key(key: str, renamed: dict[str, str], what: str) -> str:
    """The current name of ``key``; an old name gives a ``FutureWarning`` naming the new one."""
    if key not in renamed:
        return key
    warnings.warn(
        f"{what} {key!r} is renamed {renamed[key]!r}; the old name goes in 0.3",
        FutureWarning,
        stacklevel=3,
    )
    return renamed[key]
