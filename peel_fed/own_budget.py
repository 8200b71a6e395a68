"""Each device's own memory budget, and the dynamic-budget drill's cuts of it.

In simulation every user draws its own budget from ``device-budgets`` by its hash; in
deployment a SuperNode's ``device-budget`` applies to all users it hosts. The drill cuts a
device's budget to fractions of it, with no server contact. Shared by the full-table evaluation
(:mod:`peel_fed.fedeval`) and the serving of each device's own units (:mod:`peel_fed.fedserve`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from peel_fed.blocks import parse_budget
from peel_fed.partition import user_slots

BUDGET_STREAM = 5_000_003  # a device's own memory budget in simulation


def device_budgets(seed: int, users: np.ndarray, choices: list[str], full_bytes: int) -> np.ndarray:
    """Each device's memory budget in bytes, drawn uniformly from ``choices`` by its own hash."""
    levels = np.array([parse_budget(c, full_bytes) for c in choices], dtype=np.int64)
    return levels[user_slots(seed, users, BUDGET_STREAM, len(levels))]


def own_budget_bytes(
    seed: int,
    users: np.ndarray,
    choices: Sequence[str],
    full_table_bytes: int,
    node_budget: str | None = None,
) -> np.ndarray:
    """Each hosted user's own budget in bytes: the node's ``device-budget`` for all of them
    (deployment; it must be one of ``choices``), else each user's draw from ``choices``."""
    if node_budget is None:
        return device_budgets(seed, users, list(choices), full_table_bytes)
    mine = parse_budget(node_budget, full_table_bytes)
    levels = [parse_budget(c, full_table_bytes) for c in choices]
    if mine not in levels:
        raise ValueError(
            f"node device-budget {node_budget!r} ({mine} B) is not one of device-budgets "
            f"{', '.join(choices)}"
        )
    return np.full(np.asarray(users).size, mine, dtype=np.int64)


def drill_cut(budget_bytes: int, fraction: float) -> int:
    """Bytes a device keeps when it cuts its budget to ``fraction`` of it (floored, with a
    tolerance so that a fraction written as a ratio of two budgets gives the smaller one)."""
    return int(np.floor(budget_bytes * fraction + 1e-6))


def mean_metrics(sums: np.ndarray) -> dict:
    """Means from a (Recall@20 sum, NDCG@20 sum, users) triple."""
    n = max(sums[2], 1.0)
    return {
        "recall@20": float(sums[0] / n),
        "ndcg@20": float(sums[1] / n),
        "users": int(round(sums[2])),
    }


def own_budget_rows(
    trip: np.ndarray, device_budgets: Sequence[str], drill: Sequence[float], full_table_bytes: int
) -> list[dict]:
    """Rows of the own-budget classes and the dynamic-budget drill from their summed triples
    (per class: at the own budget, then each cut)."""
    rows, i = [], 0
    for choice in device_budgets:
        full = parse_budget(choice, full_table_bytes)
        for f in [1.0, *drill]:
            rows.append(
                {
                    "own_budget": choice,
                    "fraction_of_own": f,
                    "budget_bytes": drill_cut(full, f),
                    **mean_metrics(trip[i]),
                }
            )
            i += 1
    return rows
