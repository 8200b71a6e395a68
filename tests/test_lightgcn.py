"""LightGCN: sparse normalisation and propagation against dense references, training behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peel_fed.data import from_pairs
from peel_fed.lightgcn import (
    LightGCN,
    LightGCNConfig,
    block_redundancy,
    normalized_adjacency,
    propagate,
    train_lightgcn,
)
from peel_fed.metrics import evaluate_ranking
from peel_fed.negatives import NegativeSampler
from peel_fed.scoring import dot_score_fn

# 3 users, 4 items; item 3 has no interactions (zero degree).
N_USERS, N_ITEMS = 3, 4
EDGES = [(0, 0), (0, 1), (1, 1), (2, 1), (2, 2)]


def _tiny():
    return from_pairs("tiny", N_USERS, N_ITEMS, np.array(EDGES), np.zeros((0, 2))).train


def _dense_norm_adj() -> np.ndarray:
    n = N_USERS + N_ITEMS
    a = np.zeros((n, n))
    for u, i in EDGES:
        a[u, N_USERS + i] = a[N_USERS + i, u] = 1.0
    deg = a.sum(1)
    inv = np.array([1 / np.sqrt(d) if d > 0 else 0.0 for d in deg])
    return inv[:, None] * a * inv[None, :]


def test_normalized_adjacency_matches_dense_and_is_sparse():
    adj = normalized_adjacency(N_USERS, N_ITEMS, _tiny())
    assert adj.layout == torch.sparse_csr
    assert adj._nnz() == 2 * len(EDGES)
    ref = _dense_norm_adj()
    # spot check by hand: user 0 (degree 2) -- item 1 (degree 3)
    assert ref[0, N_USERS + 1] == pytest.approx(1 / np.sqrt(6))
    np.testing.assert_allclose(adj.to_dense().numpy(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layers", [0, 1, 3])
def test_propagate_and_gradient_match_dense(layers):
    adj = normalized_adjacency(N_USERS, N_ITEMS, _tiny())
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(N_USERS + N_ITEMS, 4, generator=gen)
    w = torch.randn(N_USERS + N_ITEMS, 4, generator=gen)

    ego = x0.clone().requires_grad_(True)
    out = propagate(adj, ego, layers)
    (out * w).sum().backward()

    a = torch.from_numpy(_dense_norm_adj())
    ego_d = x0.double().clone().requires_grad_(True)
    x, acc = ego_d, ego_d
    for _ in range(layers):
        x = a @ x
        acc = acc + x
    out_d = acc / (layers + 1)
    (out_d * w.double()).sum().backward()

    np.testing.assert_allclose(out.detach().numpy(), out_d.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ego.grad.numpy(), ego_d.grad.numpy(), rtol=1e-5, atol=1e-6)


def own_cluster_top10_share(ds, user_emb: np.ndarray, item_emb: np.ndarray) -> float:
    """On a two-cluster board: the share of users whose top 10 unseen items are all in their
    own cluster."""
    user_cluster = np.arange(ds.n_users) * 2 // ds.n_users
    item_cluster = np.arange(ds.n_items) * 2 // ds.n_items
    scores = user_emb @ item_emb.T
    scores[ds.train.users, ds.train.items] = -np.inf
    top10 = np.argsort(-scores, axis=1)[:, :10]
    return float((item_cluster[top10] == user_cluster[:, None]).all(axis=1).mean())


def test_checkerboard_known_answer(board, board_model):
    _, user_emb, item_emb = board_model
    ds = board
    assert own_cluster_top10_share(ds, user_emb, item_emb) >= 0.95

    out = evaluate_ranking(dot_score_fn(user_emb, item_emb), ds.n_users, ds.train, ds.test)
    # a uniformly random ranking of a user's candidates hits each test item with prob 20/|cand|
    deg = ds.user_degree()
    has_test = np.bincount(ds.test.users, minlength=ds.n_users) > 0
    random_recall = float(np.mean(20 / (ds.n_items - deg[has_test])))
    assert random_recall < 0.35
    assert out["recall@20"] > 2 * random_recall


def _train(seed: int, epochs: int = 3):
    ds = from_pairs("tiny", N_USERS, N_ITEMS, np.array(EDGES), np.zeros((0, 2)))
    cfg = LightGCNConfig(dim=8, epochs=epochs, batch_size=2, lr=1e-2, num_blocks=2)
    return train_lightgcn(ds.n_users, ds.n_items, ds.train, cfg, seed=seed).final_embeddings()


def test_training_is_seeded():
    a, b, c = _train(7), _train(7), _train(8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[1], c[1])


def test_block_redundancy_hand_cases():
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    e = np.eye(4)
    # rows of 3 blocks of 4 values; blocks within a row are mutually orthogonal
    ortho = np.stack(
        [
            np.concatenate([2 * e[0], -0.5 * e[1], 3 * e[2]]),
            np.concatenate([q[:, 0], q[:, 1], 5 * q[:, 3]]),
        ]
    )
    assert float(block_redundancy(torch.tensor(ortho), 3)) == pytest.approx(0.0, abs=1e-12)
    v = np.array([1.0, -2.0, 0.5, 3.0])
    same = np.stack([np.concatenate([v, v, v]), np.concatenate([v, 2 * v, v])])
    assert float(block_redundancy(torch.tensor(same), 3)) == pytest.approx(1.0)
    # two blocks at 60 degrees: cos = 1/2, mean squared off-diagonal cosine = 1/4
    half = np.array([[1.0, 0.0, 0.5, np.sqrt(3) / 2]])
    assert float(block_redundancy(torch.tensor(half), 2)) == pytest.approx(0.25)
    assert float(block_redundancy(torch.tensor(half), 1)) == 0.0


def test_diversity_regulariser_lowers_redundancy(board_model, board_model_diverse):
    _, _, items_plain = board_model
    _, items_div = board_model_diverse
    plain = float(block_redundancy(torch.from_numpy(items_plain), 4))
    div = float(block_redundancy(torch.from_numpy(items_div), 4))
    assert div < 0.5 * plain


def test_negative_sampler_never_returns_positives():
    rng = np.random.default_rng(0)
    n_users, n_items = 50, 30
    likes = rng.random((n_users, n_items)) < 0.9  # dense: plain rejection runs out of rounds
    likes[:, 0] = False  # every user has at least one negative
    likes[0, 1:] = True  # user 0 has exactly one negative: item 0
    u, i = np.nonzero(likes)
    known = from_pairs("d", n_users, n_items, np.stack([u, i], 1), np.zeros((0, 2))).train
    sampler = NegativeSampler(known, n_items)
    users = np.repeat(np.arange(n_users), 200)
    neg = sampler.sample(users, rng)
    assert neg.min() >= 0 and neg.max() < n_items
    assert not likes[users, neg].any()
    assert (neg[users == 0] == 0).all()
    np.testing.assert_array_equal(sampler.is_known(u, i), np.ones(u.size, dtype=bool))


def test_negative_sampler_user_with_every_item():
    known = from_pairs("d", 1, 3, np.array([(0, 0), (0, 1), (0, 2)]), np.zeros((0, 2))).train
    with pytest.raises(ValueError, match="every item"):
        NegativeSampler(known, 3).sample(np.array([0]), np.random.default_rng(0))


@pytest.mark.parametrize("nested", [(0,), (8,), (2, 2), (4, 2), (-1, 4)])
def test_nested_dims_must_be_increasing_prefixes(nested):
    with pytest.raises(ValueError, match=r"nested dims must be strictly increasing .*\(0, 8\)"):
        LightGCNConfig(dim=8, nested_dims=nested)
    assert LightGCNConfig(dim=8, nested_dims=[1, 4, 7]).prefix_dims == (1, 4, 7, 8)


def _hand_model(nested: tuple[int, ...]) -> LightGCN:
    """1 user, 2 items, d = 3, no propagation (final = ego) and no L2: the loss is BPR alone."""
    cfg = LightGCNConfig(dim=3, layers=0, l2=0.0, nested_dims=nested)
    adj = normalized_adjacency(1, 2, from_pairs("h", 1, 2, np.array([(0, 0)]), []).train)
    model = LightGCN(1, 2, adj, cfg)
    with torch.no_grad():
        model.embedding.copy_(
            torch.tensor([[1.0, 2.0, -1.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # user, pos, neg
        )
    return model


def test_nested_loss_is_the_mean_of_prefix_bpr_losses():
    """Scores (pos, neg) by prefix: d=1: (1, 0); d=2: (1, 2); d=3: (0, 1)."""
    users, pos, neg = torch.tensor([0]), torch.tensor([0]), torch.tensor([1])

    def softplus(x: float) -> float:
        return float(np.log1p(np.exp(x)))

    plain, _ = _hand_model(()).loss(users, pos, neg)
    assert float(plain.detach()) == pytest.approx(softplus(1 - 0))
    nested, parts = _hand_model((1, 2)).loss(users, pos, neg)
    expected = (softplus(0 - 1) + softplus(2 - 1) + softplus(1 - 0)) / 3
    assert float(nested.detach()) == pytest.approx(expected, rel=1e-6)
    assert parts["bpr"] == pytest.approx(expected, rel=1e-6)


def test_nested_training_makes_a_two_dim_prefix_rank_the_own_cluster_first():
    """Four clusters: after nested training the first 2 dims alone put an own-cluster item on
    top for (nearly) every user; the plain model's first 2 dims do not."""
    from peel_fed.synthetic import checkerboard

    ds = checkerboard(n_users=120, n_items=80, n_clusters=4, p_in=0.3, p_out=0.0)
    user_cluster = np.arange(ds.n_users) * 4 // ds.n_users
    item_cluster = np.arange(ds.n_items) * 4 // ds.n_items

    def top1_own(nested: tuple[int, ...]) -> float:
        cfg = LightGCNConfig(dim=16, epochs=100, batch_size=256, lr=5e-2, nested_dims=nested)
        users, items = train_lightgcn(ds.n_users, ds.n_items, ds.train, cfg).final_embeddings()
        scores = users[:, :2] @ items[:, :2].T
        scores[ds.train.users, ds.train.items] = -np.inf
        return float((item_cluster[scores.argmax(1)] == user_cluster).mean())

    assert top1_own((2,)) >= 0.95
    assert top1_own(()) <= 0.7


def test_unknown_loss_and_bad_softmax_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="loss must be one of bpr, softmax, got 'hinge'"):
        LightGCNConfig(loss="hinge")
    with pytest.raises(ValueError, match="negatives and temperature must be positive"):
        LightGCNConfig(loss="softmax", temperature=0.0)


def test_softmax_loss_by_hand():
    """1 user, a positive and 2 shared negatives, no propagation and no L2. Cosines (user,
    item): pos 1/sqrt(2), negatives 0 and -1/sqrt(2); at temperature 0.5 the loss is
    ``log(e^{a} + e^{0} + e^{-a}) - a`` with ``a = 2 / sqrt(2)``."""
    cfg = LightGCNConfig(dim=2, layers=0, l2=0.0, loss="softmax", temperature=0.5)
    adj = normalized_adjacency(1, 3, from_pairs("h", 1, 3, np.array([(0, 0)]), []).train)
    model = LightGCN(1, 3, adj, cfg)
    with torch.no_grad():  # user, pos, neg 1, neg 2 (norms differ: cosine ignores them)
        model.embedding.copy_(torch.tensor([[2.0, 0.0], [3.0, 3.0], [0.0, 5.0], [-1.0, -1.0]]))
    loss, parts = model.loss(torch.tensor([0]), torch.tensor([0]), torch.tensor([1, 2]))
    a = 2 / np.sqrt(2)
    expected = float(np.log(np.exp(a) + 1 + np.exp(-a)) - a)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert parts["softmax"] == pytest.approx(expected, rel=1e-6)
    # exported rows are unit-norm, so their dot product is the cosine the loss trained
    users, items = model.final_embeddings()
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, rtol=1e-6)
    assert float(users[0] @ items[0]) == pytest.approx(1 / np.sqrt(2), rel=1e-6)


def test_softmax_checkerboard_known_answer(board):
    """The sampled-softmax model ranks a user's own cluster first, like the BPR one."""
    ds = board
    cfg = LightGCNConfig(
        dim=16, epochs=40, batch_size=256, lr=5e-2, loss="softmax", negatives=32, num_blocks=2
    )
    user_emb, item_emb = train_lightgcn(ds.n_users, ds.n_items, ds.train, cfg).final_embeddings()
    assert own_cluster_top10_share(ds, user_emb, item_emb) >= 0.95


def test_pretrain_cache_key_keeps_bpr_keys_and_separates_softmax():
    """BPR models keep the keys (and cached files) they had before the softmax loss existed:
    the softmax fields do not enter a BPR key, and every softmax setting gets its own key."""
    from dataclasses import replace

    from peel_fed.pipeline import PipelineConfig, _pretrain_key

    ds = from_pairs("tiny", N_USERS, N_ITEMS, np.array(EDGES), np.zeros((0, 2)))
    base = PipelineConfig(lightgcn=LightGCNConfig())  # uniform BPR at a constant rate

    def key(**lightgcn) -> str:
        lightgcn_cfg = replace(base.lightgcn, **lightgcn)
        return _pretrain_key(ds, ds.train, replace(base, lightgcn=lightgcn_cfg))

    assert key() == key(negatives=7, temperature=0.9)
    softmax = key(loss="softmax")
    assert softmax != key()
    assert softmax != key(loss="softmax", negatives=7)


def test_dns_negative_is_the_top_scored_candidate_that_is_not_a_positive():
    """Hand scores, chunks of 2 rows: users 0 = (1, 0), 1 = (0, 1); items 0..3 = (3, 0), (0, 3),
    (1, 1), (2, 2). Rows (user, first negative): (0, 2), (1, 2), (0, 2). Rows 0-1 share the
    candidates [0, 3], row 2 has [1, 3]. User 0 likes item 0: row 0 scores [1, 3, 2], masks its
    positive 0 and takes item 3; row 1 scores [1, 0, 2] and takes 3; row 2 scores [1, 0, 2] and
    takes 3. With only the first negative, every row takes it."""
    from peel_fed.negatives import dns_negatives

    user_final = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    item_final = torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 1.0], [2.0, 2.0]])
    known = from_pairs("k", 2, 4, np.array([(0, 0), (1, 1)]), np.zeros((0, 2))).train
    sampler = NegativeSampler(known, 4)
    users, first = np.array([0, 1, 0]), np.array([2, 2, 2])
    shared = np.array([[0, 3], [1, 3]])
    neg = dns_negatives(user_final[users], item_final, users, first, shared, sampler, chunk=2)
    assert neg.tolist() == [3, 3, 3]
    # make item 3 the worst for both users
    item_final[3] = torch.tensor([-1.0, -1.0])
    neg = dns_negatives(user_final[users], item_final, users, first, shared, sampler, chunk=2)
    assert neg.tolist() == [2, 2, 2]  # row 0: 0 is masked, 2 beats 3; rows 1-2 likewise
    users = np.array([1, 1, 1])
    neg = dns_negatives(user_final[users], item_final, users, first, shared, sampler, chunk=2)
    # rows 0-1: the first negative 2 (score 1) beats 0 (0) and 3 (-1); row 2: item 1 (3) is
    # user 1's positive, so it is masked and the first negative wins again
    assert neg.tolist() == [2, 2, 2]
    only_first = dns_negatives(
        user_final[users], item_final, users, first, shared[:, :0], sampler, 2
    )
    assert only_first.tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="do not cover 3 rows"):
        dns_negatives(user_final[users], item_final, users, first, shared[:1], sampler, chunk=2)


def test_cosine_schedule_by_hand():
    from peel_fed.lightgcn import cosine_lr

    assert cosine_lr(0.02, 0, 10) == pytest.approx(0.02)
    assert cosine_lr(0.02, 5, 10) == pytest.approx(0.01)
    assert cosine_lr(0.02, 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(0.02, 12, 10) == pytest.approx(0.0, abs=1e-12)


def test_dns_cosine_checkerboard_known_answer(board):
    """Trained with hard negatives and a decaying rate, the model still ranks a user's own
    cluster first. (This does not catch an inverted positive mask, which mostly trades one
    positive against another here: the hand test above does.)

    Few candidates: on this board every unseen own-cluster item is a held-out positive, so the
    hardest of many candidates is usually a false negative (8 candidates over 40 epochs drop
    the share below 0.85); on Gowalla's 41k items that is rare."""
    ds = board
    cfg = LightGCNConfig(
        dim=16,
        epochs=20,
        batch_size=256,
        lr=5e-2,
        num_blocks=2,
        negative_sampling="dns",
        dns_candidates=4,
        lr_schedule="cosine",
    )
    user_emb, item_emb = train_lightgcn(ds.n_users, ds.n_items, ds.train, cfg).final_embeddings()
    assert own_cluster_top10_share(ds, user_emb, item_emb) >= 0.95


def test_dns_and_schedule_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="negative sampling must be one of uniform, dns, got 'x'"):
        LightGCNConfig(negative_sampling="x")
    with pytest.raises(ValueError, match="dns needs the bpr loss"):
        LightGCNConfig(negative_sampling="dns", loss="softmax")
    with pytest.raises(ValueError, match="dns candidates must be >= 1, got 0"):
        LightGCNConfig(negative_sampling="dns", dns_candidates=0)
    with pytest.raises(ValueError, match="lr schedule must be one of constant, cosine, got 'step'"):
        LightGCNConfig(lr_schedule="step")


def test_pretrain_cache_key_keeps_uniform_keys_and_separates_dns_and_schedule():
    from dataclasses import replace

    from peel_fed.pipeline import PipelineConfig, _pretrain_key

    ds = from_pairs("tiny", N_USERS, N_ITEMS, np.array(EDGES), np.zeros((0, 2)))
    base = PipelineConfig(lightgcn=LightGCNConfig())  # uniform BPR at a constant rate

    def key(**lightgcn) -> str:
        return _pretrain_key(
            ds, ds.train, replace(base, lightgcn=replace(base.lightgcn, **lightgcn))
        )

    assert key() == key(dns_candidates=7)
    keys = {
        key(),
        key(negative_sampling="dns"),
        key(negative_sampling="dns", dns_candidates=7),
        key(lr_schedule="cosine"),
        key(negative_sampling="dns", lr_schedule="cosine"),
    }
    assert len(keys) == 5
