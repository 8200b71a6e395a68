"""Bit-plane elastic embeddings and direct row quantization at given budgets: the study's rows.

:func:`plane_budget_rows` evaluates, on a pretrained LightGCN (user and item tables), at every
budget in bytes:

- ``PEEL bit-planes (G_u=1)``: one global unit order (:func:`peel_fed.planes.greedy_plane_order`
  with all users' second moments and all users' item popularity);
- ``PEEL bit-planes (G_u=k)``: personalised, k > 1: K-Means user groups on the pretrained user
  vectors (:func:`peel_fed.clustering.kmeans_user_groups`, as the centralized pipeline groups
  users); each user group's order uses its own users' second moments and its own users' item
  counts, and its users rank with its table at the budget;
- ``row quantization, best bits x dims``: at each budget every candidate of
  :func:`peel_fed.baselines.best_bits_and_dims` (the most leading columns per bit width) is
  evaluated and the best by Recall@20 is kept (an oracle choice on the test set: it favours the
  baseline); and, at their own bytes, each bit width over all columns (``row quantization,
  int8`` ... ``1-bit``).

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

from peel_fed.baselines import DIRECT_BITS, best_bits_and_dims, direct_quantize
from peel_fed.blocks import FLOAT32_BYTES, BudgetError, popularity_item_groups
from peel_fed.clustering import kmeans_user_groups
from peel_fed.console import log
from peel_fed.data import Dataset
from peel_fed.metrics import grouped_metrics
from peel_fed.planes import (
    HeldPlanes,
    PlaneCode,
    greedy_plane_order,
    plane_score_fn,
    planes_at_budget,
    second_moments,
)
from peel_fed.scoring import dot_score_fn

BEST_DIRECT = "row quantization, best bits x dims"
BIT_NAMES = {8: "int8", 4: "int4", 2: "int2", 1: "1-bit"}


def bit_planes_method(num_user_groups: int) -> str:
    return f"PEEL bit-planes (G_u={num_user_groups})"


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
    num_user_groups: int,
    alpha: float,
    seed: int,
) -> list[PlaneGroup]:
    """The user groups (one: all users with ``popularity``; more: K-Means, each with its own
    users' item counts) and the greedy plane order of each."""
    if num_user_groups == 1:
        members = [np.arange(ds.n_users)]
        pops = [np.asarray(popularity)]
    else:
        ugroups = kmeans_user_groups(user_emb, num_user_groups, seed=seed)
        members = [ugroups.members(g) for g in range(num_user_groups)]
        of_user = ugroups.assignment[ds.train.users]
        pops = [
            np.bincount(ds.train.items[of_user == g], minlength=ds.n_items)
            for g in range(num_user_groups)
        ]
    return [
        PlaneGroup(
            users,
            greedy_plane_order(
                code, item_emb, item_groups, pop, second_moments(user_emb[users]), alpha
            ),
        )
        for users, pop in zip(members, pops, strict=True)
        if users.size
    ]


def _same_held(a: HeldPlanes, b: HeldPlanes) -> bool:
    return all(
        np.array_equal(getattr(a, f), getattr(b, f)) for f in ("top", "planes", "offset", "scale")
    ) and np.array_equal(a.decode()[0], b.decode()[0])


def _row(method: str, label: str, budget: int, full: int, metrics: dict, used: int, **extra):
    return {
        "method": method,
        "budget": label,
        "budget_bytes": int(budget),
        "budget_fraction": budget / full,
        "recall@20": metrics["recall@20"],
        "ndcg@20": metrics["ndcg@20"],
        "used_bytes": int(used),
        **extra,
    }


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
    one, checked against the served table)."""
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
        rows[label] = _row(
            method,
            label,
            budget,
            full,
            metrics,
            max(used for _, used in per_group),
            planes_per_group=[planes.tolist() for planes, _ in per_group],
        )
        log(f"{method} {label}: Recall@20 {metrics['recall@20']:.4f}", source="planes")
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
    user_emb: np.ndarray,
    item_emb: np.ndarray,
    budgets: Sequence[tuple[str, int]],
) -> tuple[list[dict], list[dict]]:
    """Rows of the best (bits, leading dims) at every budget, and of each bit width over all
    columns at its own bytes (labelled with the fraction of the float32 table it uses)."""
    n_items, dim = item_emb.shape
    full = item_emb.size * FLOAT32_BYTES
    cache: dict[tuple[int, int], tuple[dict, int]] = {}

    def evaluate(bits: int, dims: int) -> tuple[dict, int]:
        if (bits, dims) not in cache:
            table, nbytes = direct_quantize(item_emb[:, :dims], bits)
            users = np.ascontiguousarray(user_emb[:, :dims], dtype=np.float32)
            score = dot_score_fn(users, table)
            everyone = [(np.arange(ds.n_users), score)]
            cache[bits, dims] = grouped_metrics(everyone, ds.n_users, ds.train, ds.test), nbytes
            log(
                f"row quantization {bits} bit(s) x {dims} dims: "
                f"Recall@20 {cache[bits, dims][0]['recall@20']:.4f}",
                source="planes",
            )
        return cache[bits, dims]

    rows = []
    for label, budget in budgets:
        try:
            shapes = best_bits_and_dims(budget, n_items, dim)
        except BudgetError as exc:
            log(f"{BEST_DIRECT} {label}: no row ({exc})", source="planes")
            continue
        scored = [(evaluate(s.bits, s.dims), s) for s in shapes]
        (metrics, nbytes), best = max(scored, key=lambda ms: ms[0][0]["recall@20"])
        rows.append(
            _row(BEST_DIRECT, label, budget, full, metrics, nbytes, bits=best.bits, dims=best.dims)
        )
    own = []
    for bits in DIRECT_BITS:
        metrics, nbytes = evaluate(bits, dim)
        label = f"{100 * nbytes / full:.3g}%"
        own.append(
            _row(
                f"row quantization, {BIT_NAMES[bits]}",
                label,
                nbytes,
                full,
                metrics,
                nbytes,
                bits=bits,
                dims=dim,
            )
        )
    return rows, own


def plane_budget_rows(
    ds: Dataset,
    user_emb: np.ndarray,
    item_emb: np.ndarray,
    popularity: np.ndarray,
    budgets: Sequence[tuple[str, int]],
    num_user_groups: int = 4,
    alpha: float = 0.5,
    num_item_groups: int = 20,
    seed: int = 0,
    families: Sequence[str] = ("planes", "direct"),
) -> dict[str, list[dict]]:
    """Bit-planes (G_u = 1 and ``num_user_groups``) and direct row quantization at ``budgets``
    ((label, bytes) pairs; fractions are of the float32 ``item_emb``'s bytes).

    Returns ``{"rows": [...], "own_bytes_rows": [...], "trace": [...]}``: rows at the budgets
    (method, budget, budget_bytes, budget_fraction, recall@20, ndcg@20, used_bytes, and a few
    details; a method gets no row at a budget below its smallest unit), the fixed bit widths at
    their own bytes, and the bit-plane trace (the largest budget's table cut on the device to each
    smaller budget, largest first; ``cut_on_device`` is True). ``families`` picks the method
    families to run ("planes", "direct").
    """
    item_emb = np.asarray(item_emb, dtype=np.float32)
    user_emb = np.asarray(user_emb, dtype=np.float32)
    budgets = [(label, int(b)) for label, b in budgets]
    item_groups = popularity_item_groups(np.asarray(popularity), num_item_groups)
    code = PlaneCode.encode(item_emb)
    rows, own, trace = [], [], []
    if "planes" in families:
        for g in dict.fromkeys((1, num_user_groups)):
            groups = plane_groups(
                ds, user_emb, item_emb, code, item_groups, popularity, g, alpha, seed
            )
            got, cut = bit_plane_rows(
                ds, user_emb, item_emb, groups, code, item_groups, budgets, bit_planes_method(g)
            )
            rows += got
            trace += cut
    if "direct" in families:
        got, own = direct_rows(ds, user_emb, item_emb, budgets)
        rows += got
    return {"rows": rows, "own_bytes_rows": own, "trace": trace}
