"""Sparse downloads (pretraining and PEE learning): a node that gets only the item rows it says it
reads computes exactly what it computes on the whole tables (core, messages and the pipeline in
process)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_adapters import SMALL

from peel_fed.blocks import BlockLayout, popularity_item_groups
from peel_fed.data import split_validation
from peel_fed.fedconfig import ConfigError, FedConfig
from peel_fed.fedlightgcn import (
    FedLightGCNConfig,
    PretrainDevices,
    PretrainServer,
    round_participants,
)
from peel_fed.fedpee import PEE_SLOT_STREAM, FedPEEConfig, PEEDevices
from peel_fed.loading import load_dataset
from peel_fed.messages import (
    DataSpec,
    PEEDown,
    PEERound,
    PretrainDown,
    PretrainStep,
    decode_pee_down,
    decode_pee_rows_wanted,
    decode_pretrain_down,
    decode_rows_wanted,
    encode_pee_down,
    encode_pee_rows_wanted,
    encode_pretrain_down,
    encode_rows_wanted,
)
from sim.local_grid import LocalGrid
from strategies.server_app import run_pipeline

BOARD = "checkerboard"


def _setup(**cfg_over):
    ds = load_dataset(BOARD)
    fit = split_validation(ds.train, ds.n_users, 0.1, seed=0).fit
    degree = np.bincount(fit.items, minlength=ds.n_items)
    cfg = FedLightGCNConfig(dim=8, layers=3, local_steps=3, rounds=4, **cfg_over)
    server = PretrainServer(ds.n_items, degree, cfg, seed=0)
    # tables with something in every row of every layer, so a row read but not sent shows
    gen = torch.Generator().manual_seed(1)
    server.S += torch.randn(server.S.shape, generator=gen)

    def devices(users):
        return PretrainDevices(users, ds.n_users, ds.n_items, fit, degree, cfg, seed=0)

    return ds, server, devices


def _only(layers: list[torch.Tensor], rows: np.ndarray) -> list[torch.Tensor]:
    """The layers as a sparse download gives them: zero outside ``rows``."""
    out = []
    for layer in layers:
        kept = torch.zeros_like(layer)
        kept[torch.from_numpy(rows)] = layer[torch.from_numpy(rows)]
        out.append(kept)
    return out


@pytest.mark.parametrize(
    "over",
    [{}, {"negative_sampling": "dns", "dns_candidates": 8}, {"decoys": 3}, {"item_local_steps": 3}],
    ids=["uniform", "dns", "decoys", "item-local-steps"],
)
def test_a_round_on_the_rows_read_equals_a_round_on_the_whole_tables(over):
    ds, server, devices = _setup(**over)
    hosted = np.array([0, 7, 50, 121, 200])
    layers = server.item_layers()
    for round_no in (1, 2):
        part = round_participants(0, hosted, round_no, 2)
        assert part.size
        full, sparse = devices(hosted), devices(hosted)
        rows = sparse.rows_read("round", part, round_no)
        assert 0 < rows.size < ds.n_items  # not the whole table, or the test says nothing
        a = full.device_round(part, layers, round_no)
        b = sparse.device_round(part, _only(layers, rows), round_no)
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.contrib_rows, b.contrib_rows)
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
        torch.testing.assert_close(a.contrib_delta, b.contrib_delta, rtol=0, atol=0)
        assert a.loss_sum == b.loss_sum
        torch.testing.assert_close(full.U0, sparse.U0, rtol=0, atol=0)


def test_init_and_final_read_only_the_hosted_users_items():
    ds, server, devices = _setup()
    hosted = np.arange(5, 9)
    node = devices(hosted)
    rows = node.rows_read("init")
    assert 0 < rows.size < ds.n_items
    layers = server.item_layers()
    for k in range(3):
        a_rows, a = devices(hosted).initial_contribution(k, layers)
        b_rows, b = devices(hosted).initial_contribution(k, _only(layers, rows))
        np.testing.assert_array_equal(a_rows, b_rows)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    np.testing.assert_array_equal(node.rows_read("final"), rows)
    np.testing.assert_array_equal(
        node.final_user_vectors(layers), node.final_user_vectors(_only(layers, rows))
    )


def test_rows_read_names_an_unknown_step():
    _, _, devices = _setup()
    with pytest.raises(ValueError, match="unknown pretrain step 'warmup'"):
        devices(np.arange(3)).rows_read("warmup")


def test_a_sparse_download_decodes_to_the_rows_over_the_whole_table():
    step = PretrainStep("round", 4, 1, 2, 0.1, False, round=1, rounds_per_pass=1)
    full = [np.arange(40, dtype=np.float32).reshape(10, 4) + k for k in range(2)]
    degree = np.arange(10, dtype=np.int64)
    rows = np.array([1, 4, 7])
    down = PretrainDown(DataSpec("x"), step, [t[rows] for t in full], degree[rows], rows, 10)
    got = decode_pretrain_down(encode_pretrain_down(down))
    for table, want in zip(got.layers, full, strict=True):
        assert table.shape == (10, 4)
        np.testing.assert_array_equal(table[rows], want[rows])
        assert not table[np.setdiff1d(np.arange(10), rows)].any()
    np.testing.assert_array_equal(got.degree[rows], rows)
    bad = PretrainDown(DataSpec("x"), step, [t[:1] for t in full], degree[:1], np.array([10]), 10)
    with pytest.raises(ValueError, match="rows outside the table of 10 items"):
        decode_pretrain_down(encode_pretrain_down(bad))
    with pytest.raises(ValueError, match="a node asked for pretraining rows outside"):
        decode_rows_wanted(encode_rows_wanted(np.array([3, -1]), 1), 10)


def test_download_mode_errors_are_one_line():
    for key in ("pretrain", "pee"):
        name = f"{key}-download"
        with pytest.raises(ConfigError, match=f"{name} must be one of auto, sparse, full"):
            FedConfig(**{f"{key}_download": "some"})
        with pytest.raises(ConfigError, match=f"secure-rows hides: use {name}=full"):
            FedConfig(**{f"{key}_download": "sparse"}, secure_rows=True)
        assert getattr(FedConfig(), f"sparse_{key}_downloads")
        assert not getattr(FedConfig(secure_rows=True), f"sparse_{key}_downloads")
        assert not getattr(FedConfig(**{f"{key}_download": "full"}), f"sparse_{key}_downloads")


def _pee_setup():
    ds = load_dataset(BOARD)
    split = split_validation(ds.train, ds.n_users, 0.2, seed=0)
    layout = BlockLayout(popularity_item_groups(ds.item_popularity(), 4), 8, 4)
    gen = np.random.default_rng(2)
    vectors = gen.normal(0, 0.3, (ds.n_users, 8)).astype(np.float32)
    table = gen.normal(0, 0.3, (ds.n_items, 8)).astype(np.float32)  # no zero row anywhere
    alpha = gen.uniform(0.2, 1.0, (layout.num_item_groups, 4))
    cfg = FedPEEConfig(local_steps=3, user_lr=1e-2)

    def devices(users):
        return PEEDevices(
            users, vectors[users], ds.n_users, split.fit, split.val, layout, cfg, seed=0
        )

    return ds, table, alpha, devices


def test_a_pee_round_on_the_rows_read_equals_a_round_on_the_whole_table():
    ds, table, alpha, devices = _pee_setup()
    hosted = np.array([0, 7, 50, 121, 200, 233])
    for round_no in (1, 2):
        part = round_participants(0, hosted, round_no, 2, PEE_SLOT_STREAM)
        assert part.size
        full, sparse = devices(hosted), devices(hosted)
        rows = sparse.pairs.rows_read(part, round_no)
        assert 0 < rows.size < ds.n_items  # not the whole table, or the test says nothing
        kept = np.zeros_like(table)
        kept[rows] = table[rows]
        a = full.device_round(part, table, alpha, round_no)
        b = sparse.device_round(part, kept, alpha, round_no)
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.grad, b.grad)
        np.testing.assert_array_equal(a.row_devices, b.row_devices)
        np.testing.assert_array_equal(a.weight_grad, b.weight_grad)  # the validation pairs too
        np.testing.assert_array_equal(a.loss_sum, b.loss_sum)
        assert a.val_devices == b.val_devices > 0
        torch.testing.assert_close(full.vecs, sparse.vecs, rtol=0, atol=0)


def test_a_sparse_pee_download_decodes_to_the_rows_over_the_whole_table():
    layout = BlockLayout(np.array([0, 0, 1, 1, 1, 0, 1, 0, 1, 1]), 4, 2)
    round_ = PEERound(3, 5, 2, 0.1, 2, 4, 2, 2, False)
    full = {g: np.arange(40, dtype=np.float32).reshape(10, 4) + g for g in (0, 1)}
    rows = {0: np.array([1, 4, 7]), 1: np.zeros(0, dtype=np.int64)}
    alphas = {g: np.ones((2, 2)) * g for g in (0, 1)}
    sent = {g: full[g][rows[g]] for g in rows}
    got = decode_pee_down(
        encode_pee_down(PEEDown(DataSpec("x"), round_, sent, alphas, layout, rows))
    )
    assert got.tables[0].shape == got.tables[1].shape == (10, 4)
    np.testing.assert_array_equal(got.tables[0][rows[0]], full[0][rows[0]])
    assert not got.tables[0][np.setdiff1d(np.arange(10), rows[0])].any()
    assert not got.tables[1].any()
    np.testing.assert_array_equal(got.alphas[1], alphas[1])
    bad = PEEDown(
        DataSpec("x"), round_, sent, alphas, layout, {0: np.array([1, 4, 10]), 1: rows[1]}
    )
    with pytest.raises(ValueError, match="sparse PEE rows outside the table of 10 items"):
        decode_pee_down(encode_pee_down(bad))
    wanted = decode_pee_rows_wanted(encode_pee_rows_wanted({1: np.array([5, 2, 5])}, 3), 10, 2)
    assert list(wanted) == [1] and wanted[1].tolist() == [2, 5]
    with pytest.raises(ValueError, match="a node asked for PEE rows outside the table of 10"):
        decode_pee_rows_wanted(encode_pee_rows_wanted({0: np.array([10])}, 1), 10, 2)
    with pytest.raises(ValueError, match="PEE rows of user group 2 of 2"):
        decode_pee_rows_wanted(encode_pee_rows_wanted({2: np.array([1])}, 1), 10, 2)


def test_pipeline_with_sparse_downloads_ends_as_with_full_ones(server_identity):
    """Six nodes of two users each on the tiny board: the same run with whole-table and with sparse
    pretraining downloads gives the same pretraining losses and metrics, while each node gets
    fewer bytes down in pretraining; a node none of whose users takes part is not sent the
    tables."""
    runs, types = {}, {}
    for mode in ("full", "sparse"):
        grid = LocalGrid(6)
        cfg = FedConfig(**{**SMALL, "min_nodes": 6}, pretrain_download=mode, pee_download=mode)
        runs[mode] = run_pipeline(grid, cfg)
        types[mode] = grid.types
    full, sparse = runs["full"], runs["sparse"]
    for ask in ("query.rows", "query.peeread"):
        assert ask not in types["full"] and ask in types["sparse"]
    assert not any(p["failures"] for p in full["phases"] + sparse["phases"])
    for a, b in zip(full["pretrain"], sparse["pretrain"], strict=True):
        assert (a["users"], a["rows"]) == (b["users"], b["rows"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert full["user_group_sizes"] == sparse["user_group_sizes"]
    for a, b in zip(full["rows"], sparse["rows"], strict=True):
        assert a["method"] == b["method"] and a["budget_bytes"] == b["budget_bytes"]
        assert a["recall@20"] == pytest.approx(b["recall@20"], abs=1e-6)
    for a, b in zip(full["pee"], sparse["pee"], strict=True):
        for ga, gb in zip(a["groups"], b["groups"], strict=True):
            assert (ga["users"], ga["rows"]) == (gb["users"], gb["rows"])
            assert ga["loss"] == pytest.approx(gb["loss"], rel=1e-6)
    for phase in ("pretrain", "pee"):
        down = {m: runs[m]["bytes"][phase]["down_bytes_total"] for m in runs}
        assert down["sparse"] < 0.8 * down["full"], phase
    for kind in ("train.pretrain", "train.pee"):
        assert types["sparse"].count(kind) < types["full"].count(kind), kind
    # a node names the next step's rows in its reply, so only the first step asks every node
    # and a later one asks just the nodes that sat out (idle) the step before:
    # asks = 6 + sum over steps s > 0 of (6 - trained in s - 1) = 6 S + 6 - trains (final: 6)
    from peel_fed.fedlightgcn import rounds_per_pass_for

    steps = cfg.layers + cfg.pretrain_passes * rounds_per_pass_for(cfg.pretrain_cohort_fraction)
    trains = types["sparse"].count("train.pretrain")
    assert trains < 6 * (steps + 1)  # some node sat out a round
    assert types["sparse"].count("query.rows") == 6 * (steps + 1) + 6 - trains
    # PEE rounds likewise: round 1 asks all 6 nodes, round r the nodes not sent round r - 1
    sent = {(p["phase"], p["round"]): p["nodes"] for p in sparse["phases"]}
    rounds = range(1, cfg.pee_rounds + 1)
    asked = [sent.get(("pee-ask", r), 0) for r in rounds]
    assert asked == [6] + [6 - sent.get(("pee", r - 1), 0) for r in rounds[1:]]
    assert sum(asked) < 6 * cfg.pee_rounds
