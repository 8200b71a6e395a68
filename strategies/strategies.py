"""One strategy class per federated phase: build messages, call the core, aggregate replies.

The algorithms live in ``peel_fed`` (``fedlightgcn``, ``clustering``, ``fedpee``); these classes
only move records between the grid and those cores, and log bytes and failures per round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid

from peel_fed.blocks import (
    BlockLayout,
    BudgetError,
    check_budget,
    first_blocks_order,
    parse_budget,
    popularity_item_groups,
    random_unit_order,
)
from peel_fed.clustering import initial_centroids, kmeans_step
from peel_fed.fedconfig import ConfigError, FedConfig
from peel_fed.fedlightgcn import (
    DeviceUpdate,
    PretrainServer,
    rounds_per_pass_for,
)
from peel_fed.fedpee import EvalSpec, PEEGroupServer, PEEUpload, drill_cut, evaluation_table
from peel_fed.lightgcn import progress_bar
from strategies.phases import PhaseReport, exchange, secure_sum


def _log(msg: str) -> None:
    print(f"[peel-fed] {msg}", flush=True)


class PhaseLog:
    """Every exchange's report, plus the users each reply covered (for per-device bytes)."""

    def __init__(self, cfg: FedConfig, nodes: list[int]) -> None:
        self.cfg, self.nodes = cfg, nodes
        self.reports: list[PhaseReport] = []
        self.users: list[dict[int, int]] = []

    def add(
        self,
        reports: list[PhaseReport] | PhaseReport,
        users: dict[int, tuple[int, int]] | None = None,
    ) -> None:
        """``users``: per replying node, (taking-part users, bytes they would send alone)."""
        for r in reports if isinstance(reports, list) else [reports]:
            self.reports.append(r)
            self.users.append(users or {})

    def summaries(self) -> list[dict]:
        return [r.summary() for r in self.reports]

    def failures(self) -> dict[str, dict]:
        """Per phase: failed node replies (node id -> count), and exchanges with a failure."""
        out: dict[str, dict] = {}
        for r in self.reports:
            phase = r.phase.split("/")[0]
            entry = out.setdefault(phase, {"exchanges": 0, "failed_replies": 0, "by_node": {}})
            entry["exchanges"] += 1
            entry["failed_replies"] += len(r.failed)
            for node in r.failed:
                entry["by_node"][str(node)] = entry["by_node"].get(str(node), 0) + 1
        return out

    def participation(self) -> dict:
        """Which nodes took part in which phase: per node and phase, the exchanges sent to it,
        answered and failed; the nodes that connected after the run started (``late``, with the
        phase they were first seen in) and those that dropped off the SuperLink's list
        (``gone``, with the phase they were first missing from)."""
        start = set(self.nodes)
        per_node: dict[str, dict[str, dict[str, int]]] = {str(n): {} for n in self.nodes}
        late: dict[str, str] = {}
        gone: dict[str, str] = {}
        for r in self.reports:
            phase = r.phase.split("/")[0]
            online = set(r.online)
            for n in online - start:
                late.setdefault(str(n), phase)
            for n in start - online if r.online else ():
                gone.setdefault(str(n), phase)
            for n in r.sent_to:
                e = per_node.setdefault(str(n), {}).setdefault(
                    phase, {"sent": 0, "replied": 0, "failed": 0}
                )
                e["sent"] += 1
                e["replied"] += int(n in r.replied)
                e["failed"] += int(n in r.failed)
        return {"nodes": per_node, "late": late, "gone": gone}

    def timing_report(self) -> dict[str, float] | None:
        """Where an exchange's time goes, from the devices' ``timing`` timestamps (run config
        ``timing = true``) and the server's push and receive times; medians over all replies,
        in seconds. None when no reply carried timestamps (timing off, or simulation)."""
        parts: dict[str, list[float]] = {
            "exchange": [],
            "pickup": [],
            "startup": [],
            "handler": [],
            "return": [],
        }
        for r in self.reports:
            for node, t in r.timing.items():
                parts["exchange"].append(r.received_at[node] - r.pushed_at)
                parts["pickup"].append(t["process-start"] - r.pushed_at)
                parts["startup"].append(t["handler-start"] - t["process-start"])
                parts["handler"].append(t["handler-end"] - t["handler-start"])
                parts["return"].append(r.received_at[node] - t["handler-end"])
        if not parts["exchange"]:
            return None
        out = {f"median_{k}_s": float(np.median(v)) for k, v in parts.items()}
        out["replies"] = len(parts["exchange"])
        return out

    def bytes_report(self, stats: StatsResult) -> dict[str, dict]:
        """Per phase: mean bytes per node per exchange down and up, and per taking-part device
        where devices are counted: the bytes each taking-part user would upload alone (one user per
        node, as in deployment; same encoding), averaged over users and rounds."""
        out: dict[str, dict] = {}
        for r, users in zip(self.reports, self.users, strict=True):
            phase = r.phase.split("/")[0]
            e = out.setdefault(
                phase,
                {
                    "exchanges": 0,
                    "down": 0,
                    "up": 0,
                    "replies": 0,
                    "devices": 0,
                    "up_dev": 0,
                    "s": 0,
                },
            )
            e["exchanges"] += 1
            e["s"] += r.seconds
            e["sent"] = e.get("sent", 0) + len(r.sent_to)
            e["down"] += sum(r.bytes_down.values())
            e["up"] += sum(r.bytes_up.values())
            e["replies"] += len(r.replied)
            for node, (n, solo) in users.items():
                if node in r.bytes_up and n:
                    e["devices"] += n
                    e["up_dev"] += solo
        cfg = self.cfg
        dense = (1 + cfg.layers) * stats.n_items * cfg.dim * 4
        report = {}
        for phase, e in out.items():
            row = {
                "exchanges": e["exchanges"],
                "exchange_seconds": e["s"],
                "down_bytes_per_node_per_exchange": e["down"] / max(e["sent"], 1),
                "up_bytes_per_reply": e["up"] / max(e["replies"], 1),
                "down_bytes_total": e["down"],
                "up_bytes_total": e["up"],
            }
            if e["devices"]:
                row["up_bytes_per_device_per_round"] = e["up_dev"] / e["devices"]
            report[phase] = row
        if "pretrain" in report and "up_bytes_per_device_per_round" in report["pretrain"]:
            per_dev = report["pretrain"]["up_bytes_per_device_per_round"]
            report["pretrain"]["dense_upload_bytes"] = dense
            report["pretrain"]["sparse_over_dense"] = per_dev / dense
        return report


# --- statistics ---------------------------------------------------------------------------------
@dataclass
class StatsResult:
    train_popularity: np.ndarray
    fit_degree: np.ndarray
    users: int
    n_items: int
    layout: BlockLayout
    budget_bytes: list[int]


class PhaseStrategy:
    """A phase of the pipeline: the run config, and the log every exchange is written to."""

    def __init__(self, cfg: FedConfig, log: PhaseLog) -> None:
        self.cfg, self.log = cfg, log


class StatsStrategy(PhaseStrategy):
    """Item counts by secure aggregation -> degrees, popularity, item groups, block layout."""

    def run(self, grid: Grid, nodes: list[int], spec: RecordDict) -> StatsResult:
        cfg = self.cfg
        total, contributed, reports = secure_sum(
            grid, nodes, "query.stats", spec, cfg.round_timeout_s, "stats"
        )
        self.log.add(reports)
        n_items = (total.size - 1) // 2
        train = np.rint(total[:n_items]).astype(np.int64)
        fit = np.rint(total[n_items : 2 * n_items]).astype(np.int64)
        users = int(round(total[-1]))
        if cfg.user_groups > users:
            raise ConfigError(f"more user groups ({cfg.user_groups}) than users ({users})")
        if cfg.item_groups > n_items:
            raise ConfigError(f"more item groups ({cfg.item_groups}) than items ({n_items})")
        layout = BlockLayout(popularity_item_groups(train, cfg.item_groups), cfg.dim, cfg.blocks)
        try:
            budget_bytes = [parse_budget(b, layout.full_table_bytes) for b in cfg.budget_list()]
            for b in budget_bytes:
                check_budget(b, layout)
            own_budgets = [
                parse_budget(choice, layout.full_table_bytes)
                for choice in cfg.budget_list("device_budgets")
            ]
            for own in own_budgets:
                check_budget(own, layout)
        except BudgetError as exc:
            raise ConfigError(f"budgets: {exc}") from None
        empty = sorted(
            {
                drill_cut(own, f)
                for own in own_budgets
                for f in cfg.drill_fractions()
                if drill_cut(own, f) < layout.min_budget_bytes
            }
        )
        if empty:
            _log(f"drill cuts below one unit (no device ranks there): {empty} B")
        failed = sorted({n for r in reports for n in r.failed})
        _log(
            f"stats (secure aggregation): {len(contributed)}/{len(nodes)} nodes, {users:,} users, "
            f"{int(train.sum()):,} training interactions over {n_items:,} items; "
            f"{len(failed)} failed"
        )
        return StatsResult(train, fit, users, n_items, layout, budget_bytes)


def _node_sample(nodes: list[int], fraction: float, rng: np.random.Generator) -> list[int]:
    """Client sampling: a seeded ``fraction`` of the nodes (at least one)."""
    if fraction >= 1.0:
        return list(nodes)
    k = max(1, int(round(fraction * len(nodes))))
    return sorted(rng.choice(nodes, size=k, replace=False).tolist())


def _arrays(named: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in named.items()})


# --- pretraining --------------------------------------------------------------------------------
class PretrainStrategy(PhaseStrategy):
    """Federated LightGCN: round 0 collects first contributions layer by layer; each round sends
    the item layers, averages the sparse ``E0`` row gradients over the devices that touched each
    row and adds the contribution changes to the item-side sums."""

    def __init__(self, cfg: FedConfig, log: PhaseLog) -> None:
        super().__init__(cfg, log)
        self.history: list[dict] = []

    def _content(self, spec: RecordDict, server: PretrainServer, degree, **step) -> RecordDict:
        cfg = self.cfg
        rec = ConfigRecord(
            {
                "dim": cfg.dim,
                "layers": cfg.layers,
                "local-steps": cfg.local_steps,
                "user-lr": cfg.user_lr,
                "secure": cfg.secure_rows,
                **step,
            }
        )
        layers = server.item_layers()
        tables = _arrays({f"layer-{k}": layers[k].numpy() for k in range(len(layers))})
        return RecordDict(
            {
                "data": spec["data"],
                "pretrain": rec,
                "tables": tables,
                "degree": _arrays({"degree": degree}),
            }
        )

    def _secure_round(
        self,
        grid: Grid,
        nodes: list[int],
        spec: RecordDict,
        content: RecordDict,
        server: PretrainServer,
        n_items: int,
        round_: int,
        has_grad: bool,
    ) -> dict:
        """Secure-rows mode: masked per-row device counts first (the server learns the cohort's
        row union and how many devices touched each row), then the masked values laid out over
        that union; the server only ever sees sums over the nodes."""
        cfg = self.cfg
        phase = "pretrain" if has_grad else "pretrain/init"
        total, counted, reports = secure_sum(
            grid, nodes, "train.pretrain", content, cfg.round_timeout_s, phase, round_
        )
        self.log.add(reports)
        counts = np.rint(total[:n_items]).astype(np.int64)
        union = np.flatnonzero(counts > 0)
        down = RecordDict({"data": spec["data"], "rows": _arrays({"rows": union})})
        values, _, reports = secure_sum(
            grid, counted, "train.rows", down, cfg.round_timeout_s, f"{phase}/rows", round_
        )
        self.log.add(reports)
        d = cfg.dim
        grad = values[: union.size * d].reshape(union.size, d)
        delta = values[union.size * d :].reshape(cfg.layers, union.size, d)
        update = DeviceUpdate(
            rows=union if has_grad else union[:0],
            grad=torch.from_numpy(grad if has_grad else grad[:0]).float(),
            row_devices=counts[union] if has_grad else counts[:0],
            contrib_rows=union,
            contrib_delta=torch.from_numpy(delta).float(),
            loss_sum=float(total[n_items]),
            users=int(round(total[n_items + 1])),
        )
        return server.apply([update])

    def run(
        self, grid: Grid, nodes: list[int], spec: RecordDict, stats: StatsResult
    ) -> PretrainServer:
        cfg = self.cfg
        server = PretrainServer(stats.n_items, stats.fit_degree, cfg.lightgcn(), cfg.seed)
        for k in range(cfg.layers):
            content = self._content(spec, server, stats.fit_degree, step="init", k=k)
            if cfg.secure_rows:
                self._secure_round(grid, nodes, spec, content, server, stats.n_items, k, False)
                continue
            replies, rep = exchange(
                grid, nodes, "train.pretrain", content, cfg.round_timeout_s, "pretrain/init", k
            )
            self.log.add(rep)
            for reply in replies.values():
                up = reply.content.array_records["upload"]
                delta = torch.from_numpy(up["contrib-delta"].numpy())
                server.add_contributions(up["contrib-rows"].numpy(), delta)
        per_pass = rounds_per_pass_for(cfg.cohort_fraction)
        rounds = cfg.pretrain_passes * per_pass
        rng = np.random.default_rng([cfg.seed, 11])
        bar = progress_bar(rounds, "federated pretraining (rounds)", cfg.progress)
        for r in range(1, rounds + 1):
            sample = _node_sample(nodes, cfg.fraction_nodes, rng)
            content = self._content(
                spec,
                server,
                stats.fit_degree,
                step="round",
                round=r,
                **{"rounds-per-pass": per_pass},
            )
            if cfg.secure_rows:
                s = self._secure_round(grid, sample, spec, content, server, stats.n_items, r, True)
                self.history.append({"round": r, **s})
                bar.update(1)
                continue
            replies, rep = exchange(
                grid, sample, "train.pretrain", content, cfg.round_timeout_s, "pretrain", r
            )
            updates, users = [], {}
            for node, reply in replies.items():
                up = reply.content.array_records["upload"]
                m = reply.content.metric_records["metrics"]
                users[node] = (int(m["users"]), int(m["solo-bytes"]))
                updates.append(
                    DeviceUpdate(
                        rows=up["rows"].numpy(),
                        grad=torch.from_numpy(up["grad"].numpy()),
                        row_devices=up["row-devices"].numpy(),
                        contrib_rows=up["contrib-rows"].numpy(),
                        contrib_delta=torch.from_numpy(up["contrib-delta"].numpy()),
                        loss_sum=float(m["loss-sum"]),
                        users=int(m["users"]),
                    )
                )
            self.log.add(rep, users)
            if len(replies) < min(cfg.min_nodes, len(sample)):
                _log(f"pretrain round {r}: {len(replies)} replies < min-nodes; round skipped")
                continue
            s = server.apply(updates)
            self.history.append({"round": r, **s, "failed": len(rep.failed)})
            bar.update(1)
            bar.set_postfix(loss=f"{s['loss']:.4f}", failed=len(rep.failed))
        bar.close()
        content = self._content(spec, server, stats.fit_degree, step="final")
        _, rep = exchange(grid, nodes, "train.pretrain", content, cfg.round_timeout_s, "final")
        self.log.add(rep)
        _log(
            f"pretraining: {rounds} rounds ({cfg.pretrain_passes} passes); final vectors kept on "
            f"{len(rep.replied)}/{len(nodes)} nodes"
        )
        return server


# --- grouping -----------------------------------------------------------------------------------
@dataclass
class GroupingResult:
    centroids: np.ndarray
    sizes: list[int]
    node_groups: dict[int, list[int]] = field(default_factory=dict)


class GroupingStrategy(PhaseStrategy):
    """Federated K-Means: centroids down, per-centroid sums and counts up by secure aggregation;
    then every device joins its nearest centroid and the server learns the group sizes."""

    def run(
        self, grid: Grid, nodes: list[int], spec: RecordDict, item_table: np.ndarray
    ) -> GroupingResult:
        cfg = self.cfg
        k = cfg.user_groups
        centroids = initial_centroids(item_table, k, seed=cfg.seed)
        for it in range(cfg.kmeans_iters if k > 1 else 0):
            content = RecordDict(
                {"data": spec["data"], "kmeans": _arrays({"centroids": centroids})}
            )
            total, _, reports = secure_sum(
                grid, nodes, "query.kmeans", content, cfg.round_timeout_s, "kmeans", it
            )
            self.log.add(reports)
            dim = centroids.shape[1]
            sums, counts = total[: k * dim].reshape(k, dim), total[k * dim :]
            centroids = kmeans_step(sums, np.rint(counts), centroids)
        content = RecordDict({"data": spec["data"], "kmeans": _arrays({"centroids": centroids})})
        replies, rep = exchange(grid, nodes, "query.group", content, cfg.round_timeout_s, "group")
        self.log.add(rep)
        sizes = np.zeros(k, dtype=np.int64)
        node_groups = {}
        for node, reply in replies.items():
            counts = reply.content.metric_records["groups"]
            per = np.array([int(counts[f"g{g}"]) for g in range(k)])
            sizes += per
            node_groups[node] = np.flatnonzero(per).tolist()
        _log(f"grouping: K-Means ({cfg.kmeans_iters} secure rounds), group sizes {sizes.tolist()}")
        return GroupingResult(centroids, sizes.tolist(), node_groups)


# --- PEE learning -------------------------------------------------------------------------------
@dataclass
class PEEResult:
    servers: list[PEEGroupServer]
    history: list[dict]


def _layout_records(layout: BlockLayout) -> dict:
    return {"layout": _arrays({"item-groups": layout.item_groups})}


class PEEStrategy(PhaseStrategy):
    """All user groups in the same rounds: each node gets the tables and weights of its groups;
    per group, row gradients are averaged into the table and the mean dL_val/d alpha steps the
    group's controller."""

    def _secure_round(
        self,
        grid: Grid,
        nodes: list[int],
        spec: RecordDict,
        content: RecordDict,
        pee_rec: dict,
        layout: BlockLayout,
        round_: int,
    ) -> list[list[PEEUpload]]:
        """Secure rows: masked per-group row counts, then per group the masked gradients over the
        group's row union with dL_val/d alpha and loss statistics; only sums reach the server."""
        cfg = self.cfg
        n_items, n, k = layout.n_items, layout.num_item_groups, cfg.user_groups
        total, counted, reports = secure_sum(
            grid, nodes, "train.pee", content, cfg.round_timeout_s, "pee", round_
        )
        self.log.add(reports)
        counts = np.rint(total[: k * n_items]).reshape(k, n_items).astype(np.int64)
        unions = {f"union-{g}": np.flatnonzero(counts[g] > 0) for g in range(k)}
        down = RecordDict(
            {
                "data": spec["data"],
                "pee": ConfigRecord(dict(pee_rec)),
                "rows": _arrays(unions),
            }
        )
        values, _, reports = secure_sum(
            grid, counted, "train.peerows", down, cfg.round_timeout_s, "pee/rows", round_
        )
        self.log.add(reports)
        out, at = [], 0
        wsize = n * layout.num_blocks
        for g in range(k):
            union = unions[f"union-{g}"]
            grad = values[at : at + union.size * cfg.dim].reshape(union.size, cfg.dim)
            at += union.size * cfg.dim
            wgrad = values[at : at + wsize].reshape(n, layout.num_blocks)
            at += wsize
            st = values[at : at + 2 + 2 * n]
            at += 2 + 2 * n
            out.append(
                [
                    PEEUpload(
                        rows=union,
                        grad=grad.astype(np.float32),
                        row_devices=counts[g, union],
                        weight_grad=wgrad,
                        val_devices=int(round(st[0])),
                        loss_sum=st[2 : 2 + n],
                        loss_count=np.rint(st[2 + n :]),
                        users=int(round(st[1])),
                    )
                ]
            )
        return out

    def run(
        self,
        grid: Grid,
        nodes: list[int],
        spec: RecordDict,
        stats: StatsResult,
        item_table: np.ndarray,
        groups: GroupingResult,
    ) -> PEEResult:
        cfg = self.cfg
        pcfg = cfg.pee()
        layout = stats.layout
        servers = [
            PEEGroupServer(item_table, stats.train_popularity, layout, pcfg, cfg.seed * 1000 + g)
            for g in range(cfg.user_groups)
        ]
        per_pass = rounds_per_pass_for(cfg.pee_cohort_fraction)
        rng = np.random.default_rng([cfg.seed, 13])
        history = []
        bar = progress_bar(cfg.pee_rounds, "PEE learning (rounds)", cfg.progress)
        members = [n for n in nodes if n in groups.node_groups]
        for r in range(1, cfg.pee_rounds + 1):
            sample = _node_sample(members, cfg.fraction_nodes, rng)
            pee_rec = {
                "round": r,
                "rounds-per-pass": per_pass,
                "local-steps": cfg.pee_local_steps,
                "user-lr": cfg.pee_user_lr,
                "blocks": cfg.blocks,
                "dim": cfg.dim,
                "item-groups": layout.num_item_groups,
                "user-groups": cfg.user_groups,
                "secure": cfg.secure_rows,
            }

            def content_for(group_ids, pee_rec=pee_rec) -> RecordDict:
                named = {}
                for g in group_ids:
                    named[f"table-{g}"] = servers[g].table.numpy()
                    named[f"alpha-{g}"] = servers[g].weights()
                return RecordDict(
                    {
                        "data": spec["data"],
                        "pee": ConfigRecord(dict(pee_rec)),
                        "tables": _arrays(named),
                        **_layout_records(layout),
                    }
                )

            if cfg.secure_rows:  # one content for all: every group's table goes to every node
                content = content_for(range(cfg.user_groups))
                uploads_s = self._secure_round(grid, sample, spec, content, pee_rec, layout, r)
                stats_r = [s.apply(u) for s, u in zip(servers, uploads_s, strict=True)]
                history.append({"round": r, "groups": stats_r})
                bar.update(1)
                continue
            contents = {node: content_for(groups.node_groups[node]) for node in sample}
            replies, rep = exchange(
                grid, sample, "train.pee", contents, cfg.round_timeout_s, "pee", r
            )
            uploads: list[list[PEEUpload]] = [[] for _ in servers]
            users = {}
            n = layout.num_item_groups
            for node, reply in replies.items():
                up = reply.content.array_records["upload"]
                m = reply.content.metric_records["metrics"]
                users[node] = (int(m["users"]), int(m["solo-bytes"]))
                for g in groups.node_groups[node]:
                    st = up[f"g{g}-stats"].numpy()
                    uploads[g].append(
                        PEEUpload(
                            rows=up[f"g{g}-rows"].numpy(),
                            grad=up[f"g{g}-grad"].numpy(),
                            row_devices=up[f"g{g}-row-devices"].numpy(),
                            weight_grad=up[f"g{g}-weight-grad"].numpy(),
                            val_devices=int(st[0]),
                            loss_sum=st[2 : 2 + n],
                            loss_count=st[2 + n : 2 + 2 * n],
                            users=int(st[1]),
                        )
                    )
            self.log.add(rep, users)
            if len(replies) < min(cfg.min_nodes, len(sample)):
                _log(f"PEE round {r}: {len(replies)} replies < min-nodes; round skipped")
                continue
            stats_r = [s.apply(u) for s, u in zip(servers, uploads, strict=True)]
            history.append({"round": r, "groups": stats_r, "failed": len(rep.failed)})
            bar.update(1)
            bar.set_postfix(failed=len(rep.failed))
        bar.close()
        _log(f"PEE learning: {cfg.pee_rounds} rounds for {cfg.user_groups} user groups")
        return PEEResult(servers, history)


# --- deployment and evaluation ------------------------------------------------------------------
class EvaluationStrategy(PhaseStrategy):
    """Serve every group's units in weight order (and the baselines' tables); devices keep what
    fits each budget, rank on the device, run the dynamic-budget drill, and send up metric sums
    by secure aggregation. A device that missed grouping joins the nearest centroid here."""

    def run(
        self,
        grid: Grid,
        nodes: list[int],
        spec: RecordDict,
        stats: StatsResult,
        item_table: np.ndarray,
        pee: PEEResult,
        centroids: np.ndarray,
    ) -> dict:
        cfg = self.cfg
        layout = stats.layout
        espec = EvalSpec(
            budget_bytes=tuple(stats.budget_bytes),
            device_budgets=tuple(cfg.budget_list("device_budgets")),
            drill=tuple(cfg.drill_fractions()),
            user_groups=cfg.user_groups,
            full_table_bytes=layout.full_table_bytes,
        )
        named = {
            "pretrained": item_table,
            "order-first-k blocks": first_blocks_order(layout.num_item_groups, layout.num_blocks),
            "order-random units": random_unit_order(
                layout.num_item_groups, layout.num_blocks, seed=cfg.seed
            ),
        }
        for g, s in enumerate(pee.servers):
            named[f"table-{g}"] = s.table.numpy()
            named[f"alpha-{g}"] = s.weights()
            named[f"order-{g}"] = s.unit_order()
        content = RecordDict(
            {
                "data": spec["data"],
                "evaluate": ConfigRecord(espec.to_config()),
                "pee": ConfigRecord({"blocks": cfg.blocks, "dim": cfg.dim}),
                "tables": _arrays(named),
                "kmeans": _arrays({"centroids": centroids}),
                **_layout_records(layout),
            }
        )
        total, contributed, reports = secure_sum(
            grid, nodes, "evaluate.budgets", content, cfg.round_timeout_s, "evaluate"
        )
        self.log.add(reports)
        table = evaluation_table(total, espec)
        _log(f"evaluation (secure aggregation): {len(contributed)}/{len(nodes)} nodes")
        return {"evaluated_nodes": contributed, **table}
