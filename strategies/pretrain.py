"""Federated LightGCN pretraining: round 0 collects first contributions layer by layer; each
round sends the item layers, averages the sparse ``E0`` row gradients over the devices that
touched each row and adds the contribution changes to the item-side sums."""

from __future__ import annotations

from collections.abc import Callable

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
    decode_contribution,
    decode_device_update,
    decode_pretrain_row_counts,
    decode_pretrain_rows,
    encode_pretrain_down,
    encode_rows_down,
)
from peel_fed.privacy import noised
from strategies.base import PhaseStrategy, node_sample, reply_contents, upload_users
from strategies.log import PhaseLog
from strategies.phases import exchange
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
        )
        self.history: list[dict] = []
        # where the phase stands (a checkpoint keeps it): next init layer, next round, final sent
        self.next_layer, self.next_round, self.finished = 0, 1, False
        self.sampling_rng = np.random.default_rng([cfg.seed, 11])

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

    def configure(self, step: PretrainStep) -> RecordDict:
        """The item layers as they are now, the fit item degree and the step's settings."""
        layers = [layer.numpy() for layer in self.server.item_layers()]
        down = PretrainDown(self.data, step, layers, self.stats.fit_degree)
        return to_record_dict(encode_pretrain_down(down))

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

    def configure_rows(self, total: np.ndarray) -> tuple[RowCounts, RecordDict]:
        """Secure rows, between the halves: the summed row counts, and the row union to send."""
        first = decode_pretrain_row_counts(total, self.stats.n_items)
        return first, to_record_dict(encode_rows_down(self.data, first.union))

    def aggregate_rows(self, values: np.ndarray, first: RowCounts, has_grad: bool) -> dict:
        """Secure rows: apply the cohort's summed update (``has_grad`` False for ``init``)."""
        cfg = self.cfg
        return self.server.apply(
            [decode_pretrain_rows(values, first, cfg.layers, cfg.dim, has_grad)]
        )

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
        first, down = self.configure_rows(total)
        values, _, reports = self.secure_sum(
            grid, counted, "train.rows", down, timeout, f"{phase}/rows", round_
        )
        self.log.add(reports)
        return self.aggregate_rows(values, first, has_grad)

    def run(
        self, grid: Grid, nodes: list[int], on_step: Callable[[str], None] | None = None
    ) -> PretrainServer:
        """Run the steps not done yet (all, unless resumed from a checkpoint); ``on_step`` is
        called after each (``"pretrain init 0"``, ``"pretrain round 3"``, ``"pretrain final"``)."""
        cfg = self.cfg
        timeout = cfg.round_timeout_s
        done = on_step or (lambda _: None)
        for k in range(self.next_layer, cfg.layers):
            content = self.configure(self.step("init", k=k))
            if cfg.secure_rows:
                self._secure_round(grid, nodes, content, k, False)
            else:
                replies, rep = exchange(
                    grid, nodes, "train.pretrain", content, timeout, "pretrain/init", k
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
            content = self.configure(self.step("final"))
            _, rep = exchange(grid, nodes, "train.pretrain", content, timeout, "final")
            self.log.add(rep)
            log(
                f"pretraining: {rounds} rounds ({cfg.pretrain_passes} passes); final vectors kept "
                f"on {len(rep.replied)}/{len(nodes)} nodes"
            )
            self.finished = True
            done("pretrain final")
        return self.server

    def _round(self, grid: Grid, nodes: list[int], r: int, per_pass: int, bar) -> None:
        cfg = self.cfg
        self.server.set_round(r)
        sample = node_sample(nodes, cfg.fraction_nodes, self.sampling_rng)
        content = self.configure(self.step("round", round=r, rounds_per_pass=per_pass))
        if cfg.secure_rows:
            s = self._secure_round(grid, sample, content, r, True)
            self.history.append({"round": r, **s})
            bar.update(1)
            return
        replies, rep = exchange(
            grid, sample, "train.pretrain", content, cfg.round_timeout_s, "pretrain", r
        )
        contents = reply_contents(replies)
        self.log.add(rep, upload_users(contents))
        if len(replies) < min(cfg.min_nodes, len(sample)):
            log(f"pretrain round {r}: {len(replies)} replies < min-nodes; round skipped")
            return
        s = self.aggregate_round(contents)
        self.history.append({"round": r, **s, "failed": len(rep.failed)})
        bar.update(1)
        loss = "kept on the devices" if s["loss"] is None else f"{s['loss']:.4f}"
        bar.set_postfix(loss=loss, failed=len(rep.failed))
