"""Baselines at equal device bytes: magnitude pruning of the item table with sparse storage,
row-wise direct k-bit quantization, and the embedding size a retrained (non-elastic) LightGCN can
afford.

Byte accounting is explicit (as in torchrec): a pruned table is stored in the cheaper of two
sparse formats, and the budget buys as many kept values as that format allows.

- **CSR**: a row pointer per item plus one (``int32``) and, per kept value, its column index
  (``uint8`` when ``dim <= 256``, else ``uint16``) and the value (``float32``).
- **bitmap**: one bit per table entry (which entries are kept), then the kept values.
- **bitmap-int8** (:func:`magnitude_prune_int8`): the bitmap, one float16 scale per row and one
  ``int8`` per kept value (symmetric per-row code of the kept values).

A directly quantized table keeps the leading ``dims`` columns at ``bits`` bits per value, packed,
plus every row's float16 offset and scale (the affine code of :class:`peel_fed.planes.PlaneCode`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from peel_fed.blocks import (
    BITS_PER_BYTE,
    FLOAT16_BYTES,
    FLOAT32_BYTES,
    INT8_BYTES,
    INT16_BYTES,
    INT32_BYTES,
    UINT8_BYTES,
    BudgetError,
)
from peel_fed.planes import ROW_META_BYTES, PlaneCode, float16_up, plane_bytes


@dataclass(frozen=True)
class SparseCapacity:
    """How many values a budget keeps in the cheaper sparse format, and what they cost."""

    kept: int
    storage: str  # "csr", "bitmap" or "bitmap-int8"
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
        SparseCapacity(0, "bitmap", _bitmap_bytes(n_rows, dim), FLOAT32_BYTES),
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


def _bitmap_bytes(n_rows: int, dim: int) -> int:
    """One bit per entry of an ``n_rows x dim`` table, packed."""
    return -(-n_rows * dim // BITS_PER_BYTE)


def _largest_entries(table: np.ndarray, kept: int) -> np.ndarray:
    """Boolean mask of the ``kept`` largest-magnitude entries (ties: row-major order first)."""
    flat = np.abs(table).ravel()
    keep = np.zeros(flat.size, dtype=bool)
    if kept:
        # stable sort on -|w|: equal magnitudes keep their row-major order
        keep[np.argsort(-flat, kind="stable")[:kept]] = True
    return keep.reshape(table.shape)


def magnitude_prune(table: np.ndarray, budget_bytes: int) -> tuple[np.ndarray, SparseCapacity]:
    """Keep the largest-magnitude entries of ``table`` that fit ``budget_bytes`` sparsely; the
    rest become 0. Ties at the cut are broken by position (row-major), so the result is
    deterministic. Returns the pruned dense copy (for scoring) and the storage it stands for."""
    table = np.asarray(table, dtype=np.float32)
    cap = sparse_capacity(budget_bytes, table.shape[0], table.shape[1])
    pruned = np.where(_largest_entries(table, cap.kept), table, np.float32(0))
    return pruned, cap


INT8_LEVELS = 127  # symmetric int8 code: values in [-127, 127]


def int8_capacity(budget_bytes: int, n_rows: int, dim: int) -> SparseCapacity:
    """The most int8 values of an ``n_rows x dim`` table that fit ``budget_bytes`` as a bitmap
    (one bit per entry) plus one float16 scale per row plus one byte per kept value.

    Raises ``BudgetError`` when the budget does not hold the bitmap and the scales.
    """
    overhead = _bitmap_bytes(n_rows, dim) + n_rows * FLOAT16_BYTES
    if budget_bytes < overhead:
        raise BudgetError(
            f"budget {budget_bytes} B is below the bitmap and row scales of int8 pruning "
            f"({overhead} B for {n_rows} x {dim} values)"
        )
    kept = min((budget_bytes - overhead) // INT8_BYTES, n_rows * dim)
    return SparseCapacity(int(kept), "bitmap-int8", overhead, INT8_BYTES)


def int8_row_scales(kept: np.ndarray) -> np.ndarray:
    """(n_rows,) float16 scales of a table whose dropped entries are 0: ``max |v| / 127`` of each
    row rounded up to float16 (0 for a row with nothing kept)."""
    top = np.abs(np.asarray(kept, dtype=np.float64)).max(axis=1)
    scale = float16_up(top / INT8_LEVELS)
    if not np.isfinite(scale).all():
        raise ValueError("table values exceed what a float16 int8 scale can hold")
    return scale


def magnitude_prune_int8(table: np.ndarray, budget_bytes: int) -> tuple[np.ndarray, SparseCapacity]:
    """Magnitude pruning with int8 values: keep the largest-magnitude entries that fit
    ``budget_bytes`` in ``bitmap-int8`` storage (:func:`int8_capacity`), quantize each row's kept
    values symmetrically (``q = clip(round(v / scale), -127, 127)``, scale of
    :func:`int8_row_scales`) and return the dequantized dense copy ``q * scale`` (for scoring;
    every kept entry within ``scale / 2`` of the original, dropped entries 0) and the storage."""
    table = np.asarray(table, dtype=np.float32)
    cap = int8_capacity(budget_bytes, table.shape[0], table.shape[1])
    kept = np.where(_largest_entries(table, cap.kept), table, np.float32(0)).astype(np.float64)
    scale = int8_row_scales(kept).astype(np.float64)[:, None]
    ratio = np.divide(kept, scale, out=np.zeros_like(kept), where=scale > 0)
    q = np.clip(np.rint(ratio), -INT8_LEVELS, INT8_LEVELS)
    return (q * scale).astype(np.float32), cap


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


DIRECT_BITS = (8, 4, 2, 1)  # the bit widths the direct-quantization baseline tries


def direct_quantization_bytes(n_items: int, dims: int, bits: int) -> int:
    """Bytes of an ``n_items x dims`` table at ``bits`` bits per value, packed, plus the float16
    offset and scale of every row: ``ceil(n_items * dims * bits / 8) + n_items * 4``."""
    return plane_bytes(n_items, dims * bits) + n_items * ROW_META_BYTES


def direct_quantize(table: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """Row-wise affine ``bits``-bit quantization of ``table`` (float16 offset rounded down, float16
    scale rounded up, codes against the stored meta): the float32 table a device ranks with, and
    its bytes. Every entry is within ``scale / 2`` of the original."""
    table = np.asarray(table, dtype=np.float32)
    values, _ = PlaneCode.encode(table, bits=bits).decode()
    return values, direct_quantization_bytes(table.shape[0], table.shape[1], bits)


@dataclass(frozen=True)
class QuantizedShape:
    """A directly quantized table that fits a budget: ``bits`` per value of the leading ``dims``
    columns, and its bytes."""

    bits: int
    dims: int
    bytes: int


def best_bits_and_dims(
    budget_bytes: int, n_items: int, dim: int, bits_options: tuple[int, ...] = DIRECT_BITS
) -> list[QuantizedShape]:
    """For every bit width, the most leading columns (at most ``dim``) whose directly quantized
    table fits ``budget_bytes``; widths that fit no column are left out. The caller evaluates each
    (quantizing ``table[:, :dims]`` and scoring with ``users[:, :dims]``) and keeps the best.

    Raises ``BudgetError`` when no width fits even one column.
    """
    room_bits = (budget_bytes - n_items * ROW_META_BYTES) * BITS_PER_BYTE
    shapes = []
    for bits in bits_options:
        dims = min(dim, room_bits // (n_items * bits)) if room_bits > 0 else 0
        if dims >= 1:
            shapes.append(
                QuantizedShape(bits, int(dims), direct_quantization_bytes(n_items, dims, bits))
            )
    if not shapes:
        fewest = min(bits_options)
        need = direct_quantization_bytes(n_items, 1, fewest)
        raise BudgetError(
            f"budget {budget_bytes} B is below one quantized column of {n_items} items at "
            f"{fewest} bit(s) ({need} B)"
        )
    return shapes
