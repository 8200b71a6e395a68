"""Benchmark: what the elastic embeddings cost on the device, measured (issue 14, item 6).

On a dataset's shapes (default: bundled Gowalla; its item count and popularity), at every budget
(a share of the float32 item table's bytes), for the two kinds of unit:

- **bit-planes** (the default): a :class:`peel_fed.plane_store.PlaneStore` grown, unit by unit,
  from the payloads the server sends (:func:`peel_fed.plane_store.unit_payload`), up to the prefix
  of the greedy plane order (:func:`peel_fed.planes.greedy_plane_order`: all users' second
  moments, item popularity) that fits the budget;
- **blocks** (the paper's units): a :class:`peel_fed.store.PEEStore` grown from float32 unit
  slices (:func:`peel_fed.store.unit_slice`), uniform unit weights and the first-k blocks order
  (timing and bytes do not depend on the learned weights or order).

Each (repeat, budget, kind) runs in its own worker process (:mod:`sim.device_worker`), started
with ``OMP_NUM_THREADS=1`` (and the other BLAS thread variables) set before numpy and torch
load, and ``torch.set_num_threads(1)``. The worker loads the downloaded payloads, then measures:

- **build**: growing the store from the payloads; **decode**: turning what it holds into the
  table it ranks with (``store.score_fn``, once per budget change on a phone);
- **per user, decode once**: scoring all items for one user with the decoded table, the user's
  training items set to ``-inf``, and the top-k (``torch.topk``); after a warm-up, over
  ``--users`` users; median and p90;
- **per user, cold**: the same with the store decoded again for every user (over the first
  ``--cold-users``): the cost of the first ranking right after a budget change;
- **disk**: the bytes of the unit payloads it keeps, written to a file as downloaded (what the
  budget counts), and of an ``np.savez`` of the store's in-memory arrays;
- **memory**: the worker's peak RSS (Linux ``VmHWM``, reset after loading the inputs and an
  untimed dry run) minus its RSS just before building, over build, decode and every ranking;
  and, in a separate pass, the peak of ``tracemalloc`` (Python and numpy allocations, not
  torch's own) over build, decode and one ranking.

Figures are medians over ``--repeats`` full repetitions (repeat, then budget, then kind,
interleaved, as the machine is shared). The goal: under 20 ms per user at every budget (p90,
decode once). Without ``--model`` the item and user tables are seeded random float32 tables with
std 0.1, like a trained LightGCN table's: timing does not depend on the values.

    python -m sim.bench_device            # writes docs/results/gowalla/device-bench.json and .md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from peel_fed.atomic import write_report
from peel_fed.blocks import (
    FLOAT32_BYTES,
    BlockLayout,
    BudgetError,
    first_blocks_order,
    parse_budget,
    popularity_item_groups,
    select_prefix,
    split_budget_list,
)
from peel_fed.loading import load_dataset
from peel_fed.plane_store import unit_payload
from peel_fed.planes import PlaneCode, greedy_plane_order, planes_at_budget, second_moments
from peel_fed.store import unit_slice
from sim.device_worker import INCLUDES, KINDS, NOTES

GOAL_MS = 20.0
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)
REPO_ROOT = Path(__file__).resolve().parents[1]


def _spawn_worker(spec: dict, folder: Path, tag: str) -> dict:
    spec_path = folder / f"spec-{tag}.json"
    spec = {**spec, "result": str(folder / f"result-{tag}.json")}
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.update({var: "1" for var in THREAD_VARS})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "sim.device_worker", str(spec_path)]
    done = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"worker {tag} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(Path(spec["result"]).read_text())


# --- the parent: inputs, workers, report --------------------------------------------------------
def _tables(args: argparse.Namespace, n_users: int, n_items: int) -> tuple:
    if args.model:
        with np.load(args.model) as z:
            users, items = z["user_emb"].astype(np.float32), z["item_emb"].astype(np.float32)
        if items.shape[0] != n_items or users.shape[0] != n_users:
            raise SystemExit(
                f"--model {args.model}: tables {users.shape} / {items.shape} do not match the "
                f"dataset ({n_users} users, {n_items} items)"
            )
        return users, items, f"trained tables from {args.model}"
    rng = np.random.default_rng(args.seed)
    items = (rng.standard_normal((n_items, args.dim)) * 0.1).astype(np.float32)
    users = (rng.standard_normal((n_users, args.dim)) * 0.1).astype(np.float32)
    note = (
        f"seeded random float32 tables (seed {args.seed}, N(0, 0.1^2), like a trained LightGCN "
        "table's scale): timing, bytes and memory do not depend on the values"
    )
    return users, items, note


def _write_inputs(path: Path, order: np.ndarray, payloads: list[bytes], **extra) -> None:
    sizes = np.array([len(p) for p in payloads], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    payload = np.frombuffer(b"".join(payloads), dtype=np.uint8)
    np.savez(path, order=order, payload=payload, offsets=offsets, **extra)


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(label: str, budget: int, kind: str, runs: list[dict]) -> dict:
    """One row: medians over the repeats of every figure; bytes must agree across repeats."""
    fixed = ("units", "used_bytes", "rankable_items", "disk_payload_bytes", "disk_npz_bytes")
    for key in fixed:
        if len({r[key] for r in runs}) != 1:
            raise AssertionError(f"{kind} {label}: {key} differs between repeats")
    row = {"budget": label, "budget_bytes": budget, "kind": kind}
    row.update({key: runs[0][key] for key in fixed})
    timed = (
        "build_ms",
        "decode_ms",
        "warm_ms_median",
        "warm_ms_p90",
        "cold_ms_median",
        "cold_ms_p90",
        "peak_rss_growth_mb",
        "tracemalloc_peak_mb",
    )
    row.update({key: _median([r[key] for r in runs]) for key in timed})
    row["meets_goal"] = row["warm_ms_p90"] < GOAL_MS
    row["cold_meets_goal"] = row["cold_ms_median"] is not None and row["cold_ms_median"] < GOAL_MS
    row["repeats"] = runs
    return row


def _fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def device_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# On-device cost: {report['dataset']}",
        "",
        f"`{report['command']}` on {report['date']}: {m['platform']}, {m['cpu_count']} CPUs, "
        f"Python {m['python']}, numpy {m['numpy']}, torch {m['torch']}, one thread "
        f"(`torch.set_num_threads(1)`, `OMP_NUM_THREADS=1`), load average "
        f"{m['load_average_start'][0]:.1f} at the start (a shared machine), "
        f"{report['wall_seconds']:.0f} s in all. {report['summary']}; item table "
        f"{report['n_items']:,} x {report['dim']} float32 = {report['full_table_bytes']:,} B; "
        f"{report['tables']}.",
        "",
        f"Goal: {report['goal']} (judged on the p90 of decode once): "
        f"**{'met' if report['goal_met'] else 'not met'}** (cold, the first ranking after a "
        f"budget change: **{'met' if report['goal_met_cold'] else 'not met'}**). "
        f"Medians over {report['repeats']} repetitions, each over {report['users']} users "
        f"(cold: {report['cold_users']}), "
        f"top-{report['k']} of all items excluding the user's training items.",
        "",
        "| budget | kind | kept B (file) | of budget | npz B | rankable items | build ms | "
        "decode ms | ms/user median | p90 | cold median | cold p90 | peak RSS +MB | "
        "tracemalloc MB | < 20 ms | cold < 20 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['budget']} | {r['kind']} | {r['skipped']} |" + " |" * 13)
            continue
        lines.append(
            f"| {r['budget']} | {r['kind']} | {r['disk_payload_bytes']:,} | "
            f"{r['disk_payload_bytes'] / r['budget_bytes']:.1%} | {r['disk_npz_bytes']:,} | "
            f"{r['rankable_items']:,} | {_fmt(r['build_ms'], 1)} | {_fmt(r['decode_ms'], 1)} | "
            f"{_fmt(r['warm_ms_median'])} | {_fmt(r['warm_ms_p90'])} | "
            f"{_fmt(r['cold_ms_median'])} | {_fmt(r['cold_ms_p90'])} | "
            f"{_fmt(r['peak_rss_growth_mb'], 1)} | {_fmt(r['tracemalloc_peak_mb'], 1)} | "
            f"{'yes' if r['meets_goal'] else 'no'} | {'yes' if r['cold_meets_goal'] else 'no'} |"
        )
    lines += ["", "Reading:", ""]
    for kind in KINDS:
        mine = [r for r in report["rows"] if r["kind"] == kind and "skipped" not in r]
        if not mine:
            continue
        worst = max(mine, key=lambda r: r["warm_ms_p90"])
        cold = [r["cold_ms_median"] for r in mine if r["cold_ms_median"] is not None]
        rss = [r["peak_rss_growth_mb"] for r in mine if r["peak_rss_growth_mb"] is not None]
        lines.append(
            f"- {kind}: ranking with a decoded store takes at most {worst['warm_ms_p90']:.2f} ms "
            f"per user (p90, at {worst['budget']}); "
            + (
                f"right after a budget change (cold) {min(cold):.1f}-{max(cold):.1f} ms; "
                if cold
                else ""
            )
            + (f"peak memory +{min(rss):.0f}-{max(rss):.0f} MB." if rss else "")
        )
    lines += [f"- {note}" for note in NOTES]
    lines += ["", "What each figure includes:", ""]
    lines += [f"- `{key}`: {text}" for key, text in report["includes"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default=None, help=".npz with user_emb and item_emb (optional)")
    p.add_argument("--dim", type=int, default=64, help="embedding dim of the random tables")
    p.add_argument("--budgets", default="5%,10%,25%,50%,100%")
    p.add_argument("--num-item-groups", type=int, default=20)
    p.add_argument("--num-blocks", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5, help="popularity exponent of the order")
    p.add_argument("--users", type=int, default=200, help="users timed per store")
    p.add_argument("--cold-users", type=int, default=20, help="users timed with a fresh decode")
    p.add_argument("--warmup", type=int, default=10, help="untimed rankings first")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/gowalla/device-bench.json")
    args = p.parse_args(argv)

    started, load_start = time.perf_counter(), list(os.getloadavg())
    ds = load_dataset(args.dataset, args.data_dir)
    print(ds.summary(), flush=True)
    user_emb, item_emb, tables_note = _tables(args, ds.n_users, ds.n_items)
    n_items, dim = item_emb.shape
    full = n_items * dim * FLOAT32_BYTES
    pop = ds.item_popularity()
    item_groups = popularity_item_groups(pop, args.num_item_groups)
    sizes = np.bincount(item_groups)

    t0 = time.perf_counter()
    code = PlaneCode.encode(item_emb)
    plane_order = greedy_plane_order(
        code, item_emb, item_groups, pop, second_moments(user_emb), args.alpha
    )
    plane_units = [unit_payload(code, item_groups, g, q) for g, q in plane_order.tolist()]
    layout = BlockLayout(item_groups, dim, args.num_blocks)
    block_order = first_blocks_order(args.num_item_groups, args.num_blocks)
    block_units = [unit_slice(layout, item_emb, g, n).tobytes() for g, n in block_order.tolist()]
    print(f"server side (code, plane order, payloads): {time.perf_counter() - t0:.1f} s")

    rng = np.random.default_rng(args.seed)
    train = ds.train.per_user(ds.n_users)
    active = np.flatnonzero([len(t) > 0 for t in train])
    chosen = np.sort(rng.choice(active, size=min(args.users, active.size), replace=False))
    excluded = [np.asarray(train[u], dtype=np.int64) for u in chosen]
    ptr = np.concatenate([[0], np.cumsum([len(e) for e in excluded])]).astype(np.int64)
    flat = np.concatenate(excluded) if excluded else np.zeros(0, dtype=np.int64)

    budgets = [(b, parse_budget(b, full)) for b in split_budget_list(args.budgets)]
    runs: dict[tuple[str, str], list[dict]] = {}
    skipped: dict[tuple[str, str], str] = {}
    expected: dict[tuple[str, str], int] = {}  # unit bytes each store must hold, from the orders
    for label, budget in budgets:
        try:
            expected[(label, "bit-planes")] = planes_at_budget(plane_order, sizes, dim, budget)[1]
        except BudgetError as exc:
            skipped[(label, "bit-planes")] = str(exc)
        try:
            expected[(label, "blocks")] = layout.bytes_of(
                select_prefix(block_order, layout, budget)
            )
        except BudgetError as exc:
            skipped[(label, "blocks")] = str(exc)

    with tempfile.TemporaryDirectory(prefix="bench-device-") as tmp:
        folder = Path(tmp)
        inputs = {"bit-planes": folder / "planes.npz", "blocks": folder / "blocks.npz"}
        _write_inputs(
            inputs["bit-planes"],
            plane_order,
            [u.bits + u.meta for u in plane_units],
            item_groups=item_groups,
            dim=dim,
            bits_len=np.array([len(u.bits) for u in plane_units], dtype=np.int64),
        )
        _write_inputs(
            inputs["blocks"],
            block_order,
            block_units,
            item_groups=item_groups,
            dim=dim,
            num_blocks=args.num_blocks,
            weights=np.ones((args.num_item_groups, args.num_blocks)),
        )
        users_file = folder / "users.npz"
        np.savez(users_file, vectors=user_emb[chosen], ptr=ptr, items=flat)
        for rep in range(args.repeats):
            for label, budget in budgets:
                for kind in KINDS:
                    if (label, kind) in skipped:
                        continue
                    spec = {
                        "kind": kind,
                        "budget_bytes": budget,
                        "k": args.k,
                        "warmup": args.warmup,
                        "cold_users": args.cold_users,
                        "inputs": str(inputs[kind]),
                        "users": str(users_file),
                    }
                    res = _spawn_worker(spec, folder, f"{rep}-{kind}-{budget}")
                    if res["used_bytes"] != expected[(label, kind)]:
                        raise AssertionError(
                            f"{kind} {label}: the store holds {res['used_bytes']:,} B of units, "
                            f"the order's prefix at this budget {expected[(label, kind)]:,} B"
                        )
                    runs.setdefault((label, kind), []).append(res)
                    print(
                        f"repeat {rep + 1}/{args.repeats} {label:>5} {kind:<10} "
                        f"{res['warm_ms_median']:7.2f} ms/user (p90 {res['warm_ms_p90']:.2f}), "
                        f"cold {_fmt(res['cold_ms_median'])} ms, {res['used_bytes']:,} B, "
                        f"+{_fmt(res['peak_rss_growth_mb'], 1)} MB RSS",
                        flush=True,
                    )

    rows = []
    for label, budget in budgets:
        for kind in KINDS:
            if (label, kind) in skipped:
                reason = skipped[(label, kind)]
                rows.append(
                    {"budget": label, "budget_bytes": budget, "kind": kind, "skipped": reason}
                )
            else:
                rows.append(summarize(label, budget, kind, runs[(label, kind)]))
    measured = [r for r in rows if "skipped" not in r]
    report = {
        "dataset": ds.name,
        "summary": ds.summary(),
        "command": " ".join(
            ["python -m sim.bench_device", *(sys.argv[1:] if argv is None else argv)]
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "threads": 1,
            "load_average_start": load_start,
            "load_average_end": list(os.getloadavg()),
        },
        "wall_seconds": round(time.perf_counter() - started, 1),
        "goal": f"under {GOAL_MS:g} ms per user at every budget",
        "goal_met": bool(measured) and all(r["meets_goal"] for r in measured),
        "goal_met_cold": bool(measured) and all(r["cold_meets_goal"] for r in measured),
        "tables": tables_note,
        "n_items": n_items,
        "dim": dim,
        "full_table_bytes": full,
        "num_item_groups": args.num_item_groups,
        "num_blocks": args.num_blocks,
        "users": int(chosen.size),
        "cold_users": min(args.cold_users, int(chosen.size)),
        "warmup": args.warmup,
        "k": args.k,
        "repeats": args.repeats,
        "seed": args.seed,
        "includes": INCLUDES,
        "rows": rows,
    }
    out = Path(args.out)
    md = device_markdown(report)
    write_report(out, report, md)
    print(md, flush=True)
    print(f"saved {out} and {out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
