"""Server-side phase machinery: send a message to many nodes, collect replies, count bytes and
failures. Aggregation logic lives in ``peel_fed``; this module only moves records."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from peel_fed.sparse import sum_sparse


def _scalar_bytes(value) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    return 1 if isinstance(value, bool) else 8


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a RecordDict: array data, plus keys and values of configs and metrics.

    Config and metric records are counted here rather than with Flower's ``count_bytes``, which
    rejects empty strings in flwr 1.42.
    """
    total = 0
    for rec in content.values():
        if isinstance(rec, ArrayRecord):
            total += rec.count_bytes()
            continue
        for key, value in rec.items():
            values = value if isinstance(value, list) else [value]
            total += len(key) + sum(_scalar_bytes(v) for v in values)
    return total


@dataclass
class PhaseReport:
    """What one round of one phase cost and who took part."""

    phase: str
    round: int
    sent_to: list[int] = field(default_factory=list)
    replied: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict:
        down = list(self.bytes_down.values())
        up = list(self.bytes_up.values())
        return {
            "phase": self.phase,
            "round": self.round,
            "nodes": len(self.sent_to),
            "replied": len(self.replied),
            "failed": len(self.failed),
            "failures": {str(k): v for k, v in self.failed.items()},
            "bytes_down_per_node_mean": float(np.mean(down)) if down else 0.0,
            "bytes_up_per_node_mean": float(np.mean(up)) if up else 0.0,
            "bytes_down_total": int(sum(down)),
            "bytes_up_total": int(sum(up)),
            "seconds": self.seconds,
        }


def exchange(
    grid: Grid,
    node_ids: list[int],
    message_type: str,
    contents: dict[int, RecordDict] | RecordDict,
    timeout: float,
    phase: str,
    round_: int = 0,
) -> tuple[dict[int, Message], PhaseReport]:
    """Send ``message_type`` to every node and return the good replies keyed by node id.

    A node that raises, times out or vanishes is recorded in ``report.failed``; the phase goes on
    with the rest.
    """
    t0 = time.perf_counter()
    report = PhaseReport(phase=phase, round=round_, sent_to=list(node_ids))
    messages = []
    for node in node_ids:
        content = contents[node] if isinstance(contents, dict) else contents
        report.bytes_down[node] = record_bytes(content)
        messages.append(
            Message(
                content=content,
                dst_node_id=node,
                message_type=message_type,
                group_id=f"{phase}-{round_}",
            )
        )
    good: dict[int, Message] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            report.failed[node] = f"error: {reply.error.reason}"
            continue
        good[node] = reply
        report.replied.append(node)
        report.bytes_up[node] = record_bytes(reply.content)
    for node in node_ids:
        if node not in good and node not in report.failed:
            report.failed[node] = "no reply (timeout or node gone)"
    report.seconds = time.perf_counter() - t0
    return good, report


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[int]:
    """Node ids once at least ``min_nodes`` are connected (one-line error after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of min-nodes={min_nodes} nodes connected")
        time.sleep(0.5)


def data_spec(dataset: str, data_dir: str, seed: int) -> ConfigRecord:
    """What devices need to load their data (a node's own ``data-dir`` takes precedence)."""
    return ConfigRecord({"dataset": dataset, "data-dir": data_dir, "seed": seed})


def aggregate_item_counts(replies: dict[int, Message]) -> tuple[np.ndarray, int]:
    """Sum the nodes' sparse item counts into a popularity vector; also the hosted user count."""
    n_items = {int(r.content.metric_records["meta"]["n-items"]) for r in replies.values()}
    if len(n_items) != 1:
        raise ValueError(f"nodes disagree on the number of items: {sorted(n_items)}")
    parts = []
    users = 0
    for r in replies.values():
        rec = r.content.array_records["counts"]
        parts.append((rec["idx"].numpy(), rec["count"].numpy()))
        users += int(r.content.metric_records["meta"]["users"])
    return sum_sparse(n_items.pop(), parts), users
