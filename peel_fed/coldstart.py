"""Cold-start users: held out of every training, they join a group from their own items.

[ours] (the paper is silent; see docs/method.md) A share of the users is removed from
pretraining, grouping and PEE learning: the server never sees their interactions. Each such user's
device then builds its vector from its own items with one LightGCN propagation step over the
pretrained item table (:func:`peel_fed.clustering.cold_start_user_vector`; the device already
holds that table from pretraining, so it asks the server for nothing item-specific), joins the
group whose centroid is nearest, is served that group's PEE within its budget, and ranks with it.

:func:`run_cold_start` measures that per budget, next to the warm users of the same run (whose
data was trained on) and to the non-personalised G_u = 1 model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import numpy as np

from peel_fed.atomic import to_jsonable
from peel_fed.blocks import (
    BlockLayout,
    check_budget,
    first_blocks_order,
    parse_budget,
    popularity_item_groups,
)
from peel_fed.clustering import UserGroups, cold_start_user_vector, kmeans_user_groups
from peel_fed.console import log
from peel_fed.data import DataError, Dataset, Interactions, split_validation
from peel_fed.loading import load_dataset
from peel_fed.pipeline import PipelineConfig, evaluate_units, learn_all_groups, pretrain


def hold_out_users(ds: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, np.ndarray]:
    """Pick ``fraction`` of the users as cold-start users and remove their training interactions.

    Only users with at least one training item (to build a vector from) and one test item (to be
    evaluated on) are eligible. Returns the warm dataset (same ids and test set; the held-out
    users' training rows removed, so nothing trained on them) and the held-out user ids, sorted.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"cold-start fraction must be in (0, 1), got {fraction}")
    has_train = np.bincount(ds.train.users, minlength=ds.n_users) > 0
    has_test = np.bincount(ds.test.users, minlength=ds.n_users) > 0
    eligible = np.flatnonzero(has_train & has_test)
    n_held = int(round(fraction * ds.n_users))
    if n_held < 1 or n_held >= eligible.size:
        raise DataError(
            f"cannot hold out {fraction:g} of {ds.n_users} users as cold-start users: "
            f"{eligible.size} users have both training and test items"
        )
    rng = np.random.default_rng([seed, 7])
    held = np.sort(rng.choice(eligible, size=n_held, replace=False))
    keep = ~np.isin(ds.train.users, held)
    warm = replace(ds, train=Interactions(ds.train.users[keep], ds.train.items[keep]))
    return warm, held


def run_cold_start(
    cfg: PipelineConfig, held_fraction: float = 0.1, dataset: Dataset | None = None
) -> dict:
    """Hold users out, train on the rest, and evaluate both kinds of user at every budget.

    Returns ``{"rows": [...], "held_users": n, "warm_users": n, "cold_users_per_group": {...},
    ...}``; each row is one (method, budget) with Recall@20, NDCG@20 and the bytes used. Methods:
    PEEL with each ``cfg.num_user_groups`` for cold-start and for warm users, first-k blocks for
    cold-start users, and the full pretrained table for both.
    """
    t_start = time.perf_counter()
    ds = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_dir)
    warm_ds, held = hold_out_users(ds, held_fraction, cfg.seed)
    warm_users = np.setdiff1d(
        np.flatnonzero(np.bincount(warm_ds.train.users, minlength=ds.n_users)), held
    )
    if max(cfg.num_user_groups) > warm_users.size:
        raise ValueError(
            f"more user groups ({max(cfg.num_user_groups)}) than warm users ({warm_users.size})"
        )
    log(f"cold start: {held.size:,} users held out of training, {warm_users.size:,} warm users")
    popularity = warm_ds.item_popularity()  # what the server knows: warm users' items only
    item_groups = popularity_item_groups(popularity, cfg.peel.num_item_groups)
    layout = BlockLayout(item_groups, cfg.lightgcn.dim, cfg.peel.num_blocks)
    budgets = [(b, parse_budget(b, layout.full_table_bytes)) for b in cfg.budgets]
    for _, b in budgets:
        check_budget(b, layout)
    split = split_validation(warm_ds.train, ds.n_users, cfg.val_fraction, seed=cfg.seed)
    pre = pretrain(warm_ds, split.fit, cfg)
    # on each cold device: its own items (never sent) folded into a vector
    per_user = ds.train.per_user(ds.n_users)
    cold_vecs = np.stack(
        [cold_start_user_vector(per_user[u], pre.item_emb, popularity) for u in held]
    ).astype(np.float32)

    ones = np.ones((layout.num_item_groups, layout.num_blocks))
    first_k = first_blocks_order(layout.num_item_groups, layout.num_blocks)
    cold_first_k = [(held, cold_vecs, pre.item_emb, ones, first_k)]
    methods: dict[str, list] = {}
    assigned: dict[str, list[int]] = {}
    for num_user_groups in cfg.num_user_groups:
        name = f"PEEL (G_u={num_user_groups})"
        km = kmeans_user_groups(pre.user_emb[warm_users], num_user_groups, seed=cfg.seed)
        assignment = np.full(ds.n_users, -1, dtype=np.int64)
        assignment[warm_users] = km.assignment
        pees = learn_all_groups(
            ds, split, pre, UserGroups(assignment, km.centroids), popularity, layout, cfg
        )
        cold_group = km.nearest(cold_vecs)
        assigned[name] = np.bincount(cold_group, minlength=num_user_groups).tolist()
        log(f"{name}: cold-start users per group {assigned[name]}")
        methods[f"{name}, warm users"] = [
            (p.users, p.user_table, p.item_table, p.unit_weights, p.unit_order) for p in pees
        ]
        methods[f"{name}, cold-start users"] = [
            (
                held[cold_group == p.group],
                cold_vecs[cold_group == p.group],
                p.item_table,
                p.unit_weights,
                p.unit_order,
            )
            for p in pees
            if (cold_group == p.group).any()
        ]
    methods["first-k blocks, cold-start users"] = cold_first_k
    rows = []
    for label, budget_bytes in budgets:
        for method, groups in methods.items():
            rows.append(_row(method, label, budget_bytes, layout, ds, groups))
    full = layout.full_table_bytes
    rows.append(
        _row("LightGCN (full table), cold-start users", "100%", full, layout, ds, cold_first_k)
    )
    warm_full = [(warm_users, pre.user_emb[warm_users], pre.item_emb, ones, first_k)]
    rows.append(_row("LightGCN (full table), warm users", "100%", full, layout, ds, warm_full))
    return to_jsonable(
        {
            "rows": rows,
            "held_users": int(held.size),
            "warm_users": int(warm_users.size),
            "held_fraction": held_fraction,
            "cold_users_per_group": assigned,
            "pretrain_seconds": pre.seconds,
            "config": asdict(cfg),
            "wall_seconds": time.perf_counter() - t_start,
        }
    )


def _row(method: str, label: str, budget_bytes: int, layout, ds, groups) -> dict:
    m = evaluate_units(ds, groups, layout, budget_bytes)
    log(f"{method} at {label}: Recall@20 {m['recall@20']:.4f}")
    return {
        "method": method,
        "budget": label,
        "budget_bytes": budget_bytes,
        "budget_fraction": budget_bytes / layout.full_table_bytes,
        **m,
    }
