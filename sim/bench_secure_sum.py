"""Benchmark: the phases' secure sum (``strategies.phases.secure_sum``) with pairwise masks (over
every pair, or over the default mask graph of ``2 ceil(log2 n)`` neighbours) against double
masking with Shamir shares, as the run report counts it.

Runs ``secure_sum`` over an in-process grid: every message goes to the real ClientApp handlers
(``clients.client_app``, each node's ``context.state`` kept between messages as in deployment)
with a benchmark-only message type, ``query.bench``, whose handler masks a vector of ``--length``
floats with ``masked_reply`` as every phase does. Dropped nodes fail on ``query.bench`` (after
the keys and, for Shamir, the shares: the costly case, where pairwise needs ``query.reveal``).

Per setting: exchanges, bytes per surviving node down and up summed over the exchanges (the
PhaseReports' ``record_bytes``: what ``results.json`` reports), and the wall seconds of the whole
``secure_sum`` (all devices and the server in one process, one after the other, so it is the
protocol's CPU time, not a deployment's latency), with the server's own share of it (outside
the exchanges: relaying, unmasking); medians of ``--repeats`` rounds.

    python -m sim.bench_secure_sum --nodes 10,50,100 --out runs/bench_secure_sum.json
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time

import numpy as np
from flwr.app import Context, Error, Message

from clients.client_app import masked_reply
from clients.records import from_record_dict, to_record_dict
from peel_fed.atomic import write_report
from peel_fed.messages import Content
from peel_fed.secagg import auto_degree
from sim.bench_secagg import human_bytes
from sim.local_grid import LocalGrid, server_identity
from strategies.phases import secure_sum, shamir_threshold

# label -> (protocol, mask neighbours: 0 the default graph, None every pair)
SETTINGS = {
    "pairwise-all": ("pairwise", None),
    "pairwise": ("pairwise", 0),
    "shamir": ("shamir", 0),
}


def bench_vector(node: int, length: int) -> np.ndarray:
    """The vector node ``node`` sums (a seeded draw, so the sum can be checked)."""
    return np.random.default_rng(node).uniform(-1.0, 1.0, length)


def bench(msg: Message, context: Context) -> Message:
    """``query.bench``: this node's vector, masked as every phase masks its upload."""
    content = from_record_dict(msg.content)
    length = int(content.configs["bench"]["length"])
    return masked_reply(msg, context, content, bench_vector(context.node_id, length))


class InProcessGrid(LocalGrid):
    """The in-process grid with the benchmark message; nodes in ``drop`` fail on
    ``query.bench``."""

    def __init__(self, num_nodes: int, drop: set[int]) -> None:
        super().__init__(num_nodes)
        self.app.query("bench")(bench)
        self.drop = drop

    def reply(self, msg: Message) -> Message:
        if msg.metadata.dst_node_id in self.drop and msg.metadata.message_type == "query.bench":
            return Message(Error(0, "dropped (benchmark)"), reply_to=msg)
        return super().reply(msg)


def one_round(
    n: int, drop: set[int], protocol: str, length: int, threshold: float, neighbours: int = 0
) -> dict:
    """One ``secure_sum`` over ``n`` nodes; its bytes, exchanges, seconds and error."""
    grid = InProcessGrid(n, drop)
    content = to_record_dict(Content(configs={"bench": {"length": length}}))
    nodes = grid.get_node_ids()
    t0 = time.perf_counter()
    total, survivors, reports = secure_sum(
        grid, nodes, "query.bench", content, 60.0, "bench", 0, protocol, threshold,
        neighbours=neighbours,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    want = sum(bench_vector(node, length) for node in nodes if node not in drop)
    if sorted(survivors) != sorted(set(nodes) - drop):
        raise RuntimeError(f"{protocol}: survivors {survivors} do not match the dropouts")
    down = [sum(r.bytes_down.get(node, 0) for r in reports) for node in survivors]
    up = [sum(r.bytes_up.get(node, 0) for r in reports) for node in survivors]
    return {
        "exchanges": len(reports),
        "down_bytes_per_node": float(np.mean(down)),
        "up_bytes_per_node": float(np.mean(up)),
        "wall_s": wall,
        "server_s": wall - sum(r.seconds for r in reports),
        "max_abs_error": float(np.max(np.abs(total - want))),
    }


def markdown(report: dict, command: str) -> str:
    a = report["args"]
    lines = [
        "## Secure sum in the phases: pairwise masks (every pair, or a mask graph) against "
        "Shamir double masking",
        "",
        f"`secure_sum` on an in-process grid (real ClientApp handlers), a vector of {a['length']}"
        f" floats per node, t = max(ceil({a['threshold']} n), n/2 + 1); dropped nodes fail on the"
        f" phase's message. Bytes per surviving node over all exchanges (`record_bytes`, as the "
        f"run report counts them); seconds: the whole `secure_sum`, every device and the server "
        f"in one process one after the other (server: outside the exchanges; device ms: the rest "
        f"per node); medians of "
        f"{a['repeats']}; {report['cpus']} CPUs ({report['machine']}). Command: `{command}`.",
        "",
        "| protocol | nodes | mask neighbours | t | dropped | exchanges | down / node "
        "| up / node | wall s | server s | device ms | max error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['protocol']} | {r['nodes']} | {r.get('neighbours', r['nodes'] - 1)} | "
            f"{r['threshold'] or '-'} | {r['dropped']} | "
            f"{r['exchanges']} | {human_bytes(r['down_bytes_per_node'])} | "
            f"{human_bytes(r['up_bytes_per_node'])} | {r['wall_s']:.3f} | {r['server_s']:.3f} | "
            f"{1e3 * (r['wall_s'] - r['server_s']) / r['nodes']:.1f} | "
            f"{r['max_abs_error']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nodes", default="10,50,100", help="comma-separated cohort sizes")
    p.add_argument("--length", type=int, default=10_000, help="floats per node's vector")
    p.add_argument("--dropouts", default="0,0.1", help="comma-separated dropout fractions")
    p.add_argument("--threshold", type=float, default=0.67, help="run config secagg-threshold")
    p.add_argument("--repeats", type=int, default=3, help="rounds per setting (medians)")
    p.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma-separated, of: {', '.join(SETTINGS)}"
    )
    p.add_argument("--out", default="runs/bench_secure_sum.json", help="JSON (and .md beside)")
    args = p.parse_args(argv)
    command = "python -m sim.bench_secure_sum " + shlex.join(sys.argv[1:] if argv is None else argv)
    report: dict = {"args": vars(args), "machine": platform.machine(), "cpus": os.cpu_count()}
    report["rows"] = rows = []
    with server_identity():
        for n in [int(x) for x in args.nodes.split(",") if x.strip()]:
            for frac in [float(x) for x in args.dropouts.split(",") if x.strip()]:
                drop = set(range(100, 100 + math.floor(frac * n + 1e-9)))
                for label in [x.strip() for x in args.settings.split(",") if x.strip()]:
                    if label not in SETTINGS:
                        p.error(f"unknown setting {label!r}: use {', '.join(SETTINGS)}")
                    protocol, neighbours = SETTINGS[label]
                    k = n if neighbours is None else neighbours  # n - 1 or more: every pair
                    runs = [
                        one_round(n, drop, protocol, args.length, args.threshold, k)
                        for _ in range(args.repeats)
                    ]
                    row = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
                    row["exchanges"] = int(row["exchanges"])
                    row["max_abs_error"] = max(r["max_abs_error"] for r in runs)
                    t = shamir_threshold(args.threshold, n) if protocol == "shamir" else None
                    degree = n - 1 if neighbours is None or protocol == "shamir" else auto_degree(n)
                    rows.append({"protocol": label, "nodes": n, "neighbours": degree,
                                 "threshold": t, "dropped": len(drop), **row})  # fmt: skip
                    print(markdown({**report, "rows": [rows[-1]]}, command).splitlines()[-1])
    md = markdown(report, command)
    print(md)
    print(f"wrote {write_report(args.out, report, md)}")
    return report


if __name__ == "__main__":
    main()
