"""User groups: K-Means on pretrained user embeddings, and cold-start assignment of new users.

[ours] Users are clustered on L2-normalised embeddings (direction = taste; the norm mostly tracks
activity), so a new user's vector, built from its items at whatever scale, joins the group whose
centroid points the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class GroupingError(ValueError):
    """Impossible grouping request (e.g. more groups than users)."""


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class UserGroups:
    """Group id per user and the (normalised-space) centroids."""

    assignment: np.ndarray
    centroids: np.ndarray

    @property
    def num_user_groups(self) -> int:
        return int(self.centroids.shape[0])

    def members(self, group: int) -> np.ndarray:
        return np.flatnonzero(self.assignment == group)

    def nearest(self, user_vectors: np.ndarray) -> np.ndarray:
        """Group of each row of ``user_vectors`` (nearest centroid after normalisation)."""
        x = _normalise(np.atleast_2d(user_vectors))
        d = ((x[:, None, :] - self.centroids[None, :, :]) ** 2).sum(-1)
        return np.argmin(d, axis=1)


def kmeans_user_groups(user_emb: np.ndarray, num_user_groups: int, seed: int = 0) -> UserGroups:
    n_users = user_emb.shape[0]
    if num_user_groups < 1:
        raise GroupingError(f"num_user_groups must be >= 1, got {num_user_groups}")
    if num_user_groups > n_users:
        raise GroupingError(f"more user groups ({num_user_groups}) than users ({n_users})")
    x = _normalise(user_emb.astype(np.float64))
    if num_user_groups == 1:
        return UserGroups(np.zeros(n_users, dtype=np.int64), x.mean(axis=0, keepdims=True))
    from sklearn.cluster import KMeans  # 1 s to import: devices never need it

    km = KMeans(n_clusters=num_user_groups, n_init=4, random_state=seed).fit(x)
    return UserGroups(km.labels_.astype(np.int64), km.cluster_centers_)


def cold_start_user_vector(
    items: np.ndarray, item_table: np.ndarray, item_degree: np.ndarray
) -> np.ndarray:
    """A new user's vector from its items: one LightGCN propagation step over the item table.

    ``u = sum_i e_i / sqrt(d_u * d_i)`` with d_u = number of the user's items and d_i the item's
    training degree (at least 1).
    """
    items = np.asarray(items, dtype=np.int64)
    if items.size == 0:
        raise GroupingError("a cold-start user needs at least one item")
    d_i = np.maximum(item_degree[items], 1).astype(np.float64)
    w = 1.0 / np.sqrt(items.size * d_i)
    return (item_table[items] * w[:, None]).sum(axis=0)


def fold_in_user_vectors(
    users: np.ndarray,
    items_by_user: list[np.ndarray],
    item_table: np.ndarray,
    item_degree: np.ndarray,
) -> np.ndarray:
    """:func:`cold_start_user_vector` of each user from its own items (a user with none gets a
    zero vector): how a device that lost its pretrained vectors rebuilds them."""
    out = np.zeros((len(users), item_table.shape[1]), dtype=np.float32)
    for i, items in enumerate(items_by_user):
        if len(items):
            out[i] = cold_start_user_vector(items, item_table, item_degree)
    return out


def kmeans_partial_sums(
    user_vectors: np.ndarray, centroids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A device's (or node's) share of one Lloyd step: per-centroid sums and counts.

    Vectors are L2-normalised as in :func:`kmeans_user_groups`. Summed over all devices (by
    secure aggregation, so no single vector is seen), they give the next centroids.
    """
    x = _normalise(np.atleast_2d(np.asarray(user_vectors, dtype=np.float64)))
    k = centroids.shape[0]
    labels = UserGroups(np.zeros(0, dtype=np.int64), centroids).nearest(x)
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, labels, x)
    return sums, np.bincount(labels, minlength=k).astype(np.float64)


def kmeans_step(sums: np.ndarray, counts: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Next centroids from aggregated sums and counts; an empty cluster keeps its centroid."""
    out = np.array(centroids, dtype=np.float64, copy=True)
    full = counts > 0
    out[full] = sums[full] / counts[full, None]
    return out


def initial_centroids(item_vectors: np.ndarray, num_user_groups: int, seed: int = 0) -> np.ndarray:
    """Server-side start for federated K-Means from public data: K-Means on normalised item
    vectors (users and items share one embedding space), so no user vector is needed."""
    if num_user_groups > item_vectors.shape[0]:
        raise GroupingError(f"more user groups ({num_user_groups}) than items to seed them")
    x = _normalise(np.asarray(item_vectors, dtype=np.float64))
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=num_user_groups, n_init=1, random_state=seed).fit(x).cluster_centers_
