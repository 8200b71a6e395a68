"""Federated PEE learning and on-device evaluation (the algorithm, no transport)."""

from __future__ import annotations

import numpy as np
import pytest

from peel_fed.baselines import DIRECT_BITS, best_bits_and_dims, direct_quantize, magnitude_prune
from peel_fed.blocks import BlockLayout, first_blocks_order, parse_budget, popularity_item_groups
from peel_fed.clustering import kmeans_user_groups
from peel_fed.data import split_validation
from peel_fed.fedeval import (
    PRUNING,
    ROW_QUANTIZATION,
    EvalSpec,
    evaluation_table,
    evaluation_vector,
)
from peel_fed.fedlightgcn import round_participants
from peel_fed.fedpee import FedPEEConfig, train_fed_pee
from peel_fed.fedplanes import PlaneOrders, PlaneStats, plane_orders, plane_stats_vector
from peel_fed.lightgcn import LightGCNConfig, train_lightgcn
from peel_fed.metrics import evaluate_ranking, validation_recall
from peel_fed.partition import user_slots
from peel_fed.pipeline import evaluate_units
from peel_fed.planes import order_unit_bytes
from peel_fed.scoring import dot_score_fn
from peel_fed.synthetic import checkerboard


def test_every_user_takes_part_once_per_pass():
    users = np.arange(500)
    for per_pass in (1, 4, 7):
        rounds = [round_participants(3, users, r, per_pass) for r in range(1, per_pass + 1)]
        assert np.array_equal(np.sort(np.concatenate(rounds)), users)
    # per-user: the same slot whatever other users are asked with it
    assert user_slots(3, np.array([17]), 5, 9)[0] == user_slots(3, users, 5, 9)[17]


@pytest.fixture(scope="module")
def board():
    ds = checkerboard(n_users=80, n_items=64, n_clusters=2, p_in=0.35, p_out=0.02, seed=4)
    split = split_validation(ds.train, ds.n_users, 0.2, seed=0)
    model = train_lightgcn(
        ds.n_users, ds.n_items, split.fit, LightGCNConfig(dim=16, epochs=20, batch_size=128)
    )
    users, items = model.final_embeddings()
    layout = BlockLayout(popularity_item_groups(ds.item_popularity(), 4), 16, 4)
    return ds, split, users, items, layout


def _val(board) -> tuple:
    return board[1].fit, board[1].val


def _planes(ds, users, items, layout, groups, num_user_groups: int) -> PlaneOrders:
    every = np.arange(ds.n_users)
    vec = plane_stats_vector(every, users, groups, num_user_groups, ds.train, ds.n_items)
    stats = PlaneStats.from_vector(vec, num_user_groups, items.shape[1])
    return plane_orders(items, layout.item_groups, stats)


def test_on_device_evaluation_sums_equal_the_centralized_evaluation(board):
    ds, split, users, items, layout = board
    groups = kmeans_user_groups(users, 2, seed=0).assignment
    order = first_blocks_order(layout.num_item_groups, layout.num_blocks)
    ones = np.ones((layout.num_item_groups, layout.num_blocks))
    spec = EvalSpec(
        budget_bytes=tuple(parse_budget(b, layout.full_table_bytes) for b in ("25%", "100%")),
        device_budgets=("50%", "100%"),
        drill=(0.5,),
        num_user_groups=2,
        full_table_bytes=layout.full_table_bytes,
    )
    tables = {"pretrained": items, "order-first-k blocks": order, "order-random units": order}
    for g in range(2):
        tables.update({f"table-{g}": items, f"alpha-{g}": ones, f"order-{g}": order})
    all_users = np.arange(ds.n_users)
    planes = _planes(ds, users, items, layout, groups, 2)
    # two "nodes": their summed vectors are what the server decodes
    halves = np.array_split(all_users, 2)
    total = sum(
        evaluation_vector(
            spec,
            tables,
            planes,
            layout,
            h,
            groups[h],
            users[h],
            users[h],
            ds.n_users,
            ds.train,
            ds.test,
            seed=0,
            validation=(split.fit, split.val),
        )
        for h in halves
    )
    table = evaluation_table(total, spec)
    assert {r["method"] for r in table["rows"]} == {*spec.methods, ROW_QUANTIZATION}
    for row in table["rows"]:
        if row["method"].startswith("PEEL bit-planes"):
            continue  # tests/test_fedplanes.py
        if row["method"] in (PRUNING, ROW_QUANTIZATION):
            continue  # test_compression_baselines_on_the_device_equal_the_centralized_ones
        ref = evaluate_units(
            ds, [(all_users, users, items, ones, order)], layout, row["budget_bytes"]
        )
        assert row["recall@20"] == pytest.approx(ref["recall@20"], abs=1e-9)
        assert row["ndcg@20"] == pytest.approx(ref["ndcg@20"], abs=1e-9)
    # own-budget classes partition the users; each class at fraction 1 matches its level
    ones_rows = [d for d in table["drill"] if d["fraction_of_own"] == 1.0]
    assert sum(d["users"] for d in ones_rows) == table["rows"][0]["users"]
    assert (
        sum(p["users"] for p in table["per_group"] if p["budget_bytes"] == spec.budget_bytes[0])
        == (table["rows"][0]["users"])
    )


def test_compression_baselines_on_the_device_equal_the_centralized_ones(board):
    """Magnitude pruning, and row quantization with the bit width chosen on validation, from
    node sums equal the same baselines evaluated centrally on the pretrained table."""
    ds, split, users, items, layout = board
    full = layout.full_table_bytes
    levels = tuple(parse_budget(b, full) for b in ("12%", "30%", "100%"))
    spec = EvalSpec(levels, ("100%",), (), 1, full)
    order = first_blocks_order(layout.num_item_groups, layout.num_blocks)
    ones = np.ones((layout.num_item_groups, layout.num_blocks))
    tables = {"pretrained": items, "order-first-k blocks": order, "order-random units": order}
    tables.update({"table-0": items, "alpha-0": ones, "order-0": order})
    zeros = np.zeros(ds.n_users, dtype=np.int64)
    planes = _planes(ds, users, items, layout, zeros, 1)
    total = sum(
        evaluation_vector(
            spec,
            tables,
            planes,
            layout,
            h,
            zeros[h],
            users[h],
            users[h],
            ds.n_users,
            ds.train,
            ds.test,
            0,
            validation=(split.fit, split.val),
        )  # fmt: skip
        for h in np.array_split(np.arange(ds.n_users), 2)
    )
    rows = evaluation_table(total, spec)["rows"]
    for b in levels:
        pruned = [r for r in rows if r["method"] == PRUNING and r["budget_bytes"] == b][0]
        ref = evaluate_ranking(dot_score_fn(users, magnitude_prune(items, b)[0]), ds.n_users,
                               ds.train, ds.test)  # fmt: skip
        assert pruned["recall@20"] == pytest.approx(ref["recall@20"], abs=1e-9)
        quant = [r for r in rows if r["method"] == ROW_QUANTIZATION and r["budget_bytes"] == b][0]
        best = None
        for shape in best_bits_and_dims(b, ds.n_items, items.shape[1]):
            assert shape.bits in DIRECT_BITS
            values, used = direct_quantize(items[:, : shape.dims], shape.bits)
            score = dot_score_fn(users[:, : shape.dims], values)
            val = validation_recall(score, ds, split)
            if best is None or (val, shape.bits) > best[0]:
                best = ((val, shape.bits), score, used)
            assert used <= b
        assert quant["bits"] == best[0][1]
        assert quant["val_recall@20"] == pytest.approx(best[0][0], abs=1e-9)
        ref = evaluate_ranking(best[1], ds.n_users, ds.train, ds.test)
        assert quant["recall@20"] == pytest.approx(ref["recall@20"], abs=1e-9)
        assert quant["ndcg@20"] == pytest.approx(ref["ndcg@20"], abs=1e-9)


def test_a_node_budget_from_node_config_sets_every_hosted_users_class(board):
    ds, _, users, items, layout = board
    order = first_blocks_order(layout.num_item_groups, layout.num_blocks)
    ones = np.ones((layout.num_item_groups, layout.num_blocks))
    full = layout.full_table_bytes
    spec = EvalSpec((full,), ("50%", "100%"), (0.5,), 1, full)
    tables = {"pretrained": items, "order-first-k blocks": order, "order-random units": order}
    tables.update({"table-0": items, "alpha-0": ones, "order-0": order})
    mine = np.arange(ds.n_users)
    zeros = np.zeros(ds.n_users, dtype=np.int64)
    planes = _planes(ds, users, items, layout, zeros, 1)
    args = (spec, tables, planes, layout, mine, zeros, users, users)
    vec = evaluation_vector(
        *args, ds.n_users, ds.train, ds.test, 0, validation=_val(board), node_budget=f"{full // 2}B"
    )
    drill = evaluation_table(vec, spec)["drill"]
    assert drill[0]["users"] > 0 and drill[2]["users"] == 0  # all in the 50% class
    with pytest.raises(ValueError, match="is not one of device-budgets 50%, 100%"):
        evaluation_vector(
            *args, ds.n_users, ds.train, ds.test, 0, validation=_val(board), node_budget="10%"
        )


def test_a_drill_cut_below_one_unit_counts_no_device_instead_of_failing(board):
    ds, _, users, items, layout = board
    order = first_blocks_order(layout.num_item_groups, layout.num_blocks)
    ones = np.ones((layout.num_item_groups, layout.num_blocks))
    full = layout.full_table_bytes
    zeros = np.zeros(ds.n_users, dtype=np.int64)
    planes = _planes(ds, users, items, layout, zeros, 1)
    first = order_unit_bytes(planes.orders[0], np.bincount(layout.item_groups), layout.dim)[0]
    tiny = (first - 1) / full  # a cut of the full table below the order's first bit-plane unit
    spec = EvalSpec((full,), ("100%",), (0.5, tiny), 1, full)
    tables = {"pretrained": items, "order-first-k blocks": order, "order-random units": order}
    tables.update({"table-0": items, "alpha-0": ones, "order-0": order})
    mine = np.arange(ds.n_users)
    args = (spec, tables, planes, layout, mine, zeros, users, users)
    drill = evaluation_table(
        evaluation_vector(*args, ds.n_users, ds.train, ds.test, 0, validation=_val(board)), spec
    )["drill"]
    assert [d["fraction_of_own"] for d in drill] == [1.0, 0.5, tiny]
    assert drill[1]["users"] == drill[0]["users"] > 0
    assert drill[2]["users"] == 0 and drill[2]["budget_bytes"] < first


def test_federated_pee_learning_keeps_the_checkerboard_ranking(board):
    ds, split, users, items, layout = board
    groups = kmeans_user_groups(users, 2, seed=0).assignment
    cfg = FedPEEConfig(local_steps=2)
    servers, devices = train_fed_pee(
        users,
        items,
        groups,
        ds.n_users,
        split.fit,
        split.val,
        ds.item_popularity(),
        layout,
        cfg,
        rounds=10,
        cohort_fraction=0.5,
    )
    full = layout.full_table_bytes
    before = evaluate_units(
        ds,
        [(np.arange(ds.n_users), users, items, np.ones((4, 4)), first_blocks_order(4, 4))],
        layout,
        full,
    )
    after = evaluate_units(
        ds,
        [
            (
                np.flatnonzero(groups == g),
                devices.vecs.numpy()[groups == g],
                servers[g].table.numpy(),
                servers[g].weights(),
                servers[g].unit_order(),
            )
            for g in range(2)
        ],
        layout,
        full,
    )
    assert after["recall@20"] >= 0.95 * before["recall@20"]
    for s in servers:
        w = s.weights()
        assert w.shape == (4, 4) and np.isclose(w.mean(), 1.0) and not np.allclose(w, 1.0)
