"""The on-device PEE store: a device's elastic item embeddings and its own user vector.

It holds only the units it keeps (block n of the items of group g), their weights, the unit
order it was served in, and the user's vector. It ranks every item locally, shrinks in place by
dropping its lowest-priority units, and grows by fetching the next units in the fixed order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from peel_fed.blocks import (
    FLOAT32_BYTES,
    INT16_BYTES,
    UINT8_BYTES,
    BlockLayout,
    BudgetError,
    check_budget,
    select_prefix,
)
from peel_fed.scoring import ScoreFn, budget_score_fn

UnitFetcher = Callable[[int, int], np.ndarray]


class PEEStore:
    """A device's personalised elastic embeddings.

    Parameters
    ----------
    layout
        Item groups and block geometry (the item-to-group map is part of the device's overhead).
    unit_weights
        alpha of the device's user group, (G_v, N).
    unit_order
        The fixed deployment order of units, (G_v * N, 2).
    user_vector
        The device's own user embedding (dim,).
    """

    def __init__(
        self,
        layout: BlockLayout,
        unit_weights: np.ndarray,
        unit_order: np.ndarray,
        user_vector: np.ndarray,
    ) -> None:
        self.layout = layout
        self.unit_weights = np.asarray(unit_weights, dtype=np.float64)
        self.unit_order = np.asarray(unit_order, dtype=np.int64).reshape(-1, 2)
        self.user_vector = np.asarray(user_vector, dtype=np.float32)
        self.units: dict[tuple[int, int], np.ndarray] = {}
        self._members = [layout.items_of(g) for g in range(layout.num_item_groups)]

    @classmethod
    def from_item_table(
        cls,
        layout: BlockLayout,
        item_table: np.ndarray,
        unit_weights: np.ndarray,
        unit_order: np.ndarray,
        user_vector: np.ndarray,
        budget_bytes: int,
    ) -> PEEStore:
        """Build a store holding the units of ``item_table`` that fit ``budget_bytes``."""
        store = cls(layout, unit_weights, unit_order, user_vector)
        store.grow(budget_bytes, lambda g, n: unit_slice(layout, item_table, g, n))
        return store

    # --- accounting -------------------------------------------------------------------------
    @property
    def kept_units(self) -> np.ndarray:
        """Kept units in deployment order, (k, 2)."""
        return self.unit_order[: len(self.units)]

    @property
    def unit_bytes(self) -> int:
        """Bytes of the kept embedding units (what the budget limits)."""
        return int(sum(a.nbytes for a in self.units.values()))

    @property
    def overhead_bytes(self) -> int:
        """Bytes held besides units: user vector, unit weights, unit order, item-to-group map."""
        group_id_bytes = UINT8_BYTES if self.layout.num_item_groups <= 256 else INT16_BYTES
        return int(
            self.user_vector.nbytes
            + self.unit_weights.size * FLOAT32_BYTES
            + self.unit_order.size * INT16_BYTES
            + self.layout.n_items * group_id_bytes
        )

    # --- budget changes ---------------------------------------------------------------------
    def shrink(self, budget_bytes: int) -> list[tuple[int, int]]:
        """Drop units from the tail of the order until the kept units fit; returns the dropped."""
        check_budget(budget_bytes, self.layout)
        keep = len(select_prefix(self.unit_order, self.layout, budget_bytes))
        dropped = [tuple(int(v) for v in u) for u in self.unit_order[keep : len(self.units)]]
        for unit in dropped:
            del self.units[unit]
        return dropped

    def grow(self, budget_bytes: int, fetch: UnitFetcher) -> list[tuple[int, int]]:
        """Fetch the next units in order while they fit; ``fetch(g, n)`` returns one unit."""
        check_budget(budget_bytes, self.layout)
        target = len(select_prefix(self.unit_order, self.layout, budget_bytes))
        added = []
        for g, n in self.unit_order[len(self.units) : target]:
            block = np.asarray(fetch(int(g), int(n)), dtype=np.float32)
            expected = (self._members[g].size, self.layout.block_dim)
            if block.shape != expected:
                raise BudgetError(f"unit ({g}, {n}) has shape {block.shape}, expected {expected}")
            self.units[(int(g), int(n))] = block
            added.append((int(g), int(n)))
        return added

    # --- ranking ----------------------------------------------------------------------------
    def score_fn(self, user_vectors: np.ndarray, user_rows: np.ndarray | None = None) -> ScoreFn:
        """Scores of ``user_vectors`` with what the store holds, decoded once: the kept units are
        placed in an item table (zeros where a unit is not kept) and scored as the evaluation
        scores a device at this budget (:func:`peel_fed.scoring.budget_score_fn`); items of
        groups with no kept unit score ``-inf``."""
        layout = self.layout
        bd = layout.block_dim
        table = np.zeros((layout.n_items, layout.dim), dtype=np.float32)
        for (g, n), block in self.units.items():
            table[self._members[g], n * bd : (n + 1) * bd] = block
        return budget_score_fn(
            user_vectors, table, self.unit_weights, self.kept_units, layout, user_rows
        )

    def scores(self) -> np.ndarray:
        """Score of every item for the store's own user (:meth:`score_fn`); items of groups with
        no kept unit score ``-inf``."""
        score = self.score_fn(self.user_vector[None, :])
        return score(np.zeros(1, dtype=np.int64))[0].numpy().astype(np.float64)

    def recommend(self, k: int = 20, exclude: np.ndarray | None = None) -> np.ndarray:
        """Top-k item ids, best first, never returning ``exclude`` (e.g. the user's own items)."""
        s = self.scores()
        if exclude is not None and len(exclude):
            s[np.asarray(exclude, dtype=np.int64)] = -np.inf
        k = min(k, int(np.isfinite(s).sum()))
        top = np.argpartition(-s, k - 1)[:k] if k > 0 else np.zeros(0, dtype=np.int64)
        return top[np.lexsort((top, -s[top]))]


def unit_slice(layout: BlockLayout, item_table: np.ndarray, group: int, block: int) -> np.ndarray:
    """The values of unit (group, block) from a full item table: (|group|, block_dim)."""
    bd = layout.block_dim
    return np.ascontiguousarray(item_table[layout.items_of(group), block * bd : (block + 1) * bd])
