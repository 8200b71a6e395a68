"""The study's steps: each maps a ``StudyConfig`` to a JSON-ready result with ``rows``.

``STEPS`` lists them in run order; ``StudyConfig.key`` (``sim.study.config``) names what a step's
saved result depends on, so that a rerun reuses it (``sim.study.runner``). The baseline steps are
in ``sim.study.baseline_steps``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from peel_fed.blocks import FLOAT32_BYTES
from sim.study.baseline_steps import (
    step_baselines_nested,
    step_bit_planes,
    step_bit_planes_nested,
    step_cover_first,
    step_lightgcn_per_budget,
    step_matryoshka,
    step_per_budget_quantized,
    step_pretraining_choice,
    step_pruning,
)
from sim.study.config import (
    STUDY_BUDGETS,
    StudyConfig,
    budget_bytes,
    pipeline_config,
    work_folder,
)

__all__ = ["STEPS", "STUDY_BUDGETS", "StudyConfig"]

PEEL_AS_PUBLISHED = "PEEL as published (G_u={g})"


def step_centralized(cfg: StudyConfig) -> dict:
    from peel_fed.pipeline import run_centralized

    res = run_centralized(pipeline_config(cfg))
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


def step_federated(cfg: StudyConfig) -> dict:
    """Federated PEEL (Flower simulation) with ``peel-fed simulate``'s defaults."""
    return _federated(cfg, {}, "federated")


def step_federated_equal_passes(cfg: StudyConfig) -> dict:
    """Federated PEEL whose pretraining makes as many passes over the data as the centralized
    pretraining's epochs, so the federated/centralized ratio measures federation alone."""
    epochs = pipeline_config(cfg).lightgcn.epochs
    return _federated(cfg, {"pretrain-passes": epochs}, "federated, equal passes")


def _federated(cfg: StudyConfig, overrides: dict, tag: str) -> dict:
    from peel_fed.blocks import parse_budget
    from peel_fed.fedconfig import FedConfig
    from peel_fed.loading import load_dataset
    from sim.simulate import run_federated_simulation

    budgets = ",".join(cfg.budgets)
    values = {
        "dataset": cfg.dataset,
        "data-dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else "",
        "seed": cfg.seed,
        "min-nodes": cfg.num_nodes,
        "out-dir": str((work_folder(cfg) / re.sub(r"\W+", "-", tag)).resolve()),
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
    values.update(overrides)
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
    label = {b: lbl for lbl, b in budget_bytes(cfg, report["layout"]["full_table_bytes"])}
    rows = []
    for r in report["rows"]:  # "PEEL bit-planes (G_u=g)" -> "PEEL bit-planes (G_u=g, <tag>)"
        if r["method"].startswith("PEEL"):
            name = r["method"].removesuffix(f"(G_u={g})") + f"(G_u={g}, {tag})"
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

    pcfg = replace(pipeline_config(cfg), out_dir=str(work_folder(cfg) / "cold-start"))
    res = run_cold_start(pcfg, cfg.cold_start_fraction)
    info = ("held_users", "warm_users", "held_fraction", "cold_users_per_group", "pretrain_seconds")
    return {"rows": [], "cold_start_rows": res["rows"], "cold_start": {k: res[k] for k in info}}


def _ablation(
    name: str, num_user_groups: tuple[int, ...], change: Callable, method: str | None = None
) -> Callable:
    """A study step: centralized PEEL with one thing changed (``change`` maps the pipeline
    config); its PEEL rows go to the ablation table, or, with ``method`` (a label with a
    ``{g}`` for G_u), to the main table under that label."""

    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "user-groups"

    def step(cfg: StudyConfig) -> dict:
        from peel_fed.pipeline import run_centralized

        base = pipeline_config(cfg)
        pcfg = replace(
            change(base),
            num_user_groups=num_user_groups,
            out_dir=str(work_folder(cfg) / f"ablation-{slug}"),
        )
        res = run_centralized(pcfg)
        peel = [r for r in res["rows"] if r["method"].startswith("PEEL")]
        if method is not None:
            g_u = [re.search(r"G_u=(\d+)", r["method"]).group(1) for r in peel]
            rows = [{**r, "method": method.format(g=g)} for r, g in zip(peel, g_u, strict=True)]
            return {"rows": rows}
        rows = [{**r, "method": f"{r['method']}, {name}" if name else r["method"]} for r in peel]
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

# PEEL as the paper describes it: float32 blocks, trained on the full table only, each user
# group's units in the order of its learned weights; the study's pretraining
step_peel_as_published = _ablation(
    "as published",
    (4,),
    lambda c: replace(c, peel=replace(c.peel, elastic=False, unit_order="per-group")),
    method=PEEL_AS_PUBLISHED,
)

STEPS: dict[str, Callable[[StudyConfig], dict]] = {
    "centralized": step_centralized,
    "pruning": step_pruning,
    "lightgcn-per-budget": step_lightgcn_per_budget,
    "per-budget-quantized": step_per_budget_quantized,
    "matryoshka": step_matryoshka,
    "peel-as-published": step_peel_as_published,
    "federated": step_federated,
    "federated-equal-passes": step_federated_equal_passes,
    "cold-start": step_cold_start,
    "bit-planes": step_bit_planes,
    "bit-planes-nested": step_bit_planes_nested,
    "recipe-choice": step_pretraining_choice,
    "baselines-nested": step_baselines_nested,
    **ABLATIONS,
    "ablation-cover-first": step_cover_first,
}
