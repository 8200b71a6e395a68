"""Bit-planes and direct row quantization at budgets (``peel_fed.plane_eval``): known answers on
the checkerboard, totals equal to ``evaluate_ranking``, bytes, and the device-cut check."""

from __future__ import annotations

import numpy as np
import pytest

from peel_fed.baselines import best_bits_and_dims, direct_quantization_bytes, direct_quantize
from peel_fed.blocks import FLOAT32_BYTES, parse_budget, popularity_item_groups
from peel_fed.budget_rows import QuantCandidate, QuantizedChoice
from peel_fed.data import Interactions, TrainValSplit, from_pairs, split_validation
from peel_fed.metrics import evaluate_ranking, grouped_metrics
from peel_fed.plane_eval import BEST_DIRECT, plane_budget_rows
from peel_fed.planes import HeldPlanes, PlaneCode, plane_score_fn
from peel_fed.scoring import dot_score_fn

BUDGETS = ("3%", "5%", "10%", "100%")


def _budgets(item_emb, labels=BUDGETS):
    full = item_emb.size * FLOAT32_BYTES
    return [(b, parse_budget(b, full)) for b in labels]


def _split(ds):
    return split_validation(ds.train, ds.n_users, 0.2, seed=0)


def _by(rows):
    return {(r["method"], r["budget"]): r for r in rows}


@pytest.fixture(scope="module")
def planes(board, board_model):
    _, user_emb, item_emb = board_model
    res = plane_budget_rows(
        board,
        _split(board),
        user_emb,
        item_emb,
        board.item_popularity(),
        _budgets(item_emb),
        num_user_groups=2,
        num_item_groups=8,
        families=("planes",),
    )
    return res, _by(res["rows"])


def test_personalised_planes_rank_the_checkerboard_better_at_a_small_budget(
    board, board_model, planes
):
    """Known answer: at 5% of the float32 table, each of the two user groups spends its bytes on
    its own cluster's items (measured Recall@20 0.572 against 0.494 for the global order, full
    table 0.681); at 10% both keep >= 95% of the full table's Recall@20 (measured 97.9%, 101.6%).
    Ranking each user group with the other group's table drops G_u=2 at 5% to 0.39."""
    _, user_emb, item_emb = board_model
    full = evaluate_ranking(
        dot_score_fn(user_emb, item_emb), board.n_users, board.train, board.test
    )
    _, rows = planes
    one, two = "PEEL bit-planes (G_u=1)", "PEEL bit-planes (G_u=2)"
    assert rows[two, "5%"]["recall@20"] >= rows[one, "5%"]["recall@20"] + 0.05
    assert rows[two, "5%"]["recall@20"] >= 0.75 * full["recall@20"]
    for method in (one, two):
        assert rows[method, "10%"]["recall@20"] >= 0.95 * full["recall@20"], method
        # 16 planes (all) fit at 100%: the code's rounding only
        assert rows[method, "100%"]["recall@20"] == pytest.approx(full["recall@20"], abs=0.02)
        assert len(rows[method, "5%"]["planes_per_group"]) == (1 if method == one else 2)


def test_global_order_row_is_evaluate_ranking_of_the_served_table(board, board_model, planes):
    _, user_emb, item_emb = board_model
    res, rows = planes
    pop = board.item_popularity()
    groups = popularity_item_groups(pop, 8)
    code = PlaneCode.encode(item_emb)
    for label, budget in _budgets(item_emb):
        row = rows["PEEL bit-planes (G_u=1)", label]
        planes_per_group = np.array(row["planes_per_group"][0])
        held = code.serve(planes_per_group[groups])
        m = evaluate_ranking(plane_score_fn(user_emb, held), board.n_users, board.train, board.test)
        assert (row["recall@20"], row["ndcg@20"]) == (m["recall@20"], m["ndcg@20"])
        assert row["budget_bytes"] == budget and row["used_bytes"] <= budget
        assert row["budget_fraction"] == budget / (item_emb.size * FLOAT32_BYTES)
    # the trace: largest budget first, the served rows' numbers, for both orders
    trace = [dict(t) for t in res["trace"]]
    assert [t["budget"] for t in trace] == ["100%", "10%", "5%", "3%"] * 2
    for t in trace:
        assert t.pop("cut_on_device") is True
        assert t == rows[t["method"], t["budget"]]


def test_grouped_metrics_over_a_partition_is_evaluate_ranking(board, board_model):
    _, user_emb, item_emb = board_model
    score = dot_score_fn(user_emb, item_emb)
    users = np.random.default_rng(0).permutation(board.n_users)
    parts = [(users[:17], score), (users[17:50], score), (users[50:], score)]
    m = evaluate_ranking(score, board.n_users, board.train, board.test)
    got = grouped_metrics(parts, board.n_users, board.train, board.test)
    assert got["recall@20"] == pytest.approx(m["recall@20"], abs=1e-12)
    assert got["ndcg@20"] == pytest.approx(m["ndcg@20"], abs=1e-12)


def test_a_device_cut_that_differs_from_the_served_table_fails_loudly(
    board, board_model, monkeypatch
):
    _, user_emb, item_emb = board_model
    real_cut = HeldPlanes.cut_to

    def off_by_one_bit(self, planes):  # a device's cut (not the server's) flips a low bit
        out = real_cut(self, planes)
        if (self.planes < self.bits).any():
            out.top[out.planes > 0, 0] ^= 1
        return out

    monkeypatch.setattr(HeldPlanes, "cut_to", off_by_one_bit)
    with pytest.raises(AssertionError, match="cut differs from the served table"):
        plane_budget_rows(
            board,
            _split(board),
            user_emb,
            item_emb,
            board.item_popularity(),
            _budgets(item_emb, ("5%", "10%")),
            num_user_groups=1,
            num_item_groups=4,
            families=("planes",),
        )


def test_the_choice_reads_validation_never_test():
    """Known answer: one user, 30 items, one column. Model A ranks the validation item (1) first
    and the test item (2) last; model B the other way round. The choice is A (validation
    Recall@20 1 against 0), reported with A's test Recall@20: 0 (an oracle on test picks B)."""
    n_items = 30
    ds = from_pairs("t", 1, n_items, np.array([(0, 0), (0, 1)]), np.array([(0, 2)]))
    split = TrainValSplit(
        fit=Interactions(np.array([0]), np.array([0])),
        val=Interactions(np.array([0]), np.array([1])),
    )
    a = np.linspace(0.0, 0.5, n_items).astype(np.float32)[:, None]
    a[1], a[2] = 1.0, -1.0
    b = a.copy()
    b[1], b[2] = -1.0, 1.0
    users = np.ones((1, 1), dtype=np.float32)
    choice = QuantizedChoice(ds, split, [(users, a), (users, b)])
    cands = [QuantCandidate(m, 8, 1, 34) for m in (0, 1)]
    assert [choice.metrics(c, "test")["recall@20"] for c in cands] == [0.0, 1.0]
    best, val = choice.choose(cands[::-1])
    assert best.model == 0 and val["recall@20"] == 1.0
    assert choice.metrics(best, "test")["recall@20"] == 0.0
    with pytest.raises(ValueError, match="evaluate on 'val' or 'test'"):
        choice.metrics(best, "train")


def test_direct_rows_keep_the_validation_choice_and_fixed_widths_at_their_own_bytes(
    board, board_model
):
    _, user_emb, item_emb = board_model
    n_items, dim = item_emb.shape
    full = item_emb.size * FLOAT32_BYTES
    res = plane_budget_rows(
        board,
        _split(board),
        user_emb,
        item_emb,
        board.item_popularity(),
        _budgets(item_emb, ("3%", "12%", "100%")),
        families=("direct",),
    )
    assert res["trace"] == []
    best = _by(res["rows"])
    assert ("row quantization, best bits x dims", "3%") not in best  # below one 1-bit column

    def recall(bits, dims):
        table, _ = direct_quantize(item_emb[:, :dims], bits)
        score = dot_score_fn(np.ascontiguousarray(user_emb[:, :dims]), table)
        return evaluate_ranking(score, board.n_users, board.train, board.test)["recall@20"]

    split = _split(board)

    def val_recall(bits, dims):  # rank all but the fit items, targets the validation items
        table, _ = direct_quantize(item_emb[:, :dims], bits)
        score = dot_score_fn(np.ascontiguousarray(user_emb[:, :dims]), table)
        return evaluate_ranking(score, board.n_users, split.fit, split.val)["recall@20"]

    for label, budget in _budgets(item_emb, ("12%", "100%")):
        row = best[BEST_DIRECT, label]
        shapes = best_bits_and_dims(budget, n_items, dim)
        vals = [val_recall(s.bits, s.dims) for s in shapes]
        chosen = shapes[int(np.argmax(vals))]  # chosen on validation, reported on test
        assert (row["bits"], row["dims"]) == (chosen.bits, chosen.dims)
        assert row["val_recall@20"] == max(vals)
        assert row["recall@20"] == recall(chosen.bits, chosen.dims)
        assert row["used_bytes"] == direct_quantization_bytes(n_items, row["dims"], row["bits"])
        assert row["used_bytes"] <= budget
    own = {r["method"]: r for r in res["own_bytes_rows"]}
    assert list(own) == [f"row quantization, {b}" for b in ("int8", "int4", "int2", "1-bit")]
    for bits, r in zip((8, 4, 2, 1), own.values(), strict=True):
        nbytes = direct_quantization_bytes(n_items, dim, bits)  # 80 x (16 x bits / 8 + 4) B
        assert r["budget_bytes"] == r["used_bytes"] == nbytes == n_items * (2 * bits + 4)
        assert (
            r["budget_fraction"] == nbytes / full and r["budget"] == f"{100 * nbytes / full:.3g}%"
        )
        assert r["recall@20"] == recall(bits, dim)


def test_pruning_rows_are_evaluate_ranking_of_the_pruned_tables(board, board_model):
    """Float32 and int8 pruning rows at every budget, within the budget; the float32 trace (cut
    on the device) equals the served rows, as pruning is nested; ``trace=False`` skips it. At 5%
    (256 B of 80 x 16 values) int8 has no row: its bitmap and row scales take 160 + 160 B."""
    from peel_fed.baselines import magnitude_prune, magnitude_prune_int8
    from peel_fed.budget_rows import MAGNITUDE, MAGNITUDE_INT8, pruning_rows

    _, user_emb, item_emb = board_model
    budgets = _budgets(item_emb, ("5%", "25%", "100%"))
    cases = (
        (False, magnitude_prune, MAGNITUDE, 0),
        (True, magnitude_prune_int8, MAGNITUDE_INT8, 1),
    )
    for int8, prune, method, skipped in cases:
        rows, trace = pruning_rows(board, user_emb, item_emb, budgets, int8=int8)
        assert [r["budget"] for r in rows] == ["5%", "25%", "100%"][skipped:]
        assert [t["budget"] for t in trace] == ["100%", "25%", "5%"][: 3 - skipped]
        for r, (_, budget) in zip(rows, budgets[skipped:], strict=True):
            table, cap = prune(item_emb, budget)
            m = evaluate_ranking(
                dot_score_fn(user_emb, table), board.n_users, board.train, board.test
            )
            assert (r["method"], r["recall@20"], r["ndcg@20"]) == (
                method,
                m["recall@20"],
                m["ndcg@20"],
            )
            assert r["used_bytes"] == cap.bytes <= budget and r["storage"] == cap.storage
        if not int8:
            assert trace == rows[::-1]
        assert pruning_rows(board, user_emb, item_emb, budgets, int8=int8, trace=False)[1] == []
