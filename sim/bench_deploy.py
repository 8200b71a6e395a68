"""Benchmark: a deployed run (real SuperLink and SuperNode processes) against the same
configuration in Flower's Ray simulation, and where the deployed run's time goes.

Each repeat runs the configuration three ways, interleaved so machine noise hits all alike:
simulation (in this process), deployment without TLS, deployment with TLS. Prints and saves
(atomically) the medians of the pipeline time (the ServerApp's ``main``) and of the whole
command (including process start and stop), the deployed exchange broken into pickup (SuperNode
and SuperExec polls), app process startup, handler and return, and whether the three ways gave
the same metrics.

    python -m sim.bench_deploy --repeats 3 --out docs/results/deployment
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from peel_fed.atomic import write_json_atomic, write_text_atomic
from peel_fed.fedconfig import FedConfig
from sim.deploy import SMOKE_RUN, run_local_deployment
from sim.flower_env import configure_flower_env
from sim.simulate import run_federated_simulation

MODES = ("simulation", "deployed", "deployed+TLS")


def _run(mode: str, cfg: FedConfig, nodes: int) -> dict:
    t0 = time.perf_counter()
    if mode == "simulation":
        report = run_federated_simulation(cfg, nodes, num_cpus=os.cpu_count() or 1)
        total = time.perf_counter() - t0
    else:
        res = run_local_deployment(cfg, nodes, tls=mode.endswith("TLS"), on_line=lambda _: None)
        report, total = res.report, res.wall_seconds
    exchanges = sum(b["exchanges"] for b in report["bytes"].values())
    return {
        "mode": mode,
        "total_s": total,
        "pipeline_s": report["wall_seconds"],
        "exchanges": exchanges,
        "phase_seconds": report["phase_seconds"],
        "timing": report.get("timing"),
        "rows": [(r["method"], r["budget_bytes"], r["recall@20"]) for r in report["rows"]],
    }


def summarize(runs: list[dict]) -> dict:
    out: dict = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        if not mine:
            continue
        row = {
            "runs": len(mine),
            "median_total_s": statistics.median(r["total_s"] for r in mine),
            "median_pipeline_s": statistics.median(r["pipeline_s"] for r in mine),
            "exchanges": mine[0]["exchanges"],
        }
        row["median_s_per_exchange"] = row["median_pipeline_s"] / row["exchanges"]
        timings = [r["timing"] for r in mine if r["timing"]]
        if timings:
            row["timing"] = {
                k: statistics.median(t[k] for t in timings) for k in timings[0] if k != "replies"
            }
        out[mode] = row
    base = out.get("simulation")
    for row in out.values():
        if base:
            row["pipeline_vs_simulation"] = row["median_pipeline_s"] / base["median_pipeline_s"]
    reference = runs[0]["rows"]
    out["max_recall_difference"] = max(
        abs(a[2] - b[2]) for r in runs for a, b in zip(r["rows"], reference, strict=True)
    )
    return out


def bench_markdown(report: dict) -> str:
    s = report["summary"]
    lines = [
        f"## Deployed vs simulated: {report['config']['dataset']}, {report['nodes']} SuperNodes, "
        f"{report['repeats']} repeats (medians)",
        "",
        "| mode | pipeline s | s / exchange | whole command s | pipeline vs simulation |",
        "|---|---|---|---|---|",
    ]
    for mode in MODES:
        if mode in s:
            r = s[mode]
            lines.append(
                f"| {mode} | {r['median_pipeline_s']:.1f} | {r['median_s_per_exchange']:.2f} | "
                f"{r['median_total_s']:.1f} | {r['pipeline_vs_simulation']:.1f}x |"
            )
    for mode in ("deployed", "deployed+TLS"):
        t = s.get(mode, {}).get("timing")
        if t:
            lines.append(
                f"\n{mode}, one exchange (medians over replies, then over repeats): "
                f"{t['median_exchange_s']:.2f} s = {t['median_pickup_s']:.2f} s pickup (SuperNode "
                f"polls every 3 s, SuperExec every 0.1 s, spawn) + {t['median_startup_s']:.2f} s "
                f"app process startup (Python, Flower and app imports, message pull, app unpack) "
                f"+ {t['median_handler_s']:.2f} s handler + {t['median_return_s']:.2f} s return "
                "(SuperNode waits 0.5 s between looks for the reply; the server asks every 0.1 s)."
            )
    lines.append(
        f"\nSame metrics in every mode and repeat: largest Recall@20 difference "
        f"{s['max_recall_difference']:.2e}."
    )
    lines.append(
        f"\nCommand: `python -m sim.bench_deploy --repeats {report['repeats']} --num-nodes "
        f"{report['nodes']}`; machine: {report['machine']}; total {report['wall_s']:.0f} s."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-nodes", type=int, default=3)
    p.add_argument("--out", default="runs/bench-deploy", help="folder for bench.json and .md")
    args = p.parse_args(argv)
    configure_flower_env()
    t0 = time.perf_counter()
    runs = []
    for rep in range(args.repeats):
        for mode in MODES:
            out_dir = tempfile.mkdtemp(prefix="peel-fed-bench-")
            cfg = FedConfig(**SMOKE_RUN, min_nodes=args.num_nodes, out_dir=out_dir)
            run = _run(mode, cfg, args.num_nodes)
            runs.append(run)
            print(
                f"repeat {rep + 1}/{args.repeats} {mode}: pipeline {run['pipeline_s']:.1f} s, "
                f"whole {run['total_s']:.1f} s",
                flush=True,
            )
    report = {
        "config": FedConfig(**SMOKE_RUN).to_run_config(),
        "nodes": args.num_nodes,
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "runs": runs,
        "summary": summarize(runs),
        "wall_s": time.perf_counter() - t0,
    }
    out = Path(args.out)
    write_json_atomic(out / "bench.json", report)
    md = bench_markdown(report)
    write_text_atomic(out / "bench.md", md)
    print(md)


if __name__ == "__main__":
    main()
