"""Benchmark: how much a user's pretraining uploads tell an honest-but-curious server.

Federated LightGCN pretraining (the main job's settings) with ``--targets`` users each on a node
of its own; the server keeps every view it can decode of each (``peel_fed.attacks``) and runs
item inference (AUC of the user's training items against every other item, precision@k, k its
number of training items, against random guessing) and user-vector reconstruction (cosine with
the true final vector). Settings: clear uploads, secure rows (cohort sums), central DP at
``--dp-epsilon`` (the server reads each clipped upload before it adds the noise), clear
uploads with ``--decoys`` decoy items per user, and local DP (``--ldp-noise``: each user noises
its clipped upload on its device). Prints and
saves JSON and markdown, atomically.

    python -m sim.bench_attacks --targets 100 --out docs/results/gowalla/bench-attacks.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import replace

import numpy as np

from peel_fed.atomic import write_report
from peel_fed.attacks import cosine, item_inference, observe_pretraining
from peel_fed.fedconfig import FedConfig
from peel_fed.fedlightgcn import pretraining_releases, rounds_per_pass_for
from peel_fed.loading import load_dataset
from peel_fed.privacy import DPConfig, local_epsilon, noise_for_epsilon


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--passes", type=int, default=1)
    p.add_argument("--targets", type=int, default=100, help="users attacked, each on its own node")
    p.add_argument("--dp-epsilon", type=float, default=8.0)
    p.add_argument("--dp-clip", type=float, default=3.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--decoys", type=int, default=30, help="decoy items per user (0: no row)")
    p.add_argument(
        "--ldp-noise",
        type=float,
        default=0.0,
        help="local DP: noise per uploaded value in multiples of --dp-clip (0: no row)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-attacks.json")
    args = p.parse_args(argv)

    ds = load_dataset(args.dataset, args.data_dir)
    print(ds.summary(), flush=True)
    cfg = FedConfig(pretrain_passes=args.passes).lightgcn()
    rounds = args.passes * rounds_per_pass_for(cfg.cohort_fraction)
    releases = pretraining_releases(cfg, rounds)
    sigma = noise_for_epsilon(args.dp_epsilon, releases, args.delta)
    degree = np.bincount(ds.train.users, minlength=ds.n_users)
    rng = np.random.default_rng(args.seed)
    targets = np.sort(rng.choice(np.flatnonzero(degree > 0), args.targets, replace=False))
    bounds = ds.train.user_bounds(ds.n_users)
    base = (ds.train, ds.n_users, ds.n_items, ds.item_popularity(), cfg, targets, rounds)
    runs = {
        "no DP": observe_pretraining(*base, seed=args.seed),
        f"central DP, epsilon {args.dp_epsilon:g}": observe_pretraining(
            *base, seed=args.seed, dp=DPConfig(args.dp_clip, sigma, args.delta)
        ),
    }
    if args.decoys:
        decoyed = (*base[:4], replace(cfg, decoys=args.decoys), *base[5:])
        runs[f"{args.decoys} decoys"] = observe_pretraining(*decoyed, seed=args.seed)
    if args.ldp_noise:
        local = (*base[:4], replace(cfg, ldp_noise=args.ldp_noise), *base[5:])
        eps = local_epsilon(args.ldp_noise, releases, args.delta)
        runs[f"local DP, noise {args.ldp_noise:g} x clip, epsilon {eps:.3g}"] = observe_pretraining(
            *local, seed=args.seed, dp=DPConfig(args.dp_clip, 0.0, args.delta)
        )
    report: dict = {"dataset": ds.name, "args": vars(args), "rounds": rounds, "rows": []}
    for run, (views, finals) in runs.items():
        for setting, per_user in views.items():
            if run != "no DP" and setting != "clear":
                continue  # with secure rows the DP runs give the secure-rows view above
            t0 = time.perf_counter()
            inf = [
                item_inference(view.item_scores(), ds.train.items[bounds[u] : bounds[u + 1]])
                for u, view in per_user.items()
            ]
            cos = [cosine(view.user_vector(), finals[u]) for u, view in per_user.items()]
            row = {
                "setting": f"{setting} ({run})",
                "auc_median": float(np.median([i["auc"] for i in inf])),
                "precision_at_k": float(np.mean([i["precision_at_k"] for i in inf])),
                "random_precision_at_k": float(np.mean([i["random_precision_at_k"] for i in inf])),
                "cosine_median": float(np.median(cos)),
                "attack_seconds": time.perf_counter() - t0,
            }
            report["rows"].append(row)
            print(row, flush=True)
    lines = [
        f"## What the server learns from one user's pretraining uploads ({ds.name})",
        "",
        f"{args.targets} users, each on its own node, over {rounds} rounds ({args.passes} "
        f"passes) and the init exchanges; central DP: clip {args.dp_clip:g}, noise multiplier "
        f"{sigma:.3f} (epsilon {args.dp_epsilon:g} over {releases} releases, delta "
        f"{args.delta:g}). Command: `python -m sim.bench_attacks "
        + shlex.join(sys.argv[1:] if argv is None else argv)
        + "`.",
        "",
        "| server's view | item AUC (median) | precision@k | random precision@k "
        "| vector cosine (median) |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['setting']} | {r['auc_median']:.3f} | {r['precision_at_k']:.3f} | "
            f"{r['random_precision_at_k']:.4f} | {r['cosine_median']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    print(f"saved {args.out} and {write_report(args.out, report, text)}")
    return report


if __name__ == "__main__":
    main()
