"""The nested (Matryoshka) LightGCN baseline at given budgets: the study's ``matryoshka`` rows.

One LightGCN trained with :attr:`peel_fed.lightgcn.LightGCNConfig.nested_dims` (Kusupati et al.,
NeurIPS 2022: every leading-dimension prefix is trained as a model) serves every budget from the
same table:

- ``Matryoshka LightGCN, leading dims``: the leading :func:`peel_fed.baselines.affordable_dim`
  columns of the item table at float32; users rank with the same leading columns of their vectors;
- ``Matryoshka LightGCN, quantized``: the best row-quantized cut that fits
  (:func:`peel_fed.baselines.best_bits_and_dims`: bits 8, 4, 2, 1, each with the most leading
  columns that fit), chosen by validation Recall@20
  (:class:`peel_fed.budget_rows.QuantizedChoice`, as for every row-quantized baseline; the model
  is trained on ``split.fit`` only), reported with its test metrics.

The trace: a device holding the largest budget's leading columns cuts to each smaller budget by
dropping its trailing columns (no server contact). Each cut is checked to equal the table served
at that budget (an ``AssertionError`` otherwise), so its metrics are the served table's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from peel_fed.baselines import affordable_dim, best_bits_and_dims
from peel_fed.blocks import FLOAT32_BYTES, BudgetError
from peel_fed.budget_rows import QuantCandidate, QuantizedChoice, budget_row
from peel_fed.console import log
from peel_fed.data import Dataset, TrainValSplit
from peel_fed.metrics import evaluate_ranking
from peel_fed.scoring import dot_score_fn

LEADING = "Matryoshka LightGCN, leading dims"
QUANTIZED = "Matryoshka LightGCN, quantized"
FLOAT32_BITS = 32


def matryoshka_dims(dim: int) -> tuple[int, ...]:
    """The powers of two from 2 below ``dim``: the prefixes a nested model is trained on (with
    ``dim`` itself), e.g. (2, 4, 8, 16, 32) for 64."""
    return tuple(2**k for k in range(1, dim.bit_length()) if 2**k < dim)


def _leading(emb: np.ndarray, dims: int) -> np.ndarray:
    return np.ascontiguousarray(emb[:, :dims], dtype=np.float32)


def matryoshka_rows(
    ds: Dataset,
    split: TrainValSplit,
    user_emb: np.ndarray,
    item_emb: np.ndarray,
    budgets: Sequence[tuple[str, int]],
) -> dict[str, list[dict]]:
    """Rows of both cuts at every budget ((label, bytes); fractions are of the float32
    ``item_emb``'s bytes), and the leading-dims trace, largest budget first.

    Returns ``{"rows": [...], "trace": [...]}``; rows carry method, budget, budget_bytes,
    budget_fraction, recall@20, ndcg@20, used_bytes, dims and bits (32 for float32); quantized
    rows also their validation Recall@20 and every candidate's. A budget below one column gets
    no row.
    """
    n_items, dim = item_emb.shape
    full = n_items * dim * FLOAT32_BYTES
    budgets = [(label, int(b)) for label, b in budgets]

    def test_metrics(users: np.ndarray, table: np.ndarray) -> dict:
        return evaluate_ranking(dot_score_fn(users, table), ds.n_users, ds.train, ds.test)

    rows, served = {}, {}
    for label, budget in budgets:
        try:
            dims = affordable_dim(budget, n_items, dim)
        except BudgetError as exc:
            log(f"{LEADING} {label}: no row ({exc})", source="matryoshka")
            continue
        served[label] = _leading(item_emb, dims)
        m = test_metrics(_leading(user_emb, dims), served[label])
        used = n_items * dims * FLOAT32_BYTES
        rows[label] = budget_row(
            LEADING, label, budget, full, m, used, dims=dims, bits=FLOAT32_BITS
        )
        log(f"{LEADING} {label} (d={dims}): Recall@20 {m['recall@20']:.4f}", source="matryoshka")
    quantized, choice = [], QuantizedChoice(ds, split, [(user_emb, item_emb)])
    for label, budget in budgets:
        try:
            shapes = best_bits_and_dims(budget, n_items, dim)
        except BudgetError as exc:
            log(f"{QUANTIZED} {label}: no row ({exc})", source="matryoshka")
            continue
        candidates = [QuantCandidate(0, sh.bits, sh.dims, sh.bytes) for sh in shapes]
        best, val = choice.choose(candidates)
        m = choice.metrics(best, "test")
        quantized.append(
            budget_row(
                QUANTIZED,
                label,
                budget,
                full,
                m,
                best.bytes,
                dims=best.dims,
                bits=best.bits,
                **{"val_recall@20": val["recall@20"]},
                candidates=[
                    {
                        "bits": c.bits,
                        "dims": c.dims,
                        "val_recall@20": choice.metrics(c, "val")["recall@20"],
                    }
                    for c in candidates
                ],
            )
        )
        log(
            f"{QUANTIZED} {label} ({best.bits} bit(s) x {best.dims} dims, by validation): "
            f"Recall@20 {m['recall@20']:.4f}",
            source="matryoshka",
        )
    trace, held = [], None
    for label, _ in sorted(budgets, key=lambda lb: -lb[1]):
        if label not in served:
            continue
        # the device drops its trailing columns: what it holds is a prefix of the served table
        held = served[label] if held is None else held[:, : served[label].shape[1]]
        if not np.array_equal(held, served[label]):
            raise AssertionError(f"{LEADING} {label}: the device's cut differs from the served")
        trace.append({**rows[label], "cut_on_device": True})
    return {"rows": [*rows.values(), *quantized], "trace": trace}
