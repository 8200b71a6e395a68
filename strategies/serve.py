"""Serving each device its own PEE (:mod:`peel_fed.fedserve`): offer, units, on-device drill,
growing back.

Five exchanges: ``query.offer`` (the unit orders of each node's groups; the node answers with
the units it needs), ``query.units`` (exactly those), ``evaluate.served`` (Recall@20 at the own
budget and after each drill cut, ranking with what the device holds, by secure aggregation),
then ``query.offer`` and ``query.units`` again: after the drill a device grows back to its own
budget by asking for the units it dropped.
"""

from __future__ import annotations

import numpy as np
from flwr.serverapp import Grid

from clients.records import from_record_dict, to_record_dict
from peel_fed.console import log
from peel_fed.fedplanes import PlaneOrders
from peel_fed.fedserve import encode_units, serve_overhead_bytes, serve_units
from peel_fed.messages import (
    ServeOffer,
    decode_held,
    decode_wanted,
    encode_serve_offer,
    encode_units_down,
)
from peel_fed.own_budget import own_budget_rows
from strategies.base import PhaseStrategy
from strategies.grouping import GroupingResult
from strategies.phases import exchange
from strategies.stats import StatsResult


class ServeStrategy(PhaseStrategy):
    """Each node downloads the bit-plane units its users' budgets hold, and nothing else."""

    def offer(self, group_ids: list[int], planes: PlaneOrders, stats: StatsResult) -> ServeOffer:
        cfg = self.cfg
        return ServeOffer(
            self.data,
            {g: planes.orders[g] for g in group_ids},
            stats.layout.item_groups,
            cfg.dim,
            tuple(cfg.budget_list("device_budgets")),
            stats.layout.full_table_bytes,
            tuple(cfg.drill_fractions()),
        )

    def fetch(
        self,
        grid: Grid,
        nodes: list[int],
        groups: GroupingResult,
        planes: PlaneOrders,
        stats: StatsResult,
        phase: str,
    ) -> dict[int, dict]:
        """An offer, then the units each node asked for; per node, what it cost."""
        timeout = self.cfg.round_timeout_s
        offers = {n: self.offer(groups.node_groups[n], planes, stats) for n in nodes}
        contents = {n: to_record_dict(encode_serve_offer(o)) for n, o in offers.items()}
        replies, rep = exchange(grid, nodes, "query.offer", contents, timeout, phase)
        self.log.add(rep)
        code, item_groups = planes.code, stats.layout.item_groups
        wanted = {n: decode_wanted(from_record_dict(r.content)) for n, r in replies.items()}
        units = {n: serve_units(code, item_groups, w) for n, w in wanted.items()}
        down = {
            n: to_record_dict(encode_units_down(self.data, *encode_units(u)))
            for n, u in units.items()
        }
        replies, rep2 = exchange(grid, sorted(down), "query.units", down, timeout, f"{phase}/units")
        self.log.add(rep2)
        out = {}
        for n, reply in replies.items():
            offered = sum(len(o) for o in offers[n].orders.values())
            held, budget = decode_held(from_record_dict(reply.content))
            out[n] = {
                "groups": groups.node_groups[n],
                "units": len(units[n]),
                "payload_bytes": sum(u.nbytes for u in units[n]),
                "bytes_down": rep.bytes_down[n] + rep2.bytes_down[n],
                "stated_overhead_bytes": serve_overhead_bytes(
                    stats.n_items, offered, len(units[n]), 2
                ),
                "held_bytes": held,
                "budget_bytes": budget,
            }
        return out

    def serve(
        self,
        grid: Grid,
        nodes: list[int],
        groups: GroupingResult,
        planes: PlaneOrders,
        stats: StatsResult,
    ) -> dict[int, dict]:
        """Every node in a group gets its own units; per node, what it cost."""
        members = [n for n in nodes if groups.node_groups.get(n)]
        first = self.fetch(grid, members, groups, planes, stats, "serve")
        if not first:
            reasons = "; ".join(
                sorted({r for p in self.log.reports[-2:] for r in p.failed.values()})
            )
            raise RuntimeError(
                f"serving: no node got its units ({reasons or 'no node in a group'})"
            )
        over = [n for n, c in first.items() if c["bytes_down"] > _allowed(c)]
        log(
            f"serving: {len(first)}/{len(nodes)} nodes got their own units "
            f"(median {np.median([c['payload_bytes'] for c in first.values()]):,.0f} B)"
            + (f"; over budget plus overhead: {over}" if over else "")
        )
        return first

    def evaluate(
        self, grid: Grid, nodes: list[int], planes: PlaneOrders, stats: StatsResult
    ) -> tuple[np.ndarray, list[int]]:
        """``evaluate.served``: the drill's sums, ranked with the units each node holds (when
        the method comparison does not carry them); the sum and the nodes in it."""
        spec = to_record_dict(encode_serve_offer(self.offer([], planes, stats)))
        total, contributed, reports = self.secure_sum(
            grid, nodes, "evaluate.served", spec, self.cfg.evaluate_timeout_s, "serve/evaluate"
        )
        self.log.add(reports)
        return total, contributed

    def drill_rows(self, total: np.ndarray, stats: StatsResult) -> list[dict]:
        cfg = self.cfg
        return own_budget_rows(
            total.reshape(-1, 3),
            cfg.budget_list("device_budgets"),
            cfg.drill_fractions(),
            stats.layout.full_table_bytes,
        )

    def grow_back(
        self,
        grid: Grid,
        nodes: list[int],
        groups: GroupingResult,
        planes: PlaneOrders,
        stats: StatsResult,
    ) -> dict[int, dict]:
        """After the drill, each node asks for the units it dropped."""
        grown = self.fetch(grid, nodes, groups, planes, stats, "serve/grow")
        log(f"serving: {len(grown)}/{len(nodes)} nodes grew back to their budget after the drill")
        return grown


def _allowed(cost: dict) -> int:
    """What a node may download: the units' payload (at most its budget) plus the stated
    overhead."""
    return cost["payload_bytes"] + cost["stated_overhead_bytes"]
