"""Per-group PEE learning: all user groups in the same rounds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict
from flwr.serverapp import Grid

from clients.records import from_record_dict, to_record_dict
from peel_fed.console import log, progress_bar
from peel_fed.fedconfig import FedConfig
from peel_fed.fedlightgcn import rounds_per_pass_for
from peel_fed.fedpee import PEEGroupServer, PEEUpload
from peel_fed.messages import (
    Content,
    DataSpec,
    PEEDown,
    PEERound,
    ask_ahead,
    decode_pee_reply,
    decode_pee_row_counts,
    decode_pee_rows,
    decode_pee_rows_wanted,
    encode_pee_down,
    encode_pee_rows_down,
    encode_pee_rows_request,
    pee_row_unions,
)
from peel_fed.privacy import noised
from strategies.base import (
    PhaseStrategy,
    RowsAhead,
    node_sample,
    reply_contents,
    upload_users,
)
from strategies.grouping import GroupingResult
from strategies.log import PhaseLog
from strategies.phases import exchange
from strategies.stats import StatsResult


@dataclass
class PEEResult:
    servers: list[PEEGroupServer]
    history: list[dict]


class PEEStrategy(PhaseStrategy):
    """All user groups in the same rounds: each node gets the tables and weights of its groups;
    per group, row gradients are averaged into the table and the mean dL_val/d alpha steps the
    group's controller. ``servers`` holds one group server per user group."""

    def __init__(
        self,
        cfg: FedConfig,
        log: PhaseLog,
        data: DataSpec,
        stats: StatsResult,
        item_table: np.ndarray,
        groups: GroupingResult,
    ) -> None:
        super().__init__(cfg, log, data)
        self.layout, self.groups = stats.layout, groups
        pcfg = cfg.pee()
        self.dp = cfg.dp_settings()
        per_pass = rounds_per_pass_for(cfg.pee_cohort_fraction)
        self.servers = [
            PEEGroupServer(
                item_table,
                stats.train_popularity,
                self.layout,
                pcfg,
                cfg.seed * 1000 + g,
                self.dp,
                groups.sizes[g] / per_pass,
                noise_on_devices=cfg.distributed_dp,
            )
            for g in range(cfg.num_user_groups)
        ]
        # where the phase stands (a checkpoint keeps it)
        self.history: list[dict] = []
        self.next_round = 1
        self.sampling_rng = np.random.default_rng([cfg.seed, 13])
        self.rows_ahead = RowsAhead("pee", self._wanted)

    def round_settings(self, round_: int, rounds_per_pass: int) -> PEERound:
        cfg = self.cfg
        return PEERound(
            round=round_,
            rounds_per_pass=rounds_per_pass,
            local_steps=cfg.pee_local_steps,
            user_lr=cfg.pee_user_lr,
            num_blocks=cfg.num_blocks,
            dim=cfg.dim,
            num_item_groups=self.layout.num_item_groups,
            num_user_groups=cfg.num_user_groups,
            secure=cfg.secure_rows,
            dp_clip=cfg.dp_clip,
            dp_private=noised(self.dp) or cfg.ldp_noise_multiplier > 0,
            ldp_noise=cfg.ldp_noise_multiplier,
        )

    def configure(
        self,
        round_: PEERound,
        group_ids,
        rows: dict[int, np.ndarray] | None = None,
        ahead: PEERound | None = None,
    ) -> RecordDict:
        """The tables and unit weights of the user groups ``group_ids``, and the layout; with
        ``rows`` (a sparse download), only those rows of each group's table, and with ``ahead``
        the round whose rows the reply should name."""
        tables = {g: self.servers[g].table.numpy() for g in group_ids}
        alphas = {g: self.servers[g].weights() for g in tables}
        if rows is not None:
            tables = {g: t[rows[g]] for g, t in tables.items()}
        content = encode_pee_down(PEEDown(self.data, round_, tables, alphas, self.layout, rows))
        if ahead is not None:
            content = ask_ahead(content, "pee", ahead.to_config())
        return to_record_dict(content)

    def _wanted(self, content: Content) -> dict[int, np.ndarray]:
        return decode_pee_rows_wanted(content, self.layout.n_items, self.cfg.num_user_groups)

    def sparse_contents(
        self, grid: Grid, nodes: list[int], round_: PEERound, ahead: PEERound | None = None
    ) -> tuple[dict[int, RecordDict], int]:
        """Sparse downloads: each node gets just the rows of its groups' tables that its
        taking-part users read. It named them in its reply to the previous round (which named
        this one as the round ``ahead``), or else a ``query.peeread`` exchange asks it (the first
        round, a node that sat out or failed the previous one, a resumed server). A node none of
        whose users takes part is not sent anything; returns the contents and how many such
        idle nodes answered."""
        settings = round_.to_config()
        wanted = {n: rows for n in nodes if (rows := self.rows_ahead.get(n, settings)) is not None}
        if unasked := [n for n in nodes if n not in wanted]:
            ask = to_record_dict(encode_pee_rows_request(self.data, round_))
            timeout, r = self.cfg.round_timeout_s, round_.round
            asked, rep = exchange(grid, unasked, "query.peeread", ask, timeout, "pee-ask", r)
            self.log.add(rep)
            for node, content in reply_contents(asked).items():
                wanted[node] = self._wanted(from_record_dict(content))
        contents, idle = {}, 0
        empty = np.zeros(0, dtype=np.int64)
        for node in (n for n in nodes if n in wanted):
            groups = self.groups.node_groups[node]
            rows = {g: wanted[node].get(g, empty) for g in groups}
            if any(r.size for r in rows.values()):
                contents[node] = self.configure(round_, groups, rows, ahead)
            else:
                idle += 1
        return contents, idle

    def aggregate(self, replies: dict[int, RecordDict]) -> list[dict[str, float]]:
        """A round in the clear: every node's upload of each of its groups goes to that group's
        server (in arrival order); returns each group's round statistics."""
        uploads: list[list[PEEUpload]] = [[] for _ in self.servers]
        for node, content in replies.items():
            per_group = decode_pee_reply(from_record_dict(content), self.layout.num_item_groups)
            for g in self.groups.node_groups[node]:
                uploads[g].append(per_group[g])
        return [s.apply(u) for s, u in zip(self.servers, uploads, strict=True)]

    def configure_rows(
        self, total: np.ndarray, round_: PEERound, noise_std: float = 0.0
    ) -> tuple[np.ndarray, list[np.ndarray], RecordDict]:
        """Secure rows, between the halves: the summed per-group row counts, each group's row
        union, and the message that sends the unions (under distributed DP every row of every
        group, since the devices send no row counts, and each node's noise share
        ``noise_std``)."""
        counts = decode_pee_row_counts(total, self.cfg.num_user_groups, self.layout.n_items)
        if self.cfg.distributed_dp:
            counts = np.ones_like(counts)
        unions = pee_row_unions(counts)
        down = encode_pee_rows_down(self.data, round_, unions, noise_std, self.cfg.dp_noise_source)
        return counts, unions, to_record_dict(down)

    def aggregate_rows(
        self, values: np.ndarray, counts: np.ndarray, unions: list[np.ndarray]
    ) -> list[dict[str, float]]:
        """Secure rows: apply each group's summed upload."""
        uploads = decode_pee_rows(values, counts, unions, self.layout)
        return [s.apply([u]) for s, u in zip(self.servers, uploads, strict=True)]

    def _secure_round(
        self, grid: Grid, nodes: list[int], round_: PEERound
    ) -> list[dict[str, float]]:
        """Secure rows: masked per-group row counts, then per group the masked gradients over the
        group's row union with dL_val/d alpha and loss statistics; only sums reach the server.
        Every group's table goes to every node (one content for all)."""
        timeout, r = self.cfg.round_timeout_s, round_.round
        content = self.configure(round_, range(self.cfg.num_user_groups))
        total, counted, reports = self.secure_sum(
            grid, nodes, "train.pee", content, timeout, "pee", r
        )
        self.log.add(reports)
        shares, noise_std = self.noise_shares(counted)
        counts, unions, down = self.configure_rows(total, round_, noise_std)
        values, _, reports = self.secure_sum(
            grid, counted, "train.peerows", down, timeout, "pee/rows", r, shares
        )
        self.log.add(reports)
        return self.aggregate_rows(values, counts, unions)

    def run(
        self, grid: Grid, nodes: list[int], on_step: Callable[[str], None] | None = None
    ) -> PEEResult:
        """Run the rounds not done yet (all, unless resumed from a checkpoint); ``on_step`` is
        called after each (``"pee round 3"``)."""
        cfg = self.cfg
        per_pass = rounds_per_pass_for(cfg.pee_cohort_fraction)
        bar = progress_bar(cfg.pee_rounds, "PEE learning (rounds)", cfg.progress)
        bar.update(self.next_round - 1)
        members = [n for n in nodes if n in self.groups.node_groups]
        for r in range(self.next_round, cfg.pee_rounds + 1):
            sample = node_sample(members, cfg.fraction_nodes, self.sampling_rng)
            self._round(grid, sample, self.round_settings(r, per_pass), bar)
            self.next_round = r + 1
            if on_step:
                on_step(f"pee round {r}")
        bar.close()
        log(f"PEE learning: {cfg.pee_rounds} rounds for {cfg.num_user_groups} user groups")
        return PEEResult(self.servers, self.history)

    def _round(self, grid: Grid, sample: list[int], round_: PEERound, bar) -> None:
        cfg, r = self.cfg, round_.round
        if cfg.secure_rows:
            self.history.append({"round": r, "groups": self._secure_round(grid, sample, round_)})
            bar.update(1)
            return
        if cfg.sparse_pee_downloads:
            ahead = None
            if r < cfg.pee_rounds:
                ahead = self.round_settings(r + 1, round_.rounds_per_pass)
            contents, idle = self.sparse_contents(grid, sample, round_, ahead)
        else:
            groups = self.groups.node_groups
            contents, idle = {node: self.configure(round_, groups[node]) for node in sample}, 0
        replies, rep = exchange(
            grid, list(contents), "train.pee", contents, cfg.round_timeout_s, "pee", r
        )
        answered = reply_contents(replies)
        if cfg.sparse_pee_downloads:
            self.rows_ahead.remember(answered)
        self.log.add(rep, upload_users(answered))
        if len(replies) + idle < min(cfg.min_nodes, len(sample)):
            log(f"PEE round {r}: {len(replies)} replies < min-nodes; round skipped")
            return
        self.history.append(
            {"round": r, "groups": self.aggregate(answered), "failed": len(rep.failed)}
        )
        bar.update(1)
        bar.set_postfix(failed=len(rep.failed))
