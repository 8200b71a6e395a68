"""The on-device bit-plane store: unit payloads are exactly the bytes the budget counts, and a
device that grows (fetching units) or shrinks (no server contact) holds bit for bit what the
server serves at that budget."""

from __future__ import annotations

import numpy as np
import pytest

from peel_fed.plane_store import PlaneStore, PlaneUnit, served_store, unit_payload
from peel_fed.planes import (
    PlaneCode,
    greedy_plane_order,
    held_bytes,
    order_unit_bytes,
    plane_unit_bytes,
    planes_at_budget,
    second_moments,
)


def _setup(seed: int = 0, n: int = 30, d: int = 5):
    rng = np.random.default_rng(seed)
    table = (rng.normal(size=(n, d)) * rng.uniform(0.1, 2.0, size=(n, 1))).astype(np.float32)
    item_groups = np.array([i % 3 for i in range(n)])  # interleaved: rows are not contiguous
    code = PlaneCode.encode(table)
    users = rng.normal(size=(12, d))
    order = greedy_plane_order(
        code, table, item_groups, rng.integers(1, 50, n), second_moments(users)
    )
    return code, item_groups, order


def _same(store: PlaneStore, code: PlaneCode, order, item_groups, budget: int) -> bool:
    planes, used = planes_at_budget(order, np.bincount(item_groups), code.dim, budget)
    served = code.serve(planes[item_groups])
    h = store.held
    return (
        store.used_bytes == used
        and np.array_equal(h.top, served.top)
        and np.array_equal(h.planes, served.planes)
        and np.array_equal(h.offset.view(np.uint16), served.offset.view(np.uint16))
        and np.array_equal(h.scale.view(np.uint16), served.scale.view(np.uint16))
    )


def test_unit_payload_bytes_by_hand():
    code, item_groups, _ = _setup()
    # group 1 holds 10 rows of 5 values: a plane packs 50 bits into 7 bytes; plane 0 also carries
    # 10 float16 offsets and 10 float16 scales (40 B)
    first, later = unit_payload(code, item_groups, 1, 0), unit_payload(code, item_groups, 1, 3)
    assert (len(first.bits), len(first.meta), first.nbytes) == (7, 40, 47)
    assert (later.nbytes, later.meta) == (7, b"")
    assert first.nbytes == plane_unit_bytes(10, 5, 0) and later.nbytes == plane_unit_bytes(10, 5, 3)


def test_growing_unit_by_unit_equals_being_served_and_downloads_exactly_the_counted_bytes():
    code, item_groups, order = _setup()
    sizes = np.bincount(item_groups)
    fetched: list[PlaneUnit] = []

    def fetch(g: int, p: int) -> PlaneUnit:
        fetched.append(unit_payload(code, item_groups, g, p))
        return fetched[-1]

    store = PlaneStore(order, item_groups, code.dim)
    for budget in (60, 150, 400, 10_000):
        store.grow(budget, fetch)
        assert _same(store, code, order, item_groups, budget)
        planes, _ = planes_at_budget(order, sizes, code.dim, budget)
        assert (
            sum(u.nbytes for u in fetched)
            == store.used_bytes
            == held_bytes(sizes, code.dim, planes)
        )
        assert store.used_bytes <= budget
    values, rankable = store.held.decode()
    assert rankable.all() and np.array_equal(values, code.decode()[0])


def test_shrinking_on_the_device_equals_being_served_the_smaller_budget():
    code, item_groups, order = _setup(seed=1)
    store = served_store(code, order, item_groups, 10_000)
    for budget in (400, 150, 60):
        dropped = store.shrink(budget)
        assert dropped  # each cut drops units here
        assert _same(store, code, order, item_groups, budget)
    # growing back fetches only the units the cuts dropped
    asked = []
    store.grow(400, lambda g, p: asked.append((g, p)) or unit_payload(code, item_groups, g, p))
    assert _same(store, code, order, item_groups, 400)
    k60 = int(planes_at_budget(order, np.bincount(item_groups), code.dim, 60)[0].sum())
    assert asked == [tuple(u) for u in order[k60 : store.kept].tolist()]


def test_a_cut_below_the_first_unit_keeps_nothing():
    code, item_groups, order = _setup(seed=1)
    store = served_store(code, order, item_groups, 400)
    first = int(order_unit_bytes(order, np.bincount(item_groups), code.dim)[0])
    dropped = store.shrink(first - 1)
    assert store.kept == 0 and store.used_bytes == 0 and store.units == []
    held = planes_at_budget(order, np.bincount(item_groups), code.dim, 400)[0]
    assert len(dropped) == int(held.sum())
    assert not store.held.decode()[1].any()  # nothing left to rank with


def test_a_wrong_or_truncated_unit_is_refused():
    code, item_groups, order = _setup()
    store = PlaneStore(order, item_groups, code.dim)
    g, p = order[0]
    other = unit_payload(code, item_groups, (g + 1) % 3, 0)
    with pytest.raises(ValueError, match="asked for unit"):
        store.grow(10_000, lambda *_: other)
    good = unit_payload(code, item_groups, g, p)
    short = PlaneUnit(good.group, good.plane, good.bits[:-1], good.meta)
    with pytest.raises(ValueError, match="expected"):
        store.grow(10_000, lambda *_: short)
