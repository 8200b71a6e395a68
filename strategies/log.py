"""What every exchange of a run cost and who took part: the log the report is built from."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from peel_fed.blocks import FLOAT32_BYTES
from peel_fed.fedconfig import FedConfig
from strategies.phases import PhaseReport

if TYPE_CHECKING:
    from strategies.stats import StatsResult


class PhaseLog:
    """Every exchange's report, plus the users each reply covered (for per-device bytes)."""

    def __init__(self, cfg: FedConfig, nodes: list[int]) -> None:
        self.cfg, self.nodes = cfg, nodes
        self.reports: list[PhaseReport] = []
        # (index of the first report, the nodes the run started or resumed with)
        self.starts: list[tuple[int, list[int]]] = [(0, list(nodes))]
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

    def resumed(self, nodes: list[int]) -> None:
        """A resumed run goes on with ``nodes`` (new ids after a restart): from the next
        exchange on they are the run's own nodes, not late joiners; the old ones are gone."""
        if len(self.reports) or nodes != self.nodes:
            self.starts.append((len(self.reports), list(nodes)))

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
        starts = dict(self.starts)
        start: set[int] = set()
        per_node: dict[str, dict[str, dict[str, int]]] = {
            str(n): {} for _, nodes in self.starts for n in nodes
        }
        late: dict[str, str] = {}
        gone: dict[str, str] = {}
        for i, r in enumerate(self.reports):
            phase = r.phase.split("/")[0]
            if i in starts:  # the run (re)started with these nodes
                for n in start - set(starts[i]):
                    gone.setdefault(str(n), "resume")
                start = set(starts[i])
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
        dense = (1 + cfg.layers) * stats.n_items * cfg.dim * FLOAT32_BYTES
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
