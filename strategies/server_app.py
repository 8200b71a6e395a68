"""The server: a Flower ServerApp whose ``main`` runs the federated phases in order.

statistics (secure aggregation) -> LightGCN pretraining (sparse item rows) -> K-Means grouping
(secure aggregation) -> bit-plane orders per user group (secure aggregation of second moments and
item counts) -> per-group PEE learning of block units (all groups in the same rounds) ->
deployment and on-device evaluation with the dynamic-budget drill (secure aggregation of metric
sums). Each phase is a strategy class in its own module (``strategies.stats``, ``.pretrain``,
``.grouping``, ``.planes``, ``.pee``, ``.evaluation``); this module composes them.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from peel_fed.atomic import portable_path, write_json_atomic, write_text_atomic
from peel_fed.console import log
from peel_fed.fedconfig import FedConfig
from peel_fed.loading import dataset_name
from peel_fed.messages import DataSpec
from peel_fed.privacy import privacy_report
from strategies.evaluation import EvaluationStrategy
from strategies.grouping import GroupingStrategy
from strategies.log import PhaseLog
from strategies.pee import PEEStrategy
from strategies.phases import wait_for_nodes
from strategies.planes import PlanesStrategy
from strategies.pretrain import PretrainStrategy
from strategies.report import plot_recall_vs_budget, results_markdown
from strategies.stats import StatsStrategy

app = ServerApp()


def run_pipeline(grid: Grid, cfg: FedConfig) -> dict:
    """Run the federated phases with ``cfg``; returns (and, with ``out-dir``, saves) the report."""
    t_start = time.perf_counter()
    nodes = wait_for_nodes(grid, cfg.min_nodes, cfg.node_wait_s)
    log(f"{len(nodes)} nodes connected")
    data = DataSpec(cfg.dataset, cfg.data_dir, cfg.seed, cfg.val_fraction)
    phase_log = PhaseLog(cfg, nodes)
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[phase] = now - t
        t = now

    stats = StatsStrategy(cfg, phase_log, data).run(grid, nodes)
    lap("stats")
    pretraining = PretrainStrategy(cfg, phase_log, data, stats)
    items = pretraining.run(grid, nodes).final_item_table()
    lap("pretrain")
    groups = GroupingStrategy(cfg, phase_log, data).run(grid, nodes, items)
    lap("grouping")
    planes = PlanesStrategy(cfg, phase_log, data).run(
        grid, nodes, groups.centroids, items, stats.layout.item_groups
    )
    lap("planes")
    pee = PEEStrategy(cfg, phase_log, data, stats, items, groups).run(grid, nodes)
    lap("pee")
    evaluation = EvaluationStrategy(cfg, phase_log, data).run(
        grid, nodes, stats, items, pee, planes, groups.centroids
    )
    lap("evaluate")
    report = {
        "config": {
            **cfg.to_run_config(),
            "data-dir": portable_path(cfg.data_dir),
            "out-dir": portable_path(cfg.out_dir),
        },
        "nodes": nodes,
        "dataset": {
            "name": dataset_name(cfg.dataset, cfg.data_dir),
            "users": stats.users,
            "items": stats.n_items,
            "train": int(stats.train_popularity.sum()),
            "fit": int(stats.fit_degree.sum()),
        },
        "layout": {
            "full_table_bytes": stats.layout.full_table_bytes,
            "num_item_groups": stats.layout.num_item_groups,
            "num_blocks": stats.layout.num_blocks,
        },
        "user_group_sizes": groups.sizes,
        "unit_weights": [s.weights().round(4).tolist() for s in pee.servers],
        **evaluation,
        "pretrain": pretraining.history,
        "privacy": privacy_report(pretraining.dp, cfg.dp_releases()) if pretraining.dp else None,
        "pee": pee.history,
        "bytes": phase_log.bytes_report(stats),
        "failures": phase_log.failures(),
        "participation": phase_log.participation(),
        "timing": phase_log.timing_report(),
        "phase_seconds": seconds,
        "phases": phase_log.summaries(),
        "wall_seconds": time.perf_counter() - t_start,
    }
    print(results_markdown(report), flush=True)
    if cfg.out_dir:
        out = Path(cfg.out_dir)
        write_json_atomic(out / "results.json", report)
        write_text_atomic(out / "results.md", results_markdown(report))
        plot_recall_vs_budget(report, out / "recall_vs_budget.png")
        log(f"wrote results.json, results.md and recall_vs_budget.png in {out}")
    log(f"done in {report['wall_seconds']:.0f} s")
    return report


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_pipeline(grid, FedConfig.from_run_config(dict(context.run_config)))
