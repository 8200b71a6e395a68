"""The study: every method at equal device bytes, one resumable command per dataset.

``peel-fed study`` (or ``python -m sim.study``) composes the core and the federated pipeline:

1. ``centralized``: pretrain LightGCN, PEEL with G_u = 4 and G_u = 1, first-k blocks and random
   units at every budget (``peel_fed.pipeline.run_centralized``);
2. ``pruning``: magnitude pruning of the pretrained item table, stored sparsely
   (``peel_fed.baselines``);
3. ``lightgcn-per-budget``: LightGCN retrained for each budget at the largest dimension that
   fits it;
4. ``federated``: federated PEEL in Flower's simulation (``sim.simulate``), with heterogeneous
   device budgets and the dynamic-budget drill (a device at the largest budget cuts to each
   smaller one);
5. ``cold-start``: users held out of all training join the nearest group from their own items
   (``peel_fed.coldstart``), evaluated per budget next to the same run's warm users;
6. ablations, one step each: no diversity regulariser, uniform weights (controller off), joint
   training instead of bi-level, G_u = 2 and 8, half and twice the blocks (in PEE learning and
   pretraining's regulariser, or in PEE learning only, with the reference's pretrained model).

Each step's result is saved atomically under ``<out>/steps/`` with a key of its inputs. A rerun
skips the steps whose saved key matches, so an interrupted study resumes where it stopped. The
report (``study.md``, ``results.json``, PNG plots) is rebuilt from the saved steps every time; it
includes the dynamic-budget trace: cut on the device (PEEL, magnitude pruning) against a
retrained model per budget.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from peel_fed.atomic import write_atomic, write_json_atomic, write_text_atomic
from strategies.report import drill_lines

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
        name = STEP_KEY_NAMES.get(step, step)
        blob = json.dumps({"step": name, **inputs}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Fields only some steps read (the others' keys, and so their saved results, ignore them).
STEP_ONLY_FIELDS: dict[str, tuple[str, ...]] = {"cold_start_fraction": ("cold-start",)}
# A renamed step keys its results under its old name, so they stay valid ("retrained" became
# "lightgcn-per-budget": a results path with "train" in it reads as a dataset file to checks).
STEP_KEY_NAMES: dict[str, str] = {"lightgcn-per-budget": "retrained"}
# Bump a step's version when its code changes what it saves, so saved results are redone.
STEP_VERSIONS: dict[str, int] = {"pruning": 2, "federated": 2}


def _log(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


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
        user_groups=(4, 1),
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
    from peel_fed.data import load_dataset, split_validation
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
    from peel_fed.metrics import dot_score_fn, evaluate_ranking

    ds, _, pre = _data_and_pretrained(cfg)
    full = pre.item_emb.size * 4

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
        _log(
            f"magnitude pruning {label}: {r['kept_values']:,} values ({r['storage']}), "
            f"Recall@20 {r['recall@20']:.4f}"
        )
    # the dynamic-budget trace: the device holds the largest budget's table and prunes what it
    # holds at each drop (no server contact); nested, so each cut keeps a subset of the last
    trace, held = [], pre.item_emb
    for label, budget in sorted(_budget_bytes(cfg, full), key=lambda lb: -lb[1]):
        held, r = prune(held, label, budget)
        trace.append(r)
    return {"rows": rows, "trace": trace}


def step_retrained(cfg: StudyConfig) -> dict:
    """One LightGCN per budget at the largest dimension whose item table fits it (no blocks and
    no diversity regulariser: a plain, non-elastic model)."""
    from peel_fed.baselines import affordable_dim
    from peel_fed.data import load_dataset
    from peel_fed.metrics import dot_score_fn, evaluate_ranking

    base = _pipeline_config(cfg)
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    full = ds.n_items * base.lightgcn.dim * 4
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
                "used_bytes": ds.n_items * dim * 4,
                "dim": dim,
                "train_seconds": pre.seconds,
            }
        )
        _log(f"retrained LightGCN d={dim} for {label}: Recall@20 {m['recall@20']:.4f}")
    return {"rows": rows}


def step_federated(cfg: StudyConfig) -> dict:
    from peel_fed.blocks import parse_budget
    from peel_fed.data import load_dataset
    from peel_fed.fedconfig import FedConfig
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
                "cohort-fraction": 0.5,
                "local-steps": 1,
                "kmeans-iters": 2,
                "pee-rounds": 3,
                "pee-cohort-fraction": 0.5,
                "item-groups": 4,
                "blocks": 4,
                "dim": 16,
                "user-groups": 2,
            }
        )
    values.update(cfg.fed_overrides)
    fcfg = FedConfig.from_run_config({**FedConfig().to_run_config(), **values})
    if "drill" not in cfg.fed_overrides:
        # the drill: a device at the largest budget cuts to every smaller one (the trace)
        full = load_dataset(cfg.dataset, cfg.data_dir).n_items * fcfg.dim * 4
        sizes = sorted((parse_budget(b, full) for b in cfg.budgets), reverse=True)
        values["drill"] = ",".join(repr(b / sizes[0]) for b in sizes[1:]) or "1"
        fcfg = FedConfig.from_run_config({**FedConfig().to_run_config(), **values})
    report = run_federated_simulation(fcfg, cfg.num_nodes)
    g = fcfg.user_groups
    label = {b: lbl for lbl, b in _budget_bytes(cfg, report["layout"]["full_table_bytes"])}
    rows = []
    for r in report["rows"]:
        if r["method"].startswith("PEEL"):
            rows.append(
                {**r, "method": f"PEEL (G_u={g}, federated)", "budget": label[r["budget_bytes"]]}
            )
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


def _ablation(name: str, user_groups: tuple[int, ...], change: Callable) -> Callable:
    """A study step: centralized PEEL with one thing changed (``change`` maps the pipeline
    config); its PEEL rows go to the ablation table."""

    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "user-groups"

    def step(cfg: StudyConfig) -> dict:
        from peel_fed.pipeline import run_centralized

        base = _pipeline_config(cfg)
        pcfg = replace(
            change(base), user_groups=user_groups, out_dir=str(_work(cfg) / f"ablation-{slug}")
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
    "lightgcn-per-budget": step_retrained,
    "federated": step_federated,
    "cold-start": step_cold_start,
    **ABLATIONS,
}


# --- the runner ---------------------------------------------------------------------------------
def run_study(cfg: StudyConfig, steps: list[str] | None = None) -> dict:
    """Run (or resume) the study's steps and rebuild the report; returns the report."""
    out = Path(cfg.out_dir)
    done: dict[str, dict] = {}
    for name in steps or list(STEPS):
        if name not in STEPS:
            raise ValueError(f"unknown study step {name!r}: steps are {', '.join(STEPS)}")
        path = out / "steps" / f"{name}.json"
        key = cfg.key(name)
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                _log(f"{name}: done earlier ({saved['seconds']:.0f} s), reusing {path}")
                done[name] = saved
                continue
            _log(f"{name}: inputs changed since {path} was written; running it again")
        _log(f"{name}: running")
        t0 = time.perf_counter()
        result = STEPS[name](cfg)
        saved = {"key": key, "seconds": time.perf_counter() - t0, "result": result}
        write_json_atomic(path, saved)
        done[name] = saved
        _log(f"{name}: done in {saved['seconds']:.0f} s")
    report = json.loads(json.dumps(build_report(cfg, done)))  # as results.json holds it
    write_json_atomic(out / "results.json", report)
    write_text_atomic(out / "study.md", report_markdown(report))
    plot_metric_vs_bytes(report, "recall@20", out / "recall_vs_bytes.png")
    plot_metric_vs_bytes(report, "ndcg@20", out / "ndcg_vs_bytes.png")
    if report.get("drill") or report.get("trace"):
        plot_dynamic_budgets(report, out / "dynamic_budget.png")
    _log(f"report: {out / 'study.md'}")
    return report


def build_report(cfg: StudyConfig, done: dict[str, dict]) -> dict:
    rows = [r for step in done.values() for r in step["result"]["rows"]]
    ablation_rows = [r for step in done.values() for r in step["result"].get("ablation_rows", [])]
    if ablation_rows:  # the reference: PEEL G_u = 4, centralized, as the method is
        reference = [r for r in rows if r["method"] == "PEEL (G_u=4) (centralized)"]
        ablation_rows = reference + ablation_rows
    central = done.get("centralized", {}).get("result", {})
    cold = done.get("cold-start", {}).get("result", {})
    return {
        "ablation_rows": ablation_rows,
        "cold_start_rows": cold.get("cold_start_rows", []),
        "cold_start": cold.get("cold_start"),
        "trace": dynamic_trace(done),
        "config": {k: v for k, v in asdict(cfg).items() if k != "progress"},
        "dataset": central.get("dataset"),
        "layout": central.get("layout"),
        "rows": rows,
        "drill": done.get("federated", {}).get("result", {}).get("drill", []),
        "step_seconds": {name: step["seconds"] for name, step in done.items()},
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
    }


def dynamic_trace(done: dict[str, dict]) -> list[dict]:
    """A device at the largest budget whose budget drops to each smaller one: Recall@20 and
    NDCG@20 after each drop, per method, with what each drop asks of the server."""

    def result(step: str) -> dict:
        return done.get(step, {}).get("result", {})

    trace = []
    fed_rows, drill = result("federated").get("rows", []), result("federated").get("drill", [])
    if fed_rows and drill:
        top = max(fed_rows, key=lambda r: r["budget_bytes"])
        own = next(  # the own-budget class of the largest budget, matched by bytes
            (
                d["own_budget"]
                for d in drill
                if d["fraction_of_own"] == 1.0 and d["budget_bytes"] == top["budget_bytes"]
            ),
            None,
        )
        for d in drill:
            if d["own_budget"] == own and d["users"]:
                trace.append(
                    {
                        "method": f"{top['method']}: cut on the device",
                        "budget_fraction": top["budget_fraction"] * d["fraction_of_own"],
                        "recall@20": d["recall@20"],
                        "ndcg@20": d["ndcg@20"],
                        "contact": "none: it drops its lowest-priority units",
                        "devices": d["users"],
                    }
                )
    for r in result("centralized").get("rows", []):
        if r["method"] == "PEEL (G_u=4) (centralized)":
            trace.append(
                {
                    **_metrics(r),
                    "method": "PEEL (G_u=4, centralized): cut on the device",
                    "contact": "none: it drops its lowest-priority units",
                }
            )
    for r in result("pruning").get("trace", []):
        trace.append(
            {
                **_metrics(r),
                "method": "magnitude pruning: cut on the device",
                "contact": "none: it zeroes its smallest kept values",
            }
        )
    for r in result("lightgcn-per-budget").get("rows", []):
        trace.append(
            {
                **_metrics(r),
                "method": "LightGCN retrained per budget",
                "contact": "downloads a new table, trained for the new budget",
                "download_bytes": r["used_bytes"],
                "train_seconds": r["train_seconds"],
            }
        )
    return trace


def _metrics(r: dict) -> dict:
    return {k: r[k] for k in ("budget_fraction", "recall@20", "ndcg@20")}


def trace_lines(trace: list[dict]) -> list[str]:
    """The trace as markdown: one row per method, a column per budget after the drop."""
    fracs = sorted({round(t["budget_fraction"], 4) for t in trace}, reverse=True)
    lines = [
        "| method | " + " | ".join(f"{100 * f:g}%" for f in fracs) + " | server contact per drop |",
        "|---|" + "---|" * (len(fracs) + 1),
    ]
    for m in dict.fromkeys(t["method"] for t in trace):
        mine = {round(t["budget_fraction"], 4): t for t in trace if t["method"] == m}
        cells = [
            f"{mine[f]['recall@20']:.4f} / {mine[f]['ndcg@20']:.4f}" if f in mine else "-"
            for f in fracs
        ]
        contact = next(iter(mine.values()))["contact"]
        down = [t["download_bytes"] for t in mine.values() if "download_bytes" in t]
        if down:
            secs = [t["train_seconds"] for t in mine.values()]
            contact += (
                f" ({_size(min(down))} to {_size(max(down))}; one training per budget, "
                f"{min(secs):.0f}-{max(secs):.0f} s each)"
            )
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {contact} |")
    return lines


def report_markdown(report: dict) -> str:
    rows = report["rows"]
    every = rows + report.get("cold_start_rows", []) + report.get("ablation_rows", [])
    budgets = sorted({(r["budget_fraction"], r["budget"]) for r in every})
    ds = report.get("dataset") or {}
    cfg = report["config"]
    lines = [
        f"# The study on {ds.get('name', cfg['dataset'])}: Recall@20 / NDCG@20 at equal bytes",
        "",
        "Every method keeps at most the budget's bytes of item embeddings on the device "
        "(a fraction of the full float32 item table; the header gives the bytes too). Magnitude "
        "pruning counts its sparse storage; the retrained LightGCN is one model per budget, at "
        "the largest dimension that fits.",
        "",
        *_metric_table(rows, budgets, "method"),
    ]
    if report.get("drill"):
        lines += [
            "",
            "## Heterogeneous budgets (federated PEEL)",
            "",
            "Each device draws its own budget from the study's budgets (by a hash of its id) and "
            "is served its group's units that fit it; Recall@20 per own-budget class (fraction "
            "kept 1), then after each cut of that budget on the device (the drill, no server "
            "contact). '-' with 0 devices: a cut below one unit, where nothing fits.",
            "",
            *drill_lines(report["drill"]),
        ]
    if report.get("trace"):
        lines += [
            "",
            "## Dynamic budgets against retraining",
            "",
            "A device holding the largest budget's embeddings sees its budget drop to each "
            "smaller one in turn. Recall@20 / NDCG@20 after each drop. PEEL and magnitude "
            "pruning cut what the device holds (federated PEEL: measured on the devices of the "
            "largest own-budget class; centralized PEEL: a cut keeps the same units as being "
            "served the smaller budget, as `tests/test_store.py` checks; magnitude pruning: each "
            "cut prunes the previous cut's table). The retrained LightGCN cannot shrink: each "
            "drop needs a new model from the server.",
            "",
            *trace_lines(report["trace"]),
        ]
    if report.get("cold_start_rows"):
        info = report["cold_start"]
        per_group = "; ".join(f"{k}: {v}" for k, v in info["cold_users_per_group"].items())
        lines += [
            "",
            "## Cold-start users",
            "",
            f"{info['held_users']:,} users ({info['held_fraction']:.0%}, drawn by the seed among "
            "users with training and test items) are held out of pretraining, grouping and PEE "
            f"learning; the model is trained on the other {info['warm_users']:,}. Each held-out "
            "device builds its vector from its own training items (one LightGCN propagation step "
            "over the pretrained item table), joins the nearest group centroid and ranks with "
            "that group's units within the budget. Warm users are the same run's trained users. "
            f"Cold-start users per group: {per_group}.",
            "",
            *_metric_table(report["cold_start_rows"], budgets, "method, users"),
        ]
    if report.get("ablation_rows"):
        lines += [
            "",
            "## Ablations (centralized PEEL, Recall@20 / NDCG@20)",
            "",
            *_metric_table(report["ablation_rows"], budgets, "variant"),
        ]
    secs = report["step_seconds"]
    default = StudyConfig()
    lines += [
        "",
        "Step wall times: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items())
        + f"; seed {cfg['seed']}; {report['machine']}.",
        "",
        "Command: `peel-fed study"
        + (
            f" --data-dir {cfg['data_dir']}"
            if cfg.get("data_dir")
            else f" --dataset {cfg['dataset']}"
        )
        + f" --seed {cfg['seed']}"
        + (
            f" --budgets {','.join(cfg['budgets'])}"
            if tuple(cfg["budgets"]) != default.budgets
            else ""
        )
        + (
            f" --cold-start-fraction {cfg['cold_start_fraction']:g}"
            if cfg.get("cold_start_fraction", default.cold_start_fraction)
            != default.cold_start_fraction
            else ""
        )
        + (f" --steps {','.join(secs)}" if set(secs) != set(STEPS) else "")
        + (" --quick" if cfg.get("quick") else "")
        + "`",
    ]
    return "\n".join(lines) + "\n"


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.3g} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:.3g} KB"


def _metric_table(rows: list[dict], budgets: list[tuple], first: str) -> list[str]:
    """Markdown rows: one line per method, Recall@20 / NDCG@20 per budget ('-' if not run)."""
    size = {r["budget_fraction"]: r["budget_bytes"] for r in rows}
    lines = [
        f"| {first} | "
        + " | ".join(
            f"{label} ({_size(size[frac])})" if frac in size else label for frac, label in budgets
        )
        + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for m in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for frac, _ in budgets:
            r = next((x for x in rows if x["method"] == m and x["budget_fraction"] == frac), None)
            cells.append(f"{r['recall@20']:.4f} / {r['ndcg@20']:.4f}" if r else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def plot_metric_vs_bytes(report: dict, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in report["rows"]):
        pts = sorted(
            (r["budget_bytes"], r[metric]) for r in report["rows"] if r["method"] == method
        )
        ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("item-embedding bytes on the device (MB, log scale)")
    ax.set_ylabel({"recall@20": "Recall@20", "ndcg@20": "NDCG@20"}[metric])
    ax.set_title(f"{metric} against bytes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)


def plot_dynamic_budgets(report: dict, path: Path) -> None:
    """Left: the trace (a device at the largest budget dropping to each smaller one, per method);
    right: the federated drill per own-budget class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace, drill = report.get("trace", []), report.get("drill", [])
    panels = [name for name, data in (("trace", trace), ("drill", drill)) if data]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    ax_of = dict(zip(panels, axes[0], strict=True))
    left, right = ax_of.get("trace"), ax_of.get("drill")
    for method in dict.fromkeys(t["method"] for t in trace):
        pts = sorted((t["budget_fraction"], t["recall@20"]) for t in trace if t["method"] == method)
        left.plot([100 * f for f, _ in pts], [r for _, r in pts], marker="o", label=method)
    if left is not None:
        retrained = any("download_bytes" in t for t in trace)
        left.set_title("Budget drops: cut on the device" + (" vs retrained" if retrained else ""))
        left.set_xlabel("budget after the drop (% of the full table, log scale)")
    for own in dict.fromkeys(d["own_budget"] for d in drill):
        pts = [d for d in drill if d["own_budget"] == own and d["users"]]
        if pts:
            right.plot(
                [d["budget_bytes"] / 1e6 for d in pts],
                [d["recall@20"] for d in pts],
                marker="o",
                label=f"own budget {own}",
            )
    if right is not None:
        right.set_title("Federated PEEL: each own-budget class, cut on the device")
        right.set_xlabel("bytes kept after each cut (MB, log scale)")
    for ax in axes[0]:
        ax.set_xscale("log")
        ax.set_ylabel("Recall@20")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)


def _parse_budgets(text: str, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """Budgets as given, after checking each parses (as a share of a 1 GB table)."""
    from peel_fed.blocks import BudgetError, parse_budget

    budgets = tuple(b.strip() for b in text.split(",") if b.strip())
    if not budgets:
        parser.error("--budgets: give at least one budget")
    for b in budgets:
        try:
            parse_budget(b, 10**9)
        except BudgetError as exc:
            parser.error(f"--budgets: {exc}")
    return budgets


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=None,
        help="default docs/results/<dataset>, and docs/results/<dataset>/seed-<n> for a seed "
        "other than 0 (so another seed never replaces seed 0's saved steps)",
    )
    p.add_argument("--cache-dir", default="runs/cache")
    p.add_argument(
        "--budgets",
        default=",".join(STUDY_BUDGETS),
        help="comma-separated device budgets: fractions of the full item table (25%%, 0.25) "
        "or sizes (512KB, 2MB, 1.5MiB); default %(default)s",
    )
    p.add_argument(
        "--cold-start-fraction",
        type=float,
        default=StudyConfig.cold_start_fraction,
        help="share of users held out of all training for the cold-start step (default "
        "%(default)s)",
    )
    p.add_argument("--steps", default=None, help=f"comma-separated subset of {', '.join(STEPS)}")
    p.add_argument("--quick", action="store_true", help="tiny trainings: a smoke run")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    name = Path(args.data_dir).name if args.data_dir else args.dataset
    cfg = StudyConfig(
        dataset=args.dataset,
        data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None,
        seed=args.seed,
        budgets=_parse_budgets(args.budgets, p),
        cold_start_fraction=args.cold_start_fraction,
        out_dir=args.out or f"docs/results/{name}" + (f"/seed-{args.seed}" if args.seed else ""),
        cache_dir=args.cache_dir,
        quick=args.quick,
        progress=not args.no_progress,
    )
    run_study(cfg, args.steps.split(",") if args.steps else None)


if __name__ == "__main__":
    main()
