"""Benchmark: the federated pipeline against the centralized one at the same passes.

Runs ``peel-fed simulate`` (Flower's Ray simulation) and the centralized pipeline with matching
settings (same seed, split, passes over the fit split, user groups, budgets), then prints and
saves (atomically) side by side: pretraining Recall@20 and wall time, the budget table of both
(PEEL bit-planes and blocks, and every baseline both evaluate, each on its side's pretrained
model), and bytes per device per round against a dense upload.

    python -m sim.bench_federated --out docs/results/gowalla/federated-vs-centralized.json
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace
from pathlib import Path

from peel_fed.atomic import write_report
from peel_fed.fedconfig import FedConfig
from peel_fed.pipeline import PipelineConfig, default_pretraining, run_centralized
from sim.simulate import run_federated_simulation


def _table(rows: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["method"], r["budget_bytes"]): r for r in rows}


def comparison_markdown(report: dict) -> str:
    fed, cen = report["federated"], report["centralized"]
    f_rows, c_rows = _table(fed["rows"]), _table(cen["rows"])
    budgets = sorted({b for _, b in f_rows})
    full = fed["layout"]["full_table_bytes"]
    # every method both sides evaluate, in the federated table's order (bit-planes first)
    methods = list(dict.fromkeys(m for m, _ in f_rows if any(m == c for c, _ in c_rows)))
    lines = [
        f"## Federated vs centralized on {fed['dataset']['name']} "
        f"({report['passes']} passes, seed {report['seed']})",
        "",
        "| | federated | centralized | ratio |",
        "|---|---:|---:|---:|",
    ]
    f_full = f_rows[("first-k blocks", full)]["recall@20"]  # the pretrained table, all of it
    c_full = cen["pretrain"]["full_table"]["recall@20"]
    lines.append(
        f"| pretrained LightGCN Recall@20 | {f_full:.4f} | {c_full:.4f} | {f_full / c_full:.3f} |"
    )
    f_s, c_s = fed["phase_seconds"]["pretrain"], cen["pretrain"]["seconds"]
    lines.append(f"| pretraining wall time (s) | {f_s:.0f} | {c_s:.0f} | {f_s / c_s:.2f} |")
    lines.append(
        f"| whole pipeline wall time (s) | {fed['wall_seconds']:.0f} | "
        f"{cen['wall_seconds']:.0f} | {fed['wall_seconds'] / cen['wall_seconds']:.2f} |"
    )
    lines += [
        "",
        "Recall@20, federated / centralized:",
        "",
        "| budget | " + " | ".join(methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    for b in budgets:
        cells = []
        for m in methods:
            fr, cr = f_rows[(m, b)]["recall@20"], c_rows[(m, b)]["recall@20"]
            cells.append(f"{fr:.4f} / {cr:.4f} ({fr / cr:.2f})")
        lines.append(f"| {100 * b / full:.0f}% | " + " | ".join(cells) + " |")
    pre = fed["bytes"]["pretrain"]
    pee = fed["bytes"]["pee"]
    lines += [
        "",
        f"Bytes per device per round, up-link, as if alone: pretraining "
        f"{pre['up_bytes_per_device_per_round']:,.0f} B = "
        f"{100 * pre['sparse_over_dense']:.3f}% of a dense upload of the same tensors "
        f"({pre['dense_upload_bytes']:,} B) and "
        f"{100 * pre['up_bytes_per_device_per_round'] / full:.2f}% of one dense item table "
        f"({full:,} B); PEE learning {pee['up_bytes_per_device_per_round']:,.0f} B.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--data-dir", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-nodes", type=int, default=2)
    p.add_argument("--out", default="runs/bench_federated.json")
    args = p.parse_args(argv)

    fcfg = FedConfig(
        dataset=args.dataset,
        data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else "",
        seed=args.seed,
        min_nodes=min(2, args.num_nodes),
        progress=False,
        out_dir=str(Path(args.out).resolve().parent / "federated-run"),
    )
    t0 = time.perf_counter()
    fed = run_federated_simulation(fcfg, args.num_nodes)
    fed_wall = time.perf_counter() - t0
    ccfg = PipelineConfig(
        dataset=args.dataset,
        data_dir=args.data_dir or None,
        seed=args.seed,
        val_fraction=fcfg.val_fraction,
        num_user_groups=(fcfg.num_user_groups,),
        budgets=tuple(fcfg.budget_list()),
        out_dir=str(Path(args.out).resolve().parent / "centralized-run"),
        cache_dir="runs/cache",
        progress=False,
        lightgcn=replace(
            default_pretraining(),
            epochs=fcfg.pretrain_passes,
            negative_sampling=fcfg.pretrain_negative_sampling,
            dns_candidates=fcfg.pretrain_dns_candidates,
            lr_schedule=fcfg.pretrain_lr_schedule,
        ),
    )
    cen = run_centralized(ccfg)
    report = {
        "dataset": args.dataset,
        "seed": args.seed,
        "passes": fcfg.pretrain_passes,
        "num_nodes": args.num_nodes,
        "machine": platform.machine(),
        "federated_process_wall_seconds": fed_wall,
        "federated": fed,
        "centralized": cen,
    }
    md = comparison_markdown(report)
    write_report(args.out, report, md)
    print(md, flush=True)
    return report


if __name__ == "__main__":
    main()
