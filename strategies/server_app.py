"""The server: a Flower ServerApp whose ``main`` runs the federated phases in order.

Work in progress (issue 3): the statistics phase runs; pretraining, grouping, PEE learning,
deployment and evaluation follow.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from peel_fed.atomic import write_json_atomic
from peel_fed.fedconfig import FedConfig
from strategies.phases import aggregate_item_counts, data_spec, exchange, wait_for_nodes

app = ServerApp()


def run_pipeline(grid: Grid, cfg: FedConfig) -> dict:
    """Run the federated phases with ``cfg``; returns (and, with ``out-dir``, saves) the report."""
    nodes = wait_for_nodes(grid, cfg.min_nodes, cfg.node_wait_s)
    print(f"[peel-fed] {len(nodes)} nodes connected", flush=True)
    spec = RecordDict({"data": data_spec(cfg.dataset, cfg.data_dir, cfg.seed)})
    phases = []
    replies, rep = exchange(grid, nodes, "query.stats", spec, cfg.round_timeout_s, "stats")
    phases.append(rep.summary())
    popularity, users = aggregate_item_counts(replies)
    print(
        f"[peel-fed] stats: {len(replies)}/{len(nodes)} nodes, {users:,} users, "
        f"{int(popularity.sum()):,} training interactions over {popularity.size:,} items; "
        f"{len(rep.failed)} failed",
        flush=True,
    )
    report = {
        "config": cfg.to_run_config(),
        "nodes": nodes,
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
