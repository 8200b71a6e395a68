"""Baselines at equal device bytes: magnitude pruning of the item table with sparse storage, and
the embedding size a retrained (non-elastic) LightGCN can afford.

Byte accounting is explicit (as in torchrec): a pruned table is stored in the cheaper of two
sparse formats, and the budget buys as many kept values as that format allows.

- **CSR**: a row pointer per item plus one (``int32``) and, per kept value, its column index
  (``uint8`` when ``dim <= 256``, else ``uint16``) and the value (``float32``).
- **bitmap**: one bit per table entry (which entries are kept), then the kept values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from peel_fed.blocks import (
    BITS_PER_BYTE,
    FLOAT32_BYTES,
    INT16_BYTES,
    INT32_BYTES,
    UINT8_BYTES,
    BudgetError,
)


@dataclass(frozen=True)
class SparseCapacity:
    """How many values a budget keeps in the cheaper sparse format, and what they cost."""

    kept: int
    storage: str  # "csr" or "bitmap"
    overhead_bytes: int
    bytes_per_value: int

    @property
    def bytes(self) -> int:
        return self.overhead_bytes + self.kept * self.bytes_per_value


def sparse_capacity(budget_bytes: int, n_rows: int, dim: int) -> SparseCapacity:
    """The most values of an ``n_rows x dim`` float32 table that fit ``budget_bytes`` sparsely.

    Raises ``BudgetError`` when the budget does not even hold either format's fixed part.
    """
    index_bytes = UINT8_BYTES if dim <= 256 else INT16_BYTES
    options = [
        SparseCapacity(0, "csr", INT32_BYTES * (n_rows + 1), FLOAT32_BYTES + index_bytes),
        SparseCapacity(0, "bitmap", -(-n_rows * dim // BITS_PER_BYTE), FLOAT32_BYTES),
    ]
    best = None
    for opt in options:
        room = budget_bytes - opt.overhead_bytes
        if room < 0:
            continue
        kept = min(room // opt.bytes_per_value, n_rows * dim)
        cand = SparseCapacity(int(kept), opt.storage, opt.overhead_bytes, opt.bytes_per_value)
        if best is None or cand.kept > best.kept:
            best = cand
    if best is None:
        need = min(o.overhead_bytes for o in options)
        raise BudgetError(
            f"budget {budget_bytes} B is below the fixed part of sparse storage ({need} B for "
            f"{n_rows} x {dim} values)"
        )
    return best


def magnitude_prune(table: np.ndarray, budget_bytes: int) -> tuple[np.ndarray, SparseCapacity]:
    """Keep the largest-magnitude entries of ``table`` that fit ``budget_bytes`` sparsely; the
    rest become 0. Ties at the cut are broken by position (row-major), so the result is
    deterministic. Returns the pruned dense copy (for scoring) and the storage it stands for."""
    table = np.asarray(table, dtype=np.float32)
    cap = sparse_capacity(budget_bytes, table.shape[0], table.shape[1])
    flat = np.abs(table).ravel()
    keep = np.zeros(flat.size, dtype=bool)
    if cap.kept:
        # stable sort on -|w|: equal magnitudes keep their row-major order
        keep[np.argsort(-flat, kind="stable")[: cap.kept]] = True
    pruned = np.where(keep.reshape(table.shape), table, np.float32(0))
    return pruned, cap


def affordable_dim(budget_bytes: int, n_items: int, full_dim: int) -> int:
    """The largest embedding size whose dense float32 item table fits ``budget_bytes`` (at most
    ``full_dim``): what a LightGCN retrained for this budget can use."""
    dim = min(full_dim, budget_bytes // (n_items * FLOAT32_BYTES))
    if dim < 1:
        raise BudgetError(
            f"budget {budget_bytes} B is below a 1-dimensional item table "
            f"({n_items * FLOAT32_BYTES} B)"
        )
    return int(dim)
