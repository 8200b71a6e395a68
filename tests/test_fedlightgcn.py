"""Federated LightGCN pretraining (the algorithm, no transport)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peel_fed.fedlightgcn import FedLightGCN, FedLightGCNConfig, train_fed_lightgcn
from peel_fed.lightgcn import LightGCNConfig, normalized_adjacency, propagate, train_lightgcn
from peel_fed.metrics import evaluate_ranking
from peel_fed.scoring import dot_score_fn
from peel_fed.synthetic import checkerboard

CFG = FedLightGCNConfig(dim=16, layers=3, rounds=0, cohort_fraction=0.5)


def _board():
    return checkerboard(n_users=120, n_items=80, n_clusters=2, p_in=0.3, p_out=0.02, seed=3)


def _model(ds, cfg=CFG):
    return FedLightGCN(ds.n_users, ds.n_items, ds.train, ds.item_popularity(), cfg, seed=7)


def test_fresh_contributions_reproduce_centralized_propagation():
    ds = _board()
    fed = _model(ds)
    fed.initialise()
    users, items = fed.final_embeddings()
    adj = normalized_adjacency(ds.n_users, ds.n_items, ds.train)
    ref = propagate(adj, torch.cat([fed.U0, fed.E0]), 3).numpy()
    np.testing.assert_allclose(users, ref[: ds.n_users], atol=1e-5)
    np.testing.assert_allclose(items, ref[ds.n_users :], atol=1e-5)


def test_item_side_sums_equal_the_devices_last_contributions():
    ds = _board()
    fed = _model(ds)
    fed.initialise()
    rng = np.random.default_rng(0)
    for _ in range(3):
        fed.run_round(np.sort(rng.choice(ds.n_users, 50, replace=False)), num_nodes=3)
    for k in range(CFG.layers):
        expected = torch.zeros(ds.n_items, CFG.dim)
        expected.index_add_(
            0, torch.from_numpy(ds.train.items), fed.contrib[k][torch.from_numpy(ds.train.users)]
        )
        np.testing.assert_allclose(fed.S[k].numpy(), expected.numpy(), atol=1e-4)


def _packed_twice(cfg: FedLightGCNConfig, rounds: int = 3) -> tuple[FedLightGCN, FedLightGCN]:
    """The same federation after ``rounds`` rounds of every other user, packed into 1 node and
    into 7 nodes."""
    ds = _board()
    a, b = _model(ds, cfg), _model(ds, cfg)
    a.initialise()
    b.initialise()
    cohort = np.arange(0, ds.n_users, 2)
    for _ in range(rounds):
        a.run_round(cohort, num_nodes=1)
        b.run_round(cohort, num_nodes=7)
    return a, b


def test_packing_users_into_nodes_does_not_change_the_result():
    a, b = _packed_twice(CFG)
    np.testing.assert_allclose(a.E0.numpy(), b.E0.numpy(), atol=1e-5)
    np.testing.assert_allclose(a.U0.numpy(), b.U0.numpy(), atol=1e-5)
    np.testing.assert_allclose(a.S.numpy(), b.S.numpy(), atol=1e-4)


def test_federated_pretraining_learns_the_checkerboard_nearly_as_well_as_centralized():
    ds = _board()
    # one local step: on this tiny, dense board more local steps over-fit the user vectors
    # (Recall@20 0.69 with 1 step, 0.58 with 20); the default of 20 is tuned on Gowalla
    fed_cfg = FedLightGCNConfig(
        dim=16, rounds=60, cohort_fraction=0.5, server_lr=2e-2, user_lr=2e-2, local_steps=1
    )
    fed = train_fed_lightgcn(ds.n_users, ds.n_items, ds.train, ds.item_popularity(), fed_cfg)
    u, v = fed.final_embeddings()
    fed_recall = evaluate_ranking(dot_score_fn(u, v), ds.n_users, ds.train, ds.test)["recall@20"]
    central = train_lightgcn(
        ds.n_users, ds.n_items, ds.train, LightGCNConfig(dim=16, epochs=30, batch_size=256, lr=1e-2)
    )
    cu, cv = central.final_embeddings()
    c_recall = evaluate_ranking(dot_score_fn(cu, cv), ds.n_users, ds.train, ds.test)["recall@20"]
    candidates = ds.n_items - np.bincount(ds.train.users, minlength=ds.n_users).mean()
    assert fed_recall > 2 * 20 / candidates  # far above a random ranking
    assert fed_recall >= 0.9 * c_recall


def test_same_seed_same_numbers():
    ds = _board()
    cfg = FedLightGCNConfig(dim=16, rounds=4, cohort_fraction=0.5)
    a = train_fed_lightgcn(ds.n_users, ds.n_items, ds.train, ds.item_popularity(), cfg, seed=1)
    b = train_fed_lightgcn(ds.n_users, ds.n_items, ds.train, ds.item_popularity(), cfg, seed=1)
    c = train_fed_lightgcn(ds.n_users, ds.n_items, ds.train, ds.item_popularity(), cfg, seed=2)
    assert torch.equal(a.E0, b.E0) and torch.equal(a.U0, b.U0)
    assert not torch.equal(a.E0, c.E0)


DNS_CFG = FedLightGCNConfig(
    dim=16,
    layers=3,
    rounds=6,
    cohort_fraction=0.5,
    negative_sampling="dns",
    dns_candidates=8,
    lr_schedule="cosine",
)


def test_dns_and_cosine_packing_does_not_change_the_result():
    """Each user's DNS candidates come from its own generator in chunks of its own pairs, so
    packing users into 1 or 7 nodes gives the same tables."""
    ds = _board()
    a, b = _packed_twice(DNS_CFG)
    cohort = np.arange(0, ds.n_users, 2)
    np.testing.assert_allclose(a.E0.numpy(), b.E0.numpy(), atol=1e-5)
    np.testing.assert_allclose(a.U0.numpy(), b.U0.numpy(), atol=1e-5)
    plain = _model(ds, CFG)
    plain.initialise()
    for _ in range(3):
        plain.run_round(cohort, num_nodes=1)
    assert not np.allclose(plain.E0.numpy(), a.E0.numpy(), atol=1e-3)


def test_device_dns_picks_each_pairs_hardest_candidate_that_is_not_a_positive():
    """Recomputed by brute force: every pair's negative is a non-positive item scoring at least
    as high, for its user, as every other non-positive candidate of its chunk."""
    from peel_fed.fedlightgcn import DNS_STREAM
    from peel_fed.negatives import DNS_CHUNK
    from peel_fed.partition import user_rng

    ds = _board()
    fed = _model(ds, DNS_CFG)
    fed.initialise()
    dev = fed.devices
    users = np.arange(0, ds.n_users, 3)
    layers = [t.detach() for t in fed.server.item_layers()]
    lo, hi = dev.bounds[users], dev.bounds[users + 1]
    owner = np.repeat(np.arange(users.size), hi - lo)
    first = dev._negatives(users, 1)
    local = torch.from_numpy(dev._local(users))
    neg = dev._dns_negatives(users, local, layers, 1, owner, first)
    uf = torch.stack(dev.user_layers(users, dev.U0[local], layers)).mean(0).numpy()
    items = torch.stack(layers).mean(0).numpy()
    liked = np.zeros((ds.n_users, ds.n_items), dtype=bool)
    liked[ds.train.users, ds.train.items] = True
    assert not liked[users[owner], neg].any()
    for j, u in enumerate(users):
        mine = np.flatnonzero(owner == j)
        chunks = -(-mine.size // DNS_CHUNK)
        shared = user_rng(7, int(u), DNS_STREAM + 1).integers(0, ds.n_items, (chunks, 7))
        for r, pair in enumerate(mine):
            cand = np.concatenate([[first[pair]], shared[r // DNS_CHUNK]])
            cand = cand[~liked[u, cand]]
            assert items[neg[pair]] @ uf[j] >= (items[cand] @ uf[j]).max() - 1e-5
    assert (neg != first).mean() > 0.5  # most pairs found a harder negative than the first


def test_cosine_schedule_sets_the_round_learning_rates():
    from peel_fed.fedlightgcn import lr_factor

    assert lr_factor(DNS_CFG, 1) == 1.0
    assert lr_factor(DNS_CFG, 4) == pytest.approx(0.5)
    assert lr_factor(CFG, 4) == 1.0
    ds = _board()
    fed = _model(ds, DNS_CFG)
    fed.initialise()
    for _ in range(4):
        fed.run_round(np.arange(0, ds.n_users, 2))
    assert fed.server.item_adam.lr == pytest.approx(DNS_CFG.server_lr * 0.5)
    assert fed.devices.user_adam.lr == pytest.approx(DNS_CFG.user_lr * 0.5)


def test_federated_dns_cosine_learns_the_checkerboard():
    ds = _board()
    cfg = FedLightGCNConfig(
        dim=16,
        rounds=60,
        cohort_fraction=0.5,
        server_lr=2e-2,
        user_lr=2e-2,
        local_steps=1,
        negative_sampling="dns",
        dns_candidates=4,
        lr_schedule="cosine",
    )
    fed = train_fed_lightgcn(ds.n_users, ds.n_items, ds.train, ds.item_popularity(), cfg)
    u, v = fed.final_embeddings()
    recall = evaluate_ranking(dot_score_fn(u, v), ds.n_users, ds.train, ds.test)["recall@20"]
    candidates = ds.n_items - np.bincount(ds.train.users, minlength=ds.n_users).mean()
    assert recall > 2 * 20 / candidates


def test_the_sgd_server_step_is_heavy_ball_momentum_on_the_mean_and_adam_is_not():
    """``server-optimizer=sgd``: E0 rows move by -lr * m, m = 0.9 m + g (g the mean over the
    devices that touched the row); untouched rows stay; unknown names are one-line errors."""
    from peel_fed.fedlightgcn import DeviceUpdate, FedLightGCNConfig, PretrainServer

    cfg = FedLightGCNConfig(dim=2, layers=1, server_lr=0.5, server_optimizer="sgd")
    server = PretrainServer(3, np.array([1, 1, 1]), cfg, seed=0)
    start = server.E0.clone()
    g = torch.tensor([[1.0, -2.0], [3.0, 0.0]])  # two devices' sums on row 1: mean (2, -1)

    def update() -> DeviceUpdate:
        return DeviceUpdate(
            np.array([1]), g[:1] + g[1:], np.array([2]), np.zeros(0, dtype=np.int64),
            torch.zeros(1, 0, 2), 0.0, 2,
        )  # fmt: skip

    server.apply([update()])
    mean = torch.tensor([2.0, -1.0])
    assert torch.allclose(server.E0[1], start[1] - 0.5 * mean)
    server.apply([update()])
    assert torch.allclose(server.E0[1], start[1] - 0.5 * mean - 0.5 * 1.9 * mean)
    assert torch.equal(server.E0[[0, 2]], start[[0, 2]])
    adam = PretrainServer(3, np.array([1, 1, 1]), FedLightGCNConfig(dim=2, layers=1, server_lr=0.5))
    adam.apply([update()])
    assert torch.allclose(adam.E0[1], start[1] - 0.5 * torch.sign(mean), atol=1e-6)
    with pytest.raises(ValueError, match="pretrain-server-optimizer must be one of adam, sgd"):
        FedLightGCNConfig(server_optimizer="rmsprop")
