"""PEE learning for one user group: first-order bi-level fine-tuning of the group's item table.

Item i's representation is the weighted concatenation ``concat_n alpha[g(i), n] * e_i^n`` so the
score of user u is ``sum_n alpha[g(i), n] * <u^n, e_i^n>``. The inner level fine-tunes the item
table and the group's user vectors on the *fit* interactions with alpha fixed; the outer level
computes ``dL_val / d alpha`` on the *validation* interactions and steps the controller. Test
interactions never enter this module.

The tables fine-tuned here are the pretrained LightGCN *final* (propagated) embeddings: that is
what a device stores and ranks with, so PEE learning refines exactly what is deployed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from peel_fed.blocks import (
    BlockLayout,
    consistent_unit_order,
    select_prefix,
    unit_mask,
    weighted_unit_order,
)
from peel_fed.controller import Controller, ControllerConfig, controller_features
from peel_fed.data import Interactions
from peel_fed.lightgcn import block_redundancy
from peel_fed.negatives import NegativeSampler
from peel_fed.scoring import bpr_loss, budget_unit_weights, pair_scores


@dataclass
class PEELConfig:
    """PEE learning hyper-parameters ([ours] defaults, see docs/method.md)."""

    num_item_groups: int = 20
    num_blocks: int = 8
    epochs: int = 5
    batch_size: int = 4096
    lr: float = 5e-4
    l2: float = 1e-4
    diversity_weight: float = 1e-2
    val_batch_size: int = 4096
    outer_every: int = 1
    elastic: bool = True
    # ablation: train the controller on the training batch (joint) instead of held-out validation
    # interactions (bi-level, the method)
    joint: bool = False
    unit_order: str = "consistent"
    controller: ControllerConfig = field(default_factory=ControllerConfig)

    def __post_init__(self) -> None:
        if self.num_item_groups < 1 or self.num_blocks < 1:
            raise ValueError(f"group and block counts must be >= 1: {self}")
        if self.epochs < 0 or self.batch_size < 1 or self.outer_every < 1:
            raise ValueError(f"invalid PEEL config: {self}")
        if self.unit_order not in UNIT_ORDERS:
            raise ValueError(
                f"unit-order must be one of {', '.join(UNIT_ORDERS)}, got {self.unit_order!r}"
            )


UNIT_ORDERS = ("consistent", "per-group")


def unit_order_for(weights: np.ndarray, layout: BlockLayout, policy: str) -> np.ndarray:
    """The deployment order of units for ``weights`` under an order policy.

    ``consistent``: :func:`peel_fed.blocks.consistent_unit_order` (every item group keeps the
    same top-ranked blocks); ``per-group``: :func:`peel_fed.blocks.weighted_unit_order` (each
    item group's best unit first, then all units by weight).
    """
    if policy == "consistent":
        return consistent_unit_order(weights, layout.group_sizes)
    return weighted_unit_order(weights)


@dataclass
class GroupPEE:
    """The learned elastic embeddings of one user group."""

    group: int
    users: np.ndarray
    item_table: np.ndarray
    user_table: np.ndarray  # rows aligned with ``users``
    unit_weights: np.ndarray  # alpha, (G_v, N)
    unit_order: np.ndarray  # deployment order, (G_v * N, 2)
    history: list[dict] = field(default_factory=list)


def _restrict(edges: Interactions, keep_users: np.ndarray) -> Interactions:
    sel = np.isin(edges.users, keep_users)
    return Interactions(edges.users[sel], edges.items[sel])


def learn_group_pee(
    group: int,
    users: np.ndarray,
    item_table: np.ndarray,
    user_table: np.ndarray,
    fit: Interactions,
    val: Interactions,
    popularity: np.ndarray,
    layout: BlockLayout,
    cfg: PEELConfig,
    seed: int = 0,
    progress=None,
) -> GroupPEE:
    """Bi-level PEE learning for the users ``users`` of one group.

    Parameters
    ----------
    item_table, user_table
        Pretrained final embeddings (all items; all users, indexed by global user id).
    fit, val
        Training interactions split into the inner (fit) and outer (validation) levels. They may
        cover all users; only ``users``' interactions are used.
    progress
        Optional tqdm-like object; ``update(1)`` is called once per inner step.
    """
    rng = np.random.default_rng(seed)
    users = np.asarray(users, dtype=np.int64)
    local = np.full(user_table.shape[0], -1, dtype=np.int64)
    local[users] = np.arange(users.size)
    fit_g, val_g = _restrict(fit, users), _restrict(val, users)
    known = Interactions(
        np.concatenate([fit_g.users, val_g.users]), np.concatenate([fit_g.items, val_g.items])
    )
    sampler = NegativeSampler(known, layout.n_items)
    item_groups_t = torch.from_numpy(layout.item_groups)
    num_item_groups, n_blocks = layout.num_item_groups, layout.num_blocks

    items = torch.nn.Parameter(torch.tensor(item_table, dtype=torch.float32))
    user_vecs = torch.nn.Parameter(torch.tensor(user_table[users], dtype=torch.float32))
    inner_opt = torch.optim.Adam([items, user_vecs], lr=cfg.lr)
    torch.manual_seed(seed)
    controller = Controller(num_item_groups, n_blocks, cfg.controller)
    group_loss = np.zeros(num_item_groups)
    features = controller_features(popularity, layout.item_groups, group_loss)
    history: list[dict] = []
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        loss_sum = np.zeros(num_item_groups)
        loss_cnt = np.zeros(num_item_groups)
        order = rng.permutation(len(fit_g))
        neg_all = sampler.sample(fit_g.users[order], rng)
        epoch_loss, epoch_val, n_batches = 0.0, 0.0, 0
        for start in range(0, len(fit_g), cfg.batch_size):
            sl = order[start : start + cfg.batch_size]
            u = torch.from_numpy(local[fit_g.users[sl]])
            p = torch.from_numpy(fit_g.items[sl])
            n = torch.from_numpy(neg_all[start : start + cfg.batch_size])
            alpha_np = controller.weights(features)
            if cfg.elastic:
                alpha_np = sampled_budget_weights(alpha_np, layout, cfg.unit_order, rng)
            alpha = torch.from_numpy(alpha_np).float()
            uv, pv, nv = user_vecs[u], items[p], items[n]
            pos = pair_scores(uv, pv, alpha[item_groups_t[p]], n_blocks)
            neg = pair_scores(uv, nv, alpha[item_groups_t[n]], n_blocks)
            pair_loss = bpr_loss(pos, neg, reduction="none")
            sq_norms = uv.pow(2).sum() + pv.pow(2).sum() + nv.pow(2).sum()
            loss = pair_loss.mean() + cfg.l2 * 0.5 * sq_norms / u.shape[0]
            if cfg.diversity_weight > 0:
                loss = loss + cfg.diversity_weight * block_redundancy(torch.cat([pv, nv]), n_blocks)
            inner_opt.zero_grad(set_to_none=True)
            loss.backward()
            inner_opt.step()
            pl = pair_loss.detach().numpy()
            pg = layout.item_groups[fit_g.items[sl]]
            loss_sum += np.bincount(pg, weights=pl, minlength=num_item_groups)
            loss_cnt += np.bincount(pg, minlength=num_item_groups)
            epoch_loss += float(loss.detach())
            n_batches += 1
            step += 1
            if (len(val_g) or cfg.joint) and step % cfg.outer_every == 0:
                if cfg.joint:  # the same batch the table just trained on
                    vu, vp, vn = fit_g.users[sl], p.numpy(), n.numpy()
                else:
                    vb = rng.integers(0, len(val_g), size=min(cfg.val_batch_size, len(val_g)))
                    vu, vp = val_g.users[vb], val_g.items[vb]
                    vn = sampler.sample(vu, rng)
                grad, vloss = validation_weight_grad(
                    user_vecs.detach()[torch.from_numpy(local[vu])],
                    items.detach(),
                    torch.from_numpy(vp),
                    torch.from_numpy(vn),
                    controller.weights(features),
                    item_groups_t,
                )
                controller.apply_weight_grad(features, grad)
                epoch_val += vloss
            if progress is not None:
                progress.update(1)
        seen = loss_cnt > 0
        if seen.any():
            group_loss[seen] = loss_sum[seen] / loss_cnt[seen]
            group_loss[~seen] = group_loss[seen].mean()
        features = controller_features(popularity, layout.item_groups, group_loss)
        history.append(
            {
                "epoch": epoch,
                "train_loss": epoch_loss / max(n_batches, 1),
                "val_loss": epoch_val / max(n_batches // cfg.outer_every, 1),
            }
        )
    weights = controller.weights(features)
    return GroupPEE(
        group=group,
        users=users,
        item_table=items.detach().numpy().copy(),
        user_table=user_vecs.detach().numpy().copy(),
        unit_weights=weights,
        unit_order=unit_order_for(weights, layout, cfg.unit_order),
        history=history,
    )


def sampled_budget_weights(
    weights: np.ndarray, layout: BlockLayout, policy: str, rng: np.random.Generator
) -> np.ndarray:
    """Elastic training [ours]: the weights a device would rank with at a random budget.

    The budget is drawn uniformly between half the bytes that cover every item group and the
    full table; units past the budget's prefix of the current unit order get weight 0 and kept
    units are rescaled as on the device, so the table learns to rank well under every prefix.
    """
    low = max(layout.min_budget_bytes, layout.cover_bytes // 2)
    budget = int(rng.uniform(low, layout.full_table_bytes))
    units = select_prefix(unit_order_for(weights, layout, policy), layout, budget)
    mask = unit_mask(units, layout.num_item_groups, layout.num_blocks)
    return budget_unit_weights(weights, mask)[0]


def validation_weight_grad(
    user_vecs: torch.Tensor,
    item_table: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    unit_weights: np.ndarray,
    item_groups: torch.Tensor,
) -> tuple[np.ndarray, float]:
    """``dL_val / d alpha`` of the BPR validation loss, and the loss, with tables held fixed.

    ``user_vecs`` rows are aligned with ``pos``/``neg``. This is what a device computes on its
    validation split and sends up; the server feeds the aggregate to the controller.
    """
    alpha = torch.tensor(unit_weights, dtype=torch.float32, requires_grad=True)
    n_blocks = alpha.shape[1]
    s_pos = pair_scores(user_vecs, item_table[pos], alpha[item_groups[pos]], n_blocks)
    s_neg = pair_scores(user_vecs, item_table[neg], alpha[item_groups[neg]], n_blocks)
    loss = bpr_loss(s_pos, s_neg)
    (grad,) = torch.autograd.grad(loss, alpha)
    return grad.numpy().astype(np.float64), float(loss.detach())
