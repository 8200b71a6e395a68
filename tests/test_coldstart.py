"""Cold-start users: held out of every training, they join a group from their own items."""

from __future__ import annotations

import numpy as np
import pytest

from peel_fed.coldstart import hold_out_users, run_cold_start
from peel_fed.data import DataError
from peel_fed.lightgcn import LightGCNConfig
from peel_fed.peel import PEELConfig
from peel_fed.pipeline import PipelineConfig
from peel_fed.synthetic import checkerboard


def _board():
    return checkerboard(n_users=300, n_items=160, n_clusters=4, p_in=0.25, p_out=0.01, seed=1)


def test_hold_out_removes_only_the_held_users_training_rows():
    ds = _board()
    warm, held = hold_out_users(ds, 0.1, seed=3)
    assert held.size == 30 and np.all(np.diff(held) > 0)
    assert not np.isin(warm.train.users, held).any()
    kept = ~np.isin(ds.train.users, held)
    np.testing.assert_array_equal(warm.train.users, ds.train.users[kept])
    np.testing.assert_array_equal(warm.train.items, ds.train.items[kept])
    assert warm.test is ds.test and warm.n_users == ds.n_users
    again, held_again = hold_out_users(ds, 0.1, seed=3)
    np.testing.assert_array_equal(held, held_again)  # the seed decides
    assert not np.array_equal(held, hold_out_users(ds, 0.1, seed=4)[1])
    with pytest.raises(ValueError, match="cold-start fraction must be in"):
        hold_out_users(ds, 1.0)
    with pytest.raises(DataError, match="cannot hold out 0.001 of 300 users"):
        hold_out_users(ds, 0.001)


@pytest.fixture(scope="module")
def cold_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cold")
    cfg = PipelineConfig(
        out_dir=str(root / "out"),
        cache_dir=str(root / "cache"),
        progress=False,
        num_user_groups=(4, 1),
        budgets=("25%", "50%", "100%"),
        lightgcn=LightGCNConfig(epochs=30, batch_size=256, lr=1e-2, dim=16, num_blocks=4),
        peel=PEELConfig(num_item_groups=4, num_blocks=4, epochs=5, batch_size=256),
    )
    return run_cold_start(cfg, 0.1, _board())


def _recall(res, method, budget):
    return next(r for r in res["rows"] if r["method"] == method and r["budget"] == budget)[
        "recall@20"
    ]


def test_cold_start_users_rank_their_own_cluster_first(cold_run):
    """Checkerboard: a held-out user's items lie (almost) all in its cluster of 40 items, about
    8 of them seen, so ranking the cluster's unseen items first gets Recall@20 near 20/32 = 0.62
    and a random ranking about 20/152 = 0.13."""
    assert cold_run["held_users"] == 30 and cold_run["warm_users"] == 270
    assert sum(cold_run["cold_users_per_group"]["PEEL (G_u=4)"]) == 30
    for method in ("PEEL (G_u=4)", "PEEL (G_u=1)"):
        cold = _recall(cold_run, f"{method}, cold-start users", "100%")
        warm = _recall(cold_run, f"{method}, warm users", "100%")
        assert cold > 0.35 and warm > 0.5, (method, cold, warm)
    assert _recall(cold_run, "LightGCN (full table), cold-start users", "100%") > 0.35
    for r in cold_run["rows"]:
        assert r["used_bytes"] <= r["budget_bytes"], r
