"""The one scoring module: pair scores, the BPR loss, ranking score functions, budget table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peel_fed.blocks import BlockLayout
from peel_fed.budget_table import budget_table_lines
from peel_fed.scoring import bpr_loss, budget_score_fn, dot_score_fn, pair_scores


def test_pair_scores_by_hand():
    users = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    items = torch.tensor([[1.0, 1.0, 2.0, 0.5]])
    assert pair_scores(users, items).item() == 1 + 2 + 6 + 2
    # two blocks: <(1,2),(1,1)> = 3 and <(3,4),(2,0.5)> = 8
    weighted = pair_scores(users, items, torch.tensor([[2.0, 0.5]]), num_blocks=2)
    assert weighted.item() == 2 * 3 + 0.5 * 8


def test_bpr_loss_mean_and_per_pair():
    pos, neg = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    per_pair = bpr_loss(pos, neg, reduction="none")
    np.testing.assert_allclose(per_pair.numpy(), [np.log1p(np.exp(-2.0)), np.log(2.0)], rtol=1e-6)
    assert bpr_loss(pos, neg).item() == pytest.approx(per_pair.mean().item())
    with pytest.raises(ValueError, match="reduction"):
        bpr_loss(pos, neg, reduction="sum")


def test_dot_score_fn_rows_and_uncovered_items():
    users = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    items = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=np.float32)
    plain = dot_score_fn(users, items)(np.array([1, 0]))
    np.testing.assert_array_equal(plain.numpy(), [[2, 4, 6], [1, 3, 5]])
    # global user 7 is row 1; item 2 is not held
    rows = np.full(8, -1)
    rows[7] = 1
    uncovered = np.array([False, False, True])
    masked = dot_score_fn(users, items, user_rows=rows, uncovered_items=uncovered)(np.array([7]))
    np.testing.assert_array_equal(masked.numpy(), [[2, 4, -np.inf]])


def test_budget_score_fn_keeps_units_and_rescales():
    # 2 items in 2 item groups, 2 blocks of 1 value; group 1 keeps no unit
    layout = BlockLayout(np.array([0, 1]), dim=2, num_blocks=2)
    table = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    weights = np.array([[1.0, 3.0], [1.0, 1.0]])
    score = budget_score_fn(np.array([[1.0, 1.0]]), table, weights, np.array([[0, 1]]), layout)
    # group 0 keeps block 1 only: its weight is rescaled to (1 + 3) / 3 * 3 = 4
    np.testing.assert_allclose(score(np.array([0])).numpy(), [[4 * 2.0, -np.inf]])


def test_budget_table_lines_one_line_per_budget_in_row_order():
    rows = [
        {"method": m, "budget": b, "budget_bytes": n, "budget_fraction": f, **metrics}
        for b, n, f in (("50%", 500, 0.5), ("10%", 100, 0.1))
        for m, metrics in (
            ("PEEL", {"recall@20": 0.25, "ndcg@20": 0.125}),
            ("first-k", {"recall@20": 0.2, "ndcg@20": 0.1}),
        )
    ]
    assert budget_table_lines(rows) == [
        "| budget | bytes | PEEL | first-k |",
        "|---|---:|---:|---:|",
        "| 50% (50.0%) | 500 | 0.2500 / 0.1250 | 0.2000 / 0.1000 |",
        "| 10% (10.0%) | 100 | 0.2500 / 0.1250 | 0.2000 / 0.1000 |",
    ]
    unlabelled = [{k: v for k, v in r.items() if k != "budget"} for r in rows[:2]]
    expected = "| 50.0% | 500 | 0.2500 / 0.1250 | 0.2000 / 0.1000 |"
    assert budget_table_lines(unlabelled)[2] == expected


def test_budget_table_lines_show_a_dash_where_a_method_has_no_row():
    """A budget below a method's smallest storage gives it no row: its cell is '-'."""
    rows = [
        {"method": m, "budget": b, "budget_bytes": n, "budget_fraction": n / 1000, **metrics}
        for m, b, n, metrics in (
            ("PEEL", "5%", 50, {"recall@20": 0.25, "ndcg@20": 0.125}),
            ("PEEL", "50%", 500, {"recall@20": 0.5, "ndcg@20": 0.25}),
            ("pruning", "50%", 500, {"recall@20": 0.2, "ndcg@20": 0.1}),
        )
    ]
    assert budget_table_lines(rows)[2:] == [
        "| 5% (5.0%) | 50 | 0.2500 / 0.1250 | - |",
        "| 50% (50.0%) | 500 | 0.5000 / 0.2500 | 0.2000 / 0.1000 |",
    ]
