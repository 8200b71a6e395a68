"""Benchmark: time to quality of LightGCN pretraining recipes, in one run, on the same machine.

Runs ``sim.bench_lightgcn`` once per recipe (same data, seed, threads and time budget) and
reports each recipe's Recall@20 curve against training seconds (evaluation time excluded),
its best Recall@20, and the speed-up of every recipe over the published one: the training time
the published recipe needed to reach its own best Recall@20 within the budget, over the time the
recipe needed to reach that same Recall@20.

Recipes (all BPR + L2 1e-4, LightGCN with 3 layers, d = 64, in this project's implementation):

- ``published``: the LightGCN paper's recipe, batch 2048, Adam lr 1e-3, uniform negatives;
- ``large-batch``: the project's earlier default, batch 32768, lr 2e-2, uniform, 60 epochs;
- ``dns-cosine``: the pipeline's default (``default_pretraining``): batch 32768, lr 2e-2
  decayed by a half cosine over 10 epochs, dynamic negative sampling with 64 candidates.

    python -m sim.bench_pretrain_recipes --minutes 30 \\
        --out docs/results/gowalla/bench-pretrain-recipes.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from peel_fed.atomic import write_json_atomic, write_report
from peel_fed.pipeline import default_pretraining
from sim import bench_lightgcn

_DEFAULT = default_pretraining()  # the pipeline's recipe, so the bench measures what runs use
RECIPES: dict[str, list[str]] = {
    "published": ["--batch-size", "2048", "--lr", "1e-3", "--epochs", "1000", "--eval-every", "2"],
    "large-batch": ["--batch-size", "32768", "--lr", "2e-2", "--epochs", "60", "--eval-every", "5"],
    "dns-cosine": [
        *("--batch-size", str(_DEFAULT.batch_size), "--lr", str(_DEFAULT.lr)),
        *("--epochs", str(_DEFAULT.epochs), "--eval-every", "1"),
        *("--negative-sampling", _DEFAULT.negative_sampling),
        *("--dns-candidates", str(_DEFAULT.dns_candidates), "--lr-schedule", _DEFAULT.lr_schedule),
    ],
}


def seconds_to_reach(curve: list[dict], target: float) -> float | None:
    """Training seconds of the first evaluated epoch whose Recall@20 reaches ``target``."""
    hit = next((r for r in curve if r.get("recall@20", -1.0) >= target), None)
    return None if hit is None else hit["train_seconds"]


def summarise(runs: dict[str, dict], baseline: str = "published") -> dict:
    """Each recipe's best Recall@20, its time to the baseline's best, and the speed-up."""
    base = runs[baseline]
    target = base["best_recall@20"]
    base_seconds = seconds_to_reach(base["epochs"], target)
    rows = {}
    for name, run in runs.items():
        reach = seconds_to_reach(run["epochs"], target)
        rows[name] = {
            "best_recall@20": run["best_recall@20"],
            "best_ndcg@20": run["best_ndcg@20"],
            "best_epoch": run["best_epoch"],
            "train_seconds_at_best": next(
                r["train_seconds"] for r in run["epochs"] if r["epoch"] == run["best_epoch"]
            ),
            "median_seconds_per_epoch": run["median_seconds_per_epoch"],
            f"seconds_to_{baseline}_best": reach,
            f"speedup_vs_{baseline}": (base_seconds / reach) if reach else None,
        }
    return {"target_recall@20": target, "baseline": baseline, "recipes": rows}


def markdown(report: dict) -> str:
    s = report["summary"]
    b = s["baseline"]
    lines = [
        f"# LightGCN pretraining recipes on {report['dataset']}: time to quality",
        "",
        f"One run, {report['minutes']} min of training per recipe at most, seed {report['seed']}, "
        f"{report['torch_threads']} torch threads. Target: the {b} recipe's best Recall@20 "
        f"within its budget, {s['target_recall@20']:.4f}.",
        "",
        f"| recipe | best Recall@20 | NDCG@20 | at epoch | train s at best | s / epoch "
        f"| s to {b} best | speed-up vs {b} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in s["recipes"].items():
        reach = r[f"seconds_to_{b}_best"]
        speed = r[f"speedup_vs_{b}"]
        lines.append(
            f"| {name} | {r['best_recall@20']:.4f} | {r['best_ndcg@20']:.4f} | {r['best_epoch']} "
            f"| {r['train_seconds_at_best']:.0f} | {r['median_seconds_per_epoch']:.1f} "
            f"| {'not reached' if reach is None else f'{reach:.0f}'} "
            f"| {'-' if speed is None else f'{speed:.1f}x'} |"
        )
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--minutes", type=float, default=30.0, help="training budget per recipe")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="runs/bench_pretrain_recipes.json")
    args = p.parse_args(argv)
    names = [n for n in args.recipes.split(",") if n]
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        p.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    if "published" not in names:
        p.error("the recipes must include 'published', the baseline of the speed-up")
    common = ["--dataset", args.dataset, "--seed", str(args.seed)]
    common += ["--time-budget-min", str(args.minutes), "--threads", str(args.threads)]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    runs: dict[str, dict] = {}
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"== recipe {name}", flush=True)
            out = str(Path(tmp) / f"{name}.json")
            runs[name] = bench_lightgcn.main([*common, *RECIPES[name], "--out", out])
            first = runs[names[0]]
            report = {
                "dataset": first["dataset"],
                "seed": args.seed,
                "minutes": args.minutes,
                "torch_threads": first["torch_threads"],
                "command": "python -m sim.bench_pretrain_recipes "
                + " ".join(sys.argv[1:] if argv is None else argv),
                "recipe_args": {n: RECIPES[n] for n in names},
                "runs": runs,
            }
            if "published" in runs:
                report["summary"] = summarise(runs)
            write_json_atomic(args.out, report)
    write_report(args.out, report, markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
