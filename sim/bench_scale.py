"""Benchmark: federated pretraining in Flower's Ray simulation at 2, 10, 100 and 1,000 SuperNodes.

For each node count, one simulation runs the statistics and the pretraining phase (the phase
whose downloads are sparse, ``pretrain-download``) and reports: wall time per training round
(median), bytes down and up per node per exchange, the peak memory of this process and its
children (Ray's workers; resident sets summed, so shared pages count more than once), and how
far the pretrained item table and the round losses are from the first node count's (packing
invariance at scale: the same users, the same seed, only sums taken in another order).

    python -m sim.bench_scale --dataset gowalla --nodes 2,10,100,1000 --passes 1 \\
        --out docs/results/gowalla/bench-scale.json

Each node count's figures are saved (atomically) as soon as they are measured, so a node count
that does not finish within ``--timeout-s`` still leaves the others, and the report says how
far it got.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import queue
import sys
import threading
import time
from dataclasses import replace

import numpy as np

from peel_fed.atomic import write_report
from peel_fed.fedconfig import FedConfig

DEFAULT_NODES = "2,10,100,1000"


class PeakMemory:
    """Samples the resident memory of this process and all its children every ``every_s``."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        """Resident bytes of this process and its descendants, read from Linux's /proc."""
        parent, rss, page = {}, {}, os.sysconf("SC_PAGE_SIZE")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # a process that just ended
                continue
            parent[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * page
        children: dict[int, list[int]] = {}
        for pid, ppid in parent.items():
            children.setdefault(ppid, []).append(pid)
        total, todo = 0, [os.getpid()]
        while todo:
            pid = todo.pop()
            total += rss.get(pid, 0)
            todo += children.get(pid, [])
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def pretraining_only(grid, cfg: FedConfig, marks: queue.Queue) -> dict:
    """A ServerApp body that runs the statistics and pretraining phases only; ``marks`` gets
    (step, time) after each pretraining step, so a run cut short still says how far it got."""
    from peel_fed.messages import DataSpec
    from strategies.log import PhaseLog
    from strategies.phases import wait_for_nodes
    from strategies.pretrain import PretrainStrategy
    from strategies.stats import StatsStrategy

    nodes = wait_for_nodes(grid, cfg.min_nodes, cfg.node_wait_s)
    marks.put(("connected", time.perf_counter()))
    data = DataSpec(cfg.dataset, cfg.data_dir, cfg.seed, cfg.val_fraction)
    phase_log = PhaseLog(cfg, nodes)
    stats = StatsStrategy(cfg, phase_log, data).run(grid, nodes)
    marks.put(("stats", time.perf_counter()))
    strategy = PretrainStrategy(cfg, phase_log, data, stats)
    server = strategy.run(grid, nodes, lambda at: marks.put((at, time.perf_counter())))
    return {
        "bytes": phase_log.bytes_report(stats),
        "losses": [h["loss"] for h in strategy.history],
        "item_table": server.final_item_table(),
    }


def _child(cfg: FedConfig, num_nodes: int, num_cpus: int, marks: mp.Queue, out: mp.Queue) -> None:
    """One simulation in its own process (a fresh Ray each time, and a timeout can end it)."""
    from sim.simulate import run_federated_simulation

    def body(grid, c):
        return pretraining_only(grid, c, marks)

    with PeakMemory() as peak:
        report = run_federated_simulation(cfg, num_nodes, num_cpus=num_cpus, server_main=body)
    report["peak_rss_bytes"] = peak.peak
    out.put(report)


def measure(cfg: FedConfig, num_nodes: int, num_cpus: int, timeout_s: float) -> dict:
    """Run one node count; returns its figures (``finished`` False if cut at ``timeout_s``)."""
    ctx = mp.get_context("spawn")
    marks, out = ctx.Queue(), ctx.Queue()
    cfg = replace(cfg, min_nodes=num_nodes)
    t0 = time.perf_counter()
    proc = ctx.Process(target=_child, args=(cfg, num_nodes, num_cpus, marks, out))
    proc.start()
    report, steps = None, []
    deadline = t0 + timeout_s
    while time.perf_counter() < deadline:
        try:
            report = out.get(timeout=1.0)
            break
        except queue.Empty:
            if not proc.is_alive():
                break
    wall = time.perf_counter() - t0
    if report is None and proc.is_alive():
        proc.terminate()  # by PID: the child and, through Ray's own shutdown, its workers
    proc.join(30)
    if proc.is_alive():
        proc.kill()
    while True:
        try:
            steps.append(marks.get_nowait())
        except queue.Empty:
            break
    return summarize(num_nodes, t0, wall, steps, report)


def summarize(
    num_nodes: int, t0: float, wall: float, steps: list[tuple[str, float]], report: dict | None
) -> dict:
    """One node count's row from its step marks ((name, time) as the ServerApp reached them)
    and the child's report (None if it was cut): a round's time is from the previous mark."""
    times = dict(steps)
    rounds = [t for s, t in steps if s.startswith("pretrain round")]
    before_rounds = [t for s, t in steps if s.startswith("pretrain init")]
    per_round = np.diff(([before_rounds[-1]] if before_rounds else []) + rounds)
    row = {
        "nodes": num_nodes,
        "finished": report is not None,
        "wall_seconds": wall,
        "steps_done": [s for s, _ in steps],
        "seconds_to_connect": times["connected"] - t0 if "connected" in times else None,
        "round_seconds": per_round.tolist(),
        "median_round_seconds": float(np.median(per_round)) if per_round.size else None,
    }
    if report is not None:
        row.update(
            bytes=report["bytes"],
            losses=report["losses"],
            peak_rss_bytes=report["peak_rss_bytes"],
            item_table=report["item_table"],
        )
    return row


def _agreement(rows: list[dict]) -> None:
    """Per finished row, how far its item table and losses are from the first finished row's."""
    base = next((r for r in rows if r["finished"]), None)
    for r in rows:
        if not r["finished"] or base is None:
            continue
        a, b = base["item_table"], r["item_table"]
        r["agreement"] = {
            "vs_nodes": base["nodes"],
            "item_table_max_abs_diff": float(np.abs(a - b).max()),
            "item_table_rel_diff": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
            "loss_max_abs_diff": float(
                max(abs(x - y) for x, y in zip(base["losses"], r["losses"], strict=True))
            ),
        }


def _seconds(phases: dict, *names: str) -> str:
    """The exchange seconds of these phases, summed ("-" if none ran)."""
    ran = [phases[n]["exchange_seconds"] for n in names if n in phases]
    return f"{sum(ran):.0f}" if ran else "-"


def markdown(report: dict) -> str:
    lines = [
        f"## Federated pretraining at scale on {report['dataset']} ({report['passes']} pass(es), "
        f"{report['rounds']} rounds, pretrain-download={report['download']}, "
        f"{report['num_cpus']} CPUs)",
        "",
        "| nodes | finished | wall s | median s / round | statistics s | asks s | "
        "down B / node / round | ask down+up B / node | up B / reply | peak RSS | "
        "item table vs first (max abs, rel) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        b = r.get("bytes", {})
        pre, ask = b.get("pretrain", {}), b.get("pretrain-ask", {})
        ag = r.get("agreement")
        med = r["median_round_seconds"]
        done = "yes" if r["finished"] else "no: " + (r["steps_done"] or ["-"])[-1]
        ask_bytes = (
            f"{ask['down_bytes_per_node_per_exchange'] + ask['up_bytes_per_reply']:,.0f}"
            if ask
            else "-"
        )
        peak = f"{r['peak_rss_bytes'] / 2**30:.2f} GiB" if "peak_rss_bytes" in r else "-"
        agree = "-"
        if ag:
            agree = f"{ag['item_table_max_abs_diff']:.1e}, {ag['item_table_rel_diff']:.1e}"
        lines.append(
            f"| {r['nodes']} | {done} | {r['wall_seconds']:.0f} | "
            f"{'-' if med is None else f'{med:.1f}'} | {_seconds(b, 'stats')} | "
            f"{_seconds(b, 'pretrain-ask', 'final-ask')} | "
            f"{pre.get('down_bytes_per_node_per_exchange', 0):,.0f} | {ask_bytes} | "
            f"{pre.get('up_bytes_per_reply', 0):,.0f} | {peak} | {agree} |"
        )
    lines += [
        "",
        "Down B / node / round: the pretraining rounds' mean bytes per node that was sent the "
        "tables (a node none of whose users takes part in a round is asked for its rows but "
        "not sent any). Statistics: the two secure-aggregation exchanges (pairwise masks over "
        "the mask graph, 2 ceil(log2 n) neighbours per node; before it, every pair). Asks: the "
        "pretraining steps' `query.rows` exchanges together. Peak RSS sums the resident sets of "
        "the driver and Ray's processes.",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="gowalla")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--nodes", default=DEFAULT_NODES, help="comma-separated node counts")
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--cohort-fraction", type=float, default=0.25)
    parser.add_argument("--download", default="sparse", choices=("sparse", "full"))
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per node count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-scale.json")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.nodes.split(",") if n.strip()]
    if not counts or min(counts) < 1:
        parser.error(f"--nodes must list node counts >= 1, got {args.nodes!r}")
    cfg = FedConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        seed=args.seed,
        pretrain_passes=args.passes,
        pretrain_cohort_fraction=args.cohort_fraction,
        pretrain_download=args.download,
        progress=False,
    )
    report = {
        "dataset": args.dataset,
        "passes": args.passes,
        "rounds": cfg.lightgcn().rounds,
        "download": args.download,
        "num_cpus": args.num_cpus,
        "machine": platform.machine(),
        "command": "python -m sim.bench_scale " + " ".join(argv),
        "rows": [],
    }
    for n in counts:
        print(f"[bench-scale] {n} nodes ...", flush=True)
        row = measure(cfg, n, args.num_cpus, args.timeout_s)
        report["rows"].append(row)
        _agreement(report["rows"])
        saved = {
            **report,
            "rows": [{k: v for k, v in r.items() if k != "item_table"} for r in report["rows"]],
        }
        md = markdown(saved)
        write_report(args.out, saved, md)
        done = "finished" if row["finished"] else f"cut after {(row['steps_done'] or ['-'])[-1]}"
        print(f"[bench-scale] {n} nodes: {done} in {row['wall_seconds']:.0f} s", flush=True)
    print(md)
    return saved


if __name__ == "__main__":
    main()
