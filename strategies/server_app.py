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
from peel_fed.privacy import local_privacy_report, privacy_report
from strategies.checkpoint import Checkpoint, check_same_federation
from strategies.evaluation import EvaluationStrategy
from strategies.grouping import GroupingStrategy
from strategies.log import PhaseLog
from strategies.pee import PEEStrategy
from strategies.phases import wait_for_nodes
from strategies.planes import PlanesStrategy
from strategies.pretrain import PretrainStrategy
from strategies.report import plot_recall_vs_budget, results_markdown
from strategies.serve import ServeStrategy
from strategies.stats import StatsStrategy

app = ServerApp()


def run_pipeline(grid: Grid, cfg: FedConfig) -> dict:
    """Run the federated phases with ``cfg``; returns (and, with ``out-dir``, saves) the report.

    With an ``out-dir`` the server writes a checkpoint after every phase and training round
    (:mod:`strategies.checkpoint`); with ``resume`` it goes on from the last one.
    """
    t_start = time.perf_counter()
    checkpoint = Checkpoint(cfg)
    resumed_at = checkpoint.at if cfg.resume else None
    nodes = wait_for_nodes(grid, cfg.min_nodes, cfg.node_wait_s)
    log(f"{len(nodes)} nodes connected")
    if resumed_at is not None:
        log(f"resuming job {checkpoint.job} after {resumed_at or 'the start'}")
    data = DataSpec(
        cfg.dataset,
        cfg.data_dir,
        cfg.seed,
        cfg.val_fraction,
        checkpoint.job,
        cfg.device_state_dir,
        checkpoint.resume_points,
    )
    phase_log = checkpoint.get("log") or PhaseLog(cfg, nodes)
    phase_log.cfg = cfg
    phase_log.resumed(nodes)
    seconds: dict[str, float] = checkpoint.get("seconds", {})
    t = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[phase] = seconds.get(phase, 0.0) + now - t
        t = now

    def save(at: str, **objects) -> None:
        lap(at.split()[0])
        checkpoint.save(at, log=phase_log, seconds=seconds, **objects)

    stats = StatsStrategy(cfg, phase_log, data).run(grid, nodes)
    if checkpoint.get("stats") is not None:  # resumed: the same data, and its statistics
        check_same_federation(checkpoint.get("stats"), stats)
        stats = checkpoint.get("stats")
    else:
        save("stats", stats=stats)
    pretraining = checkpoint.get("pretrain") or PretrainStrategy(cfg, phase_log, data, stats)
    pretraining.cfg, pretraining.data = cfg, data
    if resumed_at is not None:  # devices rebuild their final vectors (or fold in, if lost)
        pretraining.finished = False
    items = pretraining.run(
        grid, nodes, lambda at: save(at, pretrain=pretraining)
    ).final_item_table()
    grouping = GroupingStrategy(cfg, phase_log, data)
    groups = checkpoint.get("groups")
    if groups is None:
        groups = grouping.run(grid, nodes, items)
    else:  # node ids are new after a restart: ask again which groups each node's users joined
        groups = grouping.assign(grid, nodes, groups.centroids)
    save("grouping", groups=groups)
    planes = checkpoint.get("planes")
    if planes is None:
        planes = PlanesStrategy(cfg, phase_log, data).run(
            grid, nodes, groups.centroids, items, stats.layout.item_groups
        )
        save("planes", planes=planes)
    strategy = checkpoint.get("pee") or PEEStrategy(cfg, phase_log, data, stats, items, groups)
    strategy.cfg, strategy.data, strategy.groups = cfg, data, groups
    pee = strategy.run(grid, nodes, lambda at: save(at, pee=strategy))
    # served again after a resume (node ids are new; a device that kept its units asks for none)
    serving = ServeStrategy(cfg, phase_log, data)
    served = {"nodes": serving.serve(grid, nodes, groups, planes, stats)}
    save("serve")
    members = sorted(int(n) for n in served["nodes"])
    if cfg.compare_methods:  # the served drill rides in the comparison's secure sum
        evaluation, total = EvaluationStrategy(cfg, phase_log, data).run(
            grid, nodes, stats, items, pee, planes, groups.centroids, with_served=True
        )
        ranked = evaluation["evaluated_nodes"]
    else:  # no full tables go down: only the drill ranked with the devices' own units
        total, ranked = serving.evaluate(grid, members, planes, stats)
        evaluation = {"evaluated_nodes": ranked, "rows": [], "per_group": []}
    served["drill"] = serving.drill_rows(total, stats)
    if not cfg.compare_methods:
        evaluation["drill"] = served["drill"]
    grown = serving.grow_back(grid, [n for n in members if n in ranked], groups, planes, stats)
    served = {
        "nodes": {str(n): c for n, c in served["nodes"].items()},
        "drill": served["drill"],
        "evaluated_nodes": ranked,
        "grow_back": {str(n): c for n, c in grown.items()},
    }
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
        "privacy": privacy_section(cfg, pretraining.dp),
        "pee": pee.history,
        "serve": served,
        "bytes": phase_log.bytes_report(stats),
        "failures": phase_log.failures(),
        "participation": phase_log.participation(),
        "timing": phase_log.timing_report(),
        "phase_seconds": seconds,
        "phases": phase_log.summaries(),
        "wall_seconds": time.perf_counter() - t_start,
        "resumed_after": resumed_at,
    }
    print(results_markdown(report), flush=True)
    if cfg.out_dir:
        out = Path(cfg.out_dir)
        write_json_atomic(out / "results.json", report)
        write_text_atomic(out / "results.md", results_markdown(report))
        written = "results.json, results.md"
        if report["rows"]:
            plot_recall_vs_budget(report, out / "recall_vs_budget.png")
            written += " and recall_vs_budget.png"
        log(f"wrote {written} in {out}")
    checkpoint.save("done")  # after the results: a run that finished is not resumed
    log(f"done in {report['wall_seconds']:.0f} s")
    return report


def privacy_section(cfg: FedConfig, dp) -> dict | None:
    """The report's privacy section: central or distributed DP (epsilon per phase) and local
    DP, if on."""
    if dp is None:
        return None
    report = privacy_report(
        dp, cfg.dp_releases(), distributed=cfg.distributed_dp, noise_source=cfg.dp_noise_source
    )
    if cfg.ldp_noise_multiplier:
        report["local"] = local_privacy_report(
            cfg.ldp_noise_multiplier, cfg.dp_releases(), cfg.dp_delta
        )
    return report


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_pipeline(grid, FedConfig.from_run_config(dict(context.run_config)))
