"""Federated bit-planes: the server's orders from securely summed statistics are the centralized
orders, and the devices' evaluation sums are the centralized bit-plane evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from peel_fed.blocks import BlockLayout, parse_budget, popularity_item_groups
from peel_fed.clustering import kmeans_user_groups
from peel_fed.fedeval import EvalSpec, evaluation_table, evaluation_vector
from peel_fed.fedplanes import PlaneStats, plane_orders, plane_stats_vector
from peel_fed.lightgcn import LightGCNConfig, train_lightgcn
from peel_fed.metrics import grouped_metrics
from peel_fed.plane_eval import plane_groups
from peel_fed.planes import PlaneCode, plane_score_fn, planes_at_budget
from peel_fed.synthetic import checkerboard


@pytest.fixture(scope="module")
def board():
    ds = checkerboard(n_users=80, n_items=64, n_clusters=2, p_in=0.35, p_out=0.02, seed=5)
    model = train_lightgcn(
        ds.n_users, ds.n_items, ds.train, LightGCNConfig(dim=16, epochs=20, batch_size=128)
    )
    users, items = model.final_embeddings()
    layout = BlockLayout(popularity_item_groups(ds.item_popularity(), 4), 16, 4)
    groups = kmeans_user_groups(users, 2, seed=0)
    return ds, users, items, layout, groups


def _summed_stats(ds, users, groups, num_user_groups: int, dim: int) -> PlaneStats:
    """Two "nodes" each send their share; the server sees the sum."""
    total = sum(
        plane_stats_vector(h, users[h], groups[h], num_user_groups, ds.train, ds.n_items)
        for h in np.array_split(np.arange(ds.n_users), 2)
    )
    return PlaneStats.from_vector(total, num_user_groups, dim)


def test_statistics_vector_layout_by_hand():
    # users 0 and 1 in groups 1 and 0; items 0..2; user 0 rated items 0, 2; user 1 rated item 2
    from peel_fed.data import Interactions

    train = Interactions(np.array([0, 0, 1]), np.array([0, 2, 2]))
    vec = plane_stats_vector(
        np.array([0, 1]), np.array([[1.0, 2.0], [3.0, 0.0]]), np.array([1, 0]), 2, train, 3
    )
    # per group: [sum u^2 (2) | users | item counts (3)]
    assert vec.tolist() == [9, 0, 1, 0, 0, 1, 1, 4, 1, 1, 0, 1]
    stats = PlaneStats.from_vector(vec, 2, 2)
    assert stats.users.tolist() == [1, 1] and stats.item_counts.tolist() == [[0, 0, 1], [1, 0, 1]]


@pytest.mark.parametrize("num_user_groups", [1, 2])
def test_federated_orders_are_the_centralized_orders(board, num_user_groups):
    ds, users, items, layout, kmeans = board
    groups = kmeans.assignment if num_user_groups > 1 else np.zeros(ds.n_users, dtype=np.int64)
    stats = _summed_stats(ds, users, groups, num_user_groups, items.shape[1])
    plan = plane_orders(items, layout.item_groups, stats)
    code = PlaneCode.encode(items)
    central = plane_groups(
        ds,
        users,
        items,
        code,
        layout.item_groups,
        ds.item_popularity(),
        kmeans if num_user_groups > 1 else None,
        0.5,
    )
    assert np.array_equal(plan.code.codes, code.codes)
    for g, ref in enumerate(central):
        if num_user_groups > 1:  # the study's K-Means: the same seed gives the same groups
            assert np.array_equal(np.sort(ref.users), kmeans.members(g))
        assert np.array_equal(plan.orders[g], ref.order)


def test_device_evaluation_of_bit_planes_equals_the_centralized_one(board):
    ds, users, items, layout, kmeans = board
    groups = kmeans.assignment
    plan = plane_orders(items, layout.item_groups, _summed_stats(ds, users, groups, 2, 16))
    budgets = tuple(parse_budget(b, layout.full_table_bytes) for b in ("10%", "25%", "100%"))
    spec = EvalSpec(budgets, ("25%", "100%"), (0.4,), 2, layout.full_table_bytes)
    order = np.array([[g, b] for g in range(4) for b in range(4)])
    ones = np.ones((4, 4))
    tables = {"pretrained": items, "order-first-k blocks": order, "order-random units": order}
    for g in range(2):
        tables.update({f"table-{g}": items, f"alpha-{g}": ones, f"order-{g}": order})
    total = sum(
        evaluation_vector(
            spec,
            tables,
            plan,
            layout,
            h,
            groups[h],
            users[h],
            users[h],
            ds.n_users,
            ds.train,
            ds.test,
            seed=0,
            validation=(ds.train, ds.test),
        )  # fmt: skip
        for h in np.array_split(np.arange(ds.n_users), 3)
    )
    table = evaluation_table(total, spec)
    sizes = np.bincount(layout.item_groups)

    def central(budget: int) -> dict:
        parts = []
        for g in range(2):
            planes, _ = planes_at_budget(plan.orders[g], sizes, 16, budget)
            held = plan.code.serve(planes[layout.item_groups])
            parts.append((kmeans.members(g), plane_score_fn(users, held)))
        return grouped_metrics(parts, ds.n_users, ds.train, ds.test)

    rows = [r for r in table["rows"] if r["method"] == "PEEL bit-planes (G_u=2)"]
    assert [r["budget_bytes"] for r in rows] == list(budgets)
    for row in rows:
        ref = central(row["budget_bytes"])
        assert row["recall@20"] == pytest.approx(ref["recall@20"], abs=1e-9)
        assert row["ndcg@20"] == pytest.approx(ref["ndcg@20"], abs=1e-9)
    # the drill: devices at 100% cut to 40% on the device and rank as if served 40%
    every = np.arange(ds.n_users)
    vec = evaluation_vector(
        spec, tables, plan, layout, every, groups, users, users, ds.n_users, ds.train, ds.test,
        seed=0, node_budget="100%", validation=(ds.train, ds.test),
    )  # fmt: skip
    drill = evaluation_table(vec, spec)["drill"]
    cut = [d for d in drill if d["own_budget"] == "100%" and d["fraction_of_own"] == 0.4][0]
    assert cut["budget_bytes"] == int(np.floor(layout.full_table_bytes * 0.4 + 1e-6))
    ref = central(cut["budget_bytes"])
    assert cut["users"] == rows[0]["users"] > 0
    assert cut["recall@20"] == pytest.approx(ref["recall@20"], abs=1e-9)
    assert cut["ndcg@20"] == pytest.approx(ref["ndcg@20"], abs=1e-9)
