"""Benchmark: centralized LightGCN on a LightGCN-format dataset (default: bundled Gowalla).

Prints and saves (JSON, atomically) seconds per epoch, Recall@20 / NDCG@20 at evaluation epochs,
and peak resident memory. Stops after ``--epochs`` or when ``--time-budget-min`` of training time
is used up, whichever comes first.

    python -m sim.bench_lightgcn --out runs/bench_lightgcn.json
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch

from peel_fed.atomic import write_json_atomic
from peel_fed.lightgcn import (
    LOSSES,
    LR_SCHEDULES,
    NEGATIVE_SAMPLING,
    EpochLog,
    LightGCN,
    LightGCNConfig,
    train_lightgcn,
)
from peel_fed.loading import load_dataset
from peel_fed.metrics import evaluate_ranking
from peel_fed.scoring import dot_score_fn


class _Stop(Exception):
    pass


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--time-budget-min", type=float, default=20.0)
    p.add_argument("--batch-size", type=int, default=LightGCNConfig.batch_size)
    p.add_argument("--lr", type=float, default=LightGCNConfig.lr)
    p.add_argument("--l2", type=float, default=LightGCNConfig.l2)
    p.add_argument("--loss", choices=LOSSES, default=LightGCNConfig.loss)
    p.add_argument("--negatives", type=int, default=LightGCNConfig.negatives)
    p.add_argument("--temperature", type=float, default=LightGCNConfig.temperature)
    p.add_argument(
        "--negative-sampling", choices=NEGATIVE_SAMPLING, default=LightGCNConfig.negative_sampling
    )
    p.add_argument("--dns-candidates", type=int, default=LightGCNConfig.dns_candidates)
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=LightGCNConfig.lr_schedule)
    p.add_argument("--dim", type=int, default=LightGCNConfig.dim)
    p.add_argument("--layers", type=int, default=LightGCNConfig.layers)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--device", default="cpu", help="torch device for training (cpu, cuda)")
    p.add_argument("--out", default="runs/bench_lightgcn.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ds = load_dataset(args.dataset, args.data_dir)
    print(ds.summary(), flush=True)
    cfg = LightGCNConfig(
        dim=args.dim,
        layers=args.layers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        l2=args.l2,
        loss=args.loss,
        negatives=args.negatives,
        temperature=args.temperature,
        negative_sampling=args.negative_sampling,
        dns_candidates=args.dns_candidates,
        lr_schedule=args.lr_schedule,
    )
    report: dict = {
        "dataset": ds.name,
        "summary": ds.summary(),
        "config": vars(cfg),
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "device": args.device,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "epochs": [],
    }
    train_seconds = 0.0
    budget = args.time_budget_min * 60.0

    def on_epoch(model: LightGCN, log: EpochLog) -> None:
        nonlocal train_seconds
        train_seconds += log.seconds
        row = {
            "epoch": log.epoch,
            "seconds": log.seconds,
            "train_seconds": train_seconds,
            "loss": log.loss,
        }
        last = train_seconds >= budget or log.epoch == args.epochs
        if log.epoch % args.eval_every == 0 or last:
            t0 = time.perf_counter()
            u, v = model.final_embeddings()
            m = evaluate_ranking(dot_score_fn(u, v), ds.n_users, ds.train, ds.test, ks=(20,))
            row.update(
                {
                    "recall@20": m["recall@20"],
                    "ndcg@20": m["ndcg@20"],
                    "eval_seconds": time.perf_counter() - t0,
                }
            )
        row["peak_rss_mb"] = peak_rss_mb()
        report["epochs"].append(row)
        print(
            " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            ),
            flush=True,
        )
        write_json_atomic(args.out, _finish(report))
        if last:
            raise _Stop

    try:
        train_lightgcn(
            ds.n_users,
            ds.n_items,
            ds.train,
            cfg,
            seed=args.seed,
            on_epoch=on_epoch,
            device=args.device,
        )
    except _Stop:
        pass
    final = _finish(report)
    write_json_atomic(args.out, final)
    print(
        f"median seconds/epoch {final['median_seconds_per_epoch']:.2f}; best Recall@20 "
        f"{final['best_recall@20']:.4f} (epoch {final['best_epoch']}); first epoch reaching "
        f"0.15: {final['first_epoch_recall_ge_0.15']} at {final['train_seconds_to_0.15']} s; "
        f"peak RSS {final['peak_rss_mb']:.0f} MB; saved {args.out}"
    )
    return final


def _finish(report: dict) -> dict:
    rows = report["epochs"]
    out = dict(report)
    out["median_seconds_per_epoch"] = statistics.median(r["seconds"] for r in rows) if rows else 0.0
    evals = [r for r in rows if "recall@20" in r]
    best = max(evals, key=lambda r: r["recall@20"], default=None)
    out["best_recall@20"] = best["recall@20"] if best else None
    out["best_ndcg@20"] = best["ndcg@20"] if best else None
    out["best_epoch"] = best["epoch"] if best else None
    hit = next((r for r in evals if r["recall@20"] >= 0.15), None)
    out["first_epoch_recall_ge_0.15"] = hit["epoch"] if hit else None
    out["train_seconds_to_0.15"] = round(hit["train_seconds"], 1) if hit else None
    out["peak_rss_mb"] = peak_rss_mb()
    return out


if __name__ == "__main__":
    main()
