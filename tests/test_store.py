"""The on-device PEE store: budget accounting, shrink/grow consistency and ranking."""

from __future__ import annotations

import numpy as np
import pytest

from peel_fed.blocks import (
    BlockLayout,
    BudgetError,
    popularity_item_groups,
    select_prefix,
    unit_mask,
    weighted_unit_order,
)
from peel_fed.scoring import budget_unit_weights, effective_item_table
from peel_fed.store import PEEStore, unit_slice

N_ITEMS, DIM, BLOCKS, GROUPS = 23, 8, 4, 5  # group sizes 5,5,5,4,4: unequal unit sizes


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    layout = BlockLayout(popularity_item_groups(rng.integers(0, 30, N_ITEMS), GROUPS), DIM, BLOCKS)
    table = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    weights = rng.random((GROUPS, BLOCKS)) * 2
    weights *= weights.size / weights.sum()
    order = weighted_unit_order(weights)
    user = rng.normal(size=DIM).astype(np.float32)
    return layout, table, weights, order, user


def _build(setup, budget):
    layout, table, weights, order, user = setup
    return PEEStore.from_item_table(layout, table, weights, order, user, budget)


def _dense_scores(setup, budget):
    """Reference: mask the kept units, rescale weights, and score with a full dense table."""
    layout, table, weights, order, user = setup
    mask = unit_mask(select_prefix(order, layout, budget), GROUPS, BLOCKS)
    eff, covered = budget_unit_weights(weights, mask)
    ref = effective_item_table(table, layout.item_groups, eff).astype(np.float64) @ user
    ref[~covered[layout.item_groups]] = -np.inf
    return ref


def _budgets(layout):
    return [
        layout.min_budget_bytes,
        layout.cover_bytes - 1,
        layout.cover_bytes,
        300,
        411,
        500,
        layout.full_table_bytes - 1,
        layout.full_table_bytes,
    ]


def test_budget_unit_weights_by_hand():
    w = np.array([[1.0, 2.0, 3.0], [4.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    mask = np.array([[True, False, True], [False, False, False], [True, True, True]])
    eff, covered = budget_unit_weights(w, mask)
    # row 0 keeps 1 + 3 of 6: scale 1.5; row 1 keeps nothing; row 2 keeps everything
    np.testing.assert_allclose(eff, [[1.5, 0.0, 4.5], [0, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(covered, [True, False, True])


def test_effective_item_table_by_hand():
    table = np.arange(8, dtype=np.float32).reshape(2, 4)  # 2 items, 2 blocks of 2
    out = effective_item_table(table, np.array([1, 0]), np.array([[2.0, 0.0], [1.0, -1.0]]))
    np.testing.assert_allclose(out, [[0, 1, -2, -3], [8, 10, 0, 0]])


def test_from_item_table_fits_and_scores_match_dense(setup):
    layout = setup[0]
    for budget in _budgets(layout):
        store = _build(setup, budget)
        assert store.unit_bytes <= budget
        assert store.unit_bytes == layout.bytes_of(store.kept_units)
        np.testing.assert_array_equal(store.kept_units, select_prefix(setup[3], layout, budget))
        for (g, n), block in store.units.items():
            bd = layout.block_dim
            np.testing.assert_array_equal(
                block, setup[1][layout.items_of(g), n * bd : (n + 1) * bd]
            )
        np.testing.assert_allclose(
            store.scores(), _dense_scores(setup, budget), rtol=1e-5, atol=1e-5
        )
    # at the full budget the scores are the plain weighted dot products
    layout, table, weights, _, user = setup
    full = _build(setup, layout.full_table_bytes).scores()
    by_hand = [
        sum(
            weights[layout.item_groups[i], n]
            * float(table[i, 2 * n : 2 * n + 2] @ user[2 * n : 2 * n + 2])
            for n in range(BLOCKS)
        )
        for i in range(N_ITEMS)
    ]
    np.testing.assert_allclose(full, by_hand, rtol=1e-5, atol=1e-5)


def test_budget_below_one_unit(setup):
    with pytest.raises(BudgetError, match="below one block"):
        _build(setup, setup[0].min_budget_bytes - 1)


def test_shrink_drops_tail_and_equals_fresh_store(setup):
    layout, _, weights, order, _ = setup
    store = _build(setup, layout.full_table_bytes)
    n_groups = layout.num_item_groups
    previous = store.unit_bytes
    for budget in sorted(_budgets(layout), reverse=True):
        before = store.kept_units.copy()
        dropped = store.shrink(budget)
        after = store.kept_units
        assert store.unit_bytes <= previous and store.unit_bytes <= budget
        previous = store.unit_bytes
        assert [tuple(u) for u in before[len(after) :].tolist()] == dropped
        np.testing.assert_array_equal(before[: len(after)], after)
        kept_w = weights[after[n_groups:, 0], after[n_groups:, 1]]
        dropped_tail = np.array([u for u in dropped if order.tolist().index(list(u)) >= n_groups])
        if kept_w.size and dropped_tail.size:
            assert weights[dropped_tail[:, 0], dropped_tail[:, 1]].max() <= kept_w.min()
        fresh = _build(setup, budget)
        np.testing.assert_array_equal(fresh.kept_units, store.kept_units)
        assert fresh.units.keys() == store.units.keys()
        np.testing.assert_array_equal(fresh.scores(), store.scores())


def test_grow_fetches_next_units_in_order(setup):
    layout, table, _, order, _ = setup
    full = layout.full_table_bytes
    original = _build(setup, 411)
    store = _build(setup, 411)
    store.shrink(layout.min_budget_bytes)
    k0 = len(store.units)
    calls = []

    def fetch(g, n):
        calls.append((g, n))
        return unit_slice(layout, table, g, n)

    added = store.grow(411, fetch)
    k1 = len(original.units)
    assert calls == added == [tuple(u) for u in order[k0:k1].tolist()]
    np.testing.assert_array_equal(store.scores(), original.scores())
    calls.clear()
    store.grow(full, fetch)
    assert calls == [tuple(u) for u in order[k1:].tolist()]
    assert store.unit_bytes == full


def test_grow_rejects_wrong_shape(setup):
    store = _build(setup, setup[0].min_budget_bytes)
    with pytest.raises(BudgetError, match="shape"):
        store.grow(setup[0].full_table_bytes, lambda g, n: np.zeros((1, 1)))


def test_recommend_excludes_and_orders(setup):
    layout = setup[0]
    store = _build(setup, layout.full_table_bytes)
    s = store.scores()
    exclude = np.argsort(-s)[:3]  # the three best items
    rec = store.recommend(k=5, exclude=exclude)
    assert len(rec) == 5
    assert not set(rec.tolist()) & set(exclude.tolist())
    assert (np.diff(s[rec]) <= 0).all()
    rest = np.setdiff1d(np.arange(N_ITEMS), np.concatenate([rec, exclude]))
    assert s[rest].max() <= s[rec].min()
    np.testing.assert_array_equal(rec, np.argsort(-s)[3:8])


def test_recommend_never_returns_uncovered_groups(setup):
    layout = setup[0]
    store = _build(setup, layout.cover_bytes - 1)  # cannot cover the last group of the head
    covered = unit_mask(store.kept_units, GROUPS, BLOCKS).any(axis=1)
    assert not covered.all() and covered.any()
    ok_items = np.flatnonzero(covered[layout.item_groups])
    rec = store.recommend(k=N_ITEMS, exclude=ok_items[:2])
    assert set(rec.tolist()) == set(ok_items[2:].tolist())
    assert store.recommend(k=N_ITEMS, exclude=ok_items).size == 0


def test_overhead_is_separate_from_unit_bytes(setup):
    store = _build(setup, setup[0].full_table_bytes)
    # user vector (8 float32) + weights (20 x 4 B) + order (40 x 2 B) + group map (23 x 1 B)
    assert store.overhead_bytes == 8 * 4 + 20 * 4 + 40 * 2 + 23
