"""Statistics: item counts by secure aggregation -> degrees, popularity, item groups, layout."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from clients.records import to_record_dict
from peel_fed.blocks import BlockLayout
from peel_fed.console import log
from peel_fed.fedeval import drill_cut
from peel_fed.messages import data_content, decode_stats
from strategies.base import PhaseStrategy
from strategies.phases import secure_sum


@dataclass
class StatsResult:
    train_popularity: np.ndarray
    fit_degree: np.ndarray
    users: int
    n_items: int
    layout: BlockLayout
    budget_bytes: list[int]


class StatsStrategy(PhaseStrategy):
    """Item counts by secure aggregation -> degrees, popularity, item groups, block layout."""

    def configure(self) -> RecordDict:
        return to_record_dict(data_content(self.data))

    def aggregate(self, total: np.ndarray) -> StatsResult:
        """The statistics from the summed ``[train counts | fit counts | users]``; checks the
        run config against them (user and item groups, budgets)."""
        cfg = self.cfg
        sums = decode_stats(total)
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
        total, contributed, reports = secure_sum(
            grid, nodes, "query.stats", self.configure(), self.cfg.round_timeout_s, "stats"
        )
        self.log.add(reports)
        result = self.aggregate(total)
        failed = sorted({n for r in reports for n in r.failed})
        log(
            f"stats (secure aggregation): {len(contributed)}/{len(nodes)} nodes, "
            f"{result.users:,} users, {int(result.train_popularity.sum()):,} training "
            f"interactions over {result.n_items:,} items; {len(failed)} failed"
        )
        return result
