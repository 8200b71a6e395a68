"""Statistics: item counts by secure aggregation -> degrees, popularity, item groups, layout."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from clients.records import to_record_dict
from peel_fed.blocks import BlockLayout
from peel_fed.console import log
from peel_fed.messages import data_content, decode_stats
from peel_fed.own_budget import drill_cut
from strategies.base import PhaseStrategy


@dataclass
class StatsResult:
    train_popularity: np.ndarray
    fit_degree: np.ndarray
    users: int
    n_items: int
    layout: BlockLayout
    budget_bytes: list[int]


def check_partitions(claims: np.ndarray, failed: int = 0) -> None:
    """Refuse user partitions that do not cover the users exactly once: ``claims[p]`` nodes
    claimed partition ``p`` (one-line ``ValueError``); partitions of ``failed`` nodes may be
    missing, with a warning."""
    twice = np.flatnonzero(claims > 1).tolist()
    if twice:
        raise ValueError(
            f"partition(s) {twice} of {claims.size} claimed by more than one node: each "
            "SuperNode needs its own partition-id (in [0, num-partitions))"
        )
    missing = np.flatnonzero(claims == 0).tolist()
    if len(missing) > failed:
        raise ValueError(
            f"partition(s) {missing} of {claims.size} claimed by no node: the SuperNodes' "
            "partition-ids must cover [0, num-partitions) (or lower num-partitions)"
        )
    if missing:
        log(f"partition(s) {missing} missing: their nodes failed, their users sit this run out")


class StatsStrategy(PhaseStrategy):
    """Item counts by secure aggregation -> degrees, popularity, item groups, block layout."""

    def configure(self) -> RecordDict:
        return to_record_dict(data_content(self.data))

    def aggregate(self, total: np.ndarray, failed: int = 0) -> StatsResult:
        """The statistics from the summed statistics vectors (``peel_fed.messages``); checks
        that the nodes' partitions cover the users exactly once (a partition claimed twice is
        refused; one claimed by no node is refused unless ``failed`` nodes could hold it) and
        the run config against them (user and item groups, budgets)."""
        cfg = self.cfg
        sums = decode_stats(total)
        check_partitions(sums.claims, failed)
        n_items = sums.train.size
        layout, budget_bytes, own_budgets = cfg.checked_layout(sums.train, sums.users)
        empty = sorted(
            {
                drill_cut(own, f)
                for own in own_budgets
                for f in cfg.drill_fractions()
                if drill_cut(own, f) < layout.min_budget_bytes
            }
        )
        if empty:
            log(f"drill cuts below one block unit (block PEEL does not rank there): {empty} B")
        return StatsResult(sums.train, sums.fit, sums.users, n_items, layout, budget_bytes)

    def run(self, grid: Grid, nodes: list[int]) -> StatsResult:
        total, contributed, reports = self.secure_sum(
            grid, nodes, "query.stats", self.configure(), self.cfg.round_timeout_s, "stats"
        )
        self.log.add(reports)
        # nodes whose counts are missing (with Shamir, one failing after its upload is counted)
        failed = sorted(set(nodes) - set(contributed))
        result = self.aggregate(total, len(failed))
        log(
            f"stats (secure aggregation): {len(contributed)}/{len(nodes)} nodes, "
            f"{result.users:,} users, {int(result.train_popularity.sum()):,} training "
            f"interactions over {result.n_items:,} items; {len(failed)} failed"
        )
        return result
