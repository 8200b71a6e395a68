"""Baselines' rows at given budgets, with one byte accounting: magnitude pruning and row-quantized
tables chosen on validation.

- :func:`budget_row`: the one row format of every budget table (method, budget, bytes, metrics).
- :func:`pruning_rows`: magnitude pruning of an item table at every budget, float32 values
  (:func:`peel_fed.baselines.magnitude_prune`) or int8 values
  (:func:`peel_fed.baselines.magnitude_prune_int8`), and its dynamic trace: a device holding the
  largest budget's table prunes what it holds to each smaller budget in turn.
- :class:`QuantizedChoice`: row-quantized candidates (the leading ``dims`` columns of a model's
  item table at ``bits`` bits, :func:`peel_fed.baselines.direct_quantize`) evaluated on the
  validation split (ranking all items but the user's fit items, targets its validation items)
  and on test, each at most once; :meth:`QuantizedChoice.choose` picks the candidate with the best
  validation Recall@20, so test is read only to report the chosen one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from peel_fed.baselines import direct_quantize, magnitude_prune, magnitude_prune_int8
from peel_fed.blocks import FLOAT32_BYTES, BudgetError
from peel_fed.console import log
from peel_fed.data import Dataset, TrainValSplit
from peel_fed.metrics import grouped_metrics
from peel_fed.scoring import dot_score_fn

MAGNITUDE = "magnitude pruning"
MAGNITUDE_INT8 = "magnitude pruning, int8 values"


def budget_row(
    method: str, label: str, budget: int, full: int, metrics: dict, used: int, **extra
) -> dict:
    """One (method, budget) row: ``budget_fraction`` is of the ``full`` float32 table's bytes."""
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


def pruning_rows(
    ds: Dataset,
    user_emb: np.ndarray,
    item_emb: np.ndarray,
    budgets: Sequence[tuple[str, int]],
    int8: bool = False,
    trace: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Magnitude pruning (float32 values, or int8 with ``int8``) at every (label, bytes) budget,
    and, with ``trace``, the trace (largest budget first, each cut pruning the previous cut's
    table; else ``[]``). A budget below the storage's fixed part gives no row (logged)."""
    prune = magnitude_prune_int8 if int8 else magnitude_prune
    method = MAGNITUDE_INT8 if int8 else MAGNITUDE
    full = item_emb.size * FLOAT32_BYTES
    everyone = np.arange(ds.n_users)

    def row(table: np.ndarray, label: str, budget: int) -> tuple[np.ndarray, dict]:
        pruned, cap = prune(table, budget)
        score = dot_score_fn(np.asarray(user_emb, dtype=np.float32), pruned)
        m = grouped_metrics([(everyone, score)], ds.n_users, ds.train, ds.test)
        extra = {"kept_values": cap.kept, "storage": cap.storage}
        return pruned, budget_row(method, label, budget, full, m, cap.bytes, **extra)

    rows: dict[str, dict] = {}
    for label, budget in budgets:
        try:
            rows[label] = row(item_emb, label, budget)[1]
        except BudgetError as exc:
            log(f"{method} {label}: no row ({exc})", source="baselines")
    cuts, held = [], None
    for label, budget in sorted(budgets, key=lambda lb: -lb[1]) if trace else []:
        if label not in rows:
            continue
        if held is None:  # served the largest budget's table: the row above
            held, r = prune(item_emb, budget)[0], rows[label]
        else:  # cut on the device: prune what it holds
            held, r = row(held, label, budget)
        cuts.append(r)
    return list(rows.values()), cuts


@dataclass(frozen=True)
class QuantCandidate:
    """A row-quantized table: the leading ``dims`` columns of model ``model``'s item table at
    ``bits`` bits per value, and its bytes."""

    model: int
    bits: int
    dims: int
    bytes: int


class QuantizedChoice:
    """Row-quantized candidates of one or more models, evaluated on validation and on test.

    ``models`` are (user table, item table) pairs, each trained on ``split.fit`` (float32 item
    tables; a candidate scores with the same leading columns of the user table).
    """

    def __init__(
        self,
        ds: Dataset,
        split: TrainValSplit,
        models: Sequence[tuple[np.ndarray, np.ndarray]],
    ) -> None:
        self.ds, self.split, self.models = ds, split, list(models)
        self._metrics: dict[tuple[QuantCandidate, str], dict] = {}

    def metrics(self, cand: QuantCandidate, on: str) -> dict:
        """Recall@20 / NDCG@20 of ``cand`` on ``"val"`` (rank all but the fit items, targets the
        validation items) or ``"test"`` (rank all but the training items, targets test)."""
        if on not in ("val", "test"):
            raise ValueError(f"evaluate on 'val' or 'test', got {on!r}")
        if (cand, on) not in self._metrics:
            user_emb, item_emb = self.models[cand.model]
            table, _ = direct_quantize(np.asarray(item_emb)[:, : cand.dims], cand.bits)
            users = np.ascontiguousarray(np.asarray(user_emb)[:, : cand.dims], dtype=np.float32)
            known, target = (
                (self.split.fit, self.split.val) if on == "val" else (self.ds.train, self.ds.test)
            )
            everyone = [(np.arange(self.ds.n_users), dot_score_fn(users, table))]
            self._metrics[cand, on] = grouped_metrics(everyone, self.ds.n_users, known, target)
            log(
                f"row quantization: model {cand.model}, {cand.bits} bit(s) x {cand.dims} dims, "
                f"{on} Recall@20 {self._metrics[cand, on]['recall@20']:.4f}",
                source="baselines",
            )
        return self._metrics[cand, on]

    def choose(self, candidates: Sequence[QuantCandidate]) -> tuple[QuantCandidate, dict]:
        """The candidate with the best validation Recall@20 (ties: the first), and its
        validation metrics."""
        if not candidates:
            raise ValueError("no candidate to choose from")
        best = max(candidates, key=lambda c: self.metrics(c, "val")["recall@20"])
        return best, self.metrics(best, "val")
