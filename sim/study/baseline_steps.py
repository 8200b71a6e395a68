"""The study's baseline steps on the centralized pretrained model or on retrained models:
magnitude pruning, LightGCN retrained per budget (float32, and quantized), bit-planes and row
quantization. Each maps a ``StudyConfig`` to a JSON-ready result with ``rows``.
"""

from __future__ import annotations

from dataclasses import replace

from peel_fed.blocks import FLOAT32_BYTES
from peel_fed.console import log
from sim.study.config import (
    StudyConfig,
    budget_bytes,
    data_and_pretrained,
    per_budget_config,
    pipeline_config,
)

RETRAINED = "LightGCN retrained per budget"
RETRAINED_QUANTIZED = "LightGCN retrained per budget, quantized"


def step_pruning(cfg: StudyConfig, pcfg=None) -> dict:
    """Magnitude pruning of the pretrained item table, float32 values and int8 values, at every
    budget, and each cut step by step on the device (``peel_fed.budget_rows.pruning_rows``);
    ``pcfg`` names another pretraining than the study's."""
    from peel_fed.budget_rows import pruning_rows

    ds, _, pre = data_and_pretrained(cfg, pcfg)
    budgets = budget_bytes(cfg, pre.item_emb.size * FLOAT32_BYTES)
    rows, trace = [], []
    for int8 in (False, True):
        got, cut = pruning_rows(ds, pre.user_emb, pre.item_emb, budgets, int8=int8)
        for r in got:
            log(
                f"{r['method']} {r['budget']}: {r['kept_values']:,} values ({r['storage']}), "
                f"Recall@20 {r['recall@20']:.4f}",
                source="study",
            )
        rows += got
        trace += cut
    return {"rows": rows, "trace": trace}


def _retrained_models(cfg: StudyConfig):
    """(dataset, split, full table bytes, {budget label: (bytes, dim, pretrained model)}): the
    LightGCN of each budget at the largest dimension whose float32 item table fits it (none for
    a budget below a 1-dimensional table)."""
    from peel_fed.baselines import affordable_dim
    from peel_fed.blocks import BudgetError
    from peel_fed.loading import load_dataset

    base = pipeline_config(cfg)
    models, split = {}, None
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    full = ds.n_items * base.lightgcn.dim * FLOAT32_BYTES
    for label, budget in budget_bytes(cfg, full):
        try:
            dim = affordable_dim(budget, ds.n_items, base.lightgcn.dim)
        except BudgetError as exc:
            log(f"{RETRAINED} {label}: no model ({exc})", source="study")
            continue
        _, split, pre = data_and_pretrained(cfg, per_budget_config(base, dim))
        models[label] = (budget, dim, pre)
    return ds, split, full, models


def step_lightgcn_per_budget(cfg: StudyConfig) -> dict:
    """One LightGCN per budget at the largest dimension whose item table fits it (no blocks and
    no diversity regulariser: a plain, non-elastic model)."""
    from peel_fed.budget_rows import budget_row
    from peel_fed.metrics import evaluate_ranking
    from peel_fed.scoring import dot_score_fn

    ds, _, full, models = _retrained_models(cfg)
    rows = []
    for label, (budget, dim, pre) in models.items():
        m = evaluate_ranking(
            dot_score_fn(pre.user_emb, pre.item_emb), ds.n_users, ds.train, ds.test
        )
        used = ds.n_items * dim * FLOAT32_BYTES
        rows.append(
            budget_row(RETRAINED, label, budget, full, m, used, dim=dim, train_seconds=pre.seconds)
        )
        log(f"{RETRAINED} d={dim} for {label}: Recall@20 {m['recall@20']:.4f}", source="study")
    return {"rows": rows}


def step_per_budget_quantized(cfg: StudyConfig) -> dict:
    """The ``lightgcn-per-budget`` models, row-quantized: at each budget every (model of size d,
    bits in 8, 4, 2, 1) whose quantized table fits, chosen by validation Recall@20
    (``peel_fed.budget_rows.QuantizedChoice``), reported on test."""
    from peel_fed.baselines import DIRECT_BITS, direct_quantization_bytes
    from peel_fed.budget_rows import QuantCandidate, QuantizedChoice, budget_row

    ds, split, full, models = _retrained_models(cfg)
    by_dim = {dim: pre for _, dim, pre in models.values()}  # one model per distinct size
    dims = sorted(by_dim)
    choice = QuantizedChoice(ds, split, [(by_dim[d].user_emb, by_dim[d].item_emb) for d in dims])
    rows = []
    for label, budget in budget_bytes(cfg, full):
        cands = [
            QuantCandidate(i, bits, d, direct_quantization_bytes(ds.n_items, d, bits))
            for i, d in enumerate(dims)
            for bits in DIRECT_BITS
        ]
        cands = [c for c in cands if c.bytes <= budget]
        if not cands:
            log(f"{RETRAINED_QUANTIZED} {label}: no candidate fits", source="study")
            continue
        best, val = choice.choose(cands)
        m = choice.metrics(best, "test")
        extra = {"dim": best.dims, "bits": best.bits, "val_recall@20": val["recall@20"]}
        rows.append(budget_row(RETRAINED_QUANTIZED, label, budget, full, m, best.bytes, **extra))
        log(
            f"{RETRAINED_QUANTIZED} {label}: d={best.dims} at {best.bits} bit(s) (validation "
            f"Recall@20 {val['recall@20']:.4f}), Recall@20 {m['recall@20']:.4f}",
            source="study",
        )
    return {"rows": rows}


def _plane_rows(cfg: StudyConfig, pcfg, **options) -> dict:
    """``peel_fed.plane_eval.plane_budget_rows`` on the model pretrained with ``pcfg`` (cached),
    at the study's budgets; ``options`` go to it (``families``, ``cover_first``)."""
    from peel_fed.plane_eval import plane_budget_rows

    ds, split, pre = data_and_pretrained(cfg, pcfg)
    return plane_budget_rows(
        ds,
        split,
        pre.user_emb,
        pre.item_emb,
        ds.item_popularity(),
        budget_bytes(cfg, pre.item_emb.size * FLOAT32_BYTES),
        num_user_groups=max(pcfg.num_user_groups),
        num_item_groups=pcfg.peel.num_item_groups,
        seed=cfg.seed,
        **options,
    )


def step_bit_planes(cfg: StudyConfig) -> dict:
    """Bit-plane units (one global order, and one per K-Means user group) and direct row
    quantization of the pretrained tables, chosen on validation (``peel_fed.plane_eval``)."""
    return _plane_rows(cfg, pipeline_config(cfg))


def step_cover_first(cfg: StudyConfig) -> dict:
    """The ``bit-planes`` step's planes with cover-first orders (every item group's first plane
    before any second one, so every item stays rankable at every budget of at least the cover),
    as ablation rows beside the default greedy order."""
    res = _plane_rows(cfg, pipeline_config(cfg), families=("planes",), cover_first=True)
    return {"rows": [], "ablation_rows": res["rows"]}


def step_matryoshka(cfg: StudyConfig) -> dict:
    """One nested (Matryoshka) LightGCN, the study's pretraining made plain (no blocks, no
    diversity regulariser) and nested on the powers of two below its dim, cut to every budget:
    leading dims at float32 and the best quantized cut by validation (``peel_fed.matryoshka``)."""
    from peel_fed.matryoshka import matryoshka_rows

    pcfg, nested = _nested_config(cfg)
    ds, split, pre = data_and_pretrained(cfg, pcfg)
    budgets = budget_bytes(cfg, pre.item_emb.size * FLOAT32_BYTES)
    res = matryoshka_rows(ds, split, pre.user_emb, pre.item_emb, budgets)
    return {**res, "nested_dims": list(nested), "train_seconds": pre.seconds}


def _nested_config(cfg: StudyConfig):
    """The ``matryoshka`` step's pipeline config (plain LightGCN, nested on the powers of two
    below its dim) and its nested dims."""
    from peel_fed.matryoshka import matryoshka_dims

    base = pipeline_config(cfg)
    nested = matryoshka_dims(base.lightgcn.dim)
    lightgcn = replace(base.lightgcn, diversity_weight=0.0, num_blocks=1, nested_dims=nested)
    return replace(base, lightgcn=lightgcn, peel=replace(base.peel, num_blocks=1)), nested


def step_pretraining_choice(cfg: StudyConfig) -> dict:
    """Validation Recall@20 of the full table under each pretraining recipe: ``plain`` (the
    study's) and ``nested`` (the ``matryoshka`` step's model; both cached), and the better one.

    The default's row in the headline (``sim.study.headline``) is the bit-planes row on this
    choice, so the recipe under the default is picked on validation, never on test.
    """
    from peel_fed.metrics import evaluate_ranking
    from peel_fed.scoring import dot_score_fn

    recipes = {"plain": pipeline_config(cfg), "nested": _nested_config(cfg)[0]}
    found = {}
    for name, pcfg in recipes.items():
        ds, split, pre = data_and_pretrained(cfg, pcfg)
        m = evaluate_ranking(
            dot_score_fn(pre.user_emb, pre.item_emb), ds.n_users, split.fit, split.val
        )
        found[name] = {
            "val_recall@20": m["recall@20"],
            "val_ndcg@20": m["ndcg@20"],
            "train_seconds": pre.seconds,
        }
        log(f"{name} pretraining: validation Recall@20 {m['recall@20']:.4f}", source="study")
    choice = max(found, key=lambda name: found[name]["val_recall@20"])
    log(f"pretraining chosen on validation: {choice}", source="study")
    return {"rows": [], "recipes": found, "choice": choice}


def step_baselines_nested(cfg: StudyConfig) -> dict:
    """Row quantization (best bits x dims, by validation) and magnitude pruning (float32 and
    int8 values) of the ``matryoshka`` step's nested model (the same cached pretraining), so
    that where the nested recipe is chosen (``recipe-choice``) the default is also judged
    against plain compression of its own model."""
    pcfg, nested = _nested_config(cfg)
    rows = _plane_rows(cfg, pcfg, families=("direct",))["rows"] + step_pruning(cfg, pcfg)["rows"]
    return {"rows": [{**r, "method": f"{r['method']} (nested pretraining)"} for r in rows]}


def step_bit_planes_nested(cfg: StudyConfig) -> dict:
    """The ``bit-planes`` step's planes on the ``matryoshka`` step's model (the same cached
    pretraining): whether bit-planes gain from nested training, and how they compare with the
    nested model's own quantized cuts on equal footing."""
    pcfg, nested = _nested_config(cfg)
    res = _plane_rows(cfg, pcfg, families=("planes",))
    rows = [
        {**r, "method": r["method"].removesuffix(")") + ", nested pretraining)"}
        for r in res["rows"]
    ]
    return {"rows": rows, "nested_dims": list(nested)}
