"""On-device evaluation of federated PEEL: what every node computes, and the server's table.

Each node ranks all items for each of its users at every budget level of the table with PEEL's
bit-plane units (the default, :mod:`peel_fed.fedplanes`), PEEL's block units and the block
baselines; and with the default at its own budget (drawn per device in simulation, or the
SuperNode's in deployment) and at the drill's cuts of it, made on the device. It sends only
sums of Recall@20, NDCG@20 and user counts
(:func:`evaluation_vector`, laid out by :class:`EvalSpec`); summed over nodes, they give the means
of :func:`evaluation_table`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from peel_fed.baselines import DIRECT_BITS, best_bits_and_dims, direct_quantize, magnitude_prune
from peel_fed.blocks import BlockLayout, BudgetError, parse_budget, select_prefix
from peel_fed.data import Interactions
from peel_fed.fedplanes import PlaneOrders, plane_metric_sums
from peel_fed.metrics import per_user_metrics
from peel_fed.own_budget import drill_cut, mean_metrics, own_budget_bytes, own_budget_rows
from peel_fed.scoring import budget_score_fn, dot_score_fn


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
    for budget in np.unique(budgets):
        sel = users[budgets == budget]
        if budget < layout.min_budget_bytes:
            continue
        units = select_prefix(unit_order, layout, int(budget))
        if not len(units):
            continue
        score = budget_score_fn(user_vectors, item_table, unit_weights, units, layout, row_of)
        m = per_user_metrics(score, n_users, train, test, ks=(20,), users=sel)
        rows = row_of[m["user"]]
        out[rows, 0] = m["recall@20"]
        out[rows, 1] = m["ndcg@20"]
        out[rows, 2] = 1.0
    return out


BASELINES = ("first-k blocks", "random units")
PRUNING = "magnitude pruning"
ROW_QUANTIZATION = "row quantization, best bits x dims"  # bits x dims chosen on validation


@dataclass(frozen=True)
class EvalSpec:
    """What every device evaluates: the budget levels of the table, the choices its own budget is
    drawn from, the drill fractions of its own budget, and the number of user groups."""

    budget_bytes: tuple[int, ...]
    device_budgets: tuple[str, ...]
    drill: tuple[float, ...]
    num_user_groups: int
    full_table_bytes: int
    # devices also append the drill ranked with the units they were served
    # (:func:`peel_fed.fedserve.served_sums`), so one secure sum carries both
    with_served: bool = False

    @property
    def methods(self) -> tuple[str, ...]:
        """Rows of the budget table; the first is the default, which the drill and the per-group
        rows measure."""
        k = self.num_user_groups
        return (f"PEEL bit-planes (G_u={k})", f"PEEL blocks (G_u={k})", *BASELINES, PRUNING)

    def to_config(self) -> dict:
        return {
            "budget-bytes": list(self.budget_bytes),
            "device-budgets": list(self.device_budgets),
            "drill": list(self.drill),
            "num-user-groups": self.num_user_groups,
            "full-table-bytes": self.full_table_bytes,
            "with-served": self.with_served,
        }

    @classmethod
    def from_config(cls, rec) -> EvalSpec:
        return cls(
            budget_bytes=tuple(int(b) for b in rec["budget-bytes"]),
            device_budgets=tuple(str(b) for b in rec["device-budgets"]),
            drill=tuple(float(f) for f in rec["drill"]),
            num_user_groups=int(rec["num-user-groups"]),
            full_table_bytes=int(rec["full-table-bytes"]),
            with_served=bool(rec.get("with-served", False)),
        )

    def sizes(self) -> tuple[int, int, int, int]:
        """Lengths of the vector's parts: the budget table, the own-budget classes with the
        drill, per user group, and the row-quantization candidates (test and validation sums of
        every bit width at every level)."""
        b = len(self.budget_bytes)
        return (
            len(self.methods) * b * 3,
            len(self.device_budgets) * (1 + len(self.drill)) * 3,
            self.num_user_groups * b * 3,
            b * len(DIRECT_BITS) * 6,
        )

    def length(self) -> int:
        return sum(self.sizes())


def _sums(per_user: np.ndarray, select: np.ndarray | None = None) -> np.ndarray:
    rows = per_user if select is None else per_user[select]
    return rows.sum(axis=0) if rows.size else np.zeros(3)


def metric_sums(score_fn, users: np.ndarray, n_users: int, seen, targets) -> np.ndarray:
    """(Recall@20 sum, NDCG@20 sum, users with targets) of ``users`` ranking with ``score_fn``."""
    m = per_user_metrics(score_fn, n_users, seen, targets, ks=(20,), users=users)
    return np.array([m["recall@20"].sum(), m["ndcg@20"].sum(), m["user"].size], dtype=np.float64)


def compression_sums(
    levels: np.ndarray,
    table: np.ndarray,
    users: np.ndarray,
    user_vectors: np.ndarray,
    n_users: int,
    train: Interactions,
    test: Interactions,
    validation: tuple[Interactions, Interactions],
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The compression baselines of the pretrained ``table``, on the device: magnitude pruning
    at each level (test sums), and row quantization with every bit width of
    :data:`peel_fed.baselines.DIRECT_BITS` at the most leading columns that fit each level (test
    and validation sums, so that the server picks each level's bit width on validation; zeros
    where a width fits no column). ``validation`` is the (fit, validation) split."""
    row_of = np.full(n_users, -1, dtype=np.int64)
    row_of[users] = np.arange(users.size)
    n_items, dim = table.shape
    pruning, quant, cache = [], [], {}
    for b in levels.tolist():
        try:
            pruned, _ = magnitude_prune(table, b)
            score = dot_score_fn(user_vectors, pruned, user_rows=row_of)
            pruning.append(metric_sums(score, users, n_users, train, test))
        except BudgetError:
            pruning.append(np.zeros(3))
        try:
            shapes = {s.bits: s for s in best_bits_and_dims(b, n_items, dim)}
        except BudgetError:
            shapes = {}
        for bits in DIRECT_BITS:
            if bits not in shapes:
                quant.append(np.zeros(6))
                continue
            d = shapes[bits].dims
            if (bits, d) not in cache:
                values, _ = direct_quantize(table[:, :d], bits)
                score = dot_score_fn(user_vectors[:, :d], values, user_rows=row_of)
                cache[bits, d] = np.concatenate(
                    [
                        metric_sums(score, users, n_users, train, test),
                        metric_sums(score, users, n_users, *validation),
                    ]
                )
            quant.append(cache[bits, d])
    return pruning, quant


def evaluation_vector(
    spec: EvalSpec,
    tables: dict[str, np.ndarray],
    planes: PlaneOrders,
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
    *,
    validation: tuple[Interactions, Interactions],
) -> np.ndarray:
    """A node's evaluation sums, to be summed over nodes (see :func:`evaluation_table`).

    Each user's own budget is drawn from ``spec.device_budgets`` by its hash (simulation), or is
    ``node_budget`` for all of the node's users (deployment: the SuperNode's ``device-budget``),
    which must equal one of ``spec.device_budgets`` in bytes.

    ``tables`` holds, per user group g, ``table-g``, ``alpha-g``, ``order-g`` (the group's PEE
    blocks), and ``pretrained``, ``order-first-k blocks``, ``order-random units`` for the
    baselines; ``validation`` the (fit, validation) split the row-quantization baseline picks
    its bit width on (:func:`compression_sums`); ``planes`` the coded pretrained item table and
    each group's bit-plane order, ranked with the pretrained user vectors (as in the centralized
    study). Sums are (Recall@20, NDCG@20, users with test items) triples.
    """
    levels = np.array(spec.budget_bytes, dtype=np.int64)
    choice = np.array([parse_budget(c, spec.full_table_bytes) for c in spec.device_budgets])
    own = own_budget_bytes(seed, users, spec.device_budgets, spec.full_table_bytes, node_budget)
    ones = np.ones((layout.num_item_groups, layout.num_blocks))
    part_a, part_b, part_c = [], [], []

    def planes_at(
        budget_per_user: np.ndarray,
        cut_from: np.ndarray | None = None,
        only: np.ndarray | None = None,
    ) -> np.ndarray:
        """Per-user sums with bit-planes (0s outside ``only``, a mask, if given)."""
        out = np.zeros((users.size, 3))
        for g in range(spec.num_user_groups):
            sel = (groups == g) if only is None else (groups == g) & only
            if sel.any():
                out[sel] = plane_metric_sums(
                    users[sel],
                    pretrained_vectors[sel],
                    planes.code,
                    planes.orders[g],
                    layout.item_groups,
                    budget_per_user[sel],
                    n_users,
                    train,
                    test,
                    cut_from=None if cut_from is None else cut_from[sel],
                )
        return out

    def blocks_at(budget_per_user: np.ndarray) -> np.ndarray:
        out = np.zeros((users.size, 3))
        for g in range(spec.num_user_groups):
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

    peel_levels = [planes_at(np.full(users.size, b)) for b in levels]
    for j in range(levels.size):
        part_a.append(_sums(peel_levels[j]))
    for b in levels:
        part_a.append(_sums(blocks_at(np.full(users.size, b))))
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
    pruning, part_d = compression_sums(
        levels, tables["pretrained"], users, pretrained_vectors, n_users, train, test, validation
    )
    part_a += pruning
    for budget in choice:
        mine = own == budget
        at_own = next(
            (pl for lv, pl in zip(levels, peel_levels, strict=True) if lv == budget), None
        )
        if at_own is None:
            at_own = planes_at(np.full(users.size, budget), only=mine)
        part_b.append(_sums(at_own, mine))
        for f in spec.drill:  # a cut where nothing fits counts no device (see plane_metric_sums)
            cut = np.full(users.size, drill_cut(budget, f))
            held = np.full(users.size, budget)
            part_b.append(_sums(planes_at(cut, cut_from=held, only=mine), mine))
    for g in range(spec.num_user_groups):
        for j in range(levels.size):
            part_c.append(_sums(peel_levels[j], groups == g))
    parts = (part_a, part_b, part_c, part_d)
    return np.concatenate([np.concatenate(p) for p in parts])


def evaluation_table(total: np.ndarray, spec: EvalSpec) -> dict:
    """Means from the summed evaluation vector: the budget table (row quantization at each
    level: the bit width with the best validation Recall@20, its test means), own-budget classes
    with the dynamic-budget drill, and PEEL per user group."""
    trip = total.reshape(-1, 3)
    mean = mean_metrics
    rows, per_group = [], []
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
    own_rows = len(spec.device_budgets) * (1 + len(spec.drill))
    drill = own_budget_rows(
        trip[i : i + own_rows], spec.device_budgets, spec.drill, spec.full_table_bytes
    )
    i += own_rows
    for g in range(spec.num_user_groups):
        for budget in spec.budget_bytes:
            per_group.append({"group": g, "budget_bytes": int(budget), **mean(trip[i])})
            i += 1
    for budget in spec.budget_bytes:
        fits = []
        for bits in DIRECT_BITS:
            test_sums, val_sums = trip[i], trip[i + 1]
            i += 2
            if test_sums[2] > 0 or val_sums[2] > 0:
                fits.append((mean(val_sums)["recall@20"], bits, test_sums))
        if fits:
            val_recall, bits, test_sums = max(fits, key=lambda f: (f[0], f[1]))
            rows.append(
                {
                    "method": ROW_QUANTIZATION,
                    "budget_bytes": int(budget),
                    "budget_fraction": budget / spec.full_table_bytes,
                    **mean(test_sums),
                    "bits": bits,
                    "val_recall@20": val_recall,
                }
            )
    assert i * 3 == spec.length()
    return {"rows": rows, "drill": drill, "per_group": per_group}
