"""Item groups, block units, byte accounting, budgets and unit selection.

An item embedding of ``dim`` values is cut into ``num_blocks`` blocks of ``dim // num_blocks``
values. The catalogue is cut into ``num_item_groups`` groups by popularity (group 0 = most
popular). A *unit* (g, n) is block n of every item in group g; it costs
``len(group g) * block_dim * bytes_per_value`` bytes. A device budget is measured against unit
bytes only; what else a device holds (its user vector, the unit weights, the item-to-group map)
is reported separately as overhead by :class:`peel_fed.store.PEEStore`.

Selection is a prefix of a *unit order*: a budget keeps the longest prefix of the order whose
bytes fit. Shrinking drops units from the tail, growing fetches the next ones, so every budget
change is consistent with one fixed order. PEEL's order (see :func:`weighted_unit_order`) first
gives every item group its best unit (most popular groups first) and then follows the weights.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import numpy as np

# Sizes of the stored types, for byte accounting here and wherever bytes are counted
FLOAT32_BYTES = 4  # an embedding value, a unit weight, a gradient value
FLOAT64_BYTES = 8  # a weight gradient or loss sum sent up
FLOAT16_BYTES = 2  # a row offset or scale of a quantized item table (peel_fed.planes)
INT64_BYTES = 8  # an item row id or a count sent up
INT32_BYTES = 4  # a sparse-storage row pointer
INT16_BYTES = 2  # an entry of a device's unit order, an item-group id past 256 groups
INT8_BYTES = 1  # a kept value of int8 magnitude pruning (peel_fed.baselines)
UINT8_BYTES = 1  # an item-group id up to 256 groups, a sparse column index up to 256 columns
BITS_PER_BYTE = 8


class BudgetError(ValueError):
    """A budget that cannot be met or parsed."""


def popularity_item_groups(popularity: np.ndarray, num_item_groups: int) -> np.ndarray:
    """Group id per item: items sorted by popularity (descending, ties by id), equal-size groups.

    Group 0 holds the most popular items. Group sizes differ by at most one item.
    """
    n_items = popularity.shape[0]
    if not 1 <= num_item_groups <= n_items:
        raise ValueError(f"num_item_groups must be in [1, {n_items}], got {num_item_groups}")
    order = np.lexsort((np.arange(n_items), -popularity))
    groups = np.empty(n_items, dtype=np.int64)
    for g, chunk in enumerate(np.array_split(order, num_item_groups)):
        groups[chunk] = g
    return groups


@dataclass(frozen=True)
class BlockLayout:
    """How an item table is cut into units, with exact byte accounting.

    Attributes
    ----------
    item_groups
        Group id of every item (``n_items`` ints in ``[0, num_item_groups)``).
    """

    item_groups: np.ndarray
    dim: int
    num_blocks: int
    bytes_per_value: int = FLOAT32_BYTES

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.dim % self.num_blocks:
            raise ValueError(
                f"num_blocks must divide dim: dim={self.dim}, num_blocks={self.num_blocks}"
            )
        sizes = self.group_sizes
        if (sizes == 0).any():
            raise ValueError("every item group must hold at least one item")

    @property
    def n_items(self) -> int:
        return int(self.item_groups.shape[0])

    @property
    def num_item_groups(self) -> int:
        return int(self.item_groups.max()) + 1

    @property
    def num_units(self) -> int:
        return self.num_item_groups * self.num_blocks

    @property
    def block_dim(self) -> int:
        return self.dim // self.num_blocks

    @property
    def group_sizes(self) -> np.ndarray:
        return np.bincount(self.item_groups, minlength=int(self.item_groups.max()) + 1)

    @property
    def full_table_bytes(self) -> int:
        return self.n_items * self.dim * self.bytes_per_value

    def unit_bytes(self) -> np.ndarray:
        """Bytes of every unit, shape (G_v, N)."""
        per_group = self.group_sizes * self.block_dim * self.bytes_per_value
        return np.repeat(per_group[:, None], self.num_blocks, axis=1).astype(np.int64)

    def bytes_of(self, units: np.ndarray) -> int:
        """Bytes of a set of units given as an (k, 2) array of (group, block)."""
        units = np.asarray(units, dtype=np.int64).reshape(-1, 2)
        return int(self.unit_bytes()[units[:, 0], units[:, 1]].sum())

    def items_of(self, group: int) -> np.ndarray:
        return np.flatnonzero(self.item_groups == group)

    @property
    def min_budget_bytes(self) -> int:
        """The smallest budget that can hold any unit."""
        return int(self.unit_bytes().min())

    @property
    def cover_bytes(self) -> int:
        """Bytes needed to keep one unit of every item group (every item rankable)."""
        return int(self.unit_bytes()[:, 0].sum())


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*((?:[kKmMgG]i?)?[bB])?\s*$")
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def parse_budget(text: str | float | int, full_table_bytes: int) -> int:
    """Budget in bytes from a fraction of the full item table (``0.25``, ``25%``) or a size.

    Sizes take decimal (``512KB``, ``2MB``) or binary (``1.5MiB``) units, or plain bytes
    (``300000``, ``300000B``). Numbers <= 1 without a unit are fractions. A budget above the full
    table (``150%``, or a size larger than ``full_table_bytes``) is a ``BudgetError``.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
        if 0 < value <= 1:
            return int(value * full_table_bytes)
        if value > 1:
            return _within_table(int(value), text, full_table_bytes)
        raise BudgetError(f"budget must be positive, got {text!r}")
    s = str(text).strip()
    if s.endswith("%"):
        try:
            pct = float(s[:-1])
        except ValueError:
            raise BudgetError(f"cannot parse budget {text!r}") from None
        if not 0 < pct <= 100:
            raise BudgetError(f"budget percentage must be in (0, 100], got {text!r}")
        return int(pct / 100.0 * full_table_bytes)
    m = _SIZE.match(s)
    if not m:
        raise BudgetError(
            f"cannot parse budget {text!r}: use a fraction (0.25), a percentage (25%) "
            "or a size (512KB, 2MB, 1.5MiB)"
        )
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if not unit and number <= 1:  # a fraction
        return parse_budget(number, full_table_bytes)
    if number <= 0:
        raise BudgetError(f"budget must be positive, got {text!r}")
    return _within_table(int(number * _UNITS[unit]), text, full_table_bytes)


def _within_table(budget_bytes: int, text: str | float | int, full_table_bytes: int) -> int:
    """``budget_bytes``, or a one-line ``BudgetError`` if it exceeds the full table."""
    if budget_bytes > full_table_bytes:
        raise BudgetError(
            f"budget {text!r} ({budget_bytes:,} B) is above the full item table "
            f"({full_table_bytes:,} B); use at most 100%"
        )
    return budget_bytes


def check_budget_format(text: str | float | int) -> None:
    """A one-line ``BudgetError`` if ``text`` is no budget; its size is checked later, against
    the item table (:func:`parse_budget`), once the table is known."""
    parse_budget(text, sys.maxsize)


def split_budget_list(text: str) -> list[str]:
    """The items of a comma-separated budget list (``"10%, 25%,512KB"``), stripped, empty items
    dropped; each item is parsed by :func:`parse_budget`.

    Raises ``BudgetError`` when the list holds no budget at all.
    """
    items = [b.strip() for b in str(text).split(",") if b.strip()]
    if not items:
        raise BudgetError(f"give at least one budget, got {text!r}")
    return items


def check_budget(budget_bytes: int, layout: BlockLayout) -> None:
    if budget_bytes < layout.min_budget_bytes:
        raise BudgetError(
            f"budget {budget_bytes} B is below one block unit ({layout.min_budget_bytes} B: "
            f"{layout.group_sizes.min()} items x {layout.block_dim} values x "
            f"{layout.bytes_per_value} B)"
        )


def weighted_unit_order(
    weights: np.ndarray, group_priority: np.ndarray | None = None
) -> np.ndarray:
    """PEEL's deployment order of units, as an (G_v * N, 2) array of (group, block).

    First the best-weighted unit of every item group, groups in ``group_priority`` order (default
    0, 1, ...: most popular first), so that any budget that can cover all groups does; then all
    other units by descending weight (ties by group, then block).
    """
    weights = np.asarray(weights, dtype=np.float64)
    num_item_groups, n_blocks = weights.shape
    if group_priority is None:
        group_priority = np.arange(num_item_groups)
    best = np.argmax(weights, axis=1)
    head = [(int(g), int(best[g])) for g in group_priority]
    taken = np.zeros_like(weights, dtype=bool)
    taken[np.arange(num_item_groups), best] = True
    gg, nn = np.nonzero(~taken)
    rest_order = np.lexsort((nn, gg, -weights[gg, nn]))
    tail = list(zip(gg[rest_order].tolist(), nn[rest_order].tolist(), strict=True))
    return np.asarray(head + tail, dtype=np.int64).reshape(-1, 2)


def consistent_unit_order(weights: np.ndarray, group_sizes: np.ndarray) -> np.ndarray:
    """Weight-ranked blocks shared by all item groups: a learned "first-k blocks" order.

    Blocks are ranked once by their item-weighted mean weight over item groups; the order keeps
    block-rank j of every item group (most popular groups first) before block-rank j + 1. Every
    budget then scores all covered items in the same sub-space, which keeps scores of different
    item groups comparable (see docs/method.md, "Why unit order must be consistent").
    """
    weights = np.asarray(weights, dtype=np.float64)
    num_item_groups, n_blocks = weights.shape
    block_score = (weights * np.asarray(group_sizes, dtype=np.float64)[:, None]).sum(axis=0)
    ranked = np.lexsort((np.arange(n_blocks), -block_score))
    g, j = np.meshgrid(np.arange(num_item_groups), np.arange(n_blocks))
    return np.stack([g.ravel(), ranked[j.ravel()]], axis=1).astype(np.int64)


def first_blocks_order(num_item_groups: int, num_blocks: int) -> np.ndarray:
    """Baseline order "first-k blocks for all items": block 0 of every group, then block 1, ...

    Within a block, groups go most popular first, so a budget between whole blocks spends its
    remainder on the most popular items.
    """
    g, n = np.meshgrid(np.arange(num_item_groups), np.arange(num_blocks))
    return np.stack([g.ravel(), n.ravel()], axis=1).astype(np.int64)


def random_unit_order(num_item_groups: int, num_blocks: int, seed: int) -> np.ndarray:
    """Baseline order "random units": one random unit per group first (as PEEL), then random."""
    rng = np.random.default_rng(seed)
    return weighted_unit_order(rng.random((num_item_groups, num_blocks)))


def select_prefix(order: np.ndarray, layout: BlockLayout, budget_bytes: int) -> np.ndarray:
    """The longest prefix of ``order`` whose bytes fit in ``budget_bytes``; (k, 2) units."""
    check_budget(budget_bytes, layout)
    order = np.asarray(order, dtype=np.int64).reshape(-1, 2)
    sizes = layout.unit_bytes()[order[:, 0], order[:, 1]]
    k = int(np.searchsorted(np.cumsum(sizes), budget_bytes, side="right"))
    return order[:k]


def unit_mask(units: np.ndarray, num_item_groups: int, num_blocks: int) -> np.ndarray:
    """Boolean (G_v, N) mask of the given units."""
    mask = np.zeros((num_item_groups, num_blocks), dtype=bool)
    units = np.asarray(units, dtype=np.int64).reshape(-1, 2)
    mask[units[:, 0], units[:, 1]] = True
    return mask
