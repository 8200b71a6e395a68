"""Federated LightGCN pretraining: the algorithm, without any transport (Flower-free reference).

The server holds the item ego table ``E0`` and the item-side propagated layers as sums of device
contributions; a device holds its user ego vector ``u0`` and its items. With item degrees ``d_i``
(from the statistics phase) and the user's degree ``d_u``:

- user side, on the device: ``u_{k+1} = sum_{i in N(u)} L_k[i] / sqrt(d_u d_i)`` with
  ``L_0 = E0``; final user vector = mean of ``u_0 .. u_K``;
- item side, on the server: ``L_{k+1}[i] = (1 / sqrt(d_i)) * sum_{u in N(i)} u_k / sqrt(d_u)``.
  Device u contributes ``v_k = u_k / sqrt(d_u)`` to each of its items; it keeps its last
  contribution and sends only the change, so the server keeps running sums ``S_k`` and
  ``L_{k+1} = S_k / sqrt(d_i)``;
- final item vector = mean of ``E0, L_1 .. L_K``.

A round: a cohort of users, each *as if alone* (its own negatives from ``user_rng``), computes
its BPR loss against the current server tables, takes local Adam steps on ``u0``, and returns
(a) the gradient of its loss with respect to the ``E0`` rows it touched and (b) its contribution
change. The server averages each ``E0`` row's gradient over the devices that touched it, applies a
server Adam step, and adds the contribution changes. The gradient does not flow through the
item-side layers (they are other users' sums): that and the staleness of ``L_k`` are what this
scheme gives up against centralized LightGCN. The cohort is computed in one vectorised batch; since
every user's loss depends only on its own data and the shared tables, the result equals per-user
computation.

Long file: about 780 lines, on purpose: the server (:class:`PretrainServer`), the devices
(:class:`PretrainDevices`) and the in-process federation (:class:`FedLightGCN`) are the two halves
of the equations above and their composition; each half is checked against the other (the
contribution sums, the row gradients), so they are read together.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from peel_fed.blocks import FLOAT32_BYTES, FLOAT64_BYTES, INT64_BYTES
from peel_fed.data import Interactions, concat_ranges
from peel_fed.lightgcn import check_sampling_and_schedule, cosine_lr
from peel_fed.negatives import DNS_CHUNK, NegativeSampler, dns_negatives
from peel_fed.optim import RowAdam
from peel_fed.partition import user_rng, user_slots
from peel_fed.privacy import DPConfig, clip_factors, gaussian_noise, noised
from peel_fed.scoring import bpr_loss, pair_scores

SERVER_OPTIMIZERS = ("adam", "sgd")
SGD_MOMENTUM = 0.9


@dataclass
class FedLightGCNConfig:
    dim: int = 64
    layers: int = 3
    rounds: int = 50
    cohort_fraction: float = 1.0
    local_steps: int = 20
    server_lr: float = 2e-2
    user_lr: float = 2e-2
    l2: float = 1e-4
    init_std: float = 0.1
    # decoy items per user (FedPerGNN's pseudo-interacted items): uploaded as if interacted
    decoys: int = 0
    # local DP (FedPerGNN's noise on uploads): each user adds Gaussian noise of this many times
    # the clip to every value of its clipped upload before it leaves the device
    ldp_noise: float = 0.0
    # dynamic negative sampling on each device (``peel_fed.negatives.dns_negatives``): each pair
    # trains on the hardest of ``dns_candidates`` items for its user, scored with the tables the
    # device received
    negative_sampling: str = "uniform"
    dns_candidates: int = 16
    # the server's and the devices' learning rates decay along a half cosine over ``rounds``
    lr_schedule: str = "constant"
    # the server's step on E0: "adam" (per-row Adam), or "sgd" (heavy-ball momentum 0.9 on the
    # aggregate, as DP-FedAvg: under DP noise Adam scales every coordinate to the learning rate,
    # so rows that receive only noise move as far as rows with signal)
    server_optimizer: str = "adam"
    # local work on the items: the first ``item_local_steps`` of the ``local_steps`` also move
    # the device's copies of the E0 rows it received (SGD at ``item_local_lr``), and the upload
    # is the sum of their gradients along that path (FedAvg's pseudo-gradient); 1: the gradient
    # at the received tables only
    item_local_steps: int = 1
    item_local_lr: float = 0.05

    def __post_init__(self) -> None:
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(
                f"pretrain-server-optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, "
                f"got {self.server_optimizer!r}"
            )
        check_sampling_and_schedule(
            self.negative_sampling,
            self.dns_candidates,
            self.lr_schedule,
            ("pretrain-negative-sampling", "pretrain-dns-candidates", "pretrain-lr-schedule"),
        )
        if self.decoys < 0:
            raise ValueError(f"decoy-items must be >= 0, got {self.decoys}")
        if not (np.isfinite(self.ldp_noise) and self.ldp_noise >= 0):
            raise ValueError(f"ldp-noise-multiplier must be >= 0, got {self.ldp_noise}")
        if not 0 < self.cohort_fraction <= 1:
            raise ValueError(f"cohort-fraction must be in (0, 1], got {self.cohort_fraction}")
        if not 1 <= self.item_local_steps <= self.local_steps:
            raise ValueError(
                f"item-local-steps must be in [1, local-steps={self.local_steps}], "
                f"got {self.item_local_steps}"
            )
        if self.rounds < 0 or self.local_steps < 1 or self.layers < 0:
            raise ValueError(f"invalid federated LightGCN config: {self}")


def lr_factor(cfg: FedLightGCNConfig, round_no: int) -> float:
    """The learning-rate multiplier of round ``round_no`` (1-based) of ``cfg.rounds``."""
    if cfg.lr_schedule == "constant":
        return 1.0
    return cosine_lr(1.0, round_no - 1, max(cfg.rounds, 1))


def rounds_per_pass_for(cohort_fraction: float) -> int:
    """Rounds in one pass over the users when each round samples ``cohort_fraction`` of them."""
    return max(1, int(np.ceil(1.0 / cohort_fraction - 1e-9)))


@dataclass
class DeviceUpdate:
    """A node's upload in one round (sums over the users it hosts)."""

    rows: np.ndarray
    grad: torch.Tensor
    row_devices: np.ndarray
    contrib_rows: np.ndarray
    contrib_delta: torch.Tensor
    loss_sum: float
    users: int
    solo_bytes: int = 0  # what the users would upload if each were alone (same encoding)

    @classmethod
    def empty(cls, cfg: FedLightGCNConfig) -> DeviceUpdate:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, torch.zeros(0, cfg.dim), z, z, torch.zeros(cfg.layers, 0, cfg.dim), 0.0, 0)


INIT_STREAM = 1_000_003  # user_rng stream of a device's initial ego vector
SLOT_STREAM = 2_000_003  # user_slots stream (plus the pass number) for client sampling
DECOY_STREAM = 7_000_003  # a device's decoy items (fixed for the run)
DECOY_NEG_STREAM = 8_000_003  # + round: negatives of the decoy pairs
DNS_STREAM = 10_000_003  # + round: a device's DNS candidates
LDP_STREAM = 9_000_003  # + round (init: + layer - layers): a device's local DP noise


def initial_user_vectors(seed: int, users: np.ndarray, dim: int, std: float) -> torch.Tensor:
    """Each device's initial ego vector, from its own generator (independent of the packing)."""
    out = (
        np.stack([user_rng(seed, int(u), INIT_STREAM).normal(0.0, std, dim) for u in users])
        if len(users)
        else np.zeros((0, dim))
    )
    return torch.from_numpy(out.astype(np.float32))


def round_participants(
    seed: int, users: np.ndarray, round_no: int, rounds_per_pass: int, stream: int = SLOT_STREAM
) -> np.ndarray:
    """The users (of ``users``) that take part in round ``round_no`` (1-based): every user takes
    part in exactly one round of each pass of ``rounds_per_pass`` rounds."""
    users = np.asarray(users, dtype=np.int64)
    pass_no, slot = divmod(round_no - 1, rounds_per_pass)
    return users[user_slots(seed, users, stream + pass_no, rounds_per_pass) == slot]


class PretrainServer:
    """The server's side of federated LightGCN: ``E0`` and the item-side sums ``S_k``."""

    def __init__(
        self,
        n_items: int,
        item_degree: np.ndarray,
        cfg: FedLightGCNConfig,
        seed: int = 0,
        dp: DPConfig | None = None,
        users_per_round: float = 1.0,
        noise_on_devices: bool = False,
    ) -> None:
        self.n_items, self.cfg = n_items, cfg
        self.inv_sqrt_di = inv_sqrt_degree(item_degree)
        gen = torch.Generator().manual_seed(seed)
        self.E0 = torch.randn(n_items, cfg.dim, generator=gen) * cfg.init_std
        self.S = torch.zeros(cfg.layers, n_items, cfg.dim)
        self.item_adam = RowAdam((n_items, cfg.dim), cfg.server_lr)
        self.item_momentum = (
            torch.zeros(n_items, cfg.dim) if cfg.server_optimizer == "sgd" else None
        )
        # user-level DP (``peel_fed.privacy``): noise on every released sum, and the gradient
        # divided by the expected users per round, a public number, not by per-row counts
        self.dp, self.users_per_round = dp, max(float(users_per_round), 1.0)
        self.noise_rng = np.random.default_rng([seed, 23])
        # distributed DP: the nodes added the noise under secure aggregation, the server adds none
        self.server_noise = noised(dp) and not noise_on_devices

    def set_round(self, round_no: int) -> None:
        """The server learning rate of round ``round_no`` (``cfg.lr_schedule``)."""
        self.item_adam.lr = self.cfg.server_lr * lr_factor(self.cfg, round_no)

    def item_layers(self) -> list[torch.Tensor]:
        """[E0, L_1, ..., L_K] as the server holds them."""
        return [self.E0] + [self.S[k] * self.inv_sqrt_di[:, None] for k in range(self.cfg.layers)]

    def final_item_table(self) -> np.ndarray:
        return torch.stack(self.item_layers()).mean(0).numpy().copy()

    def add_contributions(self, rows: np.ndarray, delta: torch.Tensor) -> None:
        for k in range(self.cfg.layers):
            self.S[k].index_add_(0, torch.from_numpy(np.asarray(rows)), delta[k])

    def noise_contributions(self, layers: range | list[int]) -> None:
        """User-level DP: Gaussian noise on every row of the released sums ``S_k``, once per
        aggregate (nothing without DP). An ``init`` exchange releases only its layer's sum."""
        if not self.server_noise:
            return
        for k in layers:
            self.S[k] += gaussian_noise(tuple(self.S[k].shape), self.dp.noise_std, self.noise_rng)

    def _step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """The server's step on ``E0[rows]`` (``cfg.server_optimizer``), at the round's rate."""
        if self.item_momentum is None:
            self.item_adam.step(self.E0, rows, grad)
            return
        m = self.item_momentum[rows] = SGD_MOMENTUM * self.item_momentum[rows] + grad
        self.E0[rows] -= self.item_adam.lr * m

    def apply(self, updates: list[DeviceUpdate]) -> dict[str, float]:
        """Average each touched ``E0`` row over the devices that touched it, take an Adam step,
        and add the contribution changes to the item-side sums.

        With DP noise, noise goes on every row of the gradient sum and of the item-side sums,
        and the gradient is divided by the expected users per round; every row takes the step.
        Without noise (clipping only, epsilon infinite) the aggregation is the plain one.
        """
        grad = torch.zeros(self.n_items, self.cfg.dim)
        devices = np.zeros(self.n_items, dtype=np.int64)
        for up in updates:
            grad.index_add_(0, torch.from_numpy(up.rows), up.grad)
            np.add.at(devices, up.rows, up.row_devices)
            self.add_contributions(up.contrib_rows, up.contrib_delta)
        private = noised(self.dp)  # the loss stays on the devices
        if private:
            self.noise_contributions(range(self.cfg.layers))
            if self.server_noise:
                grad += gaussian_noise(tuple(grad.shape), self.dp.noise_std, self.noise_rng)
            rows = np.arange(self.n_items)
            self._step(torch.from_numpy(rows), grad / self.users_per_round)
        else:
            rows = np.flatnonzero(devices)
            if rows.size:
                g = grad[rows] / torch.from_numpy(devices[rows]).float()[:, None]
                self._step(torch.from_numpy(rows), g)
        users = sum(up.users for up in updates)
        home = private or self.cfg.ldp_noise > 0  # local DP: devices keep their loss too
        return {
            "loss": None if home else sum(up.loss_sum for up in updates) / max(users, 1),
            "users": users,
            "rows": int(rows.size),
        }


def inv_sqrt_degree(item_degree: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(
        1.0 / np.sqrt(np.maximum(np.asarray(item_degree, dtype=np.float64), 1))
    ).float()


class PretrainDevices:
    """The device side for the users one node hosts: ego vectors, their Adam moments and last
    contributions (a phone's state; a simulated node keeps it for all its users).

    ``edges`` must hold at least the hosted users' (fit) interactions; ``users`` are global ids.
    """

    def __init__(
        self,
        users: np.ndarray,
        n_users: int,
        n_items: int,
        edges: Interactions,
        item_degree: np.ndarray,
        cfg: FedLightGCNConfig,
        seed: int = 0,
        sampler: NegativeSampler | None = None,
    ) -> None:
        self.users = np.asarray(users, dtype=np.int64)
        self.n_items, self.cfg, self.seed = n_items, cfg, seed
        self.bounds = edges.user_bounds(n_users)
        self.edges = edges
        self.user_degree = np.diff(self.bounds)
        self.inv_sqrt_di = inv_sqrt_degree(item_degree)
        self.U0 = initial_user_vectors(seed, self.users, cfg.dim, cfg.init_std)
        self.user_adam = RowAdam((self.users.size, cfg.dim), cfg.user_lr)
        self.contrib = torch.zeros(cfg.layers, self.users.size, cfg.dim)
        self.sampler = sampler or NegativeSampler(edges, n_items)
        self._decoys: tuple[np.ndarray, np.ndarray] | None = None  # see decoy_items

    # --- state kept between messages -----------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        return {
            "users": self.users,
            "U0": self.U0.numpy(),
            **self.user_adam.state(),
            "contrib": self.contrib.numpy(),
        }

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        if not np.array_equal(arrays["users"], self.users):
            raise ValueError("device state belongs to other users")
        self.U0 = torch.from_numpy(np.array(arrays["U0"]))
        self.user_adam.load(arrays)
        self.contrib = torch.from_numpy(np.array(arrays["contrib"]))

    def _local(self, users: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.users, users)

    # --- propagation -----------------------------------------------------------------------------
    def _norm_matrix(
        self, users: np.ndarray, columns: np.ndarray | None = None, width: int | None = None
    ) -> torch.Tensor:
        """Sparse CSR (len(users) x n_items) matrix with 1 / sqrt(d_u d_i) at each interaction;
        ``columns`` (one per interaction) and ``width`` renumber its columns."""
        lo, hi = self.bounds[users], self.bounds[users + 1]
        counts = hi - lo
        crow = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]))
        cols = self.edges.items[concat_ranges(lo, hi)]
        du = np.repeat(np.maximum(counts, 1), counts).astype(np.float32)
        vals = torch.from_numpy(1.0 / np.sqrt(du)) * self.inv_sqrt_di[torch.from_numpy(cols)]
        if columns is not None:
            cols = columns
        with warnings.catch_warnings():  # torch flags sparse CSR as beta
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                crow,
                torch.from_numpy(cols),
                vals,
                (users.size, width or self.n_items),
                check_invariants=False,
            )

    def user_layers(self, users: np.ndarray, u0: torch.Tensor, layers) -> list[torch.Tensor]:
        """[u_0, ..., u_K] of the given users from their u0 and the item layers."""
        A = self._norm_matrix(users)
        return [u0] + [torch.sparse.mm(A, layers[k]) for k in range(self.cfg.layers)]

    def final_user_vectors(self, layers: list[torch.Tensor], batch: int = 8192) -> np.ndarray:
        """Final LightGCN vectors (mean of u_0 .. u_K) of all hosted users."""
        out = np.zeros((self.users.size, self.cfg.dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, self.users.size, batch):
                sl = slice(start, start + batch)
                ul = self.user_layers(self.users[sl], self.U0[sl], layers)
                out[sl] = torch.stack(ul).mean(0).numpy()
        return out

    # --- uploads -------------------------------------------------------------------------------
    def contribution_upload(
        self,
        users: np.ndarray,
        layer_vectors: dict[int, torch.Tensor],
        clip: float | None = None,
        sq_norms: torch.Tensor | None = None,
        noise: dict[int, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """The change of ``v_k = u_k / sqrt(d_u)`` on the users' item rows, summed over users.

        ``layer_vectors[k]`` holds u_k of ``users``; the devices' last contributions are updated
        to what was sent. With ``clip``, each user's change (over all its rows and layers, plus
        ``sq_norms``, the squared norm of the rest of its upload) is scaled to L2 norm at most
        ``clip``. Returns the item rows (sorted), a (layers, rows, dim) tensor, zero for absent
        k, and the per-user scales (all ones without ``clip``). ``noise[k]`` (local DP), one
        row per (user, row) pair in :meth:`_contribution_pairs` order, is added to what is sent,
        not to what the device keeps.
        """
        local = torch.from_numpy(self._local(users))
        counts = self.bounds[users + 1] - self.bounds[users]
        owner, item_of_pair = self._contribution_pairs(users)
        by_item = np.argsort(item_of_pair, kind="stable")  # sorted index_add_ is ~3x faster
        rows, where = np.unique(item_of_pair[by_item], return_inverse=True)
        where_t, owner_t = torch.from_numpy(where), torch.from_numpy(owner[by_item])
        scale = torch.from_numpy(1.0 / np.sqrt(np.maximum(counts, 1))).float()[:, None]
        new = {k: uk.detach() * scale for k, uk in layer_vectors.items()}
        changes = {k: v - self.contrib[k, local] for k, v in new.items()}
        factors = torch.ones(users.size)
        if clip is not None:
            # each change sits on the user's rows (d_u items and its decoys)
            rows_of = torch.from_numpy(np.bincount(owner, minlength=users.size)).float()
            sq = sum(c.pow(2).sum(-1) for c in changes.values()) * rows_of
            factors = clip_factors(sq + (0 if sq_norms is None else sq_norms), clip)
            changes = {k: c * factors[:, None] for k, c in changes.items()}
            new = {k: self.contrib[k, local] + c for k, c in changes.items()}
        delta = torch.zeros(self.cfg.layers, rows.size, self.cfg.dim)
        for k, change in changes.items():
            self.contrib[k, local] = new[k]  # what the server now holds for these users
            sent = change[owner_t]
            if noise is not None:
                sent = sent + torch.from_numpy(noise[k][by_item])
            delta[k].index_add_(0, where_t, sent)
        return rows, delta, factors

    def local_noise(
        self, users: np.ndarray, stream: int, rows_per_user: np.ndarray, clip: float | None
    ) -> np.ndarray | None:
        """Local DP: each user's own Gaussian noise (std ``ldp_noise * clip``) for
        ``rows_per_user[j]`` rows of ``dim`` values, stacked in user order; None without it."""
        if not self.cfg.ldp_noise:
            return None
        if clip is None:
            raise ValueError("local DP noise needs dp-clip (its scale is a multiple of the clip)")
        std = self.cfg.ldp_noise * clip
        parts = [
            user_rng(self.seed, int(u), stream).normal(0.0, std, (int(n), self.cfg.dim))
            for u, n in zip(users, rows_per_user, strict=True)
        ]
        return np.concatenate(parts).astype(np.float32) if parts else None

    def _pair_noise(
        self, users: np.ndarray, stream: int, layers: range | list[int], clip: float | None
    ) -> dict[int, np.ndarray] | None:
        """Local DP noise of every contribution row (per layer), in _contribution_pairs order."""
        if not self.cfg.ldp_noise:
            return None
        owner, _ = self._contribution_pairs(users)
        per_user = np.bincount(owner, minlength=users.size)
        order = np.argsort(owner, kind="stable")  # noise is drawn user by user
        out = {}
        for k in layers:
            drawn = self.local_noise(users, stream + 7919 * (k + 1), per_user, clip)
            noise = np.empty_like(drawn)
            noise[order] = drawn
            out[k] = noise
        return out

    def initial_contribution(
        self, k: int, layers: list[torch.Tensor], batch: int = 4096, clip: float | None = None
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Round 0, layer ``k``: every hosted user's first contribution ``u_k / sqrt(d_u)``
        (each scaled to L2 norm at most ``clip`` when given)."""
        users = self.users[self.user_degree[self.users] > 0]
        rows_all, deltas = [], []
        for start in range(0, users.size, batch):
            chunk = users[start : start + batch]
            ul = self.user_layers(chunk, self.U0[torch.from_numpy(self._local(chunk))], layers)
            noise = self._pair_noise(chunk, LDP_STREAM + k - self.cfg.layers, [k], clip)
            rows, delta, _ = self.contribution_upload(chunk, {k: ul[k]}, clip, noise=noise)
            rows_all.append(rows)
            deltas.append(delta)
        if not rows_all:
            return np.zeros(0, dtype=np.int64), torch.zeros(self.cfg.layers, 0, self.cfg.dim)
        rows = np.concatenate(rows_all)
        uniq, where = np.unique(rows, return_inverse=True)
        out = torch.zeros(self.cfg.layers, uniq.size, self.cfg.dim)
        out.index_add_(1, torch.from_numpy(where), torch.cat(deltas, dim=1))
        return uniq, out

    def decoy_items(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each user's decoys (``cfg.decoys`` items it never interacted with, drawn once by its
        own generator, so the same in every round): (owner index into ``users``, item)."""
        k = self.cfg.decoys
        if k == 0 or len(users) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        if self._decoys is None:  # drawn once for every hosted user: (CSR bounds, items)
            drawn = [
                np.unique(
                    self.sampler.sample(np.full(k, u), user_rng(self.seed, int(u), DECOY_STREAM))
                )
                for u in self.users
            ]
            bounds = np.concatenate([[0], np.cumsum([d.size for d in drawn])])
            self._decoys = (bounds, np.concatenate(drawn))
        bounds, all_items = self._decoys
        local = self._local(np.asarray(users, dtype=np.int64))
        lo, hi = bounds[local], bounds[local + 1]
        owner = np.repeat(np.arange(len(users)), hi - lo)
        return owner, all_items[concat_ranges(lo, hi)]

    def _contribution_pairs(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(owner index into ``users``, item) of every row a contribution goes to: the users'
        items, and their decoys, which carry the same contribution (a fake edge)."""
        lo, hi = self.bounds[users], self.bounds[users + 1]
        owner = np.repeat(np.arange(users.size), hi - lo)
        items = self.edges.items[concat_ranges(lo, hi)]
        d_owner, d_items = self.decoy_items(users)
        return np.concatenate([owner, d_owner]), np.concatenate([items, d_items])

    def _negatives(self, users: np.ndarray, round_no: int) -> np.ndarray:
        """One negative per training pair, drawn by each user's own generator."""
        out = [
            self.sampler.sample(
                np.full(int(self.user_degree[u]), u), user_rng(self.seed, int(u), round_no)
            )
            for u in users
        ]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _dns_layout(
        self, users: np.ndarray, round_no: int, owner: np.ndarray, first: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """DNS candidates of a round: per chunk of ``DNS_CHUNK`` pairs of one user, the owner,
        the pairs' first negatives (padded), ``dns_candidates - 1`` shared items drawn by the
        user's own generator, and each pair's slot in the padded rows."""
        m = self.cfg.dns_candidates
        counts = np.bincount(owner, minlength=users.size)
        chunks = -(-counts // DNS_CHUNK)
        pair_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        chunk_start = np.concatenate([[0], np.cumsum(chunks)[:-1]])
        rank = np.arange(owner.size) - pair_start[owner]  # pairs are sorted by owner
        slot = chunk_start[owner] * DNS_CHUNK + rank
        row_owner = np.repeat(np.arange(users.size), chunks * DNS_CHUNK)
        padded_first = np.zeros(row_owner.size, dtype=np.int64)
        padded_first[slot] = first
        shared = np.concatenate(
            [np.zeros((0, m - 1), dtype=np.int64)]
            + [
                user_rng(self.seed, int(u), DNS_STREAM + round_no).integers(
                    0, self.n_items, size=(int(c), m - 1)
                )
                for u, c in zip(users, chunks, strict=True)
            ]
        )
        return row_owner, padded_first, shared, slot

    def _dns_negatives(
        self,
        users: np.ndarray,
        local: np.ndarray,
        layers: list[torch.Tensor],
        round_no: int,
        owner: np.ndarray,
        first: np.ndarray,
    ) -> np.ndarray:
        """DNS on the device: each pair's hardest of ``dns_candidates`` items for its user,
        scored with the user's current final vector and the received item tables (as
        centralized, :func:`peel_fed.negatives.dns_negatives`). The candidates come from each
        user's own generator and are shared by ``DNS_CHUNK`` of its pairs; no chunk spans two
        users, so a user's negatives do not depend on who else its node hosts."""
        if self.cfg.dns_candidates == 1 or owner.size == 0:
            return first
        row_owner, padded_first, shared, slot = self._dns_layout(users, round_no, owner, first)
        with torch.no_grad():
            uf = torch.stack(self.user_layers(users, self.U0[local], layers)).mean(0)
            item_final = torch.stack(layers).mean(0)
        chosen = dns_negatives(
            uf[torch.from_numpy(row_owner)],
            item_final,
            users[row_owner],
            padded_first,
            shared,
            self.sampler,
            DNS_CHUNK,
        )
        return chosen[slot]

    def _decoy_negatives(self, users: np.ndarray, d_owner: np.ndarray, round_no: int) -> np.ndarray:
        """One negative per decoy pair, drawn by each user's own generator."""
        per_user = np.bincount(d_owner, minlength=users.size)
        return np.concatenate(
            [np.zeros(0, dtype=np.int64)]
            + [
                self.sampler.sample(
                    np.full(int(n), u), user_rng(self.seed, int(u), DECOY_NEG_STREAM + round_no)
                )
                for u, n in zip(users, per_user, strict=True)
                if n
            ]
        )

    def rows_read(
        self, step: str, users: np.ndarray | None = None, round_no: int = 0
    ) -> np.ndarray:
        """The item rows (sorted) this node reads from the item layers in a pretraining step,
        so that a sparse download of just these rows gives the same result as the full tables.

        ``init`` and ``final``: the hosted users' items (propagation) and decoys (a node asks
        for no fewer rows than its clear upload touches, so a request is never exactly a user's
        item list when the upload is not). ``round``: the items of
        ``users`` that take part, their negatives (with DNS every candidate), and their decoys
        with the decoys' negatives. Everything here is drawn by the users' own generators, so the
        node knows it before the download.
        """
        if step in ("init", "final"):
            # the decoys too, though not read: the request says no more than the upload does
            return np.unique(self._contribution_pairs(self.users)[1])
        if step != "round":
            raise ValueError(f"unknown pretrain step {step!r}")
        users = np.asarray(users, dtype=np.int64)
        users = users[self.user_degree[users] > 0]
        lo, hi = self.bounds[users], self.bounds[users + 1]
        owner = np.repeat(np.arange(users.size), hi - lo)
        parts = [self.edges.items[concat_ranges(lo, hi)]]
        first = self._negatives(users, round_no)
        parts.append(first)
        if self.cfg.negative_sampling == "dns" and self.cfg.dns_candidates > 1 and owner.size:
            parts.append(self._dns_layout(users, round_no, owner, first)[2].ravel())
        d_owner, d_items = self.decoy_items(users)
        parts += [d_items, self._decoy_negatives(users, d_owner, round_no)]
        return np.unique(np.concatenate(parts).astype(np.int64))

    def device_round(
        self,
        users: np.ndarray,
        layers: list[torch.Tensor],
        round_no: int,
        clip: float | None = None,
        private: bool = False,
    ) -> DeviceUpdate:
        """What one node computes in round ``round_no`` for the hosted ``users`` taking part,
        from the tables it received.

        Updates those users' device state (u0, its Adam moments, last contributions) and returns
        the upload: the summed ``E0`` gradient on the touched rows with the number of hosted
        users that touched each row, and the summed contribution changes on the users' items.
        With ``clip`` (user-level DP), each user's row gradients and contribution change are
        scaled together to L2 norm at most ``clip`` before they are summed; ``private`` (DP
        noise on the server) also keeps the loss on the device.
        """
        users = np.asarray(users, dtype=np.int64)
        users = users[self.user_degree[users] > 0]
        if users.size == 0:
            return DeviceUpdate.empty(self.cfg)
        local = torch.from_numpy(self._local(users))
        lo, hi = self.bounds[users], self.bounds[users + 1]
        counts = hi - lo
        owner = np.repeat(np.arange(users.size), counts)
        pair_user = torch.from_numpy(owner)
        pos_items = self.edges.items[concat_ranges(lo, hi)]
        neg_items = self._negatives(users, round_no)
        received = [layer.detach() for layer in layers]
        if self.cfg.negative_sampling == "dns":
            neg_items = self._dns_negatives(users, local, received, round_no, owner, neg_items)
        self.user_adam.lr = self.cfg.user_lr * lr_factor(self.cfg, round_no)
        # decoys: pairs of (decoy, negative) whose gradient goes up as a positive's would, with
        # the user's vector held fixed (its own training sees only its real items)
        d_owner, d_items = self.decoy_items(users)
        d_neg = self._decoy_negatives(users, d_owner, round_no)
        # every (user, row) pair gets its own copy of the E0 row, so that the gradient of each
        # user's loss stays apart (per-user clipping) until the rows are summed
        pos_keys, neg_keys = owner * self.n_items + pos_items, owner * self.n_items + neg_items
        dpos_keys, dneg_keys = d_owner * self.n_items + d_items, d_owner * self.n_items + d_neg
        keys = np.unique(np.concatenate([pos_keys, neg_keys, dpos_keys, dneg_keys]))
        key_rows = keys % self.n_items
        pos, neg = np.searchsorted(keys, pos_keys), np.searchsorted(keys, neg_keys)
        pos_t, neg_t = torch.from_numpy(pos), torch.from_numpy(neg)
        pos_i, neg_i = torch.from_numpy(pos_items), torch.from_numpy(neg_items)
        weight = torch.from_numpy(1.0 / np.repeat(counts, counts)).float()  # per-user mean
        fixed = received[1:]
        n_layers = len(received)
        E0 = received[0][torch.from_numpy(key_rows)].clone()
        A = self._norm_matrix(users)
        norm_pos = self._norm_matrix(users, pos, keys.size)
        grad_keys, step_grad = torch.zeros_like(E0), None
        # step 0: gradient for u0 and for the received E0 rows (the upload); with
        # item-local-steps > 1 the next steps also move the device's copies of the rows, and the
        # upload is the sum of the row gradients along that path
        for step in range(self.cfg.item_local_steps):
            if step:
                E0 = E0 - self.cfg.item_local_lr * lr_factor(self.cfg, round_no) * step_grad
            E0 = E0.detach().requires_grad_(True)
            u0 = self.U0[local].clone().requires_grad_(True)
            ul = [u0, torch.sparse.mm(norm_pos, E0)]
            ul += [torch.sparse.mm(A, fixed[k - 1]) for k in range(1, self.cfg.layers)]
            up = (E0[pos_t] + sum(f[pos_i] for f in fixed)) / n_layers
            un = (E0[neg_t] + sum(f[neg_i] for f in fixed)) / n_layers
            item_sq = E0[pos_t].pow(2).sum(-1) + E0[neg_t].pow(2).sum(-1)
            uf = torch.stack(ul).mean(0)
            loss = self._pair_loss(uf, u0, up, un, item_sq, pair_user, weight)
            if step == 0:
                loss_sum = float(loss.detach())
            if d_items.size:
                loss = loss + self._decoy_loss(
                    uf.detach(), E0, fixed, keys, d_owner, d_items, d_neg, counts
                )
            g_u0, step_grad = torch.autograd.grad(loss, [u0, E0])
            self.user_adam.step(self.U0, local, g_u0)
            grad_keys = grad_keys + step_grad
        # further local steps move only u0; the propagated part u_1..u_K is fixed by the tables
        propagated = sum(layer.detach() for layer in ul[1:])
        up, un, item_sq = up.detach(), un.detach(), item_sq.detach()
        for _ in range(self.cfg.local_steps - self.cfg.item_local_steps):
            u0 = self.U0[local].clone().requires_grad_(True)
            uf = (u0 + propagated) / n_layers
            loss = self._pair_loss(uf, u0, up, un, item_sq, pair_user, weight)
            (g_u0,) = torch.autograd.grad(loss, [u0])
            self.user_adam.step(self.U0, local, g_u0)
        key_owner = torch.from_numpy(keys // self.n_items)
        grad_sq = torch.zeros(users.size).index_add_(0, key_owner, grad_keys.pow(2).sum(-1))
        # contributions with the new u0 and the tables received
        ul = self.user_layers(users, self.U0[local], received)
        stream = LDP_STREAM + round_no
        contrib_rows, delta, factors = self.contribution_upload(
            users,
            {k: ul[k] for k in range(self.cfg.layers)},
            clip,
            grad_sq,
            noise=self._pair_noise(users, stream, range(self.cfg.layers), clip),
        )
        if clip is not None:
            grad_keys = grad_keys * factors[key_owner][:, None]
        rows_per_user = np.bincount(keys // self.n_items, minlength=users.size)
        key_noise = self.local_noise(users, stream, rows_per_user, clip)  # keys are user-sorted
        if key_noise is not None:
            grad_keys = grad_keys + torch.from_numpy(key_noise)
        rows, where = np.unique(key_rows, return_inverse=True)
        grad = torch.zeros(rows.size, self.cfg.dim).index_add_(
            0, torch.from_numpy(where), grad_keys
        )
        d, k = self.cfg.dim, self.cfg.layers
        # as if alone: per touched row its id, device count and gradient; per interaction its
        # row id and K contributions; per user its loss sum and count
        solo = int(
            keys.size * (INT64_BYTES + INT64_BYTES + FLOAT32_BYTES * d)
            + counts.sum() * (INT64_BYTES + FLOAT32_BYTES * k * d)
            + (FLOAT64_BYTES + INT64_BYTES) * users.size
        )
        return DeviceUpdate(
            rows=rows,
            grad=grad,
            row_devices=np.bincount(where, minlength=rows.size),
            contrib_rows=contrib_rows,
            contrib_delta=delta,
            loss_sum=0.0 if private else loss_sum,
            users=int(users.size),
            solo_bytes=solo,
        )

    def _decoy_loss(self, uf, E0, fixed, keys, d_owner, d_items, d_neg, counts) -> torch.Tensor:
        """The decoy pairs' BPR + L2 on the item rows, each weighted like one of the user's own
        pairs (``1 / d_u``), with the user's vectors ``uf`` fixed."""
        n = len(fixed) + 1
        dp = torch.from_numpy(np.searchsorted(keys, d_owner * self.n_items + d_items))
        dn = torch.from_numpy(np.searchsorted(keys, d_owner * self.n_items + d_neg))
        di, dni = torch.from_numpy(d_items), torch.from_numpy(d_neg)
        up = (E0[dp] + sum(f[di] for f in fixed)) / n
        un = (E0[dn] + sum(f[dni] for f in fixed)) / n
        ue = uf[torch.from_numpy(d_owner)]
        pair = bpr_loss(pair_scores(ue, up), pair_scores(ue, un), reduction="none")
        reg = 0.5 * (E0[dp].pow(2).sum(-1) + E0[dn].pow(2).sum(-1))
        w = torch.from_numpy(1.0 / counts[d_owner]).float()
        return ((pair + self.cfg.l2 * reg) * w).sum()

    def _pair_loss(self, uf, u0, up, un, item_sq, pair_user, weight) -> torch.Tensor:
        """Sum over users of their mean BPR + L2 over their (positive, negative) pairs."""
        ue = uf[pair_user]
        pair = bpr_loss(pair_scores(ue, up), pair_scores(ue, un), reduction="none")
        reg = 0.5 * (u0.pow(2).sum(-1)[pair_user] + item_sq)
        return ((pair + self.cfg.l2 * reg) * weight).sum()


class FedLightGCN:
    """A whole federation in one process: the server and every device (reference and tests)."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        edges: Interactions,
        item_degree: np.ndarray,
        cfg: FedLightGCNConfig,
        seed: int = 0,
        dp: DPConfig | None = None,
    ) -> None:
        self.n_users, self.n_items, self.cfg, self.seed = n_users, n_items, cfg, seed
        self.devices = PretrainDevices(
            np.arange(n_users), n_users, n_items, edges, item_degree, cfg, seed
        )
        active = int((self.devices.user_degree > 0).sum())
        self.server = PretrainServer(
            n_items, item_degree, cfg, seed, dp, active / rounds_per_pass_for(cfg.cohort_fraction)
        )
        self.clip = None if dp is None else dp.clip
        self.private = noised(dp)
        self.round = 0

    @property
    def E0(self) -> torch.Tensor:
        return self.server.E0

    @property
    def S(self) -> torch.Tensor:
        return self.server.S

    @property
    def U0(self) -> torch.Tensor:
        return self.devices.U0

    @property
    def contrib(self) -> torch.Tensor:
        return self.devices.contrib

    def item_layers(self) -> list[torch.Tensor]:
        return self.server.item_layers()

    def initialise(self) -> None:
        """Round 0: every device sends its first contributions, layer by layer (K exchanges)."""
        for k in range(self.cfg.layers):
            self.server.add_contributions(
                *self.devices.initial_contribution(k, self.server.item_layers(), clip=self.clip)
            )
            self.server.noise_contributions([k])

    def run_round(self, users: np.ndarray, num_nodes: int = 1) -> dict[str, float]:
        """One round: the cohort's users, packed into ``num_nodes`` nodes, against the same
        tables; then the server step. The packing does not change the result."""
        self.round += 1
        self.server.set_round(self.round)
        layers = self.server.item_layers()
        chunks = np.array_split(np.asarray(users, dtype=np.int64), num_nodes)
        updates = [
            self.devices.device_round(c, layers, self.round, self.clip, self.private)
            for c in chunks
        ]
        return self.server.apply(updates)

    @torch.no_grad()
    def final_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        layers = self.server.item_layers()
        return self.devices.final_user_vectors(layers), self.server.final_item_table()


def train_fed_lightgcn(
    n_users: int,
    n_items: int,
    edges: Interactions,
    item_degree: np.ndarray,
    cfg: FedLightGCNConfig,
    seed: int = 0,
    on_pass: Callable[[FedLightGCN, dict], None] | None = None,
    dp: DPConfig | None = None,
) -> FedLightGCN:
    """Rounds of sampled cohorts; ``on_pass`` is called after every full pass over the users.
    ``dp`` turns on user-level DP (``pretraining_releases`` counts what to account)."""
    torch.manual_seed(seed)
    model = FedLightGCN(n_users, n_items, edges, item_degree, cfg, seed, dp)
    model.initialise()
    rounds_per_pass = rounds_per_pass_for(cfg.cohort_fraction)
    all_users = np.arange(n_users)
    t0 = time.perf_counter()
    for r in range(cfg.rounds):
        part = round_participants(seed, all_users, r + 1, rounds_per_pass)
        stats = model.run_round(part)
        if on_pass is not None and (r + 1) % rounds_per_pass == 0:
            on_pass(
                model,
                {
                    "round": r + 1,
                    "pass": (r + 1) // rounds_per_pass,
                    "seconds": time.perf_counter() - t0,
                    **stats,
                },
            )
    return model


def pretraining_releases(cfg: FedLightGCNConfig, rounds: int) -> int:
    """Aggregates one user's data can enter in a pretraining of ``rounds`` rounds: the ``layers``
    init exchanges, and one round in each (started) pass."""
    return cfg.layers + -(-rounds // rounds_per_pass_for(cfg.cohort_fraction))
