"""Typed configuration of a federated run, read from Flower's run config (kebab-case keys)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from peel_fed.blocks import (
    BlockLayout,
    BudgetError,
    check_budget,
    check_budget_format,
    parse_budget,
    popularity_item_groups,
    split_budget_list,
)
from peel_fed.controller import ControllerConfig
from peel_fed.fedlightgcn import FedLightGCNConfig, pretraining_releases, rounds_per_pass_for
from peel_fed.fedpee import FedPEEConfig
from peel_fed.privacy import NOISE_SOURCES, DPConfig, PrivacyError, noise_for_epsilon, noised
from peel_fed.renames import RENAMED_RUN_CONFIG_KEYS, with_current_keys

SECAGG_PROTOCOLS = ("pairwise", "shamir")
DOWNLOAD_MODES = ("auto", "sparse", "full")


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
    # the evaluation exchange ranks every item for every hosted user at every budget and method
    # (minutes on a large node), so it waits longer than a training round
    evaluate_timeout_s: float = 3600.0
    out_dir: str = ""
    # continue from the checkpoint in out-dir (``strategies.checkpoint``) instead of starting over
    resume: bool = False
    # where devices mirror their state so a resumed run finds it (a node's own state-dir takes
    # precedence; empty: devices keep state in memory only, and a resumed run folds them in)
    device_state_dir: str = ""
    progress: bool = True
    # devices add wall-clock timestamps to their replies (process start, handler start and end),
    # so a deployed run's report can say where the time goes; off by default
    timing: bool = False
    # statistics and model shape
    val_fraction: float = 0.1
    num_item_groups: int = 20
    num_blocks: int = 8
    dim: int = 64
    layers: int = 3
    # client sampling: fraction of nodes asked per round (users are sampled by cohort fractions)
    fraction_nodes: float = 1.0
    # federated LightGCN pretraining
    pretrain_passes: int = 20
    pretrain_cohort_fraction: float = 0.25
    pretrain_local_steps: int = 20
    pretrain_server_lr: float = 5e-2
    pretrain_user_lr: float = 2e-2
    # negatives of pretraining: "uniform", or "dns" (dynamic negative sampling on each device:
    # the hardest of pretrain-dns-candidates items, scored with the tables it received); the
    # learning rates "constant", or "cosine" (a half cosine to 0 over the pretraining rounds)
    pretrain_negative_sampling: str = "uniform"
    pretrain_dns_candidates: int = 16
    pretrain_lr_schedule: str = "constant"
    # the server's step on E0: "adam", or "sgd" (momentum 0.9 on the aggregate, for DP noise)
    pretrain_server_optimizer: str = "adam"
    # pretraining row uploads by secure aggregation over the round's row union (costs bytes)
    secure_rows: bool = False
    # what a pretraining message sends down: "sparse" (each node first says which item rows it
    # will read, then gets only those rows of the layers), "full" (every node the whole tables),
    # or "auto" (sparse, but full with secure-rows, whose point is that the server does not learn
    # a node's rows)
    pretrain_download: str = "auto"
    # secure aggregation: "pairwise" masks (a survivor that drops before revealing fails the sum)
    # or "shamir" (double masking, peel_fed.secagg_shamir: up to n - t dropouts at any step, late
    # uploads stay masked; one more exchange), with t = max(ceil(threshold * n), n // 2 + 1)
    secagg: str = "pairwise"
    secagg_threshold: float = 0.67
    # pairwise masks over a k-regular graph (SecAgg+): each node masks with this many others
    # (rounded up to even; 0: 2 ceil(log2 n), at most n - 1, where n - 1 is every pair)
    secagg_neighbours: int = 0
    # user-level differential privacy of pretraining and PEE learning (``peel_fed.privacy``), off
    # while dp-clip is 0: each user's upload clipped to dp-clip, Gaussian noise of
    # dp-noise-multiplier times the clip on every sum, or the noise that meets dp-target-epsilon
    # at dp-delta over both phases
    dp_clip: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_target_epsilon: float = 0.0
    dp_delta: float = 1e-5
    # with secure-rows, DP is distributed: every node adds its share of the noise before masking,
    # drawn from "seed" (the run's seed: a study repeats, but a server that knows the seed could
    # regenerate the shares) or "device" (the operating system's entropy, for a deployment)
    dp_noise_source: str = "seed"
    # local DP of pretraining and PEE uploads (FedPerGNN's noise on uploads): each user adds
    # Gaussian noise of this many times dp-clip to every value of its clipped upload, on its device
    ldp_noise_multiplier: float = 0.0
    # decoy items per user in pretraining (FedPerGNN's pseudo-interacted items): each device
    # uploads gradients and contributions for this many items it never interacted with
    decoy_items: int = 0
    # grouping
    num_user_groups: int = 4
    kmeans_iters: int = 8
    # PEE learning
    pee_rounds: int = 25
    pee_cohort_fraction: float = 0.2
    pee_local_steps: int = 5
    pee_server_lr: float = 5e-3
    pee_user_lr: float = 5e-4
    # what a PEE round sends down, as pretrain-download: "sparse" (each node first says which
    # rows of each of its groups' tables its taking-part users read), "full", or "auto"
    pee_download: str = "auto"
    controller_lr: float = 1e-3
    # deployment and evaluation: budget levels of the table, the distribution each simulated
    # device draws its own budget from, and the dynamic-budget drill (fractions of its budget)
    # after serving each device its own units, also evaluate every method at every budget level
    # (a measurement: each device then downloads every group's full tables and the baselines')
    compare_methods: bool = True
    budgets: str = "5%,10%,25%,50%,100%"
    device_budgets: str = "10%,25%,50%,100%"
    drill: str = "0.5,0.25"

    def __post_init__(self) -> None:
        if self.min_nodes < 1:
            raise ConfigError(f"min-nodes must be >= 1, got {self.min_nodes}")
        if self.resume and not self.out_dir:
            raise ConfigError("resume needs the out-dir that holds the run's checkpoint")
        if min(self.round_timeout_s, self.evaluate_timeout_s, self.node_wait_s) <= 0:
            raise ConfigError(
                "round-timeout-s, evaluate-timeout-s and node-wait-s must be positive"
            )
        for key in ("fraction_nodes", "pretrain_cohort_fraction", "pee_cohort_fraction"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(
                    f"{key.replace('_', '-')} must be in (0, 1], got {getattr(self, key)}"
                )
        for key in ("pretrain_download", "pee_download"):
            name, mode = key.replace("_", "-"), getattr(self, key)
            if mode not in DOWNLOAD_MODES:
                raise ConfigError(
                    f"{name} must be one of {', '.join(DOWNLOAD_MODES)}, got {mode!r}"
                )
            if mode == "sparse" and self.secure_rows:
                raise ConfigError(
                    f"{name}=sparse tells the server each node's rows, which secure-rows "
                    f"hides: use {name}=full (or auto) with secure-rows"
                )
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val-fraction must be in (0, 1), got {self.val_fraction}")
        for key in (
            "num_item_groups",
            "num_blocks",
            "dim",
            "layers",
            "num_user_groups",
            "pretrain_local_steps",
            "pee_local_steps",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        for key in (
            "pretrain_passes",
            "kmeans_iters",
            "pee_rounds",
            "decoy_items",
            "secagg_neighbours",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key.replace('_', '-')} must be >= 0, got {getattr(self, key)}")
        if self.dim % self.num_blocks:
            raise ConfigError(f"num-blocks ({self.num_blocks}) must divide dim ({self.dim})")
        try:
            self.lightgcn()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for key in ("budgets", "device_budgets"):
            try:
                texts = self.budget_list(key)
            except BudgetError:
                raise ConfigError(
                    f"{key.replace('_', '-')} must list at least one budget"
                ) from None
            for text in texts:
                try:  # the format only; sizes are checked against the item table later
                    check_budget_format(text)
                except BudgetError as exc:
                    raise ConfigError(f"{key.replace('_', '-')}: {exc}") from None
        if self.secagg not in SECAGG_PROTOCOLS:
            raise ConfigError(
                f"secagg must be one of {', '.join(SECAGG_PROTOCOLS)}, got {self.secagg!r}"
            )
        if not 0.5 < self.secagg_threshold <= 1:
            raise ConfigError(f"secagg-threshold must be in (0.5, 1], got {self.secagg_threshold}")
        self._check_privacy()
        try:
            fracs = self.drill_fractions()
        except ValueError:
            raise ConfigError(
                f"drill must be comma-separated fractions, got {self.drill!r}"
            ) from None
        if any(not 0 < f <= 1 for f in fracs):
            raise ConfigError(f"drill fractions must be in (0, 1], got {self.drill!r}")

    def checked_layout(
        self, popularity: np.ndarray, users: int
    ) -> tuple[BlockLayout, list[int], list[int]]:
        """The block layout of an item table with training counts ``popularity`` (one per item)
        for ``users`` users, and the bytes of ``budgets`` and of ``device-budgets``.

        Raises a one-line ``ConfigError`` when this config does not fit that data: more user or
        item groups than users or items, a budget below one block unit or above the table.
        """
        n_items = int(popularity.size)
        if self.num_user_groups > users:
            raise ConfigError(f"more user groups ({self.num_user_groups}) than users ({users})")
        if self.num_item_groups > n_items:
            raise ConfigError(f"more item groups ({self.num_item_groups}) than items ({n_items})")
        layout = BlockLayout(
            popularity_item_groups(popularity, self.num_item_groups), self.dim, self.num_blocks
        )
        try:
            full = layout.full_table_bytes
            budgets = [parse_budget(b, full) for b in self.budget_list()]
            own = [parse_budget(b, full) for b in self.budget_list("device_budgets")]
            for b in budgets + own:
                check_budget(b, layout)
        except BudgetError as exc:
            raise ConfigError(f"budgets: {exc}") from None
        return layout, budgets, own

    def _check_privacy(self) -> None:
        values = (self.dp_clip, self.dp_noise_multiplier, self.dp_target_epsilon)
        if min(*values, self.ldp_noise_multiplier) < 0:
            raise ConfigError(
                "dp-clip, dp-noise-multiplier, dp-target-epsilon and ldp-noise-multiplier must be "
                ">= 0"
            )
        if self.dp_clip == 0:
            if self.dp_noise_multiplier or self.dp_target_epsilon or self.ldp_noise_multiplier:
                raise ConfigError(
                    "dp-noise-multiplier, dp-target-epsilon and ldp-noise-multiplier need "
                    "dp-clip > 0"
                )
            return
        if self.dp_noise_multiplier and self.dp_target_epsilon:
            raise ConfigError("set dp-noise-multiplier or dp-target-epsilon, not both")
        if self.secure_rows and self.ldp_noise_multiplier:
            raise ConfigError(
                "ldp-noise-multiplier with secure-rows: the server sees only sums there; for "
                "noise under secure aggregation use dp-noise-multiplier (distributed DP)"
            )
        if self.dp_noise_source not in NOISE_SOURCES:
            raise ConfigError(
                f"dp-noise-source must be one of {', '.join(NOISE_SOURCES)}, got "
                f"{self.dp_noise_source!r}"
            )
        try:
            self.dp_settings()
        except PrivacyError as exc:
            raise ConfigError(str(exc)) from None

    def dp_releases(self) -> dict[str, int]:
        """Per private phase, the aggregates that one user's data enters: pretraining's ``init``
        exchanges and one round per pass, and one PEE round per pass (a user is in one group)."""
        rounds = self.pretrain_passes * rounds_per_pass_for(self.pretrain_cohort_fraction)
        pee_passes = -(-self.pee_rounds // rounds_per_pass_for(self.pee_cohort_fraction))
        return {"pretrain": pretraining_releases(self.lightgcn(), rounds), "pee": pee_passes}

    def dp_settings(self) -> DPConfig | None:
        """The DP settings of pretraining and PEE learning (None without ``dp-clip``); a target
        epsilon is turned into the noise multiplier that meets it over both phases."""
        if self.dp_clip == 0:
            return None
        sigma = self.dp_noise_multiplier
        if self.dp_target_epsilon:
            releases = sum(self.dp_releases().values())
            sigma = noise_for_epsilon(self.dp_target_epsilon, releases, self.dp_delta)
        return DPConfig(self.dp_clip, sigma, self.dp_delta)

    @property
    def distributed_dp(self) -> bool:
        """Whether DP noise is added by the nodes under secure aggregation (DP noise with
        ``secure-rows``) rather than by the server."""
        return self.secure_rows and noised(self.dp_settings())

    @property
    def sparse_pretrain_downloads(self) -> bool:
        """Whether pretraining sends each node only the item rows it reads."""
        return self._sparse(self.pretrain_download)

    @property
    def sparse_pee_downloads(self) -> bool:
        """Whether PEE learning sends each node only the table rows its users read."""
        return self._sparse(self.pee_download)

    def _sparse(self, mode: str) -> bool:
        return mode == "sparse" or (mode == "auto" and not self.secure_rows)

    def lightgcn(self) -> FedLightGCNConfig:
        """The pretraining part of this config."""
        return FedLightGCNConfig(
            dim=self.dim,
            layers=self.layers,
            cohort_fraction=self.pretrain_cohort_fraction,
            local_steps=self.pretrain_local_steps,
            server_lr=self.pretrain_server_lr,
            user_lr=self.pretrain_user_lr,
            decoys=self.decoy_items,
            ldp_noise=self.ldp_noise_multiplier,
            rounds=self.pretrain_passes * rounds_per_pass_for(self.pretrain_cohort_fraction),
            negative_sampling=self.pretrain_negative_sampling,
            dns_candidates=self.pretrain_dns_candidates,
            lr_schedule=self.pretrain_lr_schedule,
            server_optimizer=self.pretrain_server_optimizer,
        )

    def pee(self) -> FedPEEConfig:
        """The PEE-learning part of this config."""
        return FedPEEConfig(
            local_steps=self.pee_local_steps,
            server_lr=self.pee_server_lr,
            user_lr=self.pee_user_lr,
            controller=ControllerConfig(lr=self.controller_lr),
            ldp_noise=self.ldp_noise_multiplier,
        )

    def budget_list(self, key: str = "budgets") -> list[str]:
        """The budgets listed in ``key`` (``budgets`` or ``device_budgets``); ``BudgetError``
        when it lists none."""
        return split_budget_list(getattr(self, key))

    def drill_fractions(self) -> list[float]:
        """The drill's fractions of a device's own budget (none for an empty ``drill``)."""
        return [float(f) for f in split_budget_list(self.drill)] if self.drill.strip() else []

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> FedConfig:
        """Build from a Flower run config; unknown keys and wrong types are one-line errors.
        Renamed keys (``peel_fed.renames``) are accepted with a warning."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        try:
            run_config = with_current_keys(run_config, RENAMED_RUN_CONFIG_KEYS, "run-config key")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
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
