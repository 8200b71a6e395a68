"""The on-device store of bit-plane elastic embeddings: download, shrink and grow by units.

A device holds a prefix of its user group's unit order (:func:`peel_fed.planes.greedy_plane_order`).
The server sends each unit as a :class:`PlaneUnit`: plane ``p`` of every row of item group ``g``,
packed 8 values to a byte, and with a group's first plane the rows' float16 offsets and scales.
A unit's payload is exactly the bytes :func:`peel_fed.planes.plane_unit_bytes` charges for it, so
the bytes a device downloads and holds are the bytes the budget counts.

:class:`PlaneStore` keeps what the device holds. ``shrink`` drops the order's last units (no
server contact) and ``grow`` fetches the next ones; either way the store equals what the server
serves at that budget (:meth:`peel_fed.planes.PlaneCode.serve`), bit for bit
(``tests/test_plane_store.py``). Rows are stored in item-id order within each group; items stored
sorted by group need no item-to-group map, so the map is not counted (as for
:class:`peel_fed.store.PEEStore`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from peel_fed.blocks import BudgetError
from peel_fed.planes import (
    CODE_BITS,
    HeldPlanes,
    PlaneCode,
    order_unit_bytes,
    plane_score_fn,
    planes_at_budget,
)
from peel_fed.scoring import ScoreFn


@dataclass(frozen=True)
class PlaneUnit:
    """The payload of unit ``(group, plane)``: packed plane bits of the group's rows (row-major,
    rows in item-id order) and, for plane 0, the rows' float16 offsets then scales."""

    group: int
    plane: int
    bits: bytes
    meta: bytes = b""

    @property
    def nbytes(self) -> int:
        return len(self.bits) + len(self.meta)


def unit_payload(code: PlaneCode, item_groups: np.ndarray, group: int, plane: int) -> PlaneUnit:
    """What the server sends for unit ``(group, plane)`` of ``code`` (plane 0: the top bit)."""
    if not 0 <= plane < code.bits:
        raise ValueError(f"plane must be in [0, {code.bits}), got {plane}")
    rows = np.flatnonzero(np.asarray(item_groups) == group)
    if not rows.size:
        raise ValueError(f"item group {group} has no items")
    bit = (code.codes[rows].astype(np.int64) >> (code.bits - 1 - plane)) & 1
    meta = b""
    if plane == 0:
        meta = code.offset[rows].astype("<f2").tobytes() + code.scale[rows].astype("<f2").tobytes()
    return PlaneUnit(group, plane, np.packbits(bit.astype(np.uint8).ravel()).tobytes(), meta)


class PlaneStore:
    """A device's bit-plane embeddings: the prefix of ``order`` it holds, as :class:`HeldPlanes`.

    Parameters
    ----------
    order
        (units, 2) unit order of the device's user group, (group, plane) pairs.
    item_groups
        (n_items,) item group of every item.
    dim
        Embedding dimension.
    """

    def __init__(
        self, order: np.ndarray, item_groups: np.ndarray, dim: int, bits: int = CODE_BITS
    ) -> None:
        self.order = np.asarray(order, dtype=np.int64).reshape(-1, 2)
        self.item_groups = np.asarray(item_groups, dtype=np.int64)
        self.group_sizes = np.bincount(self.item_groups)
        self.dim = int(dim)
        n = self.item_groups.size
        self.held = HeldPlanes(
            top=np.zeros((n, self.dim), dtype=np.uint16),
            planes=np.zeros(n, dtype=np.int64),
            offset=np.zeros(n, dtype=np.float16),
            scale=np.zeros(n, dtype=np.float16),
            bits=bits,
        )
        self.kept = 0  # units of the order held (a prefix)
        self.units: list[PlaneUnit] = []  # their payloads, as received (what a device saves)
        self._unit_bytes = order_unit_bytes(self.order, self.group_sizes, self.dim)

    @property
    def used_bytes(self) -> int:
        """Bytes of the units held (what the budget counts)."""
        return int(self._unit_bytes[: self.kept].sum())

    def _prefix_at(self, budget_bytes: int) -> int:
        planes, _ = planes_at_budget(self.order, self.group_sizes, self.dim, budget_bytes)
        return int(planes.sum())

    def shrink(self, budget_bytes: int) -> list[tuple[int, int]]:
        """Drop the last held units until the rest fits ``budget_bytes`` (no server contact;
        a budget below the first unit keeps nothing); returns the dropped units, last first."""
        try:
            k = min(self._prefix_at(budget_bytes), self.kept)
        except BudgetError:
            k = 0
        dropped = [tuple(u) for u in self.order[k : self.kept][::-1].tolist()]
        planes = np.bincount(self.order[:k, 0], minlength=self.group_sizes.size)
        self.held = self.held.cut_to(planes[self.item_groups])
        self.kept = k
        del self.units[k:]
        return dropped

    def grow(
        self, budget_bytes: int, fetch: Callable[[int, int], PlaneUnit]
    ) -> list[tuple[int, int]]:
        """Fetch the next units of the order that fit ``budget_bytes`` (``fetch(group, plane)``
        asks the server for one); returns the units added, in order."""
        k = self._prefix_at(budget_bytes)
        added = []
        for g, p in self.order[self.kept : k].tolist():
            unit = fetch(g, p)
            if (unit.group, unit.plane) != (g, p):
                raise ValueError(f"asked for unit ({g}, {p}), got ({unit.group}, {unit.plane})")
            self._add(unit)
            added.append((g, p))
        return added

    def _add(self, unit: PlaneUnit) -> None:
        rows = np.flatnonzero(self.item_groups == unit.group)
        if unit.nbytes != int(self._unit_bytes[self.kept]):
            raise ValueError(
                f"unit ({unit.group}, {unit.plane}) has {unit.nbytes} B, "
                f"expected {int(self._unit_bytes[self.kept])}"
            )
        bit = np.unpackbits(np.frombuffer(unit.bits, dtype=np.uint8), count=rows.size * self.dim)
        h = self.held  # updated in place: one unit touches only its group's rows
        h.top[rows] = (h.top[rows] << 1) | bit.reshape(rows.size, self.dim).astype(np.uint16)
        h.planes[rows] += 1
        if unit.plane == 0:
            meta = np.frombuffer(unit.meta, dtype="<f2")
            h.offset[rows], h.scale[rows] = meta[: rows.size], meta[rows.size :]
        self.units.append(unit)
        self.kept += 1

    def score_fn(self, user_vectors: np.ndarray, user_rows: np.ndarray | None = None) -> ScoreFn:
        """Scores of the device's users with what it holds (items with no plane: ``-inf``)."""
        return plane_score_fn(user_vectors, self.held, user_rows)


def served_store(
    code: PlaneCode, order: np.ndarray, item_groups: np.ndarray, budget_bytes: int
) -> PlaneStore:
    """What a device downloads at ``budget_bytes``: the order's prefix that fits, unit by unit."""
    store = PlaneStore(order, item_groups, code.dim, code.bits)
    store.grow(budget_bytes, lambda g, p: unit_payload(code, item_groups, g, p))
    return store
