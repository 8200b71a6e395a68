"""User grouping: federated K-Means, then every device joins its nearest centroid."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from clients.records import from_record_dict, to_record_dict
from peel_fed.clustering import initial_centroids, kmeans_step
from peel_fed.console import log
from peel_fed.messages import decode_group_counts, decode_kmeans_sums, encode_centroids
from strategies.base import PhaseStrategy, reply_contents
from strategies.phases import exchange


@dataclass
class GroupingResult:
    centroids: np.ndarray
    sizes: list[int]
    node_groups: dict[int, list[int]] = field(default_factory=dict)


class GroupingStrategy(PhaseStrategy):
    """Federated K-Means: centroids down, per-centroid sums and counts up by secure aggregation;
    then every device joins its nearest centroid and the server learns the group sizes."""

    def configure(self, centroids: np.ndarray) -> RecordDict:
        return to_record_dict(encode_centroids(self.data, centroids))

    def aggregate_kmeans(self, total: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        """One Lloyd step from the summed ``[sums | counts]``: the new centroids."""
        k, dim = centroids.shape
        sums, counts = decode_kmeans_sums(total, k, dim)
        return kmeans_step(sums, counts, centroids)

    def aggregate_groups(
        self, replies: dict[int, RecordDict], centroids: np.ndarray
    ) -> GroupingResult:
        """Group sizes, and per replying node the groups its users joined."""
        k = self.cfg.num_user_groups
        sizes = np.zeros(k, dtype=np.int64)
        node_groups = {}
        for node, content in replies.items():
            per = decode_group_counts(from_record_dict(content), k)
            sizes += per
            node_groups[node] = np.flatnonzero(per).tolist()
        return GroupingResult(centroids, sizes.tolist(), node_groups)

    def run(self, grid: Grid, nodes: list[int], item_table: np.ndarray) -> GroupingResult:
        cfg = self.cfg
        k = cfg.num_user_groups
        centroids = initial_centroids(item_table, k, seed=cfg.seed)
        for it in range(cfg.kmeans_iters if k > 1 else 0):
            total, _, reports = self.secure_sum(
                grid,
                nodes,
                "query.kmeans",
                self.configure(centroids),
                cfg.round_timeout_s,
                "kmeans",
                it,
            )
            self.log.add(reports)
            centroids = self.aggregate_kmeans(total, centroids)
        result = self.assign(grid, nodes, centroids)
        log(f"grouping: K-Means ({cfg.kmeans_iters} secure rounds), group sizes {result.sizes}")
        return result

    def assign(self, grid: Grid, nodes: list[int], centroids: np.ndarray) -> GroupingResult:
        """Every device joins its nearest centroid; the server learns the group sizes and which
        groups each node's users joined (asked again when a resumed run has new node ids)."""
        replies, rep = exchange(
            grid, nodes, "query.group", self.configure(centroids), self.cfg.round_timeout_s, "group"
        )
        self.log.add(rep)
        return self.aggregate_groups(reply_contents(replies), centroids)
