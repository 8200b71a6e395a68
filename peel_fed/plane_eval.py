"""Bit-plane elastic embeddings and direct row quantization at given budgets: the study's rows.

:func:`plane_budget_rows` evaluates, on a pretrained LightGCN (user and item tables), at every
budget in bytes:

- ``PEEL bit-planes (G_u=1)``: one global unit order (:func:`peel_fed.planes.greedy_plane_order`
  with all users' second moments and all users' item popularity);
- ``PEEL bit-planes (G_u=k)``: personalised, k > 1: K-Means user groups on the pretrained user
  vectors (:func:`peel_fed.clustering.kmeans_user_groups`, as the centralized pipeline groups
  users); each user group's order uses its own users' second moments and its own users' item
  counts, and its users rank with its table at the budget;
- ``row quantization, best bits x dims``: at each budget the candidate of
  :func:`peel_fed.baselines.best_bits_and_dims` (the most leading columns per bit width) with the
  best Recall@20 on the validation split (:class:`peel_fed.budget_rows.QuantizedChoice`; the
  pretrained model is trained on the fit split), reported with its test metrics; and, at their
  own bytes, each bit width over all columns (``row quantization, int8`` ... ``1-bit``).

:func:`comparison_rows` gives the centralized pipeline's rows beside PEEL's blocks: bit-planes
for each of its G_u with its K-Means user groups, and (optionally) the strongest baselines (the
row-quantization choice above, magnitude pruning with float32 and with int8 values).

Item groups are the popularity groups of all users' counts
(:func:`peel_fed.blocks.popularity_item_groups`), one partition for every user group, so a
device's items stored sorted by group need no map (as in :mod:`peel_fed.planes`). Metrics are
means over all users with test items (per-user values of :func:`peel_fed.metrics.per_user_metrics`
concatenated over user groups: with one group this is :func:`peel_fed.metrics.evaluate_ranking`).

The dynamic trace: a device served the largest budget's planes cuts what it holds
(:meth:`peel_fed.planes.HeldPlanes.cut_to`) to each smaller budget in turn; the cut table is
checked to equal, bit for bit, the table served at that budget (an ``AssertionError`` otherwise),
so its metrics are the served table's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from peel_fed.baselines import DIRECT_BITS, best_bits_and_dims, direct_quantization_bytes
from peel_fed.blocks import FLOAT32_BYTES, BudgetError, popularity_item_groups
from peel_fed.budget_rows import QuantCandidate, QuantizedChoice, budget_row, pruning_rows
from peel_fed.clustering import UserGroups, kmeans_user_groups
from peel_fed.console import log
from peel_fed.data import Dataset, TrainValSplit
from peel_fed.metrics import grouped_metrics
from peel_fed.planes import (
    HeldPlanes,
    PlaneCode,
    greedy_plane_order,
    plane_score_fn,
    planes_at_budget,
    second_moments,
)

BEST_DIRECT = "row quantization, best bits x dims"
BIT_NAMES = {8: "int8", 4: "int4", 2: "int2", 1: "1-bit"}


def bit_planes_method(num_user_groups: int, cover_first: bool = False) -> str:
    return f"PEEL bit-planes (G_u={num_user_groups}{', cover first' if cover_first else ''})"


@dataclass(frozen=True)
class PlaneGroup:
    """One user group's bit-plane unit order."""

    users: np.ndarray
    order: np.ndarray


def plane_groups(
    ds: Dataset,
    user_emb: np.ndarray,
    item_emb: np.ndarray,
    code: PlaneCode,
    item_groups: np.ndarray,
    popularity: np.ndarray,
    user_groups: UserGroups | None,
    alpha: float,
    cover_first: bool = False,
) -> list[PlaneGroup]:
    """The user groups (None: one group of all users with ``popularity``; else each group of
    ``user_groups`` with its own users' item counts) and the greedy plane order of each."""
    if user_groups is None:
        members = [np.arange(ds.n_users)]
        pops = [np.asarray(popularity)]
    else:
        k = user_groups.num_user_groups
        members = [user_groups.members(g) for g in range(k)]
        of_user = user_groups.assignment[ds.train.users]
        pops = [np.bincount(ds.train.items[of_user == g], minlength=ds.n_items) for g in range(k)]
    return [
        PlaneGroup(
            users,
            greedy_plane_order(
                code,
                item_emb,
                item_groups,
                pop,
                second_moments(user_emb[users]),
                alpha,
                cover_first=cover_first,
            ),
        )
        for users, pop in zip(members, pops, strict=True)
        if users.size
    ]


def _same_held(a: HeldPlanes, b: HeldPlanes) -> bool:
    return all(
        np.array_equal(getattr(a, f), getattr(b, f)) for f in ("top", "planes", "offset", "scale")
    ) and np.array_equal(a.decode()[0], b.decode()[0])


def bit_plane_rows(
    ds: Dataset,
    user_emb: np.ndarray,
    item_emb: np.ndarray,
    groups: list[PlaneGroup],
    code: PlaneCode,
    item_groups: np.ndarray,
    budgets: Sequence[tuple[str, int]],
    method: str,
) -> tuple[list[dict], list[dict]]:
    """Rows at every budget, and the trace (largest budget cut on the device to each smaller
    one, checked against the served table). A row's ``unrankable_items`` counts, per user group,
    the items whose group holds no plane (they score ``-inf``)."""
    full = item_emb.size * FLOAT32_BYTES
    sizes, dim = np.bincount(item_groups), item_emb.shape[1]
    rows, served = {}, {}
    for label, budget in budgets:
        try:
            per_group = [planes_at_budget(g.order, sizes, dim, budget) for g in groups]
        except BudgetError as exc:
            log(f"{method} {label}: no row ({exc})", source="planes")
            continue
        served[label] = [code.serve(planes[item_groups]) for planes, _ in per_group]
        scored = zip(groups, served[label], strict=True)
        parts = [(g.users, plane_score_fn(user_emb, h)) for g, h in scored]
        metrics = grouped_metrics(parts, ds.n_users, ds.train, ds.test)
        rows[label] = budget_row(
            method,
            label,
            budget,
            full,
            metrics,
            max(used for _, used in per_group),
            planes_per_group=[planes.tolist() for planes, _ in per_group],
            unrankable_items=[int(sizes[planes == 0].sum()) for planes, _ in per_group],
        )
        unrankable = max(rows[label]["unrankable_items"])
        note = f" ({unrankable:,} items with no plane, not rankable)" if unrankable else ""
        log(f"{method} {label}: Recall@20 {metrics['recall@20']:.4f}{note}", source="planes")
    trace, held = [], None
    for label, _ in sorted(budgets, key=lambda lb: -lb[1]):
        if label not in served:
            continue
        if held is None:
            held = served[label]
        else:
            held = [h.cut_to(s.planes) for h, s in zip(held, served[label], strict=True)]
        if not all(_same_held(h, s) for h, s in zip(held, served[label], strict=True)):
            raise AssertionError(
                f"{method} {label}: the device's cut differs from the served table"
            )
        trace.append({**rows[label], "cut_on_device": True})
    return list(rows.values()), trace


def direct_rows(
    ds: Dataset,
    split: TrainValSplit,
    user_emb: np.ndarray,
    item_emb: np.ndarray,
    budgets: Sequence[tuple[str, int]],
) -> tuple[list[dict], list[dict]]:
    """Rows of the best (bits, leading dims) at every budget, chosen by validation Recall@20
    (``val_recall@20`` in the row) and reported on test, and of each bit width over all columns
    at its own bytes (labelled with the fraction of the float32 table it uses)."""
    n_items, dim = item_emb.shape
    full = item_emb.size * FLOAT32_BYTES
    choice = QuantizedChoice(ds, split, [(user_emb, item_emb)])
    rows = []
    for label, budget in budgets:
        try:
            shapes = best_bits_and_dims(budget, n_items, dim)
        except BudgetError as exc:
            log(f"{BEST_DIRECT} {label}: no row ({exc})", source="planes")
            continue
        best, val = choice.choose([QuantCandidate(0, s.bits, s.dims, s.bytes) for s in shapes])
        metrics = choice.metrics(best, "test")
        rows.append(
            budget_row(
                BEST_DIRECT,
                label,
                budget,
                full,
                metrics,
                best.bytes,
                bits=best.bits,
                dims=best.dims,
                **{"val_recall@20": val["recall@20"]},
            )
        )
        log(
            f"{BEST_DIRECT} {label}: {best.bits} bit(s) x {best.dims} dims (validation Recall@20 "
            f"{val['recall@20']:.4f}), Recall@20 {metrics['recall@20']:.4f}",
            source="planes",
        )
    own = []
    for bits in DIRECT_BITS:
        cand = QuantCandidate(0, bits, dim, direct_quantization_bytes(n_items, dim, bits))
        label = f"{100 * cand.bytes / full:.3g}%"
        own.append(
            budget_row(
                f"row quantization, {BIT_NAMES[bits]}",
                label,
                cand.bytes,
                full,
                choice.metrics(cand, "test"),
                cand.bytes,
                bits=bits,
                dims=dim,
            )
        )
    return rows, own


def plane_budget_rows(
    ds: Dataset,
    split: TrainValSplit,
    user_emb: np.ndarray,
    item_emb: np.ndarray,
    popularity: np.ndarray,
    budgets: Sequence[tuple[str, int]],
    num_user_groups: int = 4,
    alpha: float = 0.5,
    num_item_groups: int = 20,
    seed: int = 0,
    families: Sequence[str] = ("planes", "direct"),
    cover_first: bool = False,
) -> dict[str, list[dict]]:
    """Bit-planes (G_u = 1 and ``num_user_groups``) and direct row quantization at ``budgets``
    ((label, bytes) pairs; fractions are of the float32 ``item_emb``'s bytes), for the model
    ``user_emb``, ``item_emb`` trained on ``split.fit`` (row quantization is chosen on
    ``split.val``).

    Returns ``{"rows": [...], "own_bytes_rows": [...], "trace": [...]}``: rows at the budgets
    (method, budget, budget_bytes, budget_fraction, recall@20, ndcg@20, used_bytes, and a few
    details; a method gets no row at a budget below its smallest unit), the fixed bit widths at
    their own bytes, and the bit-plane trace (the largest budget's table cut on the device to each
    smaller budget, largest first; ``cut_on_device`` is True). ``families`` picks the method
    families to run ("planes", "direct"); ``cover_first`` orders every group's first plane
    before any second one (:func:`peel_fed.planes.greedy_plane_order`), in the rows' labels too.
    """
    item_emb = np.asarray(item_emb, dtype=np.float32)
    user_emb = np.asarray(user_emb, dtype=np.float32)
    budgets = [(label, int(b)) for label, b in budgets]
    item_groups = popularity_item_groups(np.asarray(popularity), num_item_groups)
    code = PlaneCode.encode(item_emb)
    rows, own, trace = [], [], []
    if "planes" in families:
        for g in dict.fromkeys((1, num_user_groups)):
            user_groups = None if g == 1 else kmeans_user_groups(user_emb, g, seed=seed)
            groups = plane_groups(
                ds,
                user_emb,
                item_emb,
                code,
                item_groups,
                popularity,
                user_groups,
                alpha,
                cover_first,
            )
            method = bit_planes_method(g, cover_first)
            got, cut = bit_plane_rows(
                ds, user_emb, item_emb, groups, code, item_groups, budgets, method
            )
            rows += got
            trace += cut
    if "direct" in families:
        got, own = direct_rows(ds, split, user_emb, item_emb, budgets)
        rows += got
    return {"rows": rows, "own_bytes_rows": own, "trace": trace}


def comparison_rows(
    ds: Dataset,
    split: TrainValSplit,
    user_emb: np.ndarray,
    item_emb: np.ndarray,
    popularity: np.ndarray,
    budgets: Sequence[tuple[str, int]],
    user_groups: dict[int, UserGroups | None],
    num_item_groups: int = 20,
    baselines: bool = True,
    alpha: float = 0.5,
) -> tuple[list[dict], list[dict]]:
    """What the centralized pipeline prints beside PEEL's blocks, at every budget: bit-plane rows
    for each G_u of ``user_groups`` (its K-Means groups; None: one global order), and with
    ``baselines`` the rows of ``row quantization, best bits x dims`` (chosen on validation) and
    of magnitude pruning with float32 and with int8 values. Returns (bit-plane rows, baseline
    rows); a method has no row at a budget below its smallest storage."""
    item_emb = np.asarray(item_emb, dtype=np.float32)
    user_emb = np.asarray(user_emb, dtype=np.float32)
    item_groups = popularity_item_groups(np.asarray(popularity), num_item_groups)
    code = PlaneCode.encode(item_emb)
    planes = []
    for k, groups in user_groups.items():
        order = plane_groups(ds, user_emb, item_emb, code, item_groups, popularity, groups, alpha)
        args = (ds, user_emb, item_emb, order, code, item_groups, budgets, bit_planes_method(k))
        planes += bit_plane_rows(*args)[0]
    others = []
    if baselines:
        others += direct_rows(ds, split, user_emb, item_emb, budgets)[0]
        for int8 in (False, True):
            others += pruning_rows(ds, user_emb, item_emb, budgets, int8=int8, trace=False)[0]
    return planes, others
