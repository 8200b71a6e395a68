"""The centralized reference pipeline: pretrain -> group -> PEE learning -> evaluation per budget.

Everything the federated pipeline does, in one process, so that federated numbers have a
reference. At every budget it evaluates PEEL bit-planes (``peel_fed.plane_eval``, the default
elastic embeddings) and PEEL blocks for each G_u, first-k blocks and random units, and (unless
``baselines`` is off) the strongest baselines at the same byte accounting: row quantization with
the best bits x dims chosen on validation, and magnitude pruning with float32 and int8 values.
Outputs (written atomically): ``results.json`` and ``results.md`` in ``out_dir``, and the
pretrained model in ``cache_dir`` (reused by later runs with the same data, split and config).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from peel_fed.atomic import (
    portable_path,
    to_jsonable,
    write_atomic,
    write_json_atomic,
    write_text_atomic,
)
from peel_fed.blocks import (
    BlockLayout,
    check_budget,
    first_blocks_order,
    parse_budget,
    popularity_item_groups,
    random_unit_order,
    select_prefix,
)
from peel_fed.budget_table import budget_table_lines
from peel_fed.clustering import UserGroups, kmeans_user_groups
from peel_fed.console import log, progress_bar
from peel_fed.data import Dataset, Interactions, split_validation
from peel_fed.lightgcn import LightGCNConfig, train_lightgcn
from peel_fed.loading import load_dataset
from peel_fed.metrics import evaluate_ranking, grouped_metrics
from peel_fed.peel import GroupPEE, PEELConfig, learn_group_pee
from peel_fed.plane_eval import comparison_rows
from peel_fed.scoring import budget_score_fn, dot_score_fn

DEFAULT_BUDGETS = ("5%", "10%", "25%", "50%", "100%")


def peel_blocks_method(num_user_groups: int) -> str:
    """The label of PEEL with block units (the paper's) for G_u = ``num_user_groups``."""
    return f"PEEL blocks (G_u={num_user_groups})"


def default_pretraining() -> LightGCNConfig:
    """The pipeline's LightGCN recipe: DNS (64 candidates), a cosine rate over 10 epochs (the
    published quality in minutes: docs/method.md), and PEE learning's diversity regulariser."""
    dns = dict(negative_sampling="dns", dns_candidates=64, lr_schedule="cosine")
    return LightGCNConfig(epochs=10, diversity_weight=PEELConfig().diversity_weight, **dns)


@dataclass
class PipelineConfig:
    """Everything a centralized run depends on."""

    dataset: str = "gowalla"
    data_dir: str | None = None
    seed: int = 0
    val_fraction: float = 0.1
    num_user_groups: tuple[int, ...] = (4, 1)
    budgets: tuple[str, ...] = DEFAULT_BUDGETS
    out_dir: str = "runs/centralized"
    cache_dir: str = "runs/cache"
    progress: bool = True
    device: str = "cpu"
    bit_planes: bool = True  # PEEL bit-planes rows (one per G_u)
    baselines: bool = True  # row quantization and magnitude pruning rows (slower evaluation)
    lightgcn: LightGCNConfig = field(default_factory=default_pretraining)
    peel: PEELConfig = field(default_factory=PEELConfig)

    def __post_init__(self) -> None:
        if not self.num_user_groups or min(self.num_user_groups) < 1:
            raise ValueError(
                f"num-user-groups must be positive integers, got {self.num_user_groups}"
            )
        if not self.budgets:
            raise ValueError("give at least one budget")
        if self.lightgcn.dim % self.peel.num_blocks:
            raise ValueError(
                f"blocks ({self.peel.num_blocks}) must divide the embedding dim "
                f"({self.lightgcn.dim})"
            )


@dataclass
class Pretrained:
    user_emb: np.ndarray
    item_emb: np.ndarray
    seconds: float
    path: Path
    reused: bool


def _pretrain_key(ds: Dataset, split_fit: Interactions, cfg: PipelineConfig) -> str:
    """The cache key of a pretrained model: data, fit split, LightGCN config (its
    :meth:`~peel_fed.lightgcn.LightGCNConfig.identity`, so earlier models keep their keys and
    cached files) and seed."""
    lightgcn = cfg.lightgcn.identity()
    h = hashlib.sha256()
    h.update(ds.name.encode())
    h.update(np.ascontiguousarray(split_fit.users).tobytes())
    h.update(np.ascontiguousarray(split_fit.items).tobytes())
    h.update(json.dumps(lightgcn, sort_keys=True).encode())
    h.update(str(cfg.seed).encode())
    return h.hexdigest()[:16]


def pretrain(ds: Dataset, fit: Interactions, cfg: PipelineConfig) -> Pretrained:
    """Pretrain LightGCN on the fit split, or load the cached model for the same inputs."""
    key = _pretrain_key(ds, fit, cfg)
    path = Path(cfg.cache_dir) / f"pretrain-{ds.name}-{key}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, weights_only=True)
            log(f"reusing pretrained LightGCN from {path}")
            return Pretrained(
                blob["user_emb"].numpy(),
                blob["item_emb"].numpy(),
                float(blob["seconds"]),
                path,
                True,
            )
        except Exception as exc:  # a corrupt cache file is retrained, not fatal
            log(f"ignoring unreadable cache file {path}: {exc}")
    log(f"pretraining LightGCN: {asdict(cfg.lightgcn)}")
    t0 = time.perf_counter()
    model = train_lightgcn(
        ds.n_users,
        ds.n_items,
        fit,
        cfg.lightgcn,
        seed=cfg.seed,
        progress=cfg.progress,
        device=cfg.device,
    )
    seconds = time.perf_counter() - t0
    user_emb, item_emb = model.final_embeddings()
    blob = {
        "user_emb": torch.from_numpy(user_emb),
        "item_emb": torch.from_numpy(item_emb),
        "seconds": seconds,
        "config": json.dumps(asdict(cfg.lightgcn)),
    }

    def _save(fh) -> None:
        buf = io.BytesIO()
        torch.save(blob, buf)
        fh.write(buf.getvalue())

    write_atomic(path, _save)
    log(f"pretrained in {seconds:.0f} s; saved {path}")
    return Pretrained(user_emb, item_emb, seconds, path, False)


def evaluate_units(
    ds: Dataset,
    groups: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    layout: BlockLayout,
    budget_bytes: int,
) -> dict[str, float]:
    """Mean Recall@20 / NDCG@20 over all users when each group ranks with its kept units.

    ``groups`` holds, per user group: (users, user vectors aligned with users, item table,
    unit weights (G_v, N), unit order).
    """
    parts, used = [], []
    for users, user_vecs, item_table, weights, order in groups:
        units = select_prefix(order, layout, budget_bytes)
        used.append(layout.bytes_of(units))
        row_of = np.full(ds.n_users, -1, dtype=np.int64)
        row_of[users] = np.arange(users.size)
        parts.append(
            (users, budget_score_fn(user_vecs, item_table, weights, units, layout, row_of))
        )
    return {**grouped_metrics(parts, ds.n_users, ds.train, ds.test), "used_bytes": int(max(used))}


def run_centralized(cfg: PipelineConfig, dataset: Dataset | None = None) -> dict:
    """Run the whole centralized pipeline; returns the results dict that is also saved.

    ``dataset`` overrides loading ``cfg.dataset`` / ``cfg.data_dir`` (e.g. synthetic data).
    """
    t_start = time.perf_counter()
    ds = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_dir)
    log(ds.summary())
    if max(cfg.num_user_groups) > ds.n_users:
        raise ValueError(f"more user groups ({max(cfg.num_user_groups)}) than users ({ds.n_users})")
    popularity = ds.item_popularity()
    item_groups = popularity_item_groups(popularity, cfg.peel.num_item_groups)
    layout = BlockLayout(item_groups, cfg.lightgcn.dim, cfg.peel.num_blocks)
    budgets = [(b, parse_budget(b, layout.full_table_bytes)) for b in cfg.budgets]
    for _, b in budgets:
        check_budget(b, layout)
    log(
        f"item table {layout.full_table_bytes:,} B; {layout.num_item_groups} item groups x "
        f"{layout.num_blocks} blocks; unit {layout.unit_bytes().min():,}-"
        f"{layout.unit_bytes().max():,} B; covering every group takes {layout.cover_bytes:,} B"
    )
    split = split_validation(ds.train, ds.n_users, cfg.val_fraction, seed=cfg.seed)
    log(f"validation split: {len(split.fit):,} fit / {len(split.val):,} validation interactions")
    pre = pretrain(ds, split.fit, cfg)
    t0 = time.perf_counter()
    full = evaluate_ranking(
        dot_score_fn(pre.user_emb, pre.item_emb), ds.n_users, ds.train, ds.test, ks=(20,)
    )
    log(
        f"pretrained LightGCN (full table): Recall@20 {full['recall@20']:.4f} "
        f"NDCG@20 {full['ndcg@20']:.4f} ({time.perf_counter() - t0:.0f} s to evaluate)"
    )
    all_users = np.arange(ds.n_users)
    methods: dict[str, list] = {}
    peel_info: dict[str, dict] = {}
    user_groups: dict[int, UserGroups | None] = {}
    for num_user_groups in cfg.num_user_groups:
        name = peel_blocks_method(num_user_groups)
        t0 = time.perf_counter()
        ugroups = kmeans_user_groups(pre.user_emb, num_user_groups, seed=cfg.seed)
        user_groups[num_user_groups] = ugroups if num_user_groups > 1 else None
        sizes = np.bincount(ugroups.assignment, minlength=num_user_groups).tolist()
        log(f"{name}: K-Means user groups of sizes {sizes}")
        pees = learn_all_groups(ds, split, pre, ugroups, popularity, layout, cfg)
        methods[name] = [
            (p.users, p.user_table, p.item_table, p.unit_weights, p.unit_order) for p in pees
        ]
        peel_info[name] = {
            "user_group_sizes": sizes,
            "seconds": time.perf_counter() - t0,
            "unit_weights": [p.unit_weights.round(4).tolist() for p in pees],
            "history": [p.history for p in pees],
        }
        log(f"{name}: PEE learning took {peel_info[name]['seconds']:.0f} s")
    ones = np.ones((layout.num_item_groups, layout.num_blocks))
    methods["first-k blocks"] = [
        (
            all_users,
            pre.user_emb,
            pre.item_emb,
            ones,
            first_blocks_order(layout.num_item_groups, layout.num_blocks),
        )
    ]
    methods["random units"] = [
        (
            all_users,
            pre.user_emb,
            pre.item_emb,
            ones,
            random_unit_order(layout.num_item_groups, layout.num_blocks, seed=cfg.seed),
        )
    ]
    rows = []
    bar = progress_bar(len(methods) * len(budgets), "evaluate", cfg.progress)
    for label, budget_bytes in budgets:
        for method, groups in methods.items():
            m = evaluate_units(ds, groups, layout, budget_bytes)
            rows.append(
                {
                    "method": method,
                    "budget": label,
                    "budget_bytes": budget_bytes,
                    "budget_fraction": budget_bytes / layout.full_table_bytes,
                    **m,
                }
            )
            bar.update(1)
    bar.close()
    t0 = time.perf_counter()
    planes, others = comparison_rows(
        ds,
        split,
        pre.user_emb,
        pre.item_emb,
        popularity,
        budgets,
        user_groups if cfg.bit_planes else {},
        cfg.peel.num_item_groups,
        cfg.baselines,
    )
    if planes or others:
        log(f"bit-planes and baselines evaluated in {time.perf_counter() - t0:.0f} s")
    rank = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in planes + rows + others))}
    at = {label: i for i, (label, _) in enumerate(budgets)}
    rows = sorted(planes + rows + others, key=lambda r: (at[r["budget"]], rank[r["method"]]))
    results = {
        "config": to_jsonable(
            {
                **asdict(cfg),
                **{k: portable_path(getattr(cfg, k)) for k in ("data_dir", "out_dir", "cache_dir")},
            }
        ),
        "dataset": {
            "name": ds.name,
            "summary": ds.summary(),
            "n_users": ds.n_users,
            "n_items": ds.n_items,
            "train": len(ds.train),
            "test": len(ds.test),
        },
        "layout": {
            "full_table_bytes": layout.full_table_bytes,
            "num_item_groups": layout.num_item_groups,
            "num_blocks": layout.num_blocks,
            "cover_bytes": layout.cover_bytes,
            "unit_bytes_min": int(layout.unit_bytes().min()),
            "unit_bytes_max": int(layout.unit_bytes().max()),
        },
        "pretrain": {
            "seconds": pre.seconds,
            "reused": pre.reused,
            "path": portable_path(pre.path),
            "full_table": full,
        },
        "peel": peel_info,
        "rows": rows,
        "wall_seconds": time.perf_counter() - t_start,
    }
    out = Path(cfg.out_dir)
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "results.md", results_markdown(results))
    print(results_markdown(results), flush=True)
    log(
        f"wrote {out / 'results.json'} and {out / 'results.md'} "
        f"({results['wall_seconds']:.0f} s in all)"
    )
    return results


def learn_all_groups(
    ds: Dataset,
    split,
    pre: Pretrained,
    ugroups: UserGroups,
    popularity: np.ndarray,
    layout: BlockLayout,
    cfg: PipelineConfig,
) -> list[GroupPEE]:
    fit_counts = np.bincount(split.fit.users, minlength=ds.n_users)
    steps = 0
    for g in range(ugroups.num_user_groups):
        n = int(fit_counts[ugroups.members(g)].sum())
        steps += cfg.peel.epochs * ((n + cfg.peel.batch_size - 1) // cfg.peel.batch_size)
    bar = progress_bar(steps, f"PEE learning (G_u={ugroups.num_user_groups})", cfg.progress)
    pees = []
    for g in range(ugroups.num_user_groups):
        pees.append(
            learn_group_pee(
                g,
                ugroups.members(g),
                pre.item_emb,
                pre.user_emb,
                split.fit,
                split.val,
                popularity,
                layout,
                cfg.peel,
                seed=cfg.seed * 1000 + g,
                progress=bar,
            )
        )
    bar.close()
    return pees


def results_markdown(results: dict) -> str:
    """The budget table: one row per budget, Recall@20 / NDCG@20 per method."""
    full = results["pretrain"]["full_table"]
    lines = [
        f"# Centralized PEEL on {results['dataset']['name']}",
        "",
        results["dataset"]["summary"],
        "",
        f"Full LightGCN table ({results['layout']['full_table_bytes']:,} B): "
        f"Recall@20 {full['recall@20']:.4f}, NDCG@20 {full['ndcg@20']:.4f}.",
        "",
        "Cells: Recall@20 / NDCG@20. Bytes: the item-embedding budget. Every method counts every "
        "byte of the item table it holds: bit-planes their packed planes and float16 row offsets "
        "and scales, row quantization its packed codes and row meta, magnitude pruning its "
        "bitmap or CSR indices, its values and (int8) its float16 row scales, PEEL blocks and "
        "the block baselines their float32 units. '-': the budget is below the method's "
        "smallest storage.",
        "",
        *budget_table_lines(results["rows"]),
        "",
    ]
    return "\n".join(lines)
