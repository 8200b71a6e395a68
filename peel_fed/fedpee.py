"""Federated PEE learning and on-device evaluation: the algorithm, without any transport.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from peel_fed.blocks import BlockLayout, parse_budget, select_prefix, unit_mask
from peel_fed.controller import Controller, ControllerConfig, controller_features
from peel_fed.data import Interactions
from peel_fed.fedlightgcn import _Adam, _ranges
from peel_fed.lightgcn import NegativeSampler
from peel_fed.metrics import per_user_metrics
from peel_fed.partition import user_rng, user_slots
from peel_fed.peel import (
    _sampled_budget_weights,
    budget_unit_weights,
    effective_item_table,
    unit_order_for,
)

NEG_STREAM = 3_000_003  # + round: a device's PEE negatives
PEE_SLOT_STREAM = 6_000_003  # + pass: round participation in PEE learning
ELASTIC_STREAM = 4_000_003  # + round: a device's sampled elastic budget
BUDGET_STREAM = 5_000_003  # a device's own memory budget in simulation


@dataclass
class FedPEEConfig:
    """Federated PEE learning hyper-parameters ([ours] defaults)."""

    rounds: int = 25
    cohort_fraction: float = 0.2
    local_steps: int = 5
    server_lr: float = 5e-3
    user_lr: float = 5e-4
    l2: float = 1e-4
    elastic: bool = True
    unit_order: str = "consistent"
    controller: ControllerConfig = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.controller is None:
            self.controller = ControllerConfig()
        if self.rounds < 0 or self.local_steps < 1 or not 0 < self.cohort_fraction <= 1:
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
    ) -> None:
        self.layout, self.cfg, self.popularity = layout, cfg, popularity
        self.table = torch.tensor(item_table, dtype=torch.float32)
        self.adam = _Adam(tuple(self.table.shape), cfg.server_lr)
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
        return {
            "users": users,
            "loss": float(loss_sum.sum() / max(loss_cnt.sum(), 1)),
            "rows": int(rows.size),
        }


def device_budgets(seed: int, users: np.ndarray, choices: list[str], full_bytes: int) -> np.ndarray:
    """Each device's memory budget in bytes, drawn uniformly from ``choices`` by its own hash."""
    levels = np.array([parse_budget(c, full_bytes) for c in choices], dtype=np.int64)
    return levels[user_slots(seed, users, BUDGET_STREAM, len(levels))]


class PEEDevices:
    """Device side of PEE learning for the users one node hosts: their PEE user vectors and the
    Adam moments of those vectors (a phone's state; a simulated node keeps it for all its users).
    """

    STATE = ("users", "vecs", "m", "v", "t")

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
    ) -> None:
        self.users = np.asarray(users, dtype=np.int64)
        self.vecs = torch.tensor(user_vectors, dtype=torch.float32)
        self.adam = _Adam(tuple(self.vecs.shape), cfg.user_lr)
        self.layout, self.cfg, self.seed = layout, cfg, seed
        self.fit, self.val = fit, val
        self.fit_bounds = fit.user_bounds(n_users)
        self.val_bounds = val.user_bounds(n_users)
        known = Interactions(
            np.concatenate([fit.users, val.users]), np.concatenate([fit.items, val.items])
        )
        self.sampler = NegativeSampler(known, layout.n_items)
        self.item_groups = torch.from_numpy(layout.item_groups)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"users": self.users, "vecs": self.vecs.numpy(), **self.adam.state()}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        if not np.array_equal(arrays["users"], self.users):
            raise ValueError("device state belongs to other users")
        self.vecs = torch.from_numpy(np.array(arrays["vecs"]))
        self.adam.load(arrays)

    def _pairs(self, edges: Interactions, bounds: np.ndarray, users: np.ndarray, stream: int):
        lo, hi = bounds[users], bounds[users + 1]
        counts = hi - lo
        owner = np.repeat(np.arange(users.size), counts)
        pos = edges.items[_ranges(lo, hi)]
        negs = [
            self.sampler.sample(np.full(int(c), u), user_rng(self.seed, int(u), stream))
            for u, c in zip(users, counts, strict=True)
        ]
        neg = np.concatenate(negs) if negs else np.zeros(0, dtype=np.int64)
        weight = 1.0 / np.repeat(np.maximum(counts, 1), counts)
        return owner, pos, neg, weight

    def _scores(self, uvec, table, items, alpha_rows):
        b, d = uvec.shape
        n_blocks = self.layout.num_blocks
        per_block = (uvec * table[items]).reshape(b, n_blocks, d // n_blocks).sum(-1)
        return (per_block * alpha_rows).sum(-1)

    def device_round(
        self, users: np.ndarray, table: np.ndarray, alpha: np.ndarray, round_no: int
    ) -> PEEUpload:
        """One round for the hosted ``users`` (all in one user group) against ``table``."""
        users = np.asarray(users, dtype=np.int64)
        users = users[np.diff(self.fit_bounds)[users] > 0]
        n_groups, n_blocks = self.layout.num_item_groups, self.layout.num_blocks
        if users.size == 0:
            z = np.zeros(0, dtype=np.int64)
            return PEEUpload(
                z,
                np.zeros((0, table.shape[1]), np.float32),
                z,
                np.zeros((n_groups, n_blocks)),
                0,
                np.zeros(n_groups),
                np.zeros(n_groups),
                0,
            )
        local = torch.from_numpy(np.searchsorted(self.users, users))
        T = torch.as_tensor(table, dtype=torch.float32)
        # each device's elastic budget for this round: the weights it would rank with
        if self.cfg.elastic:
            per_user = np.stack(
                [
                    _sampled_budget_weights(
                        alpha,
                        self.layout,
                        self.cfg.unit_order,
                        user_rng(self.seed, int(u), ELASTIC_STREAM + round_no),
                    )
                    for u in users
                ]
            )
        else:
            per_user = np.broadcast_to(alpha, (users.size, n_groups, n_blocks))
        alpha_u = torch.from_numpy(np.ascontiguousarray(per_user)).float()
        owner, pos, neg, weight = self._pairs(
            self.fit, self.fit_bounds, users, NEG_STREAM + round_no
        )
        owner_t, pos_t, neg_t = (torch.from_numpy(x) for x in (owner, pos, neg))
        w = torch.from_numpy(weight).float()
        a_pos = alpha_u[owner_t, self.item_groups[pos_t]]
        a_neg = alpha_u[owner_t, self.item_groups[neg_t]]
        Tg = T.clone().requires_grad_(True)
        loss_sum_g = np.zeros(n_groups)
        loss_cnt_g = np.zeros(n_groups)
        grad_rows = None
        for step in range(self.cfg.local_steps):
            u = self.vecs[local].clone().requires_grad_(True)
            table_now = Tg if step == 0 else T
            s_pos = self._scores(u[owner_t], table_now, pos_t, a_pos)
            s_neg = self._scores(u[owner_t], table_now, neg_t, a_neg)
            pair = torch.nn.functional.softplus(s_neg - s_pos)
            sq = u.pow(2).sum(-1)[owner_t] + table_now[pos_t].pow(2).sum(-1)
            sq = sq + table_now[neg_t].pow(2).sum(-1)
            loss = ((pair + self.cfg.l2 * 0.5 * sq) * w).sum()
            if step == 0:
                g_u, grad_rows = torch.autograd.grad(loss, [u, Tg])
                pl = pair.detach().numpy()
                groups_pos = self.layout.item_groups[pos]
                loss_sum_g = np.bincount(groups_pos, weights=pl, minlength=n_groups)
                loss_cnt_g = np.bincount(groups_pos, minlength=n_groups).astype(np.float64)
            else:
                (g_u,) = torch.autograd.grad(loss, [u])
            self.adam.step(self.vecs, local, g_u)
        keys = np.unique(np.concatenate([owner * T.shape[0] + pos, owner * T.shape[0] + neg]))
        row_devices = np.bincount(keys % T.shape[0], minlength=T.shape[0])
        rows = np.flatnonzero(row_devices)
        per_user = (n_groups * n_blocks + 2 + 2 * n_groups) * 8
        solo = int(keys.size * (8 + 8 + 4 * T.shape[1]) + per_user * users.size)
        # outer level: dL_val / d alpha of each device's mean validation loss, tables fixed
        wgrad, val_devices = self.validation_weight_grad(users, T, alpha, round_no)
        return PEEUpload(
            rows=rows,
            grad=grad_rows[torch.from_numpy(rows)].numpy(),
            row_devices=row_devices[rows],
            weight_grad=wgrad,
            val_devices=val_devices,
            loss_sum=loss_sum_g,
            loss_count=loss_cnt_g,
            users=int(users.size),
            solo_bytes=solo,
        )

    def validation_weight_grad(
        self, users: np.ndarray, T: torch.Tensor, alpha: np.ndarray, round_no: int
    ) -> tuple[np.ndarray, int]:
        users = users[np.diff(self.val_bounds)[users] > 0]
        if users.size == 0:
            return np.zeros_like(alpha, dtype=np.float64), 0
        local = torch.from_numpy(np.searchsorted(self.users, users))
        owner, pos, neg, weight = self._pairs(
            self.val, self.val_bounds, users, NEG_STREAM + 1_000_000 + round_no
        )
        owner_t, pos_t, neg_t = (torch.from_numpy(x) for x in (owner, pos, neg))
        a = torch.tensor(alpha, dtype=torch.float32, requires_grad=True)
        u = self.vecs[local][owner_t]
        s_pos = self._scores(u, T, pos_t, a[self.item_groups[pos_t]])
        s_neg = self._scores(u, T, neg_t, a[self.item_groups[neg_t]])
        loss = (
            torch.nn.functional.softplus(s_neg - s_pos) * torch.from_numpy(weight).float()
        ).sum()
        (grad,) = torch.autograd.grad(loss, a)
        return grad.numpy().astype(np.float64), int(users.size)


def ranking_metric_sums(
    users: np.ndarray,
    user_vectors: np.ndarray,
    item_table: np.ndarray,
    unit_weights: np.ndarray,
    unit_order: np.ndarray,
    layout: BlockLayout,
    budgets: np.ndarray,
    n_users: int,
    train: Interactions,
    test: Interactions,
) -> np.ndarray:
    """Per-user Recall@20 and NDCG@20 when each user keeps the prefix of ``unit_order`` that
    fits its budget ``budgets[j]`` and ranks all items with it (on the device, no server).

    Returns a (len(users), 3) array: recall, ndcg, has-test. Users without test items get 0s, and
    so do users whose budget holds no unit of ``unit_order``'s prefix (they cannot rank at all).
    """
    out = np.zeros((users.size, 3))
    row_of = np.full(n_users, -1, dtype=np.int64)
    row_of[users] = np.arange(users.size)
    uvecs = torch.as_tensor(np.asarray(user_vectors, dtype=np.float32))
    for budget in np.unique(budgets):
        sel = users[budgets == budget]
        if budget < layout.min_budget_bytes:
            continue
        units = select_prefix(unit_order, layout, int(budget))
        if not len(units):
            continue
        mask = unit_mask(units, layout.num_item_groups, layout.num_blocks)
        eff, covered = budget_unit_weights(unit_weights, mask)
        table = torch.from_numpy(effective_item_table(item_table, layout.item_groups, eff))
        dead = torch.from_numpy(~covered[layout.item_groups])

        def score(batch: np.ndarray, table=table, dead=dead) -> torch.Tensor:
            s = uvecs[torch.from_numpy(row_of[batch])] @ table.T
            s[:, dead] = -torch.inf
            return s

        m = per_user_metrics(score, n_users, train, test, ks=(20,), users=sel)
        rows = row_of[m["user"]]
        out[rows, 0] = m["recall@20"]
        out[rows, 1] = m["ndcg@20"]
        out[rows, 2] = 1.0
    return out


BASELINES = ("first-k blocks", "random units")


def drill_cut(budget_bytes: int, fraction: float) -> int:
    """Bytes a device keeps when it cuts its budget to ``fraction`` of it (floored, with a
    tolerance so that a fraction written as a ratio of two budgets gives the smaller one)."""
    return int(np.floor(budget_bytes * fraction + 1e-6))


@dataclass(frozen=True)
class EvalSpec:
    """What every device evaluates: the budget levels of the table, the choices its own budget is
    drawn from, the drill fractions of its own budget, and the number of user groups."""

    budget_bytes: tuple[int, ...]
    device_budgets: tuple[str, ...]
    drill: tuple[float, ...]
    user_groups: int
    full_table_bytes: int

    @property
    def methods(self) -> tuple[str, ...]:
        return (f"PEEL (G_u={self.user_groups})",) + BASELINES

    def to_config(self) -> dict:
        return {
            "budget-bytes": list(self.budget_bytes),
            "device-budgets": list(self.device_budgets),
            "drill": list(self.drill),
            "user-groups": self.user_groups,
            "full-table-bytes": self.full_table_bytes,
        }

    @classmethod
    def from_config(cls, rec) -> EvalSpec:
        return cls(
            budget_bytes=tuple(int(b) for b in rec["budget-bytes"]),
            device_budgets=tuple(str(b) for b in rec["device-budgets"]),
            drill=tuple(float(f) for f in rec["drill"]),
            user_groups=int(rec["user-groups"]),
            full_table_bytes=int(rec["full-table-bytes"]),
        )

    def sizes(self) -> tuple[int, int, int]:
        b = len(self.budget_bytes)
        return (
            len(self.methods) * b * 3,
            len(self.device_budgets) * (1 + len(self.drill)) * 3,
            self.user_groups * b * 3,
        )

    def length(self) -> int:
        return sum(self.sizes())


def _sums(per_user: np.ndarray, select: np.ndarray | None = None) -> np.ndarray:
    rows = per_user if select is None else per_user[select]
    return rows.sum(axis=0) if rows.size else np.zeros(3)


def evaluation_vector(
    spec: EvalSpec,
    tables: dict[str, np.ndarray],
    layout: BlockLayout,
    users: np.ndarray,
    groups: np.ndarray,
    pee_vectors: np.ndarray,
    pretrained_vectors: np.ndarray,
    n_users: int,
    train: Interactions,
    test: Interactions,
    seed: int,
    node_budget: str | None = None,
) -> np.ndarray:
    """A node's evaluation sums, to be summed over nodes (see :func:`evaluation_table`).

    Each user's own budget is drawn from ``spec.device_budgets`` by its hash (simulation), or is
    ``node_budget`` for all of the node's users (deployment: the SuperNode's ``budget-bytes``),
    which must equal one of ``spec.device_budgets`` in bytes.

    ``tables`` holds, per user group g, ``table-g``, ``alpha-g``, ``order-g`` (the group's PEE),
    and ``pretrained``, ``order-first-k blocks``, ``order-random units`` for the baselines.
    Sums are (Recall@20, NDCG@20, users with test items) triples.
    """
    levels = np.array(spec.budget_bytes, dtype=np.int64)
    choice = np.array([parse_budget(c, spec.full_table_bytes) for c in spec.device_budgets])
    if node_budget is None:
        own = device_budgets(seed, users, list(spec.device_budgets), spec.full_table_bytes)
    else:
        mine = parse_budget(node_budget, spec.full_table_bytes)
        if mine not in choice:
            raise ValueError(
                f"node budget-bytes {node_budget!r} ({mine} B) is not one of device-budgets "
                f"{', '.join(spec.device_budgets)}"
            )
        own = np.full(users.size, mine, dtype=np.int64)
    ones = np.ones((layout.num_item_groups, layout.num_blocks))
    part_a, part_b, part_c = [], [], []

    def peel_at(budget_per_user: np.ndarray) -> np.ndarray:
        out = np.zeros((users.size, 3))
        for g in range(spec.user_groups):
            sel = groups == g
            if sel.any():
                out[sel] = ranking_metric_sums(
                    users[sel],
                    pee_vectors[sel],
                    tables[f"table-{g}"],
                    tables[f"alpha-{g}"],
                    tables[f"order-{g}"],
                    layout,
                    budget_per_user[sel],
                    n_users,
                    train,
                    test,
                )
        return out

    peel_levels = [peel_at(np.full(users.size, b)) for b in levels]
    for j in range(levels.size):
        part_a.append(_sums(peel_levels[j]))
    for name in BASELINES:
        for b in levels:
            per_user = ranking_metric_sums(
                users,
                pretrained_vectors,
                tables["pretrained"],
                ones,
                tables[f"order-{name}"],
                layout,
                np.full(users.size, b),
                n_users,
                train,
                test,
            )
            part_a.append(_sums(per_user))
    for budget in choice:
        mine = own == budget
        at_own = next(
            (pl for lv, pl in zip(levels, peel_levels, strict=True) if lv == budget), None
        )
        if at_own is None:
            at_own = peel_at(np.full(users.size, budget))
        part_b.append(_sums(at_own, mine))
        for f in spec.drill:  # a cut where nothing fits counts no device (see ranking_metric_sums)
            part_b.append(_sums(peel_at(np.full(users.size, drill_cut(budget, f))), mine))
    for g in range(spec.user_groups):
        for j in range(levels.size):
            part_c.append(_sums(peel_levels[j], groups == g))
    return np.concatenate([np.concatenate(p) for p in (part_a, part_b, part_c)])


def evaluation_table(total: np.ndarray, spec: EvalSpec) -> dict:
    """Means from the summed evaluation vector: the budget table, own-budget classes with the
    dynamic-budget drill, and PEEL per user group."""
    a, b, _ = spec.sizes()
    trip = total.reshape(-1, 3)

    def mean(t: np.ndarray) -> dict:
        n = max(t[2], 1.0)
        return {"recall@20": float(t[0] / n), "ndcg@20": float(t[1] / n), "users": int(round(t[2]))}

    rows, drill, per_group = [], [], []
    i = 0
    for method in spec.methods:
        for budget in spec.budget_bytes:
            rows.append(
                {
                    "method": method,
                    "budget_bytes": int(budget),
                    "budget_fraction": budget / spec.full_table_bytes,
                    **mean(trip[i]),
                }
            )
            i += 1
    for choice in spec.device_budgets:
        steps = [1.0, *spec.drill]
        full = parse_budget(choice, spec.full_table_bytes)
        for f in steps:
            drill.append(
                {
                    "own_budget": choice,
                    "fraction_of_own": f,
                    "budget_bytes": drill_cut(full, f),
                    **mean(trip[i]),
                }
            )
            i += 1
    for g in range(spec.user_groups):
        for budget in spec.budget_bytes:
            per_group.append({"group": g, "budget_bytes": int(budget), **mean(trip[i])})
            i += 1
    assert i * 3 == a + b + spec.sizes()[2]
    return {"rows": rows, "drill": drill, "per_group": per_group}


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
) -> tuple[list[PEEGroupServer], PEEDevices]:
    """Federated PEE learning in one process (reference for tests and tuning): every device in
    one :class:`PEEDevices`, the same rounds and participation as the Flower strategy."""
    from peel_fed.fedlightgcn import round_participants, rounds_per_pass_for

    users = np.arange(n_users)
    devices = PEEDevices(users, user_vectors, n_users, fit, val, layout, cfg, seed)
    n_groups = int(assignment.max()) + 1
    servers = [
        PEEGroupServer(item_table, popularity, layout, cfg, seed * 1000 + g)
        for g in range(n_groups)
    ]
    per_pass = rounds_per_pass_for(cfg.cohort_fraction)
    for r in range(1, cfg.rounds + 1):
        part = round_participants(seed, users, r, per_pass, PEE_SLOT_STREAM)
        for g, server in enumerate(servers):
            mine = part[assignment[part] == g]
            up = devices.device_round(mine, server.table.numpy(), server.weights(), r)
            server.apply([up])
    return servers, devices
