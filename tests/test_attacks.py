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


def test_decoys_are_fixed_unseen_items_that_leave_the_user_s_own_training_alone():
    from dataclasses import replace

    from peel_fed.fedlightgcn import PretrainDevices, PretrainServer
    from peel_fed.negatives import NegativeSampler

    ds = checkerboard(n_users=120, n_items=80, n_clusters=2, p_in=0.3, p_out=0.02, seed=3)
    cfg = FedLightGCNConfig(dim=16, layers=3, cohort_fraction=0.5, local_steps=2)
    layers = PretrainServer(ds.n_items, ds.item_popularity(), cfg, 7).item_layers()
    users = np.arange(0, 120, 3)

    def device(c):
        return PretrainDevices(
            np.arange(ds.n_users), ds.n_users, ds.n_items, ds.train, ds.item_popularity(), c, 7
        )

    plain, decoyed = device(cfg), device(replace(cfg, decoys=5))
    owner, items = decoyed.decoy_items(users)
    assert np.array_equal(items, decoyed.decoy_items(users)[1])  # the same in every round
    assert not NegativeSampler(ds.train, ds.n_items).is_known(users[owner], items).any()
    assert np.bincount(owner).max() <= 5 and np.bincount(owner).min() >= 3
    a = plain.device_round(users, layers, 1)
    b = decoyed.device_round(users, layers, 1)
    np.testing.assert_array_equal(plain.U0.numpy(), decoyed.U0.numpy())  # own training alone
    assert a.loss_sum == b.loss_sum
    assert np.array_equal(b.contrib_rows, np.union1d(a.contrib_rows, items))
    assert np.isin(items, b.rows).all()


def test_decoys_hide_which_contribution_rows_are_real_but_not_that_the_user_sent_them(observed):
    from dataclasses import replace

    ds, args = observed
    decoyed = (*args[:4], replace(args[4], decoys=15), *args[5:])
    plain = observe_pretraining(*args)[0]["clear"]
    hidden = observe_pretraining(*decoyed)[0]["clear"]
    bounds = ds.train.user_bounds(ds.n_users)

    def precision(views):
        return np.mean(
            [
                item_inference(v.item_scores(), ds.train.items[bounds[u] : bounds[u + 1]])[
                    "precision_at_k"
                ]
                for u, v in views.items()
            ]
        )

    assert precision(plain) > 0.99
    assert precision(hidden) < 0.75  # about d_u / (d_u + 15) when the attacker cannot tell


def test_the_attack_benchmark_writes_its_report(tmp_path):
    from sim.bench_attacks import main

    out = tmp_path / "attacks.json"
    report = main(
        ["--dataset", "checkerboard", "--targets", "6", "--decoys", "4", "--ldp-noise", "4",
         "--out", str(out)]
    )  # fmt: skip
    settings = [r["setting"] for r in report["rows"]]
    assert settings[:4] == [
        "clear (no DP)",
        "secure rows (no DP)",
        "clear (central DP, epsilon 8)",
        "clear (4 decoys)",
    ]
    assert len(settings) == 5 and settings[4].startswith("clear (local DP, noise 4 x clip")
    clear, secure, local = report["rows"][0], report["rows"][1], report["rows"][4]
    assert clear["auc_median"] > 0.99 and secure["auc_median"] < clear["auc_median"]
    # local noise hides the values, not which rows were touched: the vector is what it blurs
    assert local["cosine_median"] < clear["cosine_median"]
    assert out.is_file() and "--targets 6" in out.with_suffix(".md").read_text()
