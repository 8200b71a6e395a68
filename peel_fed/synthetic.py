"""Small synthetic datasets with known structure, for tests, examples and smoke runs."""

from __future__ import annotations

import numpy as np

from peel_fed.data import DataError, Dataset, from_pairs


def checkerboard(
    n_users: int = 200,
    n_items: int = 120,
    n_clusters: int = 2,
    p_in: float = 0.3,
    p_out: float = 0.0,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Users and items in ``n_clusters`` matching clusters (by id order); users like their
    cluster's items with probability ``p_in`` and others with ``p_out``. The right ranking is
    obvious: a user's unseen in-cluster items first.
    """
    rng = np.random.default_rng(seed)
    user_cluster = np.arange(n_users) * n_clusters // n_users
    item_cluster = np.arange(n_items) * n_clusters // n_items
    same = user_cluster[:, None] == item_cluster[None, :]
    likes = rng.random((n_users, n_items)) < np.where(same, p_in, p_out)
    train, test = [], []
    for u in range(n_users):
        items = np.flatnonzero(likes[u])
        if items.size < 2:
            items = rng.choice(np.flatnonzero(same[u]), size=2, replace=False)
        rng.shuffle(items)
        k = max(1, int(round(test_fraction * items.size)))
        test += [(u, i) for i in items[:k]]
        train += [(u, i) for i in items[k:]]
    return from_pairs("checkerboard", n_users, n_items, np.array(train), np.array(test))


SYNTHETIC_DATASETS = ("checkerboard", "checkerboard-tiny")  # by name (``--dataset``)


def synthetic_dataset(name: str) -> Dataset:
    """A named synthetic dataset, generated in memory (seeded): the same for every caller."""
    if name == "checkerboard-tiny":  # one node per user stays cheap in a simulation
        return checkerboard(n_users=12, n_items=48, n_clusters=2, p_in=0.4, p_out=0.02, seed=2)
    if name == "checkerboard":
        return checkerboard(n_users=240, n_items=160, n_clusters=4, p_in=0.25, p_out=0.01, seed=1)
    raise DataError(
        f"unknown synthetic dataset {name!r}: "
        f"synthetic datasets are {', '.join(SYNTHETIC_DATASETS)}"
    )
