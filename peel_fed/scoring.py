"""How a user scores an item, and the BPR loss: the one definition every core module uses.

A score is the inner product of a user vector and an item vector. With unit weights
``alpha`` (PEEL), item i's vector is the weighted concatenation ``concat_n alpha[g(i), n] * e_i^n``
of its blocks, so the score is ``sum_n alpha[g(i), n] * <u^n, e_i^n>``; the plain inner product is
the case ``alpha = 1``. Two forms:

- per (user, item) pair, for training (:func:`pair_scores`, :func:`bpr_loss`);
- against the whole catalogue, for ranking (:func:`dot_score_fn`, :func:`budget_score_fn`): the
  weights are folded into the item table (:func:`effective_item_table`), so ranking is one matrix
  product whatever the weights. A device that keeps only some units ranks with the weights of
  :func:`budget_unit_weights`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from peel_fed.blocks import BlockLayout, unit_mask

ScoreFn = Callable[[np.ndarray], torch.Tensor]


def pair_scores(
    users: torch.Tensor,
    items: torch.Tensor,
    unit_weights: torch.Tensor | None = None,
    num_blocks: int = 1,
) -> torch.Tensor:
    """Score of every row pair: ``<u, e>``, or ``sum_n w[n] * <u^n, e^n>`` with ``unit_weights``.

    ``users`` and ``items`` are aligned (batch, dim) rows; ``unit_weights`` is (batch, N) with
    ``N = num_blocks``.
    """
    if unit_weights is None:
        return (users * items).sum(-1)
    b, d = users.shape
    per_block = (users * items).reshape(b, num_blocks, d // num_blocks).sum(-1)
    return (per_block * unit_weights).sum(-1)


def bpr_loss(
    pos_scores: torch.Tensor, neg_scores: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """BPR loss ``softplus(neg - pos)`` (= ``-log sigmoid(pos - neg)``): the batch mean, or per
    pair with ``reduction="none"`` (for weighted sums and per-item-group loss statistics)."""
    pair = torch.nn.functional.softplus(neg_scores - pos_scores)
    if reduction == "none":
        return pair
    if reduction == "mean":
        return pair.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def budget_unit_weights(weights: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights a device ranks with when it keeps only ``mask`` units.

    Dropped units get weight 0; the kept units of a partially kept item group are rescaled by
    ``sum(alpha[g]) / sum(alpha[g, kept])`` so scores stay on one scale across groups. Returns the
    (G_v, N) effective weights and a (G_v,) boolean "group has at least one unit".
    """
    weights = np.asarray(weights, dtype=np.float64)
    kept = np.where(mask, weights, 0.0)
    kept_sum = kept.sum(axis=1)
    covered = mask.any(axis=1)
    scale = np.divide(weights.sum(axis=1), kept_sum, out=np.zeros_like(kept_sum), where=covered)
    return kept * scale[:, None], covered


def effective_item_table(
    item_table: np.ndarray, item_groups: np.ndarray, unit_weights: np.ndarray
) -> np.ndarray:
    """Item table with every block multiplied by its unit weight: scores are plain dot products."""
    n_items, dim = item_table.shape
    num_blocks = unit_weights.shape[1]
    per_item = unit_weights[item_groups]  # (I, N)
    blocks = item_table.reshape(n_items, num_blocks, dim // num_blocks) * per_item[:, :, None]
    return blocks.reshape(n_items, dim).astype(np.float32)


def dot_score_fn(
    user_vectors: np.ndarray | torch.Tensor,
    item_table: np.ndarray | torch.Tensor,
    user_rows: np.ndarray | None = None,
    uncovered_items: np.ndarray | None = None,
) -> ScoreFn:
    """Score function for :func:`peel_fed.metrics.evaluate_ranking`: user ids -> (batch, items)
    inner products.

    ``user_rows[u]`` is the row of user u in ``user_vectors`` (default: row u); items flagged in
    the boolean ``uncovered_items`` score ``-inf`` (a device holds none of their values).
    """
    u = torch.as_tensor(user_vectors)
    v = torch.as_tensor(item_table)
    dead = None if uncovered_items is None else torch.from_numpy(np.asarray(uncovered_items))

    def score(batch: np.ndarray) -> torch.Tensor:
        rows = batch if user_rows is None else user_rows[batch]
        s = u[torch.from_numpy(rows)] @ v.T
        if dead is not None:
            s[:, dead] = -torch.inf
        return s

    return score


def budget_score_fn(
    user_vectors: np.ndarray,
    item_table: np.ndarray,
    unit_weights: np.ndarray,
    kept_units: np.ndarray,
    layout: BlockLayout,
    user_rows: np.ndarray | None = None,
) -> ScoreFn:
    """Score function of devices that keep only ``kept_units`` ((k, 2) of (group, block)) of
    ``item_table`` and rank with ``unit_weights`` rescaled by :func:`budget_unit_weights`; items of
    item groups with no kept unit score ``-inf``."""
    mask = unit_mask(kept_units, layout.num_item_groups, layout.num_blocks)
    eff, covered = budget_unit_weights(unit_weights, mask)
    table = effective_item_table(item_table, layout.item_groups, eff)
    return dot_score_fn(
        np.asarray(user_vectors, dtype=np.float32),
        table,
        user_rows=user_rows,
        uncovered_items=~covered[layout.item_groups],
    )
