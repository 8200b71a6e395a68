"""Full-ranking top-K metrics with the LightGCN definitions.

Every item the user has not interacted with in training is a candidate. Recall@K = hits / |test|;
NDCG@K = DCG@K / IDCG@K where the ideal DCG places min(|test|, K) positives at the top. Users with
no test items are skipped. Scores are computed in user batches so memory stays bounded.
:func:`validation_recall` is the same measure on the validation slice, for choosing among
candidates without reading test data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from peel_fed.data import Dataset, Interactions, TrainValSplit


def recall_ndcg_at_k(
    topk: np.ndarray, test_items: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-user Recall@k and NDCG@k from ranked item ids ``topk`` (users x >= k)."""
    topk = topk[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recall = np.zeros(len(test_items))
    ndcg = np.zeros(len(test_items))
    for row, truth in enumerate(test_items):
        hits = np.isin(topk[row], truth)
        n_hits = hits.sum()
        recall[row] = n_hits / len(truth)
        idcg = discounts[: min(len(truth), k)].sum()
        ndcg[row] = (discounts * hits).sum() / idcg
    return recall, ndcg


def evaluate_ranking(
    score_fn: Callable[[np.ndarray], torch.Tensor],
    n_users: int,
    train: Interactions,
    test: Interactions,
    ks: tuple[int, ...] = (20,),
    users: np.ndarray | None = None,
    batch_size: int = 2048,
) -> dict[str, float]:
    """Mean Recall@k and NDCG@k over users with test items.

    Parameters
    ----------
    score_fn
        Maps a batch of user ids to a (batch, n_items) score tensor; higher is better. Items that
        must never be recommended may score ``-inf``. See :mod:`peel_fed.scoring`.
    train
        Items excluded from each user's ranking (the user's known training interactions).
    users
        Restrict evaluation to these users (default: all with test items).
    """
    per_user = per_user_metrics(score_fn, n_users, train, test, ks, users, batch_size)
    out: dict[str, float] = {"users": float(len(per_user["user"]))}
    for k in ks:
        for name in ("recall", "ndcg"):
            vals = per_user[f"{name}@{k}"]
            out[f"{name}@{k}"] = float(vals.mean()) if vals.size else 0.0
    return out


def per_user_metrics(
    score_fn: Callable[[np.ndarray], torch.Tensor],
    n_users: int,
    train: Interactions,
    test: Interactions,
    ks: tuple[int, ...] = (20,),
    users: np.ndarray | None = None,
    batch_size: int = 2048,
) -> dict[str, np.ndarray]:
    """Per-user metrics (arrays aligned with the returned ``user`` ids)."""
    train_bounds = train.user_bounds(n_users)
    test_bounds = test.user_bounds(n_users)
    has_test = np.diff(test_bounds) > 0
    if users is None:
        users = np.flatnonzero(has_test)
    else:
        users = np.asarray(users, dtype=np.int64)
        users = users[has_test[users]]
    kmax = max(ks)
    result: dict[str, list[np.ndarray]] = {f"{m}@{k}": [] for k in ks for m in ("recall", "ndcg")}
    for start in range(0, users.size, batch_size):
        batch = users[start : start + batch_size]
        with torch.no_grad():
            scores = score_fn(batch).clone()
        lens = train_bounds[batch + 1] - train_bounds[batch]
        rows = np.repeat(np.arange(batch.size), lens)
        cols = np.concatenate([train.items[train_bounds[u] : train_bounds[u + 1]] for u in batch])
        scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
        topk = torch.topk(scores, kmax, dim=1).indices.numpy()
        truth = [test.items[test_bounds[u] : test_bounds[u + 1]] for u in batch]
        for k in ks:
            rec, nd = recall_ndcg_at_k(topk, truth, k)
            result[f"recall@{k}"].append(rec)
            result[f"ndcg@{k}"].append(nd)
    out = {key: np.concatenate(v) if v else np.zeros(0) for key, v in result.items()}
    out["user"] = users
    return out


def grouped_metrics(
    groups: Sequence[tuple[np.ndarray, Callable[[np.ndarray], torch.Tensor]]],
    n_users: int,
    train: Interactions,
    test: Interactions,
) -> dict[str, float]:
    """Recall@20 and NDCG@20 over all users of ``groups`` (users, score function), each user
    ranked by its own group's score function: the mean of the per-user values (over a partition
    of the users, what :func:`evaluate_ranking` gives with one score function)."""
    recalls, ndcgs = [], []
    for users, score in groups:
        m = per_user_metrics(score, n_users, train, test, ks=(20,), users=users)
        recalls.append(m["recall@20"])
        ndcgs.append(m["ndcg@20"])
    r, n = np.concatenate(recalls), np.concatenate(ndcgs)
    return {
        "recall@20": float(r.mean()) if r.size else 0.0,
        "ndcg@20": float(n.mean()) if n.size else 0.0,
    }


def validation_recall(
    score_fn: Callable[[np.ndarray], torch.Tensor],
    ds: Dataset,
    split: TrainValSplit,
    k: int = 20,
) -> float:
    """Recall@k on the validation slice: each user's ``split.fit`` items are excluded from the
    ranking and ``split.val`` items are the targets (test data is never read).

    Use it to pick among candidates (e.g. bit widths x dims at a budget) by validation, then
    report the chosen candidate's test metrics with :func:`evaluate_ranking`.
    """
    m = evaluate_ranking(score_fn, ds.n_users, split.fit, split.val, ks=(k,))
    return m[f"recall@{k}"]
