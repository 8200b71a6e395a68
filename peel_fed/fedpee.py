"""Federated PEE learning: the algorithm, without any transport (evaluation: ``fedeval``).

Per user group the server holds the group's item table (initialised from the pretrained final
item table), its row-wise Adam state and the group's controller. A round:

- the server sends each node the tables and block weights ``alpha`` of the groups its users are
  in;
- every taking-part device fine-tunes against the table it received, as if alone: its own
  negatives and its own elastic budget (both from ``user_rng``), ``alpha`` fixed. It moves its
  own user vector with local Adam steps, and returns the gradient of its mean training loss on
  the item rows it touched, and ``dL_val / d alpha`` of its validation split (the inner and outer
  levels of PEEL's bi-level problem, first order), plus per-item-group loss sums that feed the
  controller's features;
- the server averages each row's gradient over the devices that touched it (Adam step) and feeds
  the mean weight gradient to the group's controller.

Differences from the centralized :func:`peel_fed.peel.learn_group_pee` ([ours], see
``docs/method.md``): the table step is one server step per round rather than one per batch, and
the block-diversity regulariser (a statistic over a batch of items) is not applied, since no
device sees a batch beyond its own items.

Long file: about 430 lines, on purpose: the server (:class:`PEEGroupServer`), the pairs a device
draws (:class:`PEEPairs`, which sparse downloads ask for before the tables come), the devices
(:class:`PEEDevices`) and their in-process composition (:func:`train_fed_pee`) are the two halves
of one round and are read together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from peel_fed.blocks import FLOAT32_BYTES, FLOAT64_BYTES, INT64_BYTES, BlockLayout
from peel_fed.controller import Controller, ControllerConfig, controller_features
from peel_fed.data import Interactions, concat_ranges
from peel_fed.fedlightgcn import round_participants, rounds_per_pass_for
from peel_fed.negatives import NegativeSampler
from peel_fed.optim import RowAdam
from peel_fed.partition import user_rng
from peel_fed.peel import sampled_budget_weights, unit_order_for
from peel_fed.privacy import DPConfig, clip_factors, gaussian_noise, noised
from peel_fed.scoring import bpr_loss, pair_scores

NEG_STREAM = 3_000_003  # + round: a device's PEE negatives
VAL_NEG_STREAM = 11_000_003  # + round: the negatives of its validation pairs
PEE_SLOT_STREAM = 6_000_003  # + pass: round participation in PEE learning
ELASTIC_STREAM = 4_000_003  # + round: a device's sampled elastic budget
LDP_PEE_STREAM = 9_200_003  # + round: a device's local DP noise on its PEE upload


@dataclass
class FedPEEConfig:
    """Federated PEE learning hyper-parameters ([ours] defaults)."""

    local_steps: int = 5
    server_lr: float = 5e-3
    user_lr: float = 5e-4
    l2: float = 1e-4
    elastic: bool = True
    unit_order: str = "consistent"
    controller: ControllerConfig = None  # type: ignore[assignment]
    # local DP (as in pretraining): each user adds Gaussian noise of this many times the clip to
    # every value of its clipped upload (row gradients and dL_val/d alpha) on its device
    ldp_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.controller is None:
            self.controller = ControllerConfig()
        if self.local_steps < 1 or not (np.isfinite(self.ldp_noise) and self.ldp_noise >= 0):
            raise ValueError(f"invalid federated PEE config: {self}")


@dataclass
class PEEUpload:
    """A node's upload for one user group in one round (sums over its taking-part users)."""

    rows: np.ndarray
    grad: np.ndarray  # (rows, dim)
    row_devices: np.ndarray
    weight_grad: np.ndarray  # (G_v, N): sum over devices of dL_val / d alpha
    val_devices: int
    loss_sum: np.ndarray  # (G_v,) pair-loss sums per item group
    loss_count: np.ndarray  # (G_v,)
    users: int
    solo_bytes: int = 0  # what the users would upload if each were alone (same encoding)


class PEEGroupServer:
    """Server state of one user group: item table, row-wise Adam, controller and features."""

    def __init__(
        self,
        item_table: np.ndarray,
        popularity: np.ndarray,
        layout: BlockLayout,
        cfg: FedPEEConfig,
        seed: int = 0,
        dp: DPConfig | None = None,
        users_per_round: float = 1.0,
        noise_on_devices: bool = False,
    ) -> None:
        self.layout, self.cfg, self.popularity = layout, cfg, popularity
        self.table = torch.tensor(item_table, dtype=torch.float32)
        self.adam = RowAdam(tuple(self.table.shape), cfg.server_lr)
        # user-level DP (``peel_fed.privacy``): noise on every row of the table's gradient sum
        # and on the weight gradient, both divided by the group's expected users per round
        self.dp, self.users_per_round = dp, max(float(users_per_round), 1.0)
        self.noise_rng = np.random.default_rng([seed, 29])
        # distributed DP: the nodes added the noise under secure aggregation, the server adds none
        self.server_noise = noised(dp) and not noise_on_devices
        torch.manual_seed(seed)
        self.controller = Controller(layout.num_item_groups, layout.num_blocks, cfg.controller)
        self.group_loss = np.zeros(layout.num_item_groups)
        self.features = controller_features(popularity, layout.item_groups, self.group_loss)

    def weights(self) -> np.ndarray:
        return self.controller.weights(self.features)

    def unit_order(self) -> np.ndarray:
        return unit_order_for(self.weights(), self.layout, self.cfg.unit_order)

    def apply(self, uploads: list[PEEUpload]) -> dict[str, float]:
        n = self.layout.num_item_groups
        grad = torch.zeros_like(self.table)
        devices = np.zeros(self.table.shape[0], dtype=np.int64)
        wgrad = np.zeros((n, self.layout.num_blocks))
        val_devices, loss_sum, loss_cnt, users = 0, np.zeros(n), np.zeros(n), 0
        for up in uploads:
            grad.index_add_(0, torch.from_numpy(up.rows), torch.from_numpy(up.grad))
            np.add.at(devices, up.rows, up.row_devices)
            wgrad += up.weight_grad
            val_devices += up.val_devices
            loss_sum += up.loss_sum
            loss_cnt += up.loss_count
            users += up.users
        if noised(self.dp):
            # the loss features are not uploaded under DP (``PEEDevices.device_round``)
            if self.server_noise:
                std, rng = self.dp.noise_std, self.noise_rng
                grad += gaussian_noise(tuple(grad.shape), std, rng)
                wgrad = wgrad + gaussian_noise(wgrad.shape, std, rng).double().numpy()
            rows = np.arange(self.table.shape[0])
            self.adam.step(self.table, torch.from_numpy(rows), grad / self.users_per_round)
            self.controller.apply_weight_grad(self.features, wgrad / self.users_per_round)
            return {"users": users, "loss": None, "rows": int(rows.size)}  # loss kept at home
        rows = np.flatnonzero(devices)
        if rows.size:
            g = grad[rows] / torch.from_numpy(devices[rows]).float()[:, None]
            self.adam.step(self.table, torch.from_numpy(rows), g)
        if val_devices:
            self.controller.apply_weight_grad(self.features, wgrad / val_devices)
        seen = loss_cnt > 0
        if seen.any():
            self.group_loss[seen] = loss_sum[seen] / loss_cnt[seen]
            self.group_loss[~seen] = self.group_loss[seen].mean()
            self.features = controller_features(
                self.popularity, self.layout.item_groups, self.group_loss
            )
        home = self.cfg.ldp_noise > 0  # local DP: the devices keep their loss statistics too
        return {
            "users": users,
            "loss": None if home else float(loss_sum.sum() / max(loss_cnt.sum(), 1)),
            "rows": int(rows.size),
        }


def known_sampler(fit: Interactions, val: Interactions, n_items: int) -> NegativeSampler:
    """The negative sampler of PEE learning: never one of the user's fit or validation items."""
    known = Interactions(
        np.concatenate([fit.users, val.users]), np.concatenate([fit.items, val.items])
    )
    return NegativeSampler(known, n_items)


class PEEPairs:
    """The (positive, negative) pairs a node's users train and validate on in a PEE round, all
    drawn by the users' own generators: known before any table arrives (sparse downloads)."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        fit: Interactions,
        val: Interactions,
        seed: int = 0,
        sampler: NegativeSampler | None = None,
    ) -> None:
        self.fit, self.val, self.seed = fit, val, seed
        self.fit_bounds = fit.user_bounds(n_users)
        self.val_bounds = val.user_bounds(n_users)
        self.sampler = sampler or known_sampler(fit, val, n_items)

    def fit_pairs(self, users: np.ndarray, round_no: int):
        """(owner index, positive, negative, 1 / d_u weight) of the users' training pairs."""
        return self._pairs(self.fit, self.fit_bounds, users, NEG_STREAM + round_no)

    def val_pairs(self, users: np.ndarray, round_no: int):
        """The same for the users' validation pairs."""
        return self._pairs(self.val, self.val_bounds, users, VAL_NEG_STREAM + round_no)

    def training_users(self, users: np.ndarray) -> np.ndarray:
        """Those of ``users`` with training pairs (the others sit a round out)."""
        users = np.asarray(users, dtype=np.int64)
        return users[np.diff(self.fit_bounds)[users] > 0]

    def has_validation(self, users: np.ndarray) -> np.ndarray:
        """Per user of ``users``, whether it has validation pairs."""
        return np.diff(self.val_bounds)[users] > 0

    def rows_read(self, users: np.ndarray, round_no: int) -> np.ndarray:
        """The table rows (sorted) that :meth:`PEEDevices.device_round` of ``users`` reads in
        round ``round_no``, so that a sparse download of just these rows gives the same result
        as the whole table: the users' training items and negatives, and their validation items
        and negatives."""
        users = self.training_users(users)
        _, pos, neg, _ = self.fit_pairs(users, round_no)
        _, vpos, vneg, _ = self.val_pairs(users[self.has_validation(users)], round_no)
        return np.unique(np.concatenate([pos, neg, vpos, vneg]).astype(np.int64))

    def _pairs(self, edges: Interactions, bounds: np.ndarray, users: np.ndarray, stream: int):
        lo, hi = bounds[users], bounds[users + 1]
        counts = hi - lo
        owner = np.repeat(np.arange(users.size), counts)
        pos = edges.items[concat_ranges(lo, hi)]
        negs = [
            self.sampler.sample(np.full(int(c), u), user_rng(self.seed, int(u), stream))
            for u, c in zip(users, counts, strict=True)
        ]
        neg = np.concatenate(negs) if negs else np.zeros(0, dtype=np.int64)
        weight = 1.0 / np.repeat(np.maximum(counts, 1), counts)
        return owner, pos, neg, weight


class PEEDevices:
    """Device side of PEE learning for the users one node hosts: their PEE user vectors and the
    Adam moments of those vectors (a phone's state; a simulated node keeps it for all its users).
    """

    def __init__(
        self,
        users: np.ndarray,
        user_vectors: np.ndarray,
        n_users: int,
        fit: Interactions,
        val: Interactions,
        layout: BlockLayout,
        cfg: FedPEEConfig,
        seed: int = 0,
        sampler: NegativeSampler | None = None,
    ) -> None:
        self.users = np.asarray(users, dtype=np.int64)
        self.vecs = torch.tensor(user_vectors, dtype=torch.float32)
        self.adam = RowAdam(tuple(self.vecs.shape), cfg.user_lr)
        self.layout, self.cfg, self.seed = layout, cfg, seed
        self.pairs = PEEPairs(n_users, layout.n_items, fit, val, seed, sampler)
        self.fit, self.val = fit, val
        self.fit_bounds, self.val_bounds = self.pairs.fit_bounds, self.pairs.val_bounds
        self.item_groups = torch.from_numpy(layout.item_groups)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"users": self.users, "vecs": self.vecs.numpy(), **self.adam.state()}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        if not np.array_equal(arrays["users"], self.users):
            raise ValueError("device state belongs to other users")
        self.vecs = torch.from_numpy(np.array(arrays["vecs"]))
        self.adam.load(arrays)

    def device_round(
        self,
        users: np.ndarray,
        table: np.ndarray,
        alpha: np.ndarray,
        round_no: int,
        clip: float | None = None,
        private: bool = False,
    ) -> PEEUpload:
        """One round for the hosted ``users`` (all in one user group) against ``table``.

        With ``clip`` (user-level DP), each user's row gradients and weight gradient are scaled
        together to L2 norm at most ``clip`` before they are summed; ``private`` (DP noise on the
        server) also keeps the per-item-group loss statistics on the device. With
        ``cfg.ldp_noise`` (local DP, needs ``clip``), each user then adds its own Gaussian noise
        of ``ldp_noise * clip`` to each of its row gradients and weight-gradient values.
        """
        users = self.pairs.training_users(users)
        num_item_groups, n_blocks = self.layout.num_item_groups, self.layout.num_blocks
        if users.size == 0:
            z = np.zeros(0, dtype=np.int64)
            return PEEUpload(
                z,
                np.zeros((0, table.shape[1]), np.float32),
                z,
                np.zeros((num_item_groups, n_blocks)),
                0,
                np.zeros(num_item_groups),
                np.zeros(num_item_groups),
                0,
            )
        local = torch.from_numpy(np.searchsorted(self.users, users))
        T = torch.as_tensor(table, dtype=torch.float32)
        n_items = T.shape[0]
        # each device's elastic budget for this round: the weights it would rank with
        if self.cfg.elastic:
            per_user = np.stack(
                [
                    sampled_budget_weights(
                        alpha,
                        self.layout,
                        self.cfg.unit_order,
                        user_rng(self.seed, int(u), ELASTIC_STREAM + round_no),
                    )
                    for u in users
                ]
            )
        else:
            per_user = np.broadcast_to(alpha, (users.size, num_item_groups, n_blocks))
        alpha_u = torch.from_numpy(np.ascontiguousarray(per_user)).float()
        owner, pos, neg, weight = self.pairs.fit_pairs(users, round_no)
        owner_t, pos_t, neg_t = (torch.from_numpy(x) for x in (owner, pos, neg))
        w = torch.from_numpy(weight).float()
        a_pos = alpha_u[owner_t, self.item_groups[pos_t]]
        a_neg = alpha_u[owner_t, self.item_groups[neg_t]]
        # every (user, row) pair gets its own copy of the row, so that each user's gradient
        # stays apart (per-user clipping) until the rows are summed
        pos_keys, neg_keys = owner * n_items + pos, owner * n_items + neg
        keys = np.unique(np.concatenate([pos_keys, neg_keys]))
        key_rows = keys % n_items
        pos_k = torch.from_numpy(np.searchsorted(keys, pos_keys))
        neg_k = torch.from_numpy(np.searchsorted(keys, neg_keys))
        Tk = T[torch.from_numpy(key_rows)].clone().requires_grad_(True)
        loss_sum_g = np.zeros(num_item_groups)
        loss_cnt_g = np.zeros(num_item_groups)
        grad_keys = None
        for step in range(self.cfg.local_steps):
            u = self.vecs[local].clone().requires_grad_(True)
            t_pos, t_neg = (Tk[pos_k], Tk[neg_k]) if step == 0 else (T[pos_t], T[neg_t])
            s_pos = pair_scores(u[owner_t], t_pos, a_pos, n_blocks)
            s_neg = pair_scores(u[owner_t], t_neg, a_neg, n_blocks)
            pair = bpr_loss(s_pos, s_neg, reduction="none")
            sq = u.pow(2).sum(-1)[owner_t] + t_pos.pow(2).sum(-1) + t_neg.pow(2).sum(-1)
            loss = ((pair + self.cfg.l2 * 0.5 * sq) * w).sum()
            if step == 0:
                g_u, grad_keys = torch.autograd.grad(loss, [u, Tk])
                pl = pair.detach().numpy()
                groups_pos = self.layout.item_groups[pos]
                loss_sum_g = np.bincount(groups_pos, weights=pl, minlength=num_item_groups)
                loss_cnt_g = np.bincount(groups_pos, minlength=num_item_groups).astype(np.float64)
            else:
                (g_u,) = torch.autograd.grad(loss, [u])
            self.adam.step(self.vecs, local, g_u)
        rows, where = np.unique(key_rows, return_inverse=True)
        row_devices = np.bincount(where, minlength=rows.size)
        # as if alone: per touched row its id, device count and gradient; per user its weight
        # gradient, per-item-group loss sums and counts, and two counts
        per_user_bytes = (num_item_groups * n_blocks + 2 + 2 * num_item_groups) * FLOAT64_BYTES
        row_bytes = INT64_BYTES + INT64_BYTES + FLOAT32_BYTES * T.shape[1]
        solo = int(keys.size * row_bytes + per_user_bytes * users.size)
        # outer level: dL_val / d alpha of each device's mean validation loss, tables fixed
        wgrads, val_devices = self.validation_weight_grad(users, T, alpha, round_no)
        if clip is not None:
            key_owner = torch.from_numpy(keys // n_items)
            sq_norms = torch.zeros(users.size).index_add_(0, key_owner, grad_keys.pow(2).sum(-1))
            sq_norms += torch.from_numpy(wgrads).float().pow(2).sum((1, 2))
            factors = clip_factors(sq_norms, clip)
            grad_keys = grad_keys * factors[key_owner][:, None]
            wgrads = wgrads * factors.double().numpy()[:, None, None]
        if self.cfg.ldp_noise:
            grad_keys, wgrads = self._local_noise(
                users, keys // n_items, grad_keys, wgrads, round_no, clip
            )
        if private:
            loss_sum_g, loss_cnt_g = np.zeros(num_item_groups), np.zeros(num_item_groups)
        grad = torch.zeros(rows.size, T.shape[1]).index_add_(0, torch.from_numpy(where), grad_keys)
        return PEEUpload(
            rows=rows,
            grad=grad.numpy(),
            row_devices=row_devices,
            weight_grad=wgrads.sum(0),
            val_devices=val_devices,
            loss_sum=loss_sum_g,
            loss_count=loss_cnt_g,
            users=int(users.size),
            solo_bytes=solo,
        )

    def _local_noise(
        self,
        users: np.ndarray,
        key_owner: np.ndarray,
        grad_keys: torch.Tensor,
        wgrads: np.ndarray,
        round_no: int,
        clip: float | None,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Local DP: each user's own noise (std ``ldp_noise * clip``, from its own stream) on
        its rows' gradients (``key_owner``: the index in ``users`` of each row copy's user,
        sorted) and on its weight gradient."""
        if clip is None:
            raise ValueError("local DP noise needs dp-clip (its scale is a multiple of the clip)")
        std = self.cfg.ldp_noise * clip
        per_user = np.bincount(key_owner, minlength=users.size)
        dim = grad_keys.shape[1]
        row_noise, weight_noise = [], np.empty_like(wgrads)
        for i, u in enumerate(users):
            rng = user_rng(self.seed, int(u), LDP_PEE_STREAM + round_no)
            row_noise.append(rng.normal(0.0, std, size=(per_user[i], dim)))
            weight_noise[i] = rng.normal(0.0, std, size=wgrads.shape[1:])
        noise = torch.from_numpy(np.concatenate(row_noise).astype(np.float32))
        return grad_keys + noise, wgrads + weight_noise

    def validation_weight_grad(
        self, users: np.ndarray, T: torch.Tensor, alpha: np.ndarray, round_no: int
    ) -> tuple[np.ndarray, int]:
        """Per user (aligned with ``users``) ``dL_val / d alpha`` of its mean validation loss,
        zero for users without validation data, and how many users have some."""
        out = np.zeros((users.size, *np.shape(alpha)))
        has_val = self.pairs.has_validation(users)
        val_users = users[has_val]
        if val_users.size == 0:
            return out, 0
        local = torch.from_numpy(np.searchsorted(self.users, val_users))
        owner, pos, neg, weight = self.pairs.val_pairs(val_users, round_no)
        owner_t, pos_t, neg_t = (torch.from_numpy(x) for x in (owner, pos, neg))
        a = torch.tensor(alpha, dtype=torch.float32).expand(val_users.size, *np.shape(alpha))
        a = a.clone().requires_grad_(True)  # one copy per user: per-user gradients
        u = self.vecs[local][owner_t]
        n_blocks = self.layout.num_blocks
        s_pos = pair_scores(u, T[pos_t], a[owner_t, self.item_groups[pos_t]], n_blocks)
        s_neg = pair_scores(u, T[neg_t], a[owner_t, self.item_groups[neg_t]], n_blocks)
        loss = (bpr_loss(s_pos, s_neg, reduction="none") * torch.from_numpy(weight).float()).sum()
        (grad,) = torch.autograd.grad(loss, a)
        out[has_val] = grad.numpy().astype(np.float64)
        return out, int(val_users.size)


def train_fed_pee(
    user_vectors: np.ndarray,
    item_table: np.ndarray,
    assignment: np.ndarray,
    n_users: int,
    fit: Interactions,
    val: Interactions,
    popularity: np.ndarray,
    layout: BlockLayout,
    cfg: FedPEEConfig,
    seed: int = 0,
    rounds: int = 25,
    cohort_fraction: float = 0.2,
) -> tuple[list[PEEGroupServer], PEEDevices]:
    """Federated PEE learning in one process (reference for tests and tuning): every device in
    one :class:`PEEDevices`, the same rounds and participation as the Flower strategy (whose
    ``rounds`` and ``cohort_fraction`` are the run config's ``pee-rounds`` and
    ``pee-cohort-fraction``)."""
    if rounds < 0 or not 0 < cohort_fraction <= 1:
        raise ValueError(f"invalid rounds {rounds} or cohort fraction {cohort_fraction}")
    users = np.arange(n_users)
    devices = PEEDevices(users, user_vectors, n_users, fit, val, layout, cfg, seed)
    num_user_groups = int(assignment.max()) + 1
    servers = [
        PEEGroupServer(item_table, popularity, layout, cfg, seed * 1000 + g)
        for g in range(num_user_groups)
    ]
    per_pass = rounds_per_pass_for(cohort_fraction)
    for r in range(1, rounds + 1):
        part = round_participants(seed, users, r, per_pass, PEE_SLOT_STREAM)
        for g, server in enumerate(servers):
            mine = part[assignment[part] == g]
            up = devices.device_round(mine, server.table.numpy(), server.weights(), r)
            server.apply([up])
    return servers, devices
