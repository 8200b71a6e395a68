"""The study's steps: each maps a ``StudyConfig`` to a JSON-ready result with ``rows``.

``STEPS`` lists them in run order; ``StudyConfig.key`` names what a step's saved result
depends on, so that a rerun reuses it (``sim.study.runner``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from peel_fed.blocks import FLOAT32_BYTES
from peel_fed.console import log

STUDY_BUDGETS = ("5%", "10%", "25%", "50%", "100%")


@dataclass(frozen=True)
class StudyConfig:
    """Inputs of a study run; ``quick`` shrinks every training for smoke runs and tests."""

    dataset: str = "gowalla"
    data_dir: str | None = None
    seed: int = 0
    budgets: tuple[str, ...] = STUDY_BUDGETS
    out_dir: str = "docs/results/gowalla"
    cache_dir: str = "runs/cache"
    work_dir: str = "runs/study"  # each step's own run folders (the report needs only steps/)
    num_nodes: int = 2
    quick: bool = False
    progress: bool = True
    fed_overrides: dict = field(default_factory=dict)
    cold_start_fraction: float = 0.1  # users held out of all training (the cold-start step)

    def key(self, step: str) -> str:
        """What a step's result depends on: the inputs it reads (not where it is written, nor
        progress output) and its code version."""
        where = ("out_dir", "work_dir", "cache_dir", "progress")
        inputs = {
            k: v
            for k, v in asdict(self).items()
            if k not in where and step in STEP_ONLY_FIELDS.get(k, (step,))
        }
        if STEP_VERSIONS.get(step, 1) > 1:
            inputs["version"] = STEP_VERSIONS[step]
        blob = json.dumps({"step": step, **inputs}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Fields only some steps read (the others' keys, and so their saved results, ignore them).
STEP_ONLY_FIELDS: dict[str, tuple[str, ...]] = {"cold_start_fraction": ("cold-start",)}
# Bump a step's version when its code changes what it saves, so saved results are redone.
STEP_VERSIONS: dict[str, int] = {"pruning": 2, "federated": 3}


def _work(cfg: StudyConfig) -> Path:
    name = Path(cfg.data_dir).name if cfg.data_dir else cfg.dataset
    return Path(cfg.work_dir) / name / f"seed-{cfg.seed}"


def _pipeline_config(cfg: StudyConfig):
    from peel_fed.pipeline import PipelineConfig

    base = PipelineConfig()
    lightgcn, peel = base.lightgcn, base.peel
    if cfg.quick:
        lightgcn = replace(lightgcn, dim=16, epochs=5, batch_size=1024)
        peel = replace(peel, num_item_groups=4, num_blocks=4, epochs=2, batch_size=256)
    return PipelineConfig(
        dataset=cfg.dataset,
        data_dir=cfg.data_dir,
        seed=cfg.seed,
        num_user_groups=(4, 1),
        budgets=tuple(cfg.budgets),
        out_dir=str(_work(cfg) / "centralized"),
        cache_dir=cfg.cache_dir,
        progress=cfg.progress,
        lightgcn=lightgcn,
        peel=peel,
    )


# --- steps --------------------------------------------------------------------------------------
def step_centralized(cfg: StudyConfig) -> dict:
    from peel_fed.pipeline import run_centralized

    res = run_centralized(_pipeline_config(cfg))
    rows = [
        {
            **r,
            "method": f"{r['method']} (centralized)"
            if r["method"].startswith("PEEL")
            else r["method"],
        }
        for r in res["rows"]
    ]
    full = res["pretrain"]["full_table"]
    rows.append(
        {
            "method": "LightGCN (full table)",
            "budget": "100%",
            "budget_bytes": res["layout"]["full_table_bytes"],
            "budget_fraction": 1.0,
            "recall@20": full["recall@20"],
            "ndcg@20": full["ndcg@20"],
            "used_bytes": res["layout"]["full_table_bytes"],
        }
    )
    return {
        "rows": rows,
        "layout": res["layout"],
        "dataset": res["dataset"],
        "pretrain_seconds": res["pretrain"]["seconds"],
    }


def _data_and_pretrained(cfg: StudyConfig, pcfg=None):
    from peel_fed.data import split_validation
    from peel_fed.loading import load_dataset
    from peel_fed.pipeline import pretrain

    pcfg = pcfg or _pipeline_config(cfg)
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    split = split_validation(ds.train, ds.n_users, pcfg.val_fraction, seed=cfg.seed)
    return ds, split, pretrain(ds, split.fit, pcfg)


def _budget_bytes(cfg: StudyConfig, full_table_bytes: int) -> list[tuple[str, int]]:
    from peel_fed.blocks import parse_budget

    return [(b, parse_budget(b, full_table_bytes)) for b in cfg.budgets]


def step_pruning(cfg: StudyConfig) -> dict:
    from peel_fed.baselines import magnitude_prune
    from peel_fed.metrics import evaluate_ranking
    from peel_fed.scoring import dot_score_fn

    ds, _, pre = _data_and_pretrained(cfg)
    full = pre.item_emb.size * FLOAT32_BYTES

    def prune(table, label: str, budget: int):
        pruned, cap = magnitude_prune(table, budget)
        m = evaluate_ranking(dot_score_fn(pre.user_emb, pruned), ds.n_users, ds.train, ds.test)
        return pruned, {
            "method": "magnitude pruning",
            "budget": label,
            "budget_bytes": budget,
            "budget_fraction": budget / full,
            "recall@20": m["recall@20"],
            "ndcg@20": m["ndcg@20"],
            "used_bytes": cap.bytes,
            "kept_values": cap.kept,
            "storage": cap.storage,
        }

    rows = []
    for label, budget in _budget_bytes(cfg, full):
        rows.append(prune(pre.item_emb, label, budget)[1])
        r = rows[-1]
        log(
            f"magnitude pruning {label}: {r['kept_values']:,} values ({r['storage']}), "
            f"Recall@20 {r['recall@20']:.4f}",
            source="study",
        )
    # the dynamic-budget trace: the device holds the largest budget's table and prunes what it
    # holds at each drop (no server contact); nested, so each cut keeps a subset of the last
    trace, held = [], pre.item_emb
    for label, budget in sorted(_budget_bytes(cfg, full), key=lambda lb: -lb[1]):
        held, r = prune(held, label, budget)
        trace.append(r)
    return {"rows": rows, "trace": trace}


def step_lightgcn_per_budget(cfg: StudyConfig) -> dict:
    """One LightGCN per budget at the largest dimension whose item table fits it (no blocks and
    no diversity regulariser: a plain, non-elastic model)."""
    from peel_fed.baselines import affordable_dim
    from peel_fed.loading import load_dataset
    from peel_fed.metrics import evaluate_ranking
    from peel_fed.scoring import dot_score_fn

    base = _pipeline_config(cfg)
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    full = ds.n_items * base.lightgcn.dim * FLOAT32_BYTES
    rows = []
    for label, budget in _budget_bytes(cfg, full):
        dim = affordable_dim(budget, ds.n_items, base.lightgcn.dim)
        pcfg = replace(
            base,
            lightgcn=replace(base.lightgcn, dim=dim, diversity_weight=0.0, num_blocks=1),
            peel=replace(base.peel, num_blocks=1),
        )
        _, _, pre = _data_and_pretrained(cfg, pcfg)
        m = evaluate_ranking(
            dot_score_fn(pre.user_emb, pre.item_emb), ds.n_users, ds.train, ds.test
        )
        rows.append(
            {
                "method": "LightGCN retrained per budget",
                "budget": label,
                "budget_bytes": budget,
                "budget_fraction": budget / full,
                "recall@20": m["recall@20"],
                "ndcg@20": m["ndcg@20"],
                "used_bytes": ds.n_items * dim * FLOAT32_BYTES,
                "dim": dim,
                "train_seconds": pre.seconds,
            }
        )
        log(
            f"retrained LightGCN d={dim} for {label}: Recall@20 {m['recall@20']:.4f}",
            source="study",
        )
    return {"rows": rows}


def step_matryoshka(cfg: StudyConfig) -> dict:
    """One nested (Matryoshka) LightGCN, the study's pretraining made plain (no blocks, no
    diversity regulariser) and nested on the powers of two below its dim, cut to every budget:
    leading dims at float32 and the best quantized cut by validation (``peel_fed.matryoshka``)."""
    from peel_fed.matryoshka import matryoshka_dims, matryoshka_rows

    base = _pipeline_config(cfg)
    nested = matryoshka_dims(base.lightgcn.dim)
    lightgcn = replace(base.lightgcn, diversity_weight=0.0, num_blocks=1, nested_dims=nested)
    pcfg = replace(base, lightgcn=lightgcn, peel=replace(base.peel, num_blocks=1))
    ds, split, pre = _data_and_pretrained(cfg, pcfg)
    budgets = _budget_bytes(cfg, pre.item_emb.size * FLOAT32_BYTES)
    res = matryoshka_rows(ds, split, pre.user_emb, pre.item_emb, budgets)
    return {**res, "nested_dims": list(nested), "train_seconds": pre.seconds}


def step_federated(cfg: StudyConfig) -> dict:
    from peel_fed.blocks import parse_budget
    from peel_fed.fedconfig import FedConfig
    from peel_fed.loading import load_dataset
    from sim.simulate import run_federated_simulation

    budgets = ",".join(cfg.budgets)
    values = {
        "dataset": cfg.dataset,
        "data-dir": cfg.data_dir or "",
        "seed": cfg.seed,
        "min-nodes": cfg.num_nodes,
        "out-dir": str((_work(cfg) / "federated").resolve()),
        "progress": cfg.progress,
        "budgets": budgets,
        "device-budgets": budgets,
    }
    if cfg.quick:
        values.update(
            {
                "pretrain-passes": 2,
                "pretrain-cohort-fraction": 0.5,
                "pretrain-local-steps": 1,
                "kmeans-iters": 2,
                "pee-rounds": 3,
                "pee-cohort-fraction": 0.5,
                "num-item-groups": 4,
                "num-blocks": 4,
                "dim": 16,
                "num-user-groups": 2,
            }
        )
    values.update(cfg.fed_overrides)
    fcfg = FedConfig.from_run_config({**FedConfig().to_run_config(), **values})
    if "drill" not in cfg.fed_overrides:
        # the drill: a device at the largest budget cuts to every smaller one (the trace)
        full = load_dataset(cfg.dataset, cfg.data_dir).n_items * fcfg.dim * FLOAT32_BYTES
        sizes = sorted((parse_budget(b, full) for b in cfg.budgets), reverse=True)
        values["drill"] = ",".join(repr(b / sizes[0]) for b in sizes[1:]) or "1"
        fcfg = FedConfig.from_run_config({**FedConfig().to_run_config(), **values})
    report = run_federated_simulation(fcfg, cfg.num_nodes)
    g = fcfg.num_user_groups
    label = {b: lbl for lbl, b in _budget_bytes(cfg, report["layout"]["full_table_bytes"])}
    rows = []
    for r in report["rows"]:  # "PEEL bit-planes (G_u=g)" -> "PEEL bit-planes (G_u=g, federated)"
        if r["method"].startswith("PEEL"):
            name = r["method"].removesuffix(f"(G_u={g})") + f"(G_u={g}, federated)"
            rows.append({**r, "method": name, "budget": label[r["budget_bytes"]]})
    return {
        "rows": rows,
        "drill": report["drill"],
        "config": report["config"],
        "wall_seconds": report["wall_seconds"],
    }


def step_cold_start(cfg: StudyConfig) -> dict:
    """Users held out of all training join a group from their own items (``peel_fed.coldstart``)."""
    from peel_fed.coldstart import run_cold_start

    pcfg = replace(_pipeline_config(cfg), out_dir=str(_work(cfg) / "cold-start"))
    res = run_cold_start(pcfg, cfg.cold_start_fraction)
    info = ("held_users", "warm_users", "held_fraction", "cold_users_per_group", "pretrain_seconds")
    return {"rows": [], "cold_start_rows": res["rows"], "cold_start": {k: res[k] for k in info}}


def step_bit_planes(cfg: StudyConfig) -> dict:
    """Bit-plane units (one global order, and one per K-Means user group) and direct row
    quantization of the pretrained tables (``peel_fed.plane_eval``)."""
    from peel_fed.plane_eval import plane_budget_rows

    pcfg = _pipeline_config(cfg)
    ds, _, pre = _data_and_pretrained(cfg, pcfg)
    budgets = _budget_bytes(cfg, pre.item_emb.size * FLOAT32_BYTES)
    popularity = ds.item_popularity()
    return plane_budget_rows(
        ds,
        pre.user_emb,
        pre.item_emb,
        popularity,
        budgets,
        num_user_groups=max(pcfg.num_user_groups),
        num_item_groups=pcfg.peel.num_item_groups,
        seed=cfg.seed,
    )


def _ablation(name: str, num_user_groups: tuple[int, ...], change: Callable) -> Callable:
    """A study step: centralized PEEL with one thing changed (``change`` maps the pipeline
    config); its PEEL rows go to the ablation table."""

    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "user-groups"

    def step(cfg: StudyConfig) -> dict:
        from peel_fed.pipeline import run_centralized

        base = _pipeline_config(cfg)
        pcfg = replace(
            change(base),
            num_user_groups=num_user_groups,
            out_dir=str(_work(cfg) / f"ablation-{slug}"),
        )
        res = run_centralized(pcfg)
        rows = [
            {**r, "method": f"{r['method']}, {name}" if name else r["method"]}
            for r in res["rows"]
            if r["method"].startswith("PEEL")
        ]
        return {"rows": [], "ablation_rows": rows}

    return step


def _blocks(pcfg, factor: float, pretrain_too: bool = True):
    """``factor`` times the blocks in PEE learning, and in pretraining's diversity regulariser
    too unless ``pretrain_too`` is off (then the pretrained model is the reference's)."""
    n = max(1, int(pcfg.peel.num_blocks * factor))
    lightgcn = replace(pcfg.lightgcn, num_blocks=n) if pretrain_too else pcfg.lightgcn
    return replace(pcfg, lightgcn=lightgcn, peel=replace(pcfg.peel, num_blocks=n))


ABLATIONS: dict[str, Callable] = {
    "ablation-no-diversity": _ablation(
        "no diversity regulariser",
        (4,),
        lambda c: replace(
            c,
            lightgcn=replace(c.lightgcn, diversity_weight=0.0),
            peel=replace(c.peel, diversity_weight=0.0),
        ),
    ),
    "ablation-uniform-weights": _ablation(
        "uniform weights (no controller)",
        (4,),
        lambda c: replace(c, peel=replace(c.peel, controller=replace(c.peel.controller, lr=0.0))),
    ),
    "ablation-joint": _ablation(
        "joint training (not bi-level)",
        (4,),
        lambda c: replace(c, peel=replace(c.peel, joint=True)),
    ),
    "ablation-user-groups": _ablation("", (2, 8), lambda c: c),
    "ablation-fewer-blocks": _ablation("half the blocks", (4,), lambda c: _blocks(c, 0.5)),
    "ablation-more-blocks": _ablation("twice the blocks", (4,), lambda c: _blocks(c, 2.0)),
    "ablation-fewer-blocks-same-pretraining": _ablation(
        "half the blocks, same pretraining", (4,), lambda c: _blocks(c, 0.5, pretrain_too=False)
    ),
    "ablation-more-blocks-same-pretraining": _ablation(
        "twice the blocks, same pretraining", (4,), lambda c: _blocks(c, 2.0, pretrain_too=False)
    ),
}

STEPS: dict[str, Callable[[StudyConfig], dict]] = {
    "centralized": step_centralized,
    "pruning": step_pruning,
    "lightgcn-per-budget": step_lightgcn_per_budget,
    "matryoshka": step_matryoshka,
    "federated": step_federated,
    "cold-start": step_cold_start,
    "bit-planes": step_bit_planes,
    **ABLATIONS,
}
