"""Attacks as measurements: known answers, noise, a planted leak, and the two settings."""

from __future__ import annotations

import numpy as np
import pytest

from peel_fed.attacks import UserView, cosine, item_inference, observe_pretraining
from peel_fed.fedlightgcn import FedLightGCNConfig
from peel_fed.privacy import DPConfig
from peel_fed.synthetic import checkerboard


def test_item_inference_known_answers():
    scores = np.array([3.0, 2.0, 1.0, 0.0])
    best = item_inference(scores, np.array([0, 1]), k=2)
    assert best == {"auc": 1.0, "precision_at_k": 1.0, "random_precision_at_k": 0.5}
    worst = item_inference(scores, np.array([2, 3]), k=2)
    assert worst["auc"] == 0.0 and worst["precision_at_k"] == 0.0
    assert cosine(np.array([1.0, 0.0]), np.array([2.0, 0.0])) == 1.0
    assert cosine(np.zeros(2), np.ones(2)) == 0.0


def _views(n_items: int, true_items: list[np.ndarray], leak: bool, rng) -> list[float]:
    aucs = []
    for items in true_items:
        view = UserView(n_items, 2, 4)
        for _ in range(5):
            rows = items if leak else rng.choice(n_items, items.size, replace=False)
            view.add(
                rng.choice(n_items, 2 * items.size, replace=False),
                rows,
                rng.normal(size=(2, rows.size, 4)),
            )
        aucs.append(item_inference(view.item_scores(), items)["auc"])
    return aucs


def test_the_attack_scores_chance_on_pure_noise_and_near_one_on_a_planted_leak():
    rng = np.random.default_rng(0)
    true_items = [rng.choice(200, 15, replace=False) for _ in range(60)]
    assert np.mean(_views(200, true_items, False, rng)) == pytest.approx(0.5, abs=0.05)
    assert np.mean(_views(200, true_items, True, rng)) > 0.99


@pytest.fixture(scope="module")
def observed():
    ds = checkerboard(n_users=120, n_items=80, n_clusters=2, p_in=0.3, p_out=0.02, seed=3)
    cfg = FedLightGCNConfig(dim=16, layers=3, cohort_fraction=0.5, local_steps=2)
    targets = np.arange(0, 120, 10)
    args = (ds.train, ds.n_users, ds.n_items, ds.item_popularity(), cfg, targets, 4)
    return ds, args


def _scores(ds, views, finals):
    bounds = ds.train.user_bounds(ds.n_users)
    out = {}
    for setting, per_user in views.items():
        aucs, cos = [], []
        for u, view in per_user.items():
            items = ds.train.items[bounds[u] : bounds[u + 1]]
            aucs.append(item_inference(view.item_scores(), items)["auc"])
            cos.append(cosine(view.user_vector(), finals[u]))
        out[setting] = (np.mean(aucs), np.mean(cos))
    return out


def test_clear_uploads_give_the_items_and_the_vector_away_and_cohort_sums_do_not(observed):
    ds, args = observed
    got = _scores(ds, *observe_pretraining(*args))
    assert got["clear"][0] > 0.99 and got["clear"][1] > 0.9
    assert got["secure rows"][0] < 0.75 and got["secure rows"][1] < 0.5


def test_central_dp_does_not_hide_uploads_from_the_server(observed):
    ds, args = observed
    dp = DPConfig(clip=0.5, noise_multiplier=2.0, delta=1e-5)
    got = _scores(ds, *observe_pretraining(*args, dp=dp))
    assert got["clear"][0] > 0.99  # the server reads each clipped upload before the noise
