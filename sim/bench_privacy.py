"""Benchmark: what user-level DP costs federated LightGCN pretraining, in Recall@20 and time.

The main job's pretraining settings (``FedConfig`` defaults: 20 passes, cohort fraction 0.25,
20 local steps), in one process (``train_fed_lightgcn``, the reference the Flower apps match),
without DP and at each target epsilon. The clip is the median norm of one user's whole upload
in the first round of the plain run, unless ``--clip`` says otherwise; a real deployment would
pick it on public or proxy data, since a clip read off the private data is itself a release.
Prints and saves (JSON and markdown, atomically) Recall@20 / NDCG@20 of the pretrained table,
epsilon, the noise multiplier and training seconds (the median of ``--repeats`` runs), with
each setting's time over the plain run's.

    python -m sim.bench_privacy --epsilons 1,4,8 --out docs/results/gowalla/bench-privacy.json
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from peel_fed.atomic import write_report
from peel_fed.fedconfig import FedConfig
from peel_fed.fedlightgcn import (
    SERVER_OPTIMIZERS,
    FedLightGCN,
    pretraining_releases,
    rounds_per_pass_for,
    train_fed_lightgcn,
)
from peel_fed.loading import load_dataset
from peel_fed.metrics import evaluate_ranking
from peel_fed.privacy import (
    ACCOUNTANT,
    DPConfig,
    PrivacyError,
    dp_event,
    epsilon,
    local_epsilon,
    noise_for_epsilon,
)
from peel_fed.scoring import dot_score_fn


def median_upload_norm(ds, cfg, seed: int, sample: int = 500) -> float:
    """Median L2 norm of one user's whole upload (row gradients and contribution change) in
    the first round, each of ``sample`` users sent alone."""
    fed = FedLightGCN(ds.n_users, ds.n_items, ds.train, ds.item_popularity(), cfg, seed)
    fed.initialise()
    layers = fed.server.item_layers()
    users = np.random.default_rng(seed).choice(ds.n_users, min(sample, ds.n_users), replace=False)
    norms = []
    for u in users:
        up = fed.devices.device_round(np.array([u]), layers, 1)
        if up.users:
            norms.append(torch.cat([up.grad.ravel(), up.contrib_delta.ravel()]).norm().item())
    return float(np.median(norms))


def accounted_epsilon(noise_multiplier: float, releases: int, delta: float) -> float | None:
    """Epsilon, or None where the noise is too small for the accountant (hundreds)."""
    try:
        return epsilon(noise_multiplier, releases, delta)
    except PrivacyError:
        return None


def _setting(row: dict) -> str:
    if row["ldp_noise"]:
        return f"local DP, noise {row['ldp_noise']:g} x clip"
    if row["target_epsilon"]:
        return f"central DP, target epsilon {row['target_epsilon']:g}"
    if row["noise_multiplier"] is not None:
        return f"central DP, noise multiplier {row['noise_multiplier']:g}"
    return "no DP"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--passes", type=int, default=FedConfig.pretrain_passes)
    p.add_argument("--epsilons", default="1,4,8", help="comma-separated target epsilons")
    p.add_argument("--decoys", default="", help="comma-separated decoy items per user (no DP)")
    p.add_argument(
        "--ldp-noises",
        default="",
        help="comma-separated local DP noises per uploaded value, in multiples of the clip",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=FedConfig.layers,
        help="LightGCN layers K of pretraining (0: matrix factorisation, no contribution sums)",
    )
    p.add_argument(
        "--server-optimizer",
        choices=SERVER_OPTIMIZERS,
        default="adam",
        help="adam or sgd (momentum 0.9), the server's step on E0",
    )
    p.add_argument("--server-lr", type=float, default=FedConfig.pretrain_server_lr)
    p.add_argument(
        "--noise-multipliers",
        default="",
        help="comma-separated central-DP noise multipliers (a tiny one, e.g. 1e-4, runs the DP "
        "aggregation with no noise to speak of: epsilon not accountable)",
    )
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=0.0, help="0: the median first-round norm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="time each setting this many times")
    p.add_argument("--out", default="runs/bench-privacy.json")
    args = p.parse_args(argv)

    ds = load_dataset(args.dataset, args.data_dir)
    print(ds.summary(), flush=True)
    cfg = replace(
        FedConfig(pretrain_passes=args.passes).lightgcn(),
        layers=args.layers,
        server_optimizer=args.server_optimizer,
        server_lr=args.server_lr,
    )
    cfg.rounds = args.passes * rounds_per_pass_for(cfg.cohort_fraction)
    releases = pretraining_releases(cfg, cfg.rounds)
    clip = args.clip or median_upload_norm(ds, cfg, args.seed)
    print(f"clip {clip:.4g}; {releases} releases per user", flush=True)
    report: dict = {
        "dataset": ds.name,
        "args": vars(args),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "pretraining": {k: getattr(cfg, k) for k in ("dim", "layers", "rounds", "local_steps")},
        "cohort_fraction": cfg.cohort_fraction,
        "clip": clip,
        "releases": releases,
        "accountant": ACCOUNTANT,
        "runs": [],
    }
    targets = [(None, 0, 0.0, None)]
    targets += [(float(e), 0, 0.0, None) for e in args.epsilons.split(",") if e.strip()]
    targets += [(None, int(k), 0.0, None) for k in args.decoys.split(",") if k.strip()]
    targets += [(None, 0, float(n), None) for n in args.ldp_noises.split(",") if n.strip()]
    targets += [(None, 0, 0.0, float(s)) for s in args.noise_multipliers.split(",") if s.strip()]
    for target, decoys, ldp, sigma in targets:
        dp = None if sigma is None else DPConfig(clip, sigma, args.delta)
        if target is not None:
            dp = DPConfig(clip, noise_for_epsilon(target, releases, args.delta), args.delta)
        if ldp:  # clipped on the devices, noised there, no central noise
            dp = DPConfig(clip, 0.0, args.delta)
        runs = []  # the same seed gives the same model: repeats only time it again
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model = train_fed_lightgcn(
                ds.n_users,
                ds.n_items,
                ds.train,
                ds.item_popularity(),
                replace(cfg, decoys=decoys, ldp_noise=ldp),
                args.seed,
                dp=dp,
            )
            runs.append(time.perf_counter() - t0)
        seconds = float(np.median(runs))
        m = evaluate_ranking(
            dot_score_fn(*model.final_embeddings()), ds.n_users, ds.train, ds.test, ks=(20,)
        )
        row = {
            "target_epsilon": target,
            "decoys": decoys,
            "ldp_noise": ldp,
            "epsilon": (
                local_epsilon(ldp, releases, args.delta)
                if ldp
                else None
                if dp is None
                else accounted_epsilon(dp.noise_multiplier, releases, args.delta)
            ),
            "noise_multiplier": None if dp is None else dp.noise_multiplier,
            "dp_event": None if dp is None else repr(dp_event(dp.noise_multiplier, releases)),
            "train_seconds": seconds,
            "train_seconds_runs": runs,
            **m,
        }
        report["runs"].append(row)
        print(row, flush=True)
    base = report["runs"][0]
    lines = [
        f"## User-level DP of federated pretraining on {ds.name}",
        "",
        f"{cfg.rounds} rounds ({args.passes} passes, cohort fraction {cfg.cohort_fraction}), "
        f"clip {clip:.4g}, delta {args.delta:g}, {releases} Gaussian releases per user, "
        f"accountant {ACCOUNTANT}, seed {args.seed}. Command: `python -m sim.bench_privacy "
        + shlex.join(sys.argv[1:] if argv is None else argv)
        + "`.",
        "",
        "| setting | decoys | epsilon | noise multiplier | Recall@20 | NDCG@20 "
        "| share of no DP | train s (median) | time over no DP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        r["recall_share"] = r["recall@20"] / base["recall@20"]
        r["time_ratio"] = r["train_seconds"] / base["train_seconds"]
        lines.append(
            f"| {_setting(r)} | {r['decoys']} | "
            + (f"{r['epsilon']:.3f}" if r["epsilon"] is not None else "-")
            + " | "
            + (f"{r['noise_multiplier']:.3f}" if r["noise_multiplier"] is not None else "-")
            + f" | {r['recall@20']:.4f} | {r['ndcg@20']:.4f} | {100 * r['recall_share']:.1f}% | "
            f"{r['train_seconds']:.0f} | {r['time_ratio']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    print(f"saved {args.out} and {write_report(args.out, report, text)}")
    return report


if __name__ == "__main__":
    main()
