"""Which users a node hosts, and per-user seeds, so results do not depend on the packing."""

from __future__ import annotations

import numpy as np


def partition_users(n_users: int, num_partitions: int, partition_id: int) -> np.ndarray:
    """User ids hosted by partition ``partition_id`` of ``num_partitions`` (contiguous, balanced).

    Raises a one-line ``ValueError`` for impossible requests (more partitions than users, an id
    outside ``[0, num_partitions)``).
    """
    if num_partitions < 1:
        raise ValueError(f"num-partitions must be >= 1, got {num_partitions}")
    if num_partitions > n_users:
        raise ValueError(f"more partitions ({num_partitions}) than users ({n_users})")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
    bounds = np.linspace(0, n_users, num_partitions + 1).round().astype(np.int64)
    return np.arange(bounds[partition_id], bounds[partition_id + 1], dtype=np.int64)


def user_rng(seed: int, user_id: int, stream: int = 0) -> np.random.Generator:
    """The random generator of one user: the same whichever node hosts the user."""
    return np.random.default_rng([int(seed), int(user_id), int(stream)])


def user_slots(seed: int, users: np.ndarray, stream: int, num_slots: int) -> np.ndarray:
    """A slot in ``[0, num_slots)`` per user, from a hash of (seed, user, stream).

    Vectorised and per-user: the same whichever node hosts the user. Federated rounds use it for
    client sampling, so every user takes part in exactly one round of each pass over the data.
    """
    x = np.asarray(users, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x ^= np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x += np.uint64(stream) * np.uint64(0xD1B54A32D192ED03) + np.uint64(0x632BE59BD9B4E019)
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):  # SplitMix64
            x ^= x >> np.uint64(shift)
            x *= np.uint64(mult)
        x ^= x >> np.uint64(31)
    return (x % np.uint64(num_slots)).astype(np.int64)
