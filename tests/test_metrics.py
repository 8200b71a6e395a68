"""Recall@K / NDCG@K against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from peel_fed.data import Interactions, TrainValSplit, from_pairs
from peel_fed.metrics import evaluate_ranking, per_user_metrics, validation_recall
from peel_fed.scoring import dot_score_fn

# 6 items, 3 users.
# user 0: train {0}, test {2, 4}; item 0 (train) has the top score and must be skipped.
# user 1: train {3, 5}, test {0}; both train items outscore everything else.
# user 2: train {1}, no test items -> not evaluated.
SCORES = torch.tensor(
    [
        [10.0, 5.0, 4.0, 3.0, 2.0, 1.0],
        [1.0, 7.0, 6.0, 8.0, 0.5, 9.0],
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
    ]
)
TRAIN = np.array([(0, 0), (1, 3), (1, 5), (2, 1)])
TEST = np.array([(0, 2), (0, 4), (1, 0)])


def _score(batch: np.ndarray) -> torch.Tensor:
    return SCORES[torch.from_numpy(batch)]


def test_hand_example():
    ds = from_pairs("hand", 3, 6, TRAIN, TEST)
    out = evaluate_ranking(_score, 3, ds.train, ds.test, ks=(2, 4))
    d = [1.0 / math.log2(r + 2) for r in range(4)]  # discounts for ranks 0..3
    # user 0 ranking without item 0: 1, 2, 3, 4, 5  -> hits at ranks 1 and 3
    r0_2, n0_2 = 1 / 2, d[1] / (d[0] + d[1])
    r0_4, n0_4 = 2 / 2, (d[1] + d[3]) / (d[0] + d[1])
    # user 1 ranking without items 5, 3: 1, 2, 0, 4 -> hit at rank 2; IDCG uses 1 positive
    r1_2, n1_2 = 0.0, 0.0
    r1_4, n1_4 = 1.0, d[2] / d[0]
    assert out["users"] == 2
    assert out["recall@2"] == pytest.approx((r0_2 + r1_2) / 2)
    assert out["ndcg@2"] == pytest.approx((n0_2 + n1_2) / 2)
    assert out["recall@4"] == pytest.approx((r0_4 + r1_4) / 2)
    assert out["ndcg@4"] == pytest.approx((n0_4 + n1_4) / 2)
    per = per_user_metrics(_score, 3, ds.train, ds.test, ks=(2, 4))
    np.testing.assert_array_equal(per["user"], [0, 1])
    np.testing.assert_allclose(per["ndcg@4"], [n0_4, n1_4])


def test_train_items_are_excluded():
    """Without exclusion the hand example would score differently: the exclusion matters."""
    ds = from_pairs("hand", 3, 6, TRAIN, TEST)
    no_train = from_pairs("hand", 3, 6, np.zeros((0, 2), dtype=np.int64), TEST)
    with_ex = evaluate_ranking(_score, 3, ds.train, ds.test, ks=(4,))
    without = evaluate_ranking(_score, 3, no_train.train, no_train.test, ks=(4,))
    # no exclusion: user 0 top-4 = 0,1,2,3 (1 hit); user 1 top-4 = 5,3,1,2 (0 hits)
    assert without["recall@4"] == pytest.approx((1 / 2 + 0) / 2)
    assert with_ex["recall@4"] == pytest.approx(1.0)


def test_restricting_users():
    ds = from_pairs("hand", 3, 6, TRAIN, TEST)
    out = evaluate_ranking(_score, 3, ds.train, ds.test, ks=(2,), users=np.array([1, 2]))
    assert out["users"] == 1  # user 2 has no test items
    assert out["recall@2"] == 0.0


def test_batching_does_not_change_results():
    rng = np.random.default_rng(0)
    n_users, n_items = 37, 25
    likes = rng.random((n_users, n_items)) < 0.3
    test_mask = likes & (rng.random((n_users, n_items)) < 0.3)
    train = np.argwhere(likes & ~test_mask)
    test = np.argwhere(test_mask)
    ds = from_pairs("r", n_users, n_items, train, test)
    ue = rng.normal(size=(n_users, 4)).astype(np.float32)
    ie = rng.normal(size=(n_items, 4)).astype(np.float32)
    score = dot_score_fn(ue, ie)
    a = evaluate_ranking(score, n_users, ds.train, ds.test, ks=(5, 10), batch_size=1)
    b = evaluate_ranking(score, n_users, ds.train, ds.test, ks=(5, 10), batch_size=1000)
    assert a["users"] == float((np.bincount(test[:, 0], minlength=n_users) > 0).sum())
    assert a == pytest.approx(b, abs=1e-12)

    # independent reference: plain numpy ranking per user
    full = ue.astype(np.float64) @ ie.T.astype(np.float64)
    rec, nd = [], []
    for u in range(n_users):
        truth = set(np.flatnonzero(test_mask[u]).tolist())
        if not truth:
            continue
        cand = [i for i in np.argsort(-full[u]) if not (likes[u, i] and not test_mask[u, i])]
        top = cand[:10]
        hits = [1.0 if i in truth else 0.0 for i in top]
        rec.append(sum(hits) / len(truth))
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(truth), 10)))
        nd.append(dcg / idcg)
    assert a["recall@10"] == pytest.approx(np.mean(rec))
    assert a["ndcg@10"] == pytest.approx(np.mean(nd))


def test_validation_recall_ranks_without_fit_items_against_validation_items():
    """Train = fit + validation: user 0 fit {0}, val {1}; user 1 fit {3, 5}, val {0}; user 2
    has no validation item (skipped). Top-2 without fit items: user 0 {1, 2} (hit), user 1
    {1, 2} (miss): Recall@2 = 1/2. Excluding all training items, or aiming at test (item 4),
    would give 0."""
    ds = from_pairs(
        "hand", 3, 6, [(0, 0), (0, 1), (1, 0), (1, 3), (1, 5), (2, 1)], [(0, 4), (1, 4)]
    )
    split = TrainValSplit(
        fit=Interactions(np.array([0, 1, 1, 2]), np.array([0, 3, 5, 1])),
        val=Interactions(np.array([0, 1]), np.array([1, 0])),
    )
    assert validation_recall(_score, ds, split, k=2) == pytest.approx(0.5)
    assert validation_recall(_score, ds, split, k=3) == pytest.approx(1.0)  # user 1: 1, 2, 0
