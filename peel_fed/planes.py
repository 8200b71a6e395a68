"""Elastic item embeddings whose units are bit-planes: PEEL's weighted nested units, cut by bits.

Every item row ``v`` (``dim`` values) gets one affine code of ``bits`` (16) bits per value
(:class:`PlaneCode`): a float16 ``offset`` (the row minimum rounded down to float16) and a float16
``scale`` (``(max - offset) / (2^bits - 1)`` rounded up to float16), and the codes
``c = clip(round((v - offset) / scale), 0, 2^bits - 1)`` computed against the stored float16
values, so a device reconstructs exactly what the server evaluated. A device that keeps the top
``k`` bit-planes of a row holds ``c >> (bits - k)`` (:class:`HeldPlanes`) and reconstructs at the
midpoint of the interval the dropped bits leave open::

    c_hat = (c_k << (bits - k)) + (2^(bits - k) - 1) / 2,   v_hat = offset + scale * c_hat

(``k = bits`` gives ``c`` exactly). Dropping planes on the device (``k -> k' < k``) gives bit for
bit what the server serves with ``k'`` planes, so a device shrinks with no server contact.

A *unit* ``(g, p)`` is plane ``p`` (0 = most significant) of every row of item group ``g`` (the
popularity groups of :func:`peel_fed.blocks.popularity_item_groups`). It costs
``ceil(|g| * dim / 8)`` bytes, and a group's first plane also its rows' float16 offset and scale
(:data:`ROW_META_BYTES` per row, :func:`plane_unit_bytes`). Items of a group with no plane are not
rankable (they score ``-inf``, as items of PEEL's uncovered item groups do).

The unit order is greedy (:func:`greedy_plane_order`): one unit at a time, the one with the most
benefit per byte, where the benefit of a plane is the popularity-weighted drop of the squared
reconstruction error, each dimension weighted by the users' second moment. A budget keeps the
longest prefix of the order that fits (:func:`planes_at_budget`); a larger budget's prefix holds a
smaller one's. As in PEEL (:mod:`peel_fed.blocks`), a budget counts unit bytes only: the
item-to-group map is not counted, since items stored sorted by group need none (PEEL's
:class:`peel_fed.store.PEEStore` reports its map as overhead outside the budget).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from peel_fed.blocks import BITS_PER_BYTE, FLOAT16_BYTES, BudgetError
from peel_fed.scoring import ScoreFn, dot_score_fn

CODE_BITS = 16  # bits per value of the plane code (an uint16 per entry when all planes are kept)
ROW_META_BYTES = 2 * FLOAT16_BYTES  # a row's float16 offset and float16 scale
FLOAT16_MAX = float(np.finfo(np.float16).max)


def _float16_down(x: np.ndarray) -> np.ndarray:
    """The largest float16 <= ``x`` (float64 in, float16 out; beyond float16: inf)."""
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    wrong = h.astype(np.float64) > x
    h[wrong] = np.nextafter(h[wrong], np.float16(-np.inf))
    return h


def float16_up(x: np.ndarray) -> np.ndarray:
    """The smallest float16 >= ``x`` (float64 in, float16 out; beyond float16: inf)."""
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    wrong = h.astype(np.float64) < x
    h[wrong] = np.nextafter(h[wrong], np.float16(np.inf))
    return h


def _planes_per_row(planes: int | np.ndarray | None, n_rows: int, bits: int) -> np.ndarray:
    """``planes`` (None = all, one int for every row, or one per row) as an (n_rows,) int64."""
    if planes is None:
        planes = bits
    out = np.broadcast_to(np.asarray(planes, dtype=np.int64), (n_rows,)).copy()
    if out.size and (out.min() < 0 or out.max() > bits):
        raise ValueError(f"planes per row must be in [0, {bits}], got {out.min()}..{out.max()}")
    return out


@dataclass(frozen=True)
class HeldPlanes:
    """What a device holds: the top ``planes[i]`` bit-planes of row i and, for every row with at
    least one plane, its offset and scale (zero for rows with none).

    Attributes
    ----------
    top
        (n_items, dim) uint16: ``c >> (bits - planes[i])``, 0 for rows with no plane.
    planes
        (n_items,) int64 planes kept per row, in ``[0, bits]``.
    offset, scale
        (n_items,) float16 row meta.
    """

    top: np.ndarray
    planes: np.ndarray
    offset: np.ndarray
    scale: np.ndarray
    bits: int = CODE_BITS

    def cut_to(self, planes: int | np.ndarray) -> HeldPlanes:
        """Drop the lowest planes so that row i keeps ``planes[i]`` (never more than it holds)."""
        target = _planes_per_row(planes, self.planes.shape[0], self.bits)
        if (target > self.planes).any():
            raise ValueError("a device can only drop planes it holds, not add any")
        held = target > 0
        top = (self.top.astype(np.int64) >> (self.planes - target)[:, None]) * held[:, None]
        zero = np.float16(0)
        return HeldPlanes(
            top=top.astype(np.uint16),
            planes=target,
            offset=np.where(held, self.offset, zero).astype(np.float16),
            scale=np.where(held, self.scale, zero).astype(np.float16),
            bits=self.bits,
        )

    @property
    def rankable(self) -> np.ndarray:
        """(n_items,) bool: rows with at least one plane."""
        return self.planes > 0

    def decode(self) -> tuple[np.ndarray, np.ndarray]:
        """The float32 table the device ranks with (midpoint reconstruction; rows with no plane are
        0) and the (n_items,) boolean rankable mask."""
        shift = self.bits - self.planes  # (I,)
        c_hat = (self.top.astype(np.int64) << shift[:, None]) + ((1 << shift) - 1)[:, None] / 2.0
        values = (
            self.offset.astype(np.float64)[:, None] + self.scale.astype(np.float64)[:, None] * c_hat
        )
        rankable = self.rankable
        values[~rankable] = 0.0
        return values.astype(np.float32), rankable


@dataclass(frozen=True)
class PlaneCode:
    """Row-wise affine ``bits``-bit code of an item table (see the module docstring).

    Attributes
    ----------
    codes
        (n_items, dim) uint16 codes in ``[0, 2^bits - 1]``.
    offset, scale
        (n_items,) float16 row meta, exactly as stored and as used to compute ``codes``.
    """

    codes: np.ndarray
    offset: np.ndarray
    scale: np.ndarray
    bits: int = CODE_BITS

    @classmethod
    def encode(cls, table: np.ndarray, bits: int = CODE_BITS) -> PlaneCode:
        """Encode every row of ``table`` (float) with its own float16 offset and scale."""
        if not 1 <= bits <= CODE_BITS:
            raise ValueError(f"bits must be in [1, {CODE_BITS}], got {bits}")
        x = np.asarray(table, dtype=np.float64)
        if x.ndim != 2 or not np.isfinite(x).all():
            raise ValueError("table must be a finite 2-d array")
        levels = (1 << bits) - 1
        offset = _float16_down(x.min(axis=1))
        spread = x.max(axis=1) - offset.astype(np.float64)
        # a constant row still needs a positive scale: the smallest float16 above 0
        scale = float16_up(np.maximum(spread / levels, np.finfo(np.float64).tiny))
        if not (np.isfinite(offset).all() and np.isfinite(scale).all()):
            raise ValueError(f"table values or row ranges exceed float16 (max {FLOAT16_MAX})")
        c = np.rint((x - offset.astype(np.float64)[:, None]) / scale.astype(np.float64)[:, None])
        codes = np.clip(c, 0, levels).astype(np.uint16)
        return cls(codes=codes, offset=offset, scale=scale, bits=bits)

    @property
    def n_items(self) -> int:
        return int(self.codes.shape[0])

    @property
    def dim(self) -> int:
        return int(self.codes.shape[1])

    def serve(self, planes: int | np.ndarray | None = None) -> HeldPlanes:
        """What a device is served: the top ``planes`` (one int or one per row; None = all) bits."""
        full = HeldPlanes(
            top=self.codes,
            planes=np.full(self.n_items, self.bits, dtype=np.int64),
            offset=self.offset,
            scale=self.scale,
            bits=self.bits,
        )
        return full.cut_to(_planes_per_row(planes, self.n_items, self.bits))

    def decode(self, planes: int | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(float32 table, rankable mask) reconstructed from the top ``planes`` bits of each row."""
        return self.serve(planes).decode()


# --- byte accounting --------------------------------------------------------------------------
def plane_bytes(n_rows: int, dim: int) -> int:
    """Bytes of one bit-plane of ``n_rows`` rows of ``dim`` values, packed: ceil(rows * dim / 8)."""
    return -(-int(n_rows) * int(dim) // BITS_PER_BYTE)


def plane_unit_bytes(group_size: int, dim: int, plane: int) -> int:
    """Bytes of unit (g, plane) for a group of ``group_size`` rows; plane 0 (a group's first) also
    carries the rows' offset and scale (:data:`ROW_META_BYTES` each row)."""
    meta = int(group_size) * ROW_META_BYTES if plane == 0 else 0
    return plane_bytes(group_size, dim) + meta


def order_unit_bytes(order: np.ndarray, group_sizes: np.ndarray, dim: int) -> np.ndarray:
    """(len(order),) int64 bytes of every (group, plane) unit of ``order``."""
    order = np.asarray(order, dtype=np.int64).reshape(-1, 2)
    return np.array(
        [plane_unit_bytes(group_sizes[g], dim, p) for g, p in order.tolist()], dtype=np.int64
    )


def held_bytes(group_sizes: np.ndarray, dim: int, planes_per_group: np.ndarray) -> int:
    """Bytes a device holds with ``planes_per_group[g]`` planes of group g (meta included)."""
    sizes, planes = np.asarray(group_sizes).tolist(), np.asarray(planes_per_group).tolist()
    return sum(
        plane_unit_bytes(size, dim, p)
        for size, k in zip(sizes, planes, strict=True)
        for p in range(k)
    )


# --- the unit order and budgets ---------------------------------------------------------------
def second_moments(user_vectors: np.ndarray) -> np.ndarray:
    """(dim,) mean of ``u_j^2`` over the rows of ``user_vectors``: how much an error in item
    dimension j moves these users' scores, on average (the benefit's dimension weights)."""
    u = np.asarray(user_vectors, dtype=np.float64)
    return (u**2).mean(axis=0)


def plane_benefits(
    code: PlaneCode,
    table: np.ndarray,
    item_groups: np.ndarray,
    popularity: np.ndarray,
    dim_weights: np.ndarray,
    alpha: float = 0.5,
) -> np.ndarray:
    """(G, bits) benefit of plane p of group g: ``sum_{i in g} pop_i^alpha * sum_j s_j *
    (err_ij(p planes) - err_ij(p + 1 planes))``, with ``s = dim_weights`` (the users'
    :func:`second_moments`) and ``err`` the squared error of the reconstruction (0 planes:
    ``v_ij^2``)."""
    x = np.asarray(table, dtype=np.float64)
    s = np.asarray(dim_weights, dtype=np.float64)
    if s.shape != (x.shape[1],):
        raise ValueError(f"dim_weights must have shape ({x.shape[1]},), got {s.shape}")
    weight = np.asarray(popularity, dtype=np.float64) ** alpha
    num_groups = int(item_groups.max()) + 1
    benefit = np.zeros((num_groups, code.bits))
    err_before = (x**2) @ s
    for p in range(1, code.bits + 1):
        err = ((x - code.decode(p)[0].astype(np.float64)) ** 2) @ s
        delta = (err_before - err) * weight
        benefit[:, p - 1] = np.bincount(item_groups, weights=delta, minlength=num_groups)
        err_before = err
    return benefit


def greedy_plane_order(
    code: PlaneCode,
    table: np.ndarray,
    item_groups: np.ndarray,
    popularity: np.ndarray,
    dim_weights: np.ndarray,
    alpha: float = 0.5,
    cover_first: bool = False,
) -> np.ndarray:
    """The unit order, (G * bits, 2) of (group, plane): greedily the next plane with the most
    :func:`plane_benefits` per byte (ties: lowest group id); a group's planes come in order.

    ``cover_first`` puts the first plane of every group (in that greedy order) before any second
    plane, so every budget of at least the cover (one plane and the row meta of every item:
    ``n_items * (ROW_META_BYTES + ceil(dim / 8))`` B) keeps every item rankable; without it a
    small budget may leave the least valuable groups out (their items score ``-inf``).

    ``code`` is the :class:`PlaneCode` of ``table``. For a user group's personalised order pass
    its users' :func:`second_moments` and the popularity counted over its users; for a global
    one, all users'. Both are sums over users, so a federated server gets them by secure
    aggregation (:mod:`peel_fed.fedplanes`).
    """
    benefit = plane_benefits(code, table, item_groups, popularity, dim_weights, alpha)
    num_groups, bits = benefit.shape
    sizes = np.bincount(item_groups, minlength=num_groups)
    plane_cost = np.array([plane_bytes(n, code.dim) for n in sizes.tolist()], dtype=np.float64)
    meta_cost = sizes * float(ROW_META_BYTES)
    nxt = np.zeros(num_groups, dtype=np.int64)
    rows = np.arange(num_groups)
    order = np.empty((num_groups * bits, 2), dtype=np.int64)
    for step in range(num_groups * bits):
        cost = plane_cost + (nxt == 0) * meta_cost
        open_ = (nxt < bits) & ((nxt == 0) | ~cover_first | (step >= num_groups))
        ratio = np.where(open_, benefit[rows, np.minimum(nxt, bits - 1)] / cost, -np.inf)
        g = int(np.argmax(ratio))
        order[step] = (g, nxt[g])
        nxt[g] += 1
    return order


def planes_at_budget(
    order: np.ndarray, group_sizes: np.ndarray, dim: int, budget_bytes: int
) -> tuple[np.ndarray, int]:
    """Planes per group held at ``budget_bytes``: the longest prefix of ``order`` that fits.

    Returns the (G,) planes per group and the bytes they use (never above the budget). Raises
    ``BudgetError`` if the budget does not hold the order's first unit, and ``ValueError`` if the
    order gives a group's planes out of sequence.
    """
    order = np.asarray(order, dtype=np.int64).reshape(-1, 2)
    group_sizes = np.asarray(group_sizes, dtype=np.int64)
    seen = np.zeros(group_sizes.shape[0], dtype=np.int64)
    for g, p in order.tolist():
        if p != seen[g]:
            raise ValueError(f"unit ({g}, {p}) comes before plane {seen[g]} of group {g}")
        seen[g] += 1
    sizes = order_unit_bytes(order, group_sizes, dim)
    if sizes.size and budget_bytes < sizes[0]:
        raise BudgetError(
            f"budget {budget_bytes} B is below the first plane unit ({int(sizes[0])} B)"
        )
    cum = np.cumsum(sizes)
    k = int(np.searchsorted(cum, budget_bytes, side="right"))
    planes = np.bincount(order[:k, 0], minlength=group_sizes.shape[0]).astype(np.int64)
    return planes, int(cum[k - 1]) if k else 0


def plane_score_fn(
    user_vectors: np.ndarray,
    held: HeldPlanes,
    user_rows: np.ndarray | None = None,
) -> ScoreFn:
    """Score function (for :func:`peel_fed.metrics.evaluate_ranking`) of devices holding ``held``:
    inner products with the decoded table, items with no plane ``-inf``."""
    table, rankable = held.decode()
    return dot_score_fn(
        np.asarray(user_vectors, dtype=np.float32),
        table,
        user_rows=user_rows,
        uncovered_items=None if rankable.all() else ~rankable,
    )
