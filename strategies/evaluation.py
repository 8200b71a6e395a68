"""Deployment and on-device evaluation with the dynamic-budget drill."""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from clients.records import to_record_dict
from peel_fed.blocks import first_blocks_order, random_unit_order
from peel_fed.console import log
from peel_fed.fedeval import EvalSpec, evaluation_table
from peel_fed.fedplanes import PlaneOrders
from peel_fed.messages import EvaluateDown, encode_evaluate_down
from strategies.base import PhaseStrategy
from strategies.pee import PEEResult
from strategies.stats import StatsResult


class EvaluationStrategy(PhaseStrategy):
    """Serve every group's bit-plane units in order, its block units in weight order, and the
    baselines' tables; devices keep what fits each budget, rank on the device, run the
    dynamic-budget drill (cutting their bit-planes), and send up metric sums by secure
    aggregation. A device that missed grouping joins the nearest centroid here."""

    def eval_spec(self, stats: StatsResult, with_served: bool = False) -> EvalSpec:
        cfg = self.cfg
        return EvalSpec(
            budget_bytes=tuple(stats.budget_bytes),
            device_budgets=tuple(cfg.budget_list("device_budgets")),
            drill=tuple(cfg.drill_fractions()),
            num_user_groups=cfg.num_user_groups,
            full_table_bytes=stats.layout.full_table_bytes,
            with_served=with_served,
        )

    def configure(
        self,
        spec: EvalSpec,
        stats: StatsResult,
        item_table: np.ndarray,
        pee: PEEResult,
        planes: PlaneOrders,
        centroids: np.ndarray,
    ) -> RecordDict:
        layout = stats.layout
        tables = {
            "pretrained": item_table,
            "order-first-k blocks": first_blocks_order(layout.num_item_groups, layout.num_blocks),
            "order-random units": random_unit_order(
                layout.num_item_groups, layout.num_blocks, seed=self.cfg.seed
            ),
        }
        for g, s in enumerate(pee.servers):
            tables[f"table-{g}"] = s.table.numpy()
            tables[f"alpha-{g}"] = s.weights()
            tables[f"order-{g}"] = s.unit_order()
        down = EvaluateDown(self.data, spec, tables, planes, centroids, layout)
        return to_record_dict(encode_evaluate_down(down))

    def aggregate(self, total: np.ndarray, spec: EvalSpec) -> dict:
        """Means from the summed metric vector (see ``peel_fed.fedpee.evaluation_table``)."""
        return evaluation_table(total, spec)

    def run(
        self,
        grid: Grid,
        nodes: list[int],
        stats: StatsResult,
        item_table: np.ndarray,
        pee: PEEResult,
        planes: PlaneOrders,
        centroids: np.ndarray,
        with_served: bool = False,
    ) -> tuple[dict, np.ndarray]:
        """The evaluation table; and, ``with_served``, the summed drill ranked with the units
        each device was served (:mod:`strategies.serve`), which rides in the same secure sum
        (else an empty array)."""
        spec = self.eval_spec(stats, with_served)
        content = self.configure(spec, stats, item_table, pee, planes, centroids)
        total, contributed, reports = self.secure_sum(
            grid, nodes, "evaluate.budgets", content, self.cfg.evaluate_timeout_s, "evaluate"
        )
        self.log.add(reports)
        table = self.aggregate(total[: spec.length()], spec)
        log(f"evaluation (secure aggregation): {len(contributed)}/{len(nodes)} nodes")
        return {"evaluated_nodes": contributed, **table}, total[spec.length() :]
