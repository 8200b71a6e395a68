"""Item groups, byte accounting, budget parsing and unit selection."""

from __future__ import annotations

import numpy as np
import pytest

from peel_fed.blocks import (
    BlockLayout,
    BudgetError,
    check_budget_format,
    first_blocks_order,
    parse_budget,
    popularity_item_groups,
    random_unit_order,
    select_prefix,
    split_budget_list,
    unit_mask,
    weighted_unit_order,
)


def test_popularity_item_groups_by_hand():
    pop = np.array([5, 9, 1, 9, 0, 5, 7])
    # descending popularity, ties by id: 1(9) 3(9) 6(7) 0(5) 5(5) 2(1) 4(0)
    groups = popularity_item_groups(pop, 3)  # sizes 3, 2, 2
    np.testing.assert_array_equal(groups, [1, 0, 2, 0, 2, 1, 0])


def test_popularity_item_groups_properties():
    rng = np.random.default_rng(0)
    pop = rng.integers(0, 6, size=53)  # many ties
    for g in (1, 4, 7, 53):
        groups = popularity_item_groups(pop, g)
        sizes = np.bincount(groups, minlength=g)
        assert sizes.max() - sizes.min() <= 1
        for a in range(g - 1):
            # every item of a more popular group is at least as popular as any later one
            assert pop[groups == a].min() >= pop[groups == a + 1].max()
            tied = np.intersect1d(pop[groups == a], pop[groups == a + 1])
            for value in tied:  # ties split by id: lower ids in the earlier group
                assert (
                    np.flatnonzero((groups == a) & (pop == value)).max()
                    < np.flatnonzero((groups == a + 1) & (pop == value)).min()
                )
    with pytest.raises(ValueError):
        popularity_item_groups(pop, 54)


def _layout_10_items() -> BlockLayout:
    groups = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])  # sizes 4, 3, 3
    return BlockLayout(groups, dim=8, num_blocks=4, bytes_per_value=4)


def test_block_layout_bytes_by_hand():
    lay = _layout_10_items()
    assert lay.block_dim == 2
    assert lay.num_units == 12
    np.testing.assert_array_equal(lay.group_sizes, [4, 3, 3])
    # unit = items x 2 values x 4 bytes
    np.testing.assert_array_equal(lay.unit_bytes(), [[32] * 4, [24] * 4, [24] * 4])
    assert lay.full_table_bytes == 10 * 8 * 4
    assert lay.unit_bytes().sum() == lay.full_table_bytes
    assert lay.cover_bytes == 32 + 24 + 24
    assert lay.min_budget_bytes == 24
    assert lay.bytes_of(np.array([[0, 0], [0, 3], [2, 1]])) == 32 + 32 + 24
    assert lay.bytes_of(np.zeros((0, 2))) == 0
    np.testing.assert_array_equal(lay.items_of(0), [0, 3, 6, 9])


def test_block_layout_rejects_bad_geometry():
    with pytest.raises(ValueError, match="divide"):
        BlockLayout(np.array([0, 1]), dim=8, num_blocks=3)
    with pytest.raises(ValueError, match="at least one item"):
        BlockLayout(np.array([0, 2]), dim=8, num_blocks=4)


FULL = 1000 * 640 * 4  # a 2.56 MB table: every size below fits


@pytest.mark.parametrize(
    "text, expected",
    [
        ("25%", 640_000),
        (0.25, 640_000),
        ("0.25", 640_000),
        ("100%", 2_560_000),
        (1, 2_560_000),
        ("2.56MB", 2_560_000),
        ("512KB", 512_000),
        ("2MB", 2_000_000),
        ("1.5MiB", int(1.5 * 1024 * 1024)),
        ("4KiB", 4096),
        ("300000", 300_000),
        ("300000B", 300_000),
        (" 2 mb ", 2_000_000),
        (4096, 4096),
    ],
)
def test_parse_budget(text, expected):
    assert parse_budget(text, FULL) == expected


@pytest.mark.parametrize(
    "text", ["lots", "", "12XB", "5iB", "1.2.3MB", "0%", "150%", "-5%", 0, -3, "0", "0KB", "x%"]
)
def test_parse_budget_rejects(text):
    with pytest.raises(BudgetError):
        parse_budget(text, FULL)


@pytest.mark.parametrize("text", ["2.57MB", "2560001", 2_560_001, "3MiB", "1GB"])
def test_parse_budget_refuses_more_than_the_full_table(text):
    with pytest.raises(BudgetError) as exc:
        parse_budget(text, FULL)
    message = str(exc.value)
    assert f"budget {text!r} (" in message and "above the full item table (2,560,000 B)" in message
    assert "\n" not in message
    check_budget_format(text)  # the format is fine: only the size is refused


def test_split_budget_list():
    assert split_budget_list(" 10%, 512KB ,,0.5,") == ["10%", "512KB", "0.5"]
    assert split_budget_list("2MB") == ["2MB"]
    for empty in ("", " , ,"):
        with pytest.raises(BudgetError, match="at least one budget"):
            split_budget_list(empty)


def test_select_prefix_respects_budget_cover_and_maximality():
    rng = np.random.default_rng(0)
    groups = popularity_item_groups(rng.integers(0, 50, size=37), 5)  # sizes 8,8,7,7,7
    lay = BlockLayout(groups, dim=12, num_blocks=4)
    sizes = lay.unit_bytes()
    for _ in range(30):
        weights = rng.random((5, 4))
        order = weighted_unit_order(weights)
        for budget in rng.integers(lay.cover_bytes, lay.full_table_bytes + 1, size=10):
            units = select_prefix(order, lay, int(budget))
            k = len(units)
            np.testing.assert_array_equal(units, order[:k])
            used = lay.bytes_of(units)
            assert used <= budget
            assert unit_mask(units, 5, 4).any(axis=1).all()  # every group keeps >= 1 unit
            if k < len(order):
                g, n = order[k]
                assert used + sizes[g, n] > budget
    units = select_prefix(order, lay, lay.full_table_bytes)
    assert len(units) == lay.num_units


def test_select_prefix_below_one_block():
    lay = _layout_10_items()
    with pytest.raises(BudgetError, match="below one block"):
        select_prefix(first_blocks_order(3, 4), lay, 23)
    assert len(select_prefix(first_blocks_order(3, 4), lay, 24)) == 0  # block 0 of group 0 is 32
    assert len(select_prefix(weighted_unit_order(np.ones((3, 4))), lay, 32)) == 1


def test_weighted_unit_order_head_then_descending_tail():
    rng = np.random.default_rng(1)
    for _ in range(20):
        w = rng.random((6, 5))
        order = weighted_unit_order(w)
        assert len({tuple(u) for u in order.tolist()}) == 30
        head, tail = order[:6], order[6:]
        np.testing.assert_array_equal(head[:, 0], np.arange(6))
        np.testing.assert_array_equal(head[:, 1], w.argmax(axis=1))
        tail_w = w[tail[:, 0], tail[:, 1]]
        assert (np.diff(tail_w) <= 0).all()


def test_weighted_unit_order_priority_and_ties():
    w = np.array([[1.0, 1.0], [2.0, 1.0]])
    order = weighted_unit_order(w, group_priority=np.array([1, 0]))
    # head: group 1's best (block 0), then group 0's first best (block 0); tail by weight,
    # equal weights by group then block
    np.testing.assert_array_equal(order, [[1, 0], [0, 0], [0, 1], [1, 1]])


def test_first_blocks_order_whole_columns():
    lay = _layout_10_items()
    order = first_blocks_order(3, 4)
    np.testing.assert_array_equal(order[:4], [[0, 0], [1, 0], [2, 0], [0, 1]])
    for k in range(1, 5):
        units = select_prefix(order, lay, k * lay.cover_bytes)
        mask = unit_mask(units, 3, 4)
        expected = np.zeros((3, 4), dtype=bool)
        expected[:, :k] = True
        np.testing.assert_array_equal(mask, expected)


def test_random_unit_order_seeded_and_covering():
    a, b, c = random_unit_order(4, 3, 0), random_unit_order(4, 3, 0), random_unit_order(4, 3, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a[:4, 0], np.arange(4))


def test_consistent_unit_order_ranks_blocks_once_for_all_groups():
    from peel_fed.blocks import consistent_unit_order

    # 3 item groups x 4 blocks. Item-weighted block scores (sizes 1, 1, 2):
    # block 0: 1+1+2*1=4, block 1: 3+0+2*1=5, block 2: 0+4+2*0=4, block 3: 0+0+2*3=6
    weights = np.array([[1.0, 3.0, 0.0, 0.0], [1.0, 0.0, 4.0, 0.0], [1.0, 1.0, 0.0, 3.0]])
    order = consistent_unit_order(weights, np.array([1, 1, 2]))
    expected_blocks = [3, 1, 0, 2]  # ties (0 and 2 at 4) broken by block id
    expected = [(g, b) for b in expected_blocks for g in range(3)]
    assert [tuple(u) for u in order] == expected


def test_consistent_order_prefix_keeps_same_blocks_for_every_group():
    from peel_fed.blocks import consistent_unit_order

    rng = np.random.default_rng(3)
    layout = BlockLayout(np.repeat(np.arange(5), [7, 7, 6, 6, 6]), dim=16, num_blocks=4)
    order = consistent_unit_order(rng.random((5, 4)), layout.group_sizes)
    for budget in range(layout.cover_bytes, layout.full_table_bytes + 1, 97):
        kept = select_prefix(order, layout, budget)
        blocks_per_group = [set(kept[kept[:, 0] == g, 1].tolist()) for g in range(5)]
        sizes = sorted(len(b) for b in blocks_per_group)
        assert sizes[-1] - sizes[0] <= 1  # whole block-ranks, plus a partial one
        # every group's kept set is a prefix of the same block ranking
        longest = max(blocks_per_group, key=len)
        assert all(b <= longest for b in blocks_per_group)
