"""Sparse row vectors as (idx, val) pairs and their aggregation."""

from __future__ import annotations

import numpy as np


def sparse_counts(items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique item ids, their counts) of an item-id array."""
    idx, cnt = np.unique(np.asarray(items, dtype=np.int64), return_counts=True)
    return idx, cnt.astype(np.int64)


def sum_sparse(size: int, parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Dense sum of sparse vectors ``(idx, val)`` of length ``size`` (rows may repeat)."""
    if not parts:
        return np.zeros(size, dtype=np.int64)
    out = np.zeros(size, dtype=np.result_type(*(np.asarray(v).dtype for _, v in parts)))
    for idx, val in parts:
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            raise ValueError(f"sparse index out of range [0, {size})")
        np.add.at(out, idx, val)
    return out
