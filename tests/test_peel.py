"""PEE learning, user groups and cold start, and the centralized pipeline end to end."""

from __future__ import annotations

import inspect
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from peel_fed.baselines import direct_quantization_bytes
from peel_fed.blocks import BlockLayout, parse_budget, popularity_item_groups
from peel_fed.budget_rows import MAGNITUDE, MAGNITUDE_INT8
from peel_fed.clustering import (
    GroupingError,
    cold_start_user_vector,
    kmeans_user_groups,
)
from peel_fed.data import from_pairs, split_validation
from peel_fed.lightgcn import LightGCNConfig, train_lightgcn
from peel_fed.peel import PEELConfig, learn_group_pee
from peel_fed.pipeline import PipelineConfig, learn_all_groups, pretrain, run_centralized
from peel_fed.plane_eval import BEST_DIRECT
from peel_fed.synthetic import checkerboard

# --- learn_group_pee on the shared checkerboard model ------------------------------------------


def _learn(board, board_model, seed, val=None, **overrides):
    _, user_emb, item_emb = board_model
    layout = BlockLayout(popularity_item_groups(board.item_popularity(), 4), 16, 4)
    split = split_validation(board.train, board.n_users, 0.2, seed=0)
    cfg = PEELConfig(
        num_item_groups=4, num_blocks=4, epochs=2, batch_size=128, lr=1e-2, **overrides
    )
    users = np.arange(0, 60)  # cluster 0
    return learn_group_pee(
        0,
        users,
        item_emb,
        user_emb,
        split.fit,
        split.val if val is None else val,
        board.item_popularity(),
        layout,
        cfg,
        seed=seed,
    ), layout


def test_learn_group_pee_seeded_and_well_formed(board, board_model):
    a, layout = _learn(board, board_model, seed=3)
    b, _ = _learn(board, board_model, seed=3)
    c, _ = _learn(board, board_model, seed=4)
    np.testing.assert_array_equal(a.item_table, b.item_table)
    np.testing.assert_array_equal(a.user_table, b.user_table)
    np.testing.assert_array_equal(a.unit_weights, b.unit_weights)
    assert not np.array_equal(a.item_table, c.item_table)
    assert a.unit_weights.shape == (4, 4)
    assert a.unit_weights.mean() == pytest.approx(1.0, rel=1e-6)
    assert (a.unit_weights > 0).all()
    assert not np.allclose(a.unit_weights, 1.0)  # the controller was trained
    all_units = sorted((g, n) for g in range(4) for n in range(4))
    assert sorted(map(tuple, a.unit_order.tolist())) == all_units
    assert a.user_table.shape == (60, 16)
    assert len(a.history) == 2
    # the tables were fine-tuned, starting from the pretrained ones
    assert not np.array_equal(a.item_table, board_model[2])


def test_joint_training_ablation_trains_the_controller_on_the_training_batch(board, board_model):
    """Joint (ablation): the controller learns from the batch the table trains on, so it moves
    even with no validation data; bi-level without validation data leaves it untrained."""
    from peel_fed.data import Interactions

    none = Interactions(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    joint, _ = _learn(board, board_model, seed=3, val=none, joint=True)
    bilevel_no_val, _ = _learn(board, board_model, seed=3, val=none)
    bilevel, _ = _learn(board, board_model, seed=3)
    assert not np.allclose(joint.unit_weights, 1.0)
    np.testing.assert_allclose(bilevel_no_val.unit_weights, 1.0, rtol=1e-6)
    assert not np.allclose(joint.unit_weights, bilevel.unit_weights)


def test_learn_group_pee_takes_no_test_data():
    params = inspect.signature(learn_group_pee).parameters
    assert not [p for p in params if "test" in p.lower()]
    for name in ("fit", "val"):
        assert name in params


# --- user groups and cold start ----------------------------------------------------------------


def test_kmeans_more_groups_than_users():
    with pytest.raises(GroupingError, match="more user groups"):
        kmeans_user_groups(np.random.default_rng(0).normal(size=(3, 4)), 4)
    with pytest.raises(GroupingError):
        kmeans_user_groups(np.ones((3, 4)), 0)


def test_single_group_and_nearest():
    emb = np.random.default_rng(0).normal(size=(10, 4))
    groups = kmeans_user_groups(emb, 1)
    np.testing.assert_array_equal(groups.assignment, np.zeros(10))
    np.testing.assert_array_equal(groups.nearest(emb[:3]), [0, 0, 0])


def test_cold_start_vector_by_hand():
    table = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    degree = np.array([4, 0, 1])
    # u = e0 / sqrt(2 * 4) + e1 / sqrt(2 * 1): the zero degree counts as 1
    np.testing.assert_allclose(
        cold_start_user_vector(np.array([0, 1]), table, degree),
        [1 / np.sqrt(8), 2 / np.sqrt(2)],
    )
    with pytest.raises(GroupingError):
        cold_start_user_vector(np.array([], dtype=np.int64), table, degree)


def test_cold_start_users_join_their_clusters_group():
    ds = checkerboard(n_users=160, n_items=80, n_clusters=2, p_in=0.3, p_out=0.0, seed=2)
    cluster = np.arange(ds.n_users) * 2 // ds.n_users
    held = np.arange(0, ds.n_users, 8)  # 20 new users, 10 per cluster
    known = np.setdiff1d(np.arange(ds.n_users), held)
    keep = np.isin(ds.train.users, known)
    train_known = np.stack([ds.train.users[keep], ds.train.items[keep]], 1)
    cfg = LightGCNConfig(dim=16, epochs=30, batch_size=256, lr=1e-2)
    model = train_lightgcn(
        ds.n_users,
        ds.n_items,
        from_pairs("cs", ds.n_users, ds.n_items, train_known, np.zeros((0, 2))).train,
        cfg,
        seed=0,
    )
    user_emb, item_emb = model.final_embeddings()
    groups = kmeans_user_groups(user_emb[known], 2, seed=0)
    majority = [
        np.bincount(groups.assignment[cluster[known] == c], minlength=2).argmax() for c in (0, 1)
    ]
    assert majority[0] != majority[1]
    degree = np.bincount(train_known[:, 1], minlength=ds.n_items)
    per_user = ds.train.per_user(ds.n_users)
    vecs = np.stack([cold_start_user_vector(per_user[u], item_emb, degree) for u in held])
    assigned = groups.nearest(vecs)
    expected = np.array([majority[c] for c in cluster[held]])
    assert (assigned == expected).mean() >= 0.9


# --- the centralized pipeline ----------------------------------------------------------------

TINY_LGCN = dict(epochs=30, batch_size=256, lr=1e-2, dim=16, num_blocks=4)
BUDGETS = ("10%", "25%", "50%", "100%")
PLANES = ("PEEL bit-planes (G_u=4)", "PEEL bit-planes (G_u=1)")
BLOCKS = ("PEEL blocks (G_u=4)", "PEEL blocks (G_u=1)", "first-k blocks", "random units")
BASELINES = (BEST_DIRECT, MAGNITUDE, MAGNITUDE_INT8)


def _cfg(root):
    return PipelineConfig(
        out_dir=str(root / "out"),
        cache_dir=str(root / "cache"),
        progress=False,
        num_user_groups=(4, 1),
        budgets=BUDGETS,
        lightgcn=LightGCNConfig(**TINY_LGCN),
        peel=PEELConfig(num_item_groups=4, num_blocks=4, epochs=5, batch_size=256),
    )


def _tiny_board():
    return checkerboard(n_users=300, n_items=160, n_clusters=4, p_in=0.25, p_out=0.01, seed=1)


def _other_test(ds):
    """Same train interactions; test keeps only each user's first test item."""
    first = np.r_[True, np.diff(ds.test.users) != 0]
    return from_pairs(
        ds.name,
        ds.n_users,
        ds.n_items,
        np.stack([ds.train.users, ds.train.items], 1),
        np.stack([ds.test.users[first], ds.test.items[first]], 1),
    )


@pytest.fixture(scope="session")
def pipeline_runs(tmp_path_factory):
    """Three runs: A, A again (cache reuse), and B = A's train with a different test set."""
    root_a, root_b = tmp_path_factory.mktemp("run_a"), tmp_path_factory.mktemp("run_b")
    ds_a = _tiny_board()
    ds_b = _other_test(ds_a)
    first = run_centralized(_cfg(root_a), ds_a)
    on_disk = json.loads((root_a / "out" / "results.json").read_text())
    md = (root_a / "out" / "results.md").read_text()
    second = run_centralized(replace(_cfg(root_a), baselines=False), ds_a)
    other = run_centralized(_cfg(root_b), ds_b)
    return dict(
        first=first,
        on_disk=on_disk,
        md=md,
        second=second,
        other=other,
        root_a=root_a,
        root_b=root_b,
        ds_a=ds_a,
        ds_b=ds_b,
    )


def test_run_centralized_outputs(pipeline_runs):
    res, disk = pipeline_runs["first"], pipeline_runs["on_disk"]
    assert disk["rows"] == res["rows"]
    full_bytes = 160 * 16 * 4
    assert disk["layout"]["full_table_bytes"] == full_bytes
    methods = [*PLANES, *BLOCKS, *BASELINES]  # bit-planes first, the baselines last
    assert [(r["budget"], r["method"]) for r in disk["rows"]] == [
        (b, m) for b in BUDGETS for m in methods
    ]
    for r in disk["rows"]:
        assert r["budget_bytes"] == parse_budget(r["budget"], full_bytes)
        assert 0 < r["used_bytes"] <= r["budget_bytes"]
        assert 0.0 <= r["recall@20"] <= 1.0 and 0.0 <= r["ndcg@20"] <= 1.0
    # at 100% the baselines keep every unit with weight 1: exactly the full pretrained table
    for r in disk["rows"]:
        if r["budget"] == "100%" and r["method"] in ("first-k blocks", "random units"):
            assert r["used_bytes"] == full_bytes
            assert r["recall@20"] == pytest.approx(disk["pretrain"]["full_table"]["recall@20"])
            assert r["ndcg@20"] == pytest.approx(disk["pretrain"]["full_table"]["ndcg@20"])
    assert (
        disk["peel"]["PEEL blocks (G_u=4)"]["user_group_sizes"]
        and sum(disk["peel"]["PEEL blocks (G_u=4)"]["user_group_sizes"]) == 300
    )
    md = pipeline_runs["md"]
    for text in (*BUDGETS, "Recall@20"):
        assert text in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0] == "| budget | bytes | " + " | ".join(methods) + " |"
    assert len(table) == 1 + 4 and all(" - |" not in line for line in table)
    # the baselines at the same bytes: within the budget, in their storage
    for r in disk["rows"]:
        if r["method"] == BEST_DIRECT:
            assert r["used_bytes"] == direct_quantization_bytes(160, r["dims"], r["bits"])
            assert 0.0 <= r["val_recall@20"] <= 1.0
        if r["method"] == MAGNITUDE_INT8:
            assert r["storage"] == "bitmap-int8"
            assert r["used_bytes"] == 160 * 16 // 8 + 160 * 2 + r["kept_values"]
    # bit-planes keep PEEL's user groups: one unit order (planes per item group) per K-Means group
    for r in disk["rows"]:
        if r["method"] in PLANES:
            assert len(r["planes_per_group"]) == (4 if "4" in r["method"] else 1)


def test_second_run_reuses_cache_and_is_deterministic(pipeline_runs):
    first, second = pipeline_runs["first"], pipeline_runs["second"]
    assert first["pretrain"]["reused"] is False
    assert second["pretrain"]["reused"] is True
    assert second["pretrain"]["path"] == first["pretrain"]["path"]
    # without the baselines (the second run): the same rows less theirs
    assert second["rows"] == [r for r in first["rows"] if r["method"] not in BASELINES]
    assert (
        second["peel"]["PEEL blocks (G_u=4)"]["unit_weights"]
        == first["peel"]["PEEL blocks (G_u=4)"]["unit_weights"]
    )


def test_learning_never_reads_test_data(pipeline_runs):
    a, b = pipeline_runs["first"], pipeline_runs["other"]
    ds_a, ds_b = pipeline_runs["ds_a"], pipeline_runs["ds_b"]
    np.testing.assert_array_equal(ds_a.train.items, ds_b.train.items)
    assert len(ds_b.test) < len(ds_a.test)
    assert b["pretrain"]["reused"] is False  # B pretrained on its own, in its own cache
    # the evaluation sees the different test sets ...
    assert [r["recall@20"] for r in a["rows"]] != [r["recall@20"] for r in b["rows"]]
    # ... the row-quantization choice is made on validation, so it is the same in both
    chosen = [
        [(r["budget"], r["bits"], r["dims"]) for r in run["rows"] if r["method"] == BEST_DIRECT]
        for run in (a, b)
    ]
    assert chosen[0] == chosen[1] and len(chosen[0]) == 4
    # ... but everything learned is identical
    ta, tb = torch.load(a["pretrain"]["path"]), torch.load(b["pretrain"]["path"])
    assert torch.equal(ta["user_emb"], tb["user_emb"])
    assert torch.equal(ta["item_emb"], tb["item_emb"])
    for name in ("PEEL blocks (G_u=4)", "PEEL blocks (G_u=1)"):
        assert a["peel"][name]["unit_weights"] == b["peel"][name]["unit_weights"]
        assert a["peel"][name]["history"] == b["peel"][name]["history"]
        assert a["peel"][name]["user_group_sizes"] == b["peel"][name]["user_group_sizes"]
    # fine-tuned tables, recomputed from each run's own cache and the pipeline's own pieces
    tables = []
    for ds, root in ((ds_a, pipeline_runs["root_a"]), (ds_b, pipeline_runs["root_b"])):
        cfg = _cfg(root)
        split = split_validation(ds.train, ds.n_users, cfg.val_fraction, seed=cfg.seed)
        pre = pretrain(ds, split.fit, cfg)
        assert pre.reused
        layout = BlockLayout(popularity_item_groups(ds.item_popularity(), 4), 16, 4)
        groups = kmeans_user_groups(pre.user_emb, 4, seed=cfg.seed)
        pees = learn_all_groups(ds, split, pre, groups, ds.item_popularity(), layout, cfg)
        tables.append(pees)
    for pa, pb in zip(*tables, strict=True):
        np.testing.assert_array_equal(pa.item_table, pb.item_table)
        np.testing.assert_array_equal(pa.user_table, pb.user_table)
        np.testing.assert_array_equal(pa.unit_weights, pb.unit_weights)
        np.testing.assert_array_equal(
            np.round(pa.unit_weights, 4).tolist(),
            a["peel"]["PEEL blocks (G_u=4)"]["unit_weights"][pa.group],
        )


def test_run_centralized_rejects_more_groups_than_users(tmp_path):
    ds = from_pairs("t", 3, 8, np.array([(0, 0), (1, 1), (2, 2), (0, 3)]), np.array([(1, 4)]))
    cfg = PipelineConfig(
        out_dir=str(tmp_path / "o"),
        cache_dir=str(tmp_path / "c"),
        progress=False,
        num_user_groups=(4,),
        lightgcn=LightGCNConfig(dim=4, num_blocks=2),
        peel=PEELConfig(num_item_groups=2, num_blocks=2),
    )
    with pytest.raises(ValueError, match="more user groups"):
        run_centralized(cfg, ds)
    assert not (tmp_path / "c").exists()


def test_pretrain_cache_key_is_unchanged_without_nested_dims():
    """The keys below were computed before ``nested_dims`` existed: plain models keep their
    cached files; a nested model gets its own key."""
    from peel_fed.pipeline import _pretrain_key

    ds = from_pairs("tiny", 3, 4, np.array([(0, 0), (0, 1), (1, 1), (2, 1), (2, 2)]), [])
    small = LightGCNConfig(dim=16, epochs=5, batch_size=1024, diversity_weight=0.0, num_blocks=1)
    legacy = PipelineConfig(lightgcn=LightGCNConfig(diversity_weight=0.01))  # the old default
    assert _pretrain_key(ds, ds.train, legacy) == "8b434ed16428ed5e"
    assert _pretrain_key(ds, ds.train, PipelineConfig()) != "8b434ed16428ed5e"  # DNS + cosine
    assert _pretrain_key(ds, ds.train, PipelineConfig(lightgcn=small, seed=3)) == "bed616946a1d0e22"
    keys = {
        _pretrain_key(ds, ds.train, PipelineConfig(lightgcn=LightGCNConfig(nested_dims=dims)))
        for dims in ((), (2, 4), (2, 4, 8))
    }
    assert len(keys) == 3


def test_federated_kmeans_from_partial_sums_equals_lloyd_on_all_users():
    from peel_fed.clustering import initial_centroids, kmeans_partial_sums, kmeans_step

    rng = np.random.default_rng(4)
    users = np.concatenate([rng.normal(c, 0.3, size=(40, 8)) for c in (-2.0, 0.0, 2.0)])
    items = rng.normal(size=(30, 8))
    centroids = initial_centroids(items, 3, seed=0)
    reference = centroids.copy()
    for _ in range(5):
        parts = [kmeans_partial_sums(chunk, centroids) for chunk in np.array_split(users, 7)]
        centroids = kmeans_step(sum(p[0] for p in parts), sum(p[1] for p in parts), centroids)
        # plain Lloyd step on all users at once (normalised vectors, nearest centroid)
        x = users / np.linalg.norm(users, axis=1, keepdims=True)
        labels = np.argmin(((x[:, None] - reference[None]) ** 2).sum(-1), axis=1)
        reference = np.stack(
            [x[labels == g].mean(0) if (labels == g).any() else reference[g] for g in range(3)]
        )
        np.testing.assert_allclose(centroids, reference, atol=1e-12)
