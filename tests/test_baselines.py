"""Baselines at equal bytes: sparse capacity, magnitude pruning (float32 and int8 values),
retrained embedding size."""

from __future__ import annotations

import numpy as np
import pytest

from peel_fed.baselines import (
    affordable_dim,
    int8_capacity,
    int8_row_scales,
    magnitude_prune,
    magnitude_prune_int8,
    sparse_capacity,
)
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


def test_int8_pruning_by_hand():
    """3 x 4 table: bitmap ceil(12 / 8) = 2 B + 3 float16 scales = 8 B fixed; 13 B keep 5 int8
    values: -2.54, 1.27, -0.5, 0.5 (a tie: row-major order), 0.3. Row scales: max |kept| / 127
    rounded UP to float16: 0.01 -> 1311 * 2^-17, 0.02 -> 1311 * 2^-16 and 0.5 / 127 = 1032.06 *
    2^-18 -> 1033 * 2^-18 (rounding to nearest would give 1032)."""
    table = np.array(
        [[1.27, -0.5, 0.01, 0.0], [-2.54, 0.3, 0.2, 0.1], [0.5, 0.04, -0.03, 0.02]],
        dtype=np.float32,
    )
    got, cap = magnitude_prune_int8(table, 13)
    assert (cap.storage, cap.kept, cap.overhead_bytes, cap.bytes) == ("bitmap-int8", 5, 8, 13)
    s0, s1, s2 = 1311 / 2**17, 1311 / 2**16, 1033 / 2**18
    expected = np.array(
        [[127 * s0, -50 * s0, 0, 0], [-127 * s1, 15 * s1, 0, 0], [127 * s2, 0, 0, 0]],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(got, expected)
    kept = np.where(expected != 0, table, 0)
    np.testing.assert_array_equal(int8_row_scales(kept), np.array([s0, s1, s2], dtype=np.float16))
    assert int8_row_scales(np.zeros((1, 4)))[0] == 0  # a row with nothing kept
    with pytest.raises(BudgetError, match="below the bitmap and row scales of int8 pruning"):
        magnitude_prune_int8(table, 7)
    assert int8_capacity(8, 3, 4).kept == 0
    assert int8_capacity(10**6, 3, 4).kept == 12  # never more than the table


def test_int8_pruning_error_bound_and_bytes_within_budget():
    """Every kept entry is within half its row's scale of the original; dropped entries are 0;
    the storage never exceeds the budget and keeps about 4x the float32 values."""
    rng = np.random.default_rng(2)
    table = rng.normal(size=(40, 16)).astype(np.float32)
    table[5] = 0.0  # a row with nothing to keep
    for budget in (160, 200, 333, 900, 2000, 4000, 10**5):
        got, cap = magnitude_prune_int8(table, budget)
        assert cap.bytes <= budget
        assert cap.bytes == 40 * 16 // 8 + 40 * 2 + cap.kept
        fresh, _ = magnitude_prune(table, 10**9)  # all entries, float32
        order = np.argsort(-np.abs(table).ravel(), kind="stable")
        keep = np.zeros(table.size, dtype=bool)
        keep[order[: cap.kept]] = True
        keep = keep.reshape(table.shape)
        scale = int8_row_scales(np.where(keep, table, 0)).astype(np.float64)
        err = np.abs(got.astype(np.float64) - fresh)
        assert (err[keep] <= np.broadcast_to(scale[:, None] / 2, table.shape)[keep]).all()
        assert (got[~keep] == 0).all()
        assert np.count_nonzero(got) <= cap.kept
    assert magnitude_prune_int8(table, 900)[1].kept >= 3 * sparse_capacity(900, 40, 16).kept
