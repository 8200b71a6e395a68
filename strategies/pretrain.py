"""Federated LightGCN pretraining: round 0 collects first contributions layer by layer; each
round sends the item layers, averages the sparse ``E0`` row gradients over the devices that
touched each row and adds the contribution changes to the item-side sums."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from flwr.app import RecordDict
from flwr.serverapp import Grid

from clients.records import from_record_dict, to_record_dict
from peel_fed.console import log, progress_bar
from peel_fed.fedconfig import FedConfig
from peel_fed.fedlightgcn import PretrainServer, rounds_per_pass_for
from peel_fed.messages import (
    DataSpec,
    PretrainDown,
    PretrainStep,
    RowCounts,
    ask_ahead,
    decode_contribution,
    decode_device_update,
    decode_pretrain_row_counts,
    decode_pretrain_rows,
    decode_rows_wanted,
    encode_pretrain_down,
    encode_rows_down,
    encode_rows_request,
)
from peel_fed.privacy import noised
from strategies.base import (
    PhaseStrategy,
    RowsAhead,
    node_sample,
    reply_contents,
    upload_users,
)
from strategies.log import PhaseLog
from strategies.phases import PhaseReport, exchange
from strategies.stats import StatsResult


class PretrainStrategy(PhaseStrategy):
    """Federated LightGCN on the server side; ``server`` holds the item tables, ``history`` one
    entry per applied round."""

    def __init__(self, cfg: FedConfig, log: PhaseLog, data: DataSpec, stats: StatsResult) -> None:
        super().__init__(cfg, log, data)
        self.stats = stats
        self.dp = cfg.dp_settings()
        per_pass = rounds_per_pass_for(cfg.pretrain_cohort_fraction)
        self.server = PretrainServer(
            stats.n_items,
            stats.fit_degree,
            cfg.lightgcn(),
            cfg.seed,
            self.dp,
            stats.users / per_pass,
            noise_on_devices=cfg.distributed_dp,
        )
        self.history: list[dict] = []
        # where the phase stands (a checkpoint keeps it): next init layer, next round, final sent
        self.next_layer, self.next_round, self.finished = 0, 1, False
        self.sampling_rng = np.random.default_rng([cfg.seed, 11])
        # a partial, not a lambda: the checkpoint pickles the strategy
        self.rows_ahead = RowsAhead("pretrain", partial(decode_rows_wanted, n_items=stats.n_items))

    def step(self, step: str, **at: int) -> PretrainStep:
        """The settings of a ``step`` message (``k`` for init, ``round``/``rounds_per_pass``)."""
        cfg = self.cfg
        return PretrainStep(
            step,
            cfg.dim,
            cfg.layers,
            cfg.pretrain_local_steps,
            cfg.pretrain_user_lr,
            cfg.secure_rows,
            **at,
            dp_clip=cfg.dp_clip,
            decoys=cfg.decoy_items,
            dp_private=noised(self.dp) or cfg.ldp_noise_multiplier > 0,
            ldp_noise=cfg.ldp_noise_multiplier,
            negative_sampling=cfg.pretrain_negative_sampling,
            dns_candidates=cfg.pretrain_dns_candidates,
            lr_schedule=cfg.pretrain_lr_schedule,
            total_rounds=self.server.cfg.rounds,
        )

    def configure(
        self,
        step: PretrainStep,
        rows: np.ndarray | None = None,
        layers: list[np.ndarray] | None = None,
        ahead: PretrainStep | None = None,
    ) -> RecordDict:
        """The item layers as they are now (or ``layers``, computed once for all nodes), the fit
        item degree and the step's settings; with ``rows``, only those rows (a sparse
        download), and with ``ahead`` the step whose rows the reply should name."""
        if layers is None:
            layers = [layer.numpy() for layer in self.server.item_layers()]
        degree = self.stats.fit_degree
        if rows is None:
            down = PretrainDown(self.data, step, layers, degree)
        else:
            down = PretrainDown(
                self.data, step, [t[rows] for t in layers], degree[rows], rows, self.stats.n_items
            )
        content = encode_pretrain_down(down)
        if ahead is not None:
            content = ask_ahead(content, "pretrain", ahead.to_config())
        return to_record_dict(content)

    def send(
        self,
        grid: Grid,
        nodes: list[int],
        step: PretrainStep,
        phase: str,
        round_: int = 0,
        ahead: PretrainStep | None = None,
    ) -> tuple[dict, PhaseReport, int]:
        """One clear pretraining exchange of ``step``: the whole tables to every node, or with
        sparse downloads each node just the rows it will read. A node names them in its reply
        to the previous step (which named ``step`` as the one ``ahead``), or else in a
        ``query.rows`` exchange first (the first step, a node that sat out or failed the
        previous one, a resumed server). A node with nothing to read in a round (no user of it
        takes part) is not asked to train; returns the replies, the report and how many such
        idle nodes answered."""
        timeout = self.cfg.round_timeout_s
        if not self.cfg.sparse_pretrain_downloads:
            content = self.configure(step)
            return (*exchange(grid, nodes, "train.pretrain", content, timeout, phase, round_), 0)
        settings = step.to_config()  # as the wire carries it
        wanted = {n: rows for n in nodes if (rows := self.rows_ahead.get(n, settings)) is not None}
        if unasked := [n for n in nodes if n not in wanted]:
            ask = to_record_dict(encode_rows_request(self.data, step))
            # its own phase in the bytes report ("pretrain-ask", "pretrain-ask/init", ...)
            head, _, tail = phase.partition("/")
            ask_phase = f"{head}-ask" + (f"/{tail}" if tail else "")
            asked, rep = exchange(grid, unasked, "query.rows", ask, timeout, ask_phase, round_)
            self.log.add(rep)
            for node, content in reply_contents(asked).items():
                wanted[node] = decode_rows_wanted(from_record_dict(content), self.stats.n_items)
        contents, idle = {}, 0
        layers = [layer.numpy() for layer in self.server.item_layers()]
        for node in (n for n in nodes if n in wanted):  # in the nodes' order, as the ask's
            rows = wanted[node]
            if rows.size or step.step != "round":
                contents[node] = self.configure(step, rows, layers, ahead)
            else:
                idle += 1
        replies, rep = exchange(
            grid, list(contents), "train.pretrain", contents, timeout, phase, round_
        )
        self.rows_ahead.remember(reply_contents(replies))
        return replies, rep, idle

    def aggregate_contributions(self, replies: dict[int, RecordDict], k: int) -> None:
        """An ``init`` step of layer ``k`` in the clear: add every node's first contributions
        (and, with DP, noise on the layer's sum)."""
        for content in replies.values():
            rows, delta = decode_contribution(from_record_dict(content))
            self.server.add_contributions(rows, torch.from_numpy(delta))
        self.server.noise_contributions([k])

    def aggregate_round(self, replies: dict[int, RecordDict]) -> dict[str, float]:
        """A training round in the clear: apply every node's upload, in arrival order."""
        updates = [decode_device_update(from_record_dict(c)) for c in replies.values()]
        return self.server.apply(updates)

    def configure_rows(
        self, total: np.ndarray, noise_std: float = 0.0
    ) -> tuple[RowCounts, RecordDict]:
        """Secure rows, between the halves: the summed row counts, and the row union to send
        (under distributed DP every row, since the devices send no row counts, and each node's
        noise share ``noise_std``)."""
        first = decode_pretrain_row_counts(total, self.stats.n_items)
        if self.cfg.distributed_dp:
            first.counts = np.ones_like(first.counts)
        return first, to_record_dict(
            encode_rows_down(self.data, first.union, noise_std, self.cfg.dp_noise_source)
        )

    def aggregate_rows(
        self, values: np.ndarray, first: RowCounts, has_grad: bool, k: int | None = None
    ) -> dict:
        """Secure rows: apply the cohort's summed update (``has_grad`` False for the ``init``
        step of layer ``k``, which adds that layer's contributions only)."""
        cfg = self.cfg
        update = decode_pretrain_rows(values, first, cfg.layers, cfg.dim, has_grad)
        if not has_grad:
            self.server.add_contributions(update.contrib_rows, update.contrib_delta)
            self.server.noise_contributions([k])
            return {"users": update.users, "rows": int(update.contrib_rows.size)}
        return self.server.apply([update])

    def _secure_round(
        self, grid: Grid, nodes: list[int], content: RecordDict, round_: int, has_grad: bool
    ) -> dict:
        """Secure-rows mode: masked per-row device counts first (the server learns the cohort's
        row union and how many devices touched each row), then the masked values laid out over
        that union; the server only ever sees sums over the nodes."""
        timeout = self.cfg.round_timeout_s
        phase = "pretrain" if has_grad else "pretrain/init"
        total, counted, reports = self.secure_sum(
            grid, nodes, "train.pretrain", content, timeout, phase, round_
        )
        self.log.add(reports)
        shares, noise_std = self.noise_shares(counted)
        first, down = self.configure_rows(total, noise_std)
        values, _, reports = self.secure_sum(
            grid, counted, "train.rows", down, timeout, f"{phase}/rows", round_, shares
        )
        self.log.add(reports)
        return self.aggregate_rows(values, first, has_grad, None if has_grad else round_)

    def run(
        self, grid: Grid, nodes: list[int], on_step: Callable[[str], None] | None = None
    ) -> PretrainServer:
        """Run the steps not done yet (all, unless resumed from a checkpoint); ``on_step`` is
        called after each (``"pretrain init 0"``, ``"pretrain round 3"``, ``"pretrain final"``)."""
        cfg = self.cfg
        done = on_step or (lambda _: None)
        for k in range(self.next_layer, cfg.layers):
            if cfg.secure_rows:
                self._secure_round(grid, nodes, self.configure(self.step("init", k=k)), k, False)
            else:
                ahead = self._ahead("init", k)
                replies, rep, _ = self.send(
                    grid, nodes, self.step("init", k=k), "pretrain/init", k, ahead
                )
                self.log.add(rep)
                self.aggregate_contributions(reply_contents(replies), k)
            self.next_layer = k + 1
            done(f"pretrain init {k}")
        per_pass = rounds_per_pass_for(cfg.pretrain_cohort_fraction)
        rounds = cfg.pretrain_passes * per_pass
        bar = progress_bar(rounds, "federated pretraining (rounds)", cfg.progress)
        bar.update(self.next_round - 1)
        for r in range(self.next_round, rounds + 1):
            self._round(grid, nodes, r, per_pass, bar)
            self.next_round = r + 1
            done(f"pretrain round {r}")
        bar.close()
        if not self.finished:
            _, rep, _ = self.send(grid, nodes, self.step("final"), "final")
            self.log.add(rep)
            log(
                f"pretraining: {rounds} rounds ({cfg.pretrain_passes} passes); final vectors kept "
                f"on {len(rep.replied)}/{len(nodes)} nodes"
            )
            self.finished = True
            done("pretrain final")
        return self.server

    def _ahead(self, step: str, at: int) -> PretrainStep | None:
        """The step after ``init`` of layer ``at`` or ``round`` ``at`` (sparse downloads: its
        rows ride on this step's replies); ``None`` without sparse downloads."""
        cfg = self.cfg
        if not cfg.sparse_pretrain_downloads:
            return None
        per_pass = rounds_per_pass_for(cfg.pretrain_cohort_fraction)
        rounds = cfg.pretrain_passes * per_pass
        if step == "init" and at + 1 < cfg.layers:
            return self.step("init", k=at + 1)
        following = self.next_round if step == "init" else at + 1
        if following <= rounds:
            return self.step("round", round=following, rounds_per_pass=per_pass)
        return self.step("final")

    def _round(self, grid: Grid, nodes: list[int], r: int, per_pass: int, bar) -> None:
        cfg = self.cfg
        self.server.set_round(r)
        sample = node_sample(nodes, cfg.fraction_nodes, self.sampling_rng)
        step = self.step("round", round=r, rounds_per_pass=per_pass)
        if cfg.secure_rows:
            s = self._secure_round(grid, sample, self.configure(step), r, True)
            self.history.append({"round": r, **s})
            bar.update(1)
            return
        replies, rep, idle = self.send(grid, sample, step, "pretrain", r, self._ahead("round", r))
        contents = reply_contents(replies)
        self.log.add(rep, upload_users(contents))
        if len(replies) + idle < min(cfg.min_nodes, len(sample)):
            log(f"pretrain round {r}: {len(replies)} replies < min-nodes; round skipped")
            return
        s = self.aggregate_round(contents)
        self.history.append({"round": r, **s, "failed": len(rep.failed)})
        bar.update(1)
        loss = "kept on the devices" if s["loss"] is None else f"{s['loss']:.4f}"
        bar.set_postfix(loss=loss, failed=len(rep.failed))
