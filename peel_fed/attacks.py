"""Attacks as measurements: what an honest-but-curious server learns from a user's uploads.

Setting: every SuperNode hosts one user, and the server keeps everything it can decode. What it
can decode depends on the setting:

- ``clear`` (and central DP: the server adds the noise after it has read the uploads): each
  node's own pretraining uploads, its row gradients on the rows it touched (its items and its
  negatives) and its contribution changes on its items;
- ``secure rows``: only the sum over the round's cohort, so a user's view in a round is the
  cohort's summed upload.

Two attacks on those views:

- (a) item inference: score every item by how often, and how strongly, it appears in the user's
  views, then report the AUC of the user's training items against all other items and
  precision@k against random guessing (k/n_items of a random pick);
- (b) user-vector reconstruction: the contribution of layer k is ``u_k / sqrt(d_u)`` on each of
  the user's items, so the running sum of a user's contribution changes, averaged over its rows,
  estimates ``u_0 .. u_{K-1}``; their mean estimates the final user vector, scored by its cosine
  with the true one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import roc_auc_score


@dataclass
class UserView:
    """What the server decoded that carries one user's data, summed over the exchanges: per
    item, how many uploads had a gradient row and a contribution on it and the contributions'
    size; per layer, the sum of all contribution changes (rows added up)."""

    n_items: int
    layers: int
    dim: int
    seen_rows: np.ndarray = field(init=False)
    seen_contrib: np.ndarray = field(init=False)
    contrib_size: np.ndarray = field(init=False)
    contrib_total: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.seen_rows = np.zeros(self.n_items)
        self.seen_contrib = np.zeros(self.n_items)
        self.contrib_size = np.zeros(self.n_items)
        self.contrib_total = np.zeros((self.layers, self.dim))

    def add(self, rows: np.ndarray, contrib_rows: np.ndarray, contrib_delta: np.ndarray) -> None:
        """One decoded upload: its gradient rows, and the contribution change on its rows
        (``contrib_delta`` is (layers, len(contrib_rows), dim))."""
        self.seen_rows[np.asarray(rows, dtype=np.int64)] += 1
        contrib_rows = np.asarray(contrib_rows, dtype=np.int64)
        delta = np.asarray(contrib_delta, dtype=np.float64)
        size = np.linalg.norm(delta, axis=2).sum(0)
        self.seen_contrib[contrib_rows[size > 0]] += 1
        self.contrib_size[contrib_rows] += size
        self.contrib_total += delta.sum(axis=1)

    def item_scores(self) -> np.ndarray:
        """Higher for items more likely the user's: rows with a contribution first (only the
        user's own items carry one), then how often the row was sent; ties broken by the size
        of the contributions on the row."""
        size = self.contrib_size / max(self.contrib_size.max(), 1e-30)
        return 1e3 * self.seen_contrib + self.seen_rows + size

    def user_vector(self) -> np.ndarray:
        """The mean over layers ``k < K`` of the recovered ``u_k``, up to a scale (which a
        cosine ignores): each row with a contribution holds the running sum ``u_k / sqrt(d_u)``,
        so the sum over rows and exchanges of the changes is ``d_u`` times it."""
        return self.contrib_total.mean(axis=0)


def item_inference(
    scores: np.ndarray, true_items: np.ndarray, k: int | None = None
) -> dict[str, float]:
    """AUC of ``true_items`` against every other item under ``scores``, precision@k (``k``
    defaults to the number of true items: a perfect ranking scores 1), and the precision@k of a
    random guess."""
    labels = np.zeros(scores.size, dtype=bool)
    labels[np.asarray(true_items, dtype=np.int64)] = True
    k = int(labels.sum()) if k is None else k
    top = np.argsort(-scores, kind="stable")[:k]
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "precision_at_k": float(labels[top].mean()),
        "random_precision_at_k": float(labels.mean()),
    }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two vectors (0 when either is zero)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def _cohort_sum(uploads: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sum over a round's uploads that secure aggregation reveals: the union of the
    gradient rows, and the summed contribution changes on the union of contribution rows."""
    rows = np.unique(np.concatenate([np.asarray(r) for r, _, _ in uploads]))
    crows = np.unique(np.concatenate([np.asarray(c) for _, c, _ in uploads]))
    total = np.zeros((uploads[0][2].shape[0], crows.size, uploads[0][2].shape[2]))
    for _, c, d in uploads:
        total[:, np.searchsorted(crows, c)] += d
    return rows, crows, total


def observe_pretraining(
    edges,
    n_users: int,
    n_items: int,
    item_degree: np.ndarray,
    cfg,
    targets: np.ndarray,
    rounds: int,
    seed: int = 0,
    dp=None,
) -> tuple[dict[str, dict[int, UserView]], dict[int, np.ndarray]]:
    """Federated pretraining (``peel_fed.fedlightgcn``) with every user of ``targets`` on a node
    of its own, the server keeping the views of each target: ``clear`` (its own uploads; also
    what a central-DP server reads before it adds noise) and ``secure rows`` (the cohort sums of
    the exchanges it took part in). Returns the views and the targets' final user vectors.
    The other users share one node: packing does not change the training."""
    from peel_fed.fedlightgcn import (
        PretrainDevices,
        PretrainServer,
        round_participants,
        rounds_per_pass_for,
    )
    from peel_fed.negatives import NegativeSampler

    targets = np.unique(np.asarray(targets, dtype=np.int64))
    everyone = np.arange(n_users)
    rest = np.setdiff1d(everyone, targets)
    sampler = NegativeSampler(edges, n_items)
    clip = None if dp is None else dp.clip
    server = PretrainServer(
        n_items, item_degree, cfg, seed, dp, n_users / rounds_per_pass_for(cfg.cohort_fraction)
    )

    def devices(users: np.ndarray) -> PretrainDevices:
        return PretrainDevices(
            users, n_users, n_items, edges, item_degree, cfg, seed, sampler=sampler
        )

    nodes = {int(u): devices(np.array([u])) for u in targets}
    others = devices(rest)
    views = {
        setting: {int(u): UserView(n_items, cfg.layers, cfg.dim) for u in targets}
        for setting in ("clear", "secure rows")
    }

    def observe(mine: dict[int, tuple], rest_upload: tuple) -> None:
        cohort = _cohort_sum([*mine.values(), rest_upload])
        for u, upload in mine.items():
            views["clear"][u].add(*upload)
            views["secure rows"][u].add(*cohort)

    for k in range(cfg.layers):
        layers = server.item_layers()
        mine = {}
        for u, node in nodes.items():
            rows, delta = node.initial_contribution(k, layers, clip=clip)
            server.add_contributions(rows, delta)
            mine[u] = (np.zeros(0, dtype=np.int64), rows, delta.numpy())
        rows, delta = others.initial_contribution(k, layers, clip=clip)
        server.add_contributions(rows, delta)
        server.noise_contributions([k])
        observe(mine, (np.zeros(0, dtype=np.int64), rows, delta.numpy()))
    per_pass = rounds_per_pass_for(cfg.cohort_fraction)
    for r in range(1, rounds + 1):
        layers = server.item_layers()
        part = round_participants(seed, everyone, r, per_pass)
        ups = {
            int(u): nodes[int(u)].device_round(np.array([u]), layers, r, clip)
            for u in part
            if int(u) in nodes
        }
        rest_up = others.device_round(part[~np.isin(part, targets)], layers, r, clip)
        server.apply([*ups.values(), rest_up])
        observe(
            {u: (up.rows, up.contrib_rows, up.contrib_delta.numpy()) for u, up in ups.items()},
            (rest_up.rows, rest_up.contrib_rows, rest_up.contrib_delta.numpy()),
        )
    layers = server.item_layers()
    finals = {u: node.final_user_vectors(layers)[0] for u, node in nodes.items()}
    return views, finals
