"""The server: a Flower ServerApp whose ``main`` runs the federated phases in order.

Work in progress (issue 3): the statistics phase runs; pretraining, grouping, PEE learning,
deployment and evaluation follow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from peel_fed.atomic import write_json_atomic
from peel_fed.fedconfig import FedConfig
from strategies.phases import data_spec, secure_sum, wait_for_nodes

app = ServerApp()


def run_pipeline(grid: Grid, cfg: FedConfig) -> dict:
    """Run the federated phases with ``cfg``; returns (and, with ``out-dir``, saves) the report."""
    nodes = wait_for_nodes(grid, cfg.min_nodes, cfg.node_wait_s)
    print(f"[peel-fed] {len(nodes)} nodes connected", flush=True)
    spec = RecordDict({"data": data_spec(cfg.dataset, cfg.data_dir, cfg.seed)})
    phases = []
    total, contributed, reports = secure_sum(
        grid, nodes, "query.stats", spec, cfg.round_timeout_s, "stats"
    )
    phases += [r.summary() for r in reports]
    popularity = np.rint(total[:-1]).astype(np.int64)
    users = int(round(total[-1]))
    failed = sorted({n for r in reports for n in r.failed})
    print(
        f"[peel-fed] stats (secure aggregation): {len(contributed)}/{len(nodes)} nodes, "
        f"{users:,} users, {int(popularity.sum()):,} training interactions over "
        f"{popularity.size:,} items; {len(failed)} failed",
        flush=True,
    )
    report = {
        "config": cfg.to_run_config(),
        "nodes": nodes,
        "stats_nodes": contributed,
        "failed_nodes": failed,
        "users": users,
        "popularity": popularity.tolist(),
        "phases": phases,
    }
    if cfg.out_dir:
        write_json_atomic(Path(cfg.out_dir) / "results.json", report)
    return report


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_pipeline(grid, FedConfig.from_run_config(dict(context.run_config)))
