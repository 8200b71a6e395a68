"""Typed configuration of a federated run, read from Flower's run config (kebab-case keys)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """An invalid run-config value."""


@dataclass(frozen=True)
class FedConfig:
    """Run-config of the federated pipeline; field ``x_y`` is run-config key ``x-y``."""

    dataset: str = "gowalla"
    data_dir: str = ""
    seed: int = 0
    min_nodes: int = 2
    node_wait_s: float = 60.0
    round_timeout_s: float = 600.0
    out_dir: str = ""

    def __post_init__(self) -> None:
        if self.min_nodes < 1:
            raise ConfigError(f"min-nodes must be >= 1, got {self.min_nodes}")
        if self.round_timeout_s <= 0 or self.node_wait_s <= 0:
            raise ConfigError("round-timeout-s and node-wait-s must be positive")

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> FedConfig:
        """Build from a Flower run config; unknown keys and wrong types are one-line errors."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            if key not in known:
                raise ConfigError(f"unknown run-config key {key!r}")
            f = known[key]
            want = {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ConfigError(f"run-config {key} must be {want.__name__}, got {value!r}")
            values[f.name] = value
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}
