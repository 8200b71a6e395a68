"""Benchmark: federated LightGCN pretraining vs centralized LightGCN at the same passes.

One pass = every training interaction used once (centralized: one epoch; federated: every user
takes part in one round). Prints and saves (JSON, atomically) Recall@20 / NDCG@20 and wall time
of both, side by side, after every ``--eval-every`` passes.

    python -m sim.bench_fed_pretrain --passes 10 --out runs/bench_fed_pretrain.json
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from peel_fed.atomic import write_json_atomic
from peel_fed.fedlightgcn import FedLightGCNConfig, train_fed_lightgcn
from peel_fed.lightgcn import LR_SCHEDULES, NEGATIVE_SAMPLING, LightGCNConfig, train_lightgcn
from peel_fed.loading import load_dataset
from peel_fed.metrics import evaluate_ranking
from peel_fed.scoring import dot_score_fn


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--passes", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--cohort-fraction", type=float, default=0.05)
    p.add_argument("--server-lr", type=float, default=FedLightGCNConfig.server_lr)
    p.add_argument("--user-lr", type=float, default=FedLightGCNConfig.user_lr)
    p.add_argument("--local-steps", type=int, default=FedLightGCNConfig.local_steps)
    p.add_argument(
        "--item-local-steps",
        type=int,
        default=FedLightGCNConfig.item_local_steps,
        help="of the local steps, how many also move the device's E0 row copies (1: none)",
    )
    p.add_argument("--item-local-lr", type=float, default=FedLightGCNConfig.item_local_lr)
    p.add_argument(
        "--negative-sampling",
        choices=NEGATIVE_SAMPLING,
        default="uniform",
        help="both sides: uniform negatives, or dynamic negative sampling (dns)",
    )
    p.add_argument("--dns-candidates", type=int, default=LightGCNConfig.dns_candidates)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant")
    p.add_argument(
        "--skip-centralized", action="store_true", help="federated only (no side-by-side table)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_fed_pretrain.json")
    args = p.parse_args(argv)

    ds = load_dataset(args.dataset, args.data_dir)
    print(ds.summary(), flush=True)
    report: dict = {
        "dataset": ds.name,
        "args": vars(args),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "centralized": [],
        "federated": [],
    }

    def evaluate(u, v) -> dict:
        return evaluate_ranking(dot_score_fn(u, v), ds.n_users, ds.train, ds.test, ks=(20,))

    recipe = dict(
        negative_sampling=args.negative_sampling,
        dns_candidates=args.dns_candidates,
        lr_schedule=args.lr_schedule,
    )
    central_cfg = LightGCNConfig(epochs=args.passes, **recipe)
    t0 = time.perf_counter()
    eval_time = 0.0

    def on_epoch(model, log) -> None:
        nonlocal eval_time
        if log.epoch % args.eval_every == 0 or log.epoch == args.passes:
            t = time.perf_counter()
            m = evaluate(*model.final_embeddings())
            eval_time += time.perf_counter() - t
            row = {"pass": log.epoch, "train_seconds": time.perf_counter() - t0 - eval_time, **m}
            report["centralized"].append(row)
            print("centralized", row, flush=True)

    if not args.skip_centralized:
        train_lightgcn(
            ds.n_users, ds.n_items, ds.train, central_cfg, seed=args.seed, on_epoch=on_epoch
        )

    fed_cfg = FedLightGCNConfig(
        rounds=int(args.passes * np.ceil(1 / args.cohort_fraction)),
        cohort_fraction=args.cohort_fraction,
        server_lr=args.server_lr,
        user_lr=args.user_lr,
        local_steps=args.local_steps,
        item_local_steps=args.item_local_steps,
        item_local_lr=args.item_local_lr,
        **recipe,
    )
    t0 = time.perf_counter()
    eval_time = 0.0

    def on_pass(model, stats) -> None:
        nonlocal eval_time
        if stats["pass"] % args.eval_every == 0 or stats["pass"] == args.passes:
            t = time.perf_counter()
            m = evaluate(*model.final_embeddings())
            eval_time += time.perf_counter() - t
            row = {
                "pass": stats["pass"],
                "train_seconds": time.perf_counter() - t0 - eval_time,
                **m,
            }
            report["federated"].append(row)
            print("federated", row, flush=True)

    train_fed_lightgcn(
        ds.n_users,
        ds.n_items,
        ds.train,
        ds.item_popularity(),
        fed_cfg,
        seed=args.seed,
        on_pass=on_pass,
    )
    print("\n| pass | centralized R@20 | federated R@20 | ratio | centralized s | federated s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for c, f in zip(report["centralized"], report["federated"], strict=False):
        ratio = f["recall@20"] / c["recall@20"]
        print(
            f"| {c['pass']} | {c['recall@20']:.4f} | {f['recall@20']:.4f} | {ratio:.3f} | "
            f"{c['train_seconds']:.0f} | {f['train_seconds']:.0f} |"
        )
    write_json_atomic(args.out, report)
    print(f"saved {args.out}")
    return report


if __name__ == "__main__":
    main()
