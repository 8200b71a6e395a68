"""The study's inputs and what its steps share: ``StudyConfig`` (with the key of each step's
inputs), step versions, and the pipeline config, data, pretrained model and budgets a step reads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from peel_fed.loading import dataset_name

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
        if inputs.get("data_dir"):  # the folder read, however the command line spelled it
            inputs["data_dir"] = str(Path(inputs["data_dir"]).resolve())
        if STEP_VERSIONS.get(step, 1) > 1:
            inputs["version"] = STEP_VERSIONS[step]
        recipe = pipeline_config(self).lightgcn.identity()
        if recipe != legacy_recipe(self.quick):  # steps saved before the recipe was keyed
            inputs["pretraining"] = recipe
        blob = json.dumps({"step": step, **inputs}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Fields only some steps read (the others' keys, and so their saved results, ignore them).
STEP_ONLY_FIELDS: dict[str, tuple[str, ...]] = {"cold_start_fraction": ("cold-start",)}
# Bump a step's version when its code changes what it saves, so saved results are redone.
STEP_VERSIONS: dict[str, int] = {"pruning": 3, "federated": 3, "bit-planes": 2, "centralized": 2}


def work_folder(cfg: StudyConfig) -> Path:
    name = dataset_name(cfg.dataset, cfg.data_dir)
    return Path(cfg.work_dir) / name / f"seed-{cfg.seed}"


def legacy_recipe(quick: bool) -> dict:
    """The pretraining every step saved before the recipe entered the keys (uniform BPR at a
    constant rate, 50 epochs; the quick study's smaller model): those steps keep their keys."""
    from peel_fed.lightgcn import LightGCNConfig

    legacy = LightGCNConfig(diversity_weight=0.01)
    if quick:
        legacy = replace(legacy, dim=16, epochs=5, batch_size=1024)
    return legacy.identity()


def pipeline_config(cfg: StudyConfig):
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
        out_dir=str(work_folder(cfg) / "centralized"),
        cache_dir=cfg.cache_dir,
        progress=cfg.progress,
        bit_planes=False,  # the bit-planes, pruning and row-quantization steps have their rows
        baselines=False,
        lightgcn=lightgcn,
        peel=peel,
    )


def data_and_pretrained(cfg: StudyConfig, pcfg=None):
    from peel_fed.data import split_validation
    from peel_fed.loading import load_dataset
    from peel_fed.pipeline import pretrain

    pcfg = pcfg or pipeline_config(cfg)
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    split = split_validation(ds.train, ds.n_users, pcfg.val_fraction, seed=cfg.seed)
    return ds, split, pretrain(ds, split.fit, pcfg)


def budget_bytes(cfg: StudyConfig, full_table_bytes: int) -> list[tuple[str, int]]:
    from peel_fed.blocks import parse_budget

    return [(b, parse_budget(b, full_table_bytes)) for b in cfg.budgets]


def per_budget_config(base, dim: int):
    """``base`` (a pipeline config) for a plain LightGCN of size ``dim``: no blocks and no
    diversity regulariser (the ``lightgcn-per-budget`` models, also read by
    ``per-budget-quantized``, so both hit the same pretrain cache)."""
    return replace(
        base,
        lightgcn=replace(base.lightgcn, dim=dim, diversity_weight=0.0, num_blocks=1),
        peel=replace(base.peel, num_blocks=1),
    )
