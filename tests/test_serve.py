"""Serving each device its own units (``peel_fed.fedserve``, ``strategies.serve``): a device
downloads the bit-plane units its budget holds and nothing else, keeps them in its stores,
shrinks in place and grows back by asking for the next units."""

from __future__ import annotations

import numpy as np
import pytest
from test_adapters import SMALL

from peel_fed.blocks import parse_budget
from peel_fed.fedconfig import FedConfig
from peel_fed.fedserve import NodePlanes, decode_units, encode_units, serve_units
from peel_fed.own_budget import device_budgets
from peel_fed.plane_store import served_store
from peel_fed.planes import PlaneCode, greedy_plane_order, planes_at_budget
from sim.local_grid import LocalGrid
from strategies.server_app import run_pipeline


def _code_and_orders(seed: int = 0):
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(30, 8)).astype(np.float32)
    item_groups = np.repeat(np.arange(3), 10)
    code = PlaneCode.encode(table)
    orders = {  # two user groups: different dimension weights, so different orders
        g: greedy_plane_order(code, table, item_groups, np.ones(30), rng.uniform(0.1, 2.0, 8))
        for g in range(2)
    }
    return code, item_groups, orders


def test_a_node_fetches_each_unit_once_and_holds_what_the_server_serves_at_its_budget():
    code, item_groups, orders = _code_and_orders()
    planes = NodePlanes(orders, item_groups, 8)
    targets = {0: 300, 1: 500}
    wanted = planes.wanted(targets)
    assert len({tuple(u) for u in wanted.tolist()}) == len(wanted)  # no unit twice
    planes.add(serve_units(code, item_groups, wanted))
    for g, budget in targets.items():
        want = served_store(code, orders[g], item_groups, budget)
        got = planes.stores[g]
        assert got.kept == want.kept and got.used_bytes <= budget
        np.testing.assert_array_equal(got.held.top, want.held.top)
    # shared units are downloaded once: the payload is the distinct units' bytes
    assert planes.payload_bytes == sum(u.nbytes for u in serve_units(code, item_groups, wanted))
    # shrink in place, then grow back by asking for exactly the dropped units
    for store in planes.stores.values():
        store.shrink(120)
    again = planes.wanted(targets)
    planes.add(serve_units(code, item_groups, again))
    for g, budget in targets.items():
        np.testing.assert_array_equal(
            planes.stores[g].held.top, served_store(code, orders[g], item_groups, budget).held.top
        )
    # what the device saves restores the same stores
    restored = NodePlanes.from_state_arrays(planes.state_arrays(), item_groups, 8)
    for g in targets:
        np.testing.assert_array_equal(restored.stores[g].held.top, planes.stores[g].held.top)
    assert restored.targets == targets


def test_units_survive_their_encoding_and_a_short_payload_is_refused():
    code, item_groups, orders = _code_and_orders()
    units = serve_units(code, item_groups, orders[0][:5])
    index, payload = encode_units(units)
    assert decode_units(index, payload) == units
    with pytest.raises(ValueError, match="unit payload of"):
        decode_units(index, payload[:-1])


@pytest.fixture(scope="module")
def single_user_nodes(tmp_path_factory):
    """One user per node, only the devices' own units go down (no method comparison)."""
    from conftest import set_server_identity

    cfg = dict(SMALL, min_nodes=2, compare_methods=False)
    with pytest.MonkeyPatch.context() as mp:
        set_server_identity(mp)
        grid = LocalGrid(12)
        return run_pipeline(grid, FedConfig(**cfg)), grid


def test_every_single_user_device_downloads_at_most_its_budget_plus_the_stated_overhead(
    single_user_nodes,
):
    report, grid = single_user_nodes
    assert "evaluate.budgets" not in grid.types  # no full table went down after PEE learning
    full = report["layout"]["full_table_bytes"]
    choices = report["config"]["device-budgets"].split(",")
    served = report["serve"]["nodes"]
    assert len(served) == 12
    for node, cost in served.items():
        user = int(node) - 100  # LocalGrid: node 100 + p hosts partition p, here user p
        own = int(device_budgets(0, np.array([user]), choices, full)[0])
        assert cost["budget_bytes"] == own  # reported against its budget
        assert cost["payload_bytes"] <= own
        assert cost["bytes_down"] <= own + cost["stated_overhead_bytes"]
        assert cost["held_bytes"] == cost["payload_bytes"]
        # it holds its group's order prefix at its budget: the most that fits
        # (units of other orders are never sent)
        assert cost["units"] > 0
    assert sum(c["bytes_down"] for c in served.values()) <= sum(
        parse_budget(c, full) for c in choices
    ) * 12 + sum(c["stated_overhead_bytes"] for c in served.values())
    # after the drill each device asked again for exactly what it had dropped
    grown = report["serve"]["grow_back"]
    assert set(grown) == set(served)
    assert all(grown[n]["held_bytes"] == served[n]["held_bytes"] for n in served)
    # the report's drill is the one ranked with the devices' own units
    assert report["drill"] == report["serve"]["drill"]
    assert {d["users"] for d in report["drill"]} == {6}


def test_ranking_with_the_served_units_equals_the_full_table_evaluation(server_identity):
    """The drill ranked with the units each device holds (shrinking its stores in place) gives
    the numbers the measurement path gets from full tables masked to the same budgets."""
    report = run_pipeline(LocalGrid(3), FedConfig(**SMALL))
    for a, b in zip(report["drill"], report["serve"]["drill"], strict=True):
        assert (a["own_budget"], a["fraction_of_own"], a["users"]) == (
            b["own_budget"],
            b["fraction_of_own"],
            b["users"],
        )
        assert a["recall@20"] == pytest.approx(b["recall@20"], abs=1e-9)
        assert a["ndcg@20"] == pytest.approx(b["ndcg@20"], abs=1e-9)
    # a node hosting users of both groups holds both groups' prefixes, each unit once
    assert all(len(c["groups"]) == 2 for c in report["serve"]["nodes"].values())


def test_planes_at_budget_is_the_most_that_fits():
    """The prefix a device asks for is the longest that fits (the next unit would not)."""
    code, item_groups, orders = _code_and_orders()
    sizes = np.bincount(item_groups)
    planes, used = planes_at_budget(orders[0], sizes, 8, 400)
    store = served_store(code, orders[0], item_groups, 400)
    assert store.used_bytes == used <= 400
    assert store.kept == len(orders[0]) or used + store._unit_bytes[store.kept] > 400


def test_the_serving_benchmark_counts_each_budget_s_download(tmp_path):
    from sim.bench_serve import main

    out = tmp_path / "serve.json"
    report = main(
        ["--dataset", "checkerboard-tiny", "--dim", "16", "--num-item-groups", "4",
         "--budgets", "25%,50%", "--out", str(out)]
    )  # fmt: skip
    assert [r["budget"] for r in report["rows"]] == ["25%", "50%"]
    for r in report["rows"]:
        assert 0 < r["payload_bytes"] <= r["budget_bytes"]
        assert r["bytes_down"] == r["payload_bytes"] + r["overhead_bytes"]
        assert r["overhead_bytes"] <= r["stated_overhead_bytes"]
    assert out.is_file() and out.with_suffix(".md").is_file()
