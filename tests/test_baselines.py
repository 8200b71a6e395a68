"""Baselines at equal bytes: sparse capacity, magnitude pruning, retrained embedding size."""

from __future__ import annotations

import numpy as np
import pytest

from peel_fed.baselines import affordable_dim, magnitude_prune, sparse_capacity
from peel_fed.blocks import BudgetError


def test_sparse_capacity_by_hand():
    # 10 rows x 8 dims: CSR fixed part 44 B, 5 B per value; bitmap fixed part 10 B, 4 B per value
    cap = sparse_capacity(84, 10, 8)
    assert (cap.storage, cap.kept, cap.bytes) == ("bitmap", 18, 82)  # CSR: (84-44)//5 = 8
    # a wide table with few rows: the bitmap's fixed part is larger, CSR wins
    cap = sparse_capacity(400, 2, 1000)  # CSR: 12 B + 6 B/value (uint16 index); bitmap: 250 B
    assert (cap.storage, cap.kept, cap.bytes) == ("csr", 64, 396)
    assert sparse_capacity(10**9, 10, 8).kept == 80  # never more than the table
    with pytest.raises(BudgetError, match="below the fixed part of sparse storage"):
        sparse_capacity(9, 10, 8)


def test_magnitude_prune_keeps_the_largest_entries_within_budget():
    table = np.array([[0.1, -5.0, 0.2], [3.0, 0.0, -0.3], [0.05, 4.0, -0.2]], dtype=np.float32)
    # 3 rows x 3 dims: bitmap fixed part 2 B, so 14 B keep 3 values: -5, 4, 3
    pruned, cap = magnitude_prune(table, 14)
    assert cap.kept == 3 and cap.bytes <= 14
    expected = np.zeros_like(table)
    expected[0, 1], expected[2, 1], expected[1, 0] = -5.0, 4.0, 3.0
    np.testing.assert_array_equal(pruned, expected)
    # ties at the cut: row-major order decides
    tied, _ = magnitude_prune(np.ones((2, 2), dtype=np.float32), 1 + 2 * 4)
    np.testing.assert_array_equal(tied, [[1, 1], [0, 0]])


def test_magnitude_pruning_is_nested_so_a_device_can_cut_what_it_holds():
    """Pruning the already pruned table to a smaller budget equals pruning the full table to it:
    a device shrinks with no server contact, as PEEL does."""
    table = np.random.default_rng(1).normal(size=(50, 16)).astype(np.float32)
    table[3, :4] = 0.5  # ties at some cut
    held = table
    for budget in (2000, 1200, 700, 300, 120):
        held, cap = magnitude_prune(held, budget)
        fresh, _ = magnitude_prune(table, budget)
        np.testing.assert_array_equal(held, fresh)
        assert int((held != 0).sum()) == cap.kept


def test_magnitude_pruning_keeps_a_checkerboard_ranking():
    """Items of cluster A load on dim 0, of cluster B on dim 1, plus small noise on the rest:
    pruning to the large entries keeps every user's right ranking (own cluster first)."""
    rng = np.random.default_rng(0)
    items = rng.normal(0, 0.01, size=(8, 6)).astype(np.float32)
    items[:4, 0] += 1.0
    items[4:, 1] += 1.0
    users = np.array([[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=np.float32)
    users += rng.normal(0, 0.01, size=users.shape).astype(np.float32)
    pruned, cap = magnitude_prune(items, 6 + 8 * 4)  # bitmap 6 B + 8 values
    assert cap.kept == 8 and np.count_nonzero(pruned) == 8
    scores = users @ pruned.T
    assert set(np.argsort(-scores[0])[:4]) == {0, 1, 2, 3}
    assert set(np.argsort(-scores[1])[:4]) == {4, 5, 6, 7}


def test_affordable_dim():
    assert affordable_dim(10 * 64 * 4, 10, 64) == 64
    assert affordable_dim(10 * 6 * 4 + 39, 10, 64) == 6
    assert affordable_dim(10**9, 10, 64) == 64
    with pytest.raises(BudgetError, match="below a 1-dimensional item table"):
        affordable_dim(39, 10, 64)
