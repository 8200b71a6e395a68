"""Federated bit-plane elastic embeddings: what devices sum up, and how the server orders units.

The greedy unit order of a user group (:func:`peel_fed.planes.greedy_plane_order`) needs, besides
the item table the server already holds, two sums over the group's users: the second moment of
their vectors per dimension and their training item counts. Each device computes its share
(:func:`plane_stats_vector`) and the server learns only the sum over all devices, by secure
aggregation; it then codes the item table once (:class:`peel_fed.planes.PlaneCode`) and orders
each user group's units (:func:`plane_orders`). So a group's order is the centralized one computed
from the same users (``tests/test_fedplanes.py``).

Each device then keeps the order's prefix that fits its budget, downloaded unit by unit
(:class:`peel_fed.plane_store.PlaneStore`), and ranks on the device
(:func:`plane_metric_sums`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from peel_fed.blocks import BudgetError
from peel_fed.data import Interactions
from peel_fed.metrics import per_user_metrics
from peel_fed.planes import (
    HeldPlanes,
    PlaneCode,
    greedy_plane_order,
    plane_score_fn,
    planes_at_budget,
)

PLANE_ALPHA = 0.5  # popularity exponent of the unit benefit (as in the centralized study)


@dataclass(frozen=True)
class PlaneStats:
    """Per user group: the sum of ``u^2`` over its users (G, dim), its users (G,), and its users'
    training item counts (G, n_items)."""

    square_sums: np.ndarray
    users: np.ndarray
    item_counts: np.ndarray

    def to_vector(self) -> np.ndarray:
        """``[square sums | users | item counts]`` of every group in turn (the wire layout)."""
        parts = [
            np.concatenate([s, [u], c])
            for s, u, c in zip(self.square_sums, self.users, self.item_counts, strict=True)
        ]
        return np.concatenate(parts).astype(np.float64)

    @classmethod
    def from_vector(cls, total: np.ndarray, num_user_groups: int, dim: int) -> PlaneStats:
        per = np.asarray(total, dtype=np.float64).reshape(num_user_groups, -1)
        if per.shape[1] <= dim + 1:
            raise ValueError(f"plane statistics of {per.shape[1]} values per group are too short")
        return cls(
            square_sums=per[:, :dim],
            users=np.rint(per[:, dim]).astype(np.int64),
            item_counts=np.rint(per[:, dim + 1 :]).astype(np.int64),
        )


def plane_stats_vector(
    users: np.ndarray,
    user_vectors: np.ndarray,
    user_groups: np.ndarray,
    num_user_groups: int,
    train: Interactions,
    n_items: int,
) -> np.ndarray:
    """A device's share of :class:`PlaneStats` for its ``users`` (``user_vectors`` and
    ``user_groups`` aligned with them), as the vector to be securely summed."""
    vecs = np.asarray(user_vectors, dtype=np.float64)
    square = np.zeros((num_user_groups, vecs.shape[1]))
    np.add.at(square, user_groups, vecs**2)
    count = np.bincount(user_groups, minlength=num_user_groups)
    group_of = np.full(int(max(users.max(initial=-1), train.users.max(initial=-1))) + 1, -1)
    group_of[users] = user_groups
    mine = group_of[train.users] >= 0
    items, groups = train.items[mine], group_of[train.users[mine]]
    counts = np.zeros((num_user_groups, n_items), dtype=np.int64)
    np.add.at(counts, (groups, items), 1)
    return PlaneStats(square, count, counts).to_vector()


@dataclass(frozen=True)
class PlaneOrders:
    """The server's bit-plane plan: the coded item table and every user group's unit order."""

    code: PlaneCode
    orders: list[np.ndarray]


def plane_orders(
    item_table: np.ndarray, item_groups: np.ndarray, stats: PlaneStats, alpha: float = PLANE_ALPHA
) -> PlaneOrders:
    """Code ``item_table`` and order each user group's units from its summed statistics; a group
    with no users gets the order of all users together."""
    code = PlaneCode.encode(item_table)
    everyone = (
        stats.square_sums.sum(axis=0) / max(int(stats.users.sum()), 1),
        stats.item_counts.sum(axis=0),
    )
    orders = []
    for g in range(stats.users.size):
        if stats.users[g] > 0:
            moments, pop = stats.square_sums[g] / stats.users[g], stats.item_counts[g]
        else:
            moments, pop = everyone
        orders.append(greedy_plane_order(code, item_table, item_groups, pop, moments, alpha))
    return PlaneOrders(code, orders)


def plane_metric_sums(
    users: np.ndarray,
    user_vectors: np.ndarray,
    code: PlaneCode,
    order: np.ndarray,
    item_groups: np.ndarray,
    budgets: np.ndarray,
    n_users: int,
    train: Interactions,
    test: Interactions,
    cut_from: np.ndarray | None = None,
) -> np.ndarray:
    """Per-user (Recall@20, NDCG@20, has-test) when user j downloads the prefix of ``order`` that
    fits ``budgets[j]`` and ranks all items on the device.

    With ``cut_from``, user j instead downloads the prefix at ``cut_from[j]`` and then shrinks it
    on the device to ``budgets[j]`` (no server contact). What a device downloads is
    :meth:`peel_fed.planes.PlaneCode.serve` of the prefix, which equals a
    :class:`peel_fed.plane_store.PlaneStore` grown unit by unit (``tests/test_plane_store.py``).
    Users whose budget holds no unit get 0s,
    as in :func:`peel_fed.fedeval.ranking_metric_sums`.
    """
    out = np.zeros((users.size, 3))
    row_of = np.full(n_users, -1, dtype=np.int64)
    row_of[users] = np.arange(users.size)
    start = np.asarray(budgets if cut_from is None else cut_from, dtype=np.int64)
    sizes = np.bincount(item_groups, minlength=int(np.max(order[:, 0])) + 1)
    served: dict[int, HeldPlanes] = {}
    for pair in np.unique(np.stack([start, budgets], axis=1), axis=0):
        served_at, budget = int(pair[0]), int(pair[1])
        sel = users[(start == served_at) & (budgets == budget)]
        try:
            cut, _ = planes_at_budget(order, sizes, code.dim, budget)
        except BudgetError:
            continue  # nothing fits: the device cannot rank
        if served_at not in served:  # the download: the order's prefix at served_at
            planes, _ = planes_at_budget(order, sizes, code.dim, served_at)
            served[served_at] = code.serve(planes[item_groups])
        held = served[served_at]
        if served_at != budget:  # shrunk on the device, as PlaneStore.shrink does
            held = held.cut_to(cut[item_groups])
        m = per_user_metrics(
            plane_score_fn(user_vectors, held, row_of), n_users, train, test, ks=(20,), users=sel
        )
        rows = row_of[m["user"]]
        out[rows, 0], out[rows, 1], out[rows, 2] = m["recall@20"], m["ndcg@20"], 1.0
    return out
