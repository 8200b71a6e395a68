"""Bit-plane orders: per user group, the users' second moments and item counts by secure
aggregation; the server codes the pretrained item table and orders each group's units."""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from clients.records import to_record_dict
from peel_fed.console import log
from peel_fed.fedplanes import PlaneOrders, PlaneStats, plane_orders
from peel_fed.messages import encode_centroids
from strategies.base import PhaseStrategy


class PlanesStrategy(PhaseStrategy):
    """Centroids down (a device that missed grouping joins the nearest), each device's share of
    :class:`peel_fed.fedplanes.PlaneStats` up by secure aggregation; the server learns only the
    sums over all devices and orders every group's bit-plane units from them."""

    def configure(self, centroids: np.ndarray) -> RecordDict:
        return to_record_dict(encode_centroids(self.data, centroids))

    def aggregate(
        self, total: np.ndarray, item_table: np.ndarray, item_groups: np.ndarray
    ) -> PlaneOrders:
        stats = PlaneStats.from_vector(total, self.cfg.num_user_groups, item_table.shape[1])
        return plane_orders(item_table, item_groups, stats)

    def run(
        self,
        grid: Grid,
        nodes: list[int],
        centroids: np.ndarray,
        item_table: np.ndarray,
        item_groups: np.ndarray,
    ) -> PlaneOrders:
        total, contributed, reports = self.secure_sum(
            grid,
            nodes,
            "query.planes",
            self.configure(centroids),
            self.cfg.round_timeout_s,
            "planes",
        )
        self.log.add(reports)
        result = self.aggregate(total, item_table, item_groups)
        log(
            f"bit-plane orders (secure aggregation): {len(contributed)}/{len(nodes)} nodes, "
            f"{len(result.orders)} user group(s) x {result.orders[0].shape[0]} units"
        )
        return result
