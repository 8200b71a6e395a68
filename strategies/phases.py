"""Server-side phase machinery: send a message to many nodes, collect replies, count bytes and
failures. Aggregation logic lives in ``peel_fed``; this module only moves records.

Long file: a little over 400 lines, as both secure-sum protocols (pairwise masks over a mask
graph, and Shamir double masking) are written out here next to the exchange they drive.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from clients.records import from_record_dict, to_record_dict
from peel_fed.messages import (
    decode_masked,
    decode_masked_key,
    decode_public_key,
    decode_revealed,
    decode_share_ciphertexts,
    decode_shares_revealed,
    encode_inbox,
    encode_peer_keys,
    encode_session,
    encode_share_request,
    encode_unmask_request,
)
from peel_fed.secagg import FixedPoint, SecAggServer, auto_degree, connected, mask_graph
from peel_fed.secagg_shamir import (
    Reveal,
    ShamirSecAggServer,
    check_threshold,
    relay,
    unmask_request,
)


def _scalar_bytes(value) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    return 1 if isinstance(value, bool) else 8


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a RecordDict: array data, plus keys and values of configs and metrics.

    Config and metric records are counted here rather than with Flower's ``count_bytes``, which
    rejects empty strings in flwr 1.42. A ``timing`` record (opt-in instrumentation) is not
    payload and is not counted.
    """
    total = 0
    for name, rec in content.items():
        if name == "timing":
            continue
        if isinstance(rec, ArrayRecord):
            total += rec.count_bytes()
            continue
        for key, value in rec.items():
            values = value if isinstance(value, list) else [value]
            total += len(key) + sum(_scalar_bytes(v) for v in values)
    return total


@dataclass
class PhaseReport:
    """What one round of one phase cost and who took part.

    ``online`` is the set of nodes the SuperLink listed as connected when the exchange started
    (late joiners show up here first); ``timing`` holds, per replying node, the device-side
    timestamps a ``timing`` reply record carried (see ``clients.timing.timing_mod``).
    """

    phase: str
    round: int
    sent_to: list[int] = field(default_factory=list)
    replied: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    online: list[int] = field(default_factory=list)
    pushed_at: float = 0.0
    received_at: dict[int, float] = field(default_factory=dict)
    timing: dict[int, dict[str, float]] = field(default_factory=dict)

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


POLL_SECONDS = 0.1
# Set by the launcher on Ctrl-C or SIGTERM (``sim.simulate``): the ServerApp, which Flower's
# simulation runs in a thread of its own, stops at its next poll instead of waiting out the round
# timeout (the process cannot exit while that thread runs).
STOP = threading.Event()


class Interrupted(RuntimeError):
    """The run was interrupted (``STOP`` was set) while the server waited for nodes."""


def _check_stop() -> None:
    if STOP.is_set():
        raise Interrupted("interrupted: the server stopped waiting for nodes")


"""How often the server asks the SuperLink for replies (Flower's own ``send_and_receive`` waits
3 s between asks, which in deployment adds about 1.5 s to every exchange)."""


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

    A node that raises, times out, is no longer connected, or that the SuperLink reports as
    unavailable (no heartbeat) is recorded in ``report.failed``; the phase goes on with the rest.
    """
    _check_stop()  # fast rounds may never wait for a reply, so look before each exchange too
    t0 = time.perf_counter()
    report = PhaseReport(phase=phase, round=round_, sent_to=list(node_ids))
    report.online = sorted(grid.get_node_ids())
    online = set(report.online)
    messages = []
    for node in node_ids:
        if node not in online:
            report.failed[node] = "offline (not connected when the exchange started)"
            continue
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
    report.pushed_at = time.time()
    grid.push_messages(messages)
    # the reply names the message it answers; the SuperLink's own error replies (node
    # unavailable) come from the SuperLink, not from the node
    pending = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    good: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            report.received_at[node] = time.time()
            if reply.has_error():
                report.failed[node] = f"error: {_last_line(reply.error.reason)}"
                continue
            good[node] = reply
            report.replied.append(node)
            report.bytes_up[node] = record_bytes(reply.content)
            if "timing" in reply.content.config_records:
                rec = reply.content.config_records["timing"]
                report.timing[node] = {k: float(v) for k, v in rec.items()}
        if not pending or time.monotonic() >= deadline:
            break
        _check_stop()
        time.sleep(POLL_SECONDS)
    for node in pending.values():
        report.failed[node] = "no reply (timeout or node gone)"
    report.seconds = time.perf_counter() - t0
    return good, report


def _last_line(text: str) -> str:
    """The last non-empty line of an error text (Ray wraps the device's exception in a trace)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[-1] if lines else str(text)


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> list[int]:
    """Node ids once at least ``min_nodes`` are connected (one-line error after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of min-nodes={min_nodes} nodes connected")
        _check_stop()
        time.sleep(0.5)


def shamir_threshold(fraction: float, n: int) -> int:
    """``t`` for a cohort of ``n`` nodes: ``max(ceil(fraction * n), n // 2 + 1)``, at most ``n``
    (``fraction`` is run config ``secagg-threshold``, in (0.5, 1])."""
    t = min(n, max(math.ceil(round(fraction * n, 9)), n // 2 + 1))
    check_threshold(t, n)
    return t


def secure_sum(
    grid: Grid,
    node_ids: list[int],
    message_type: str,
    content: RecordDict,
    timeout: float,
    phase: str,
    round_: int = 0,
    protocol: str = "pairwise",
    threshold: float = 0.67,
    min_uploads: int = 0,
    neighbours: int = 0,
) -> tuple[np.ndarray, list[int], list[PhaseReport]]:
    """Sum of one vector per node, by secure aggregation: pairwise masks (``peel_fed.secagg``)
    over a mask graph of ``neighbours`` per node (0: ``auto_degree``) or, with
    ``protocol="shamir"``, double masking with Shamir shares (:func:`shamir_sum`, whose
    threshold is ``shamir_threshold(threshold, cohort)``). Under ``min_uploads`` masked vectors
    (distributed DP: each carries a share of the noise) it raises and unmasks nothing.

    Pairwise, three exchanges: ``query.keys`` (public keys up), ``message_type`` (the cohort's
    keys down, masked vectors up; ``content`` goes along), and, only if nodes dropped out in
    between, ``query.reveal`` (the survivors' round keys with the dropped nodes). Returns the sum
    over the nodes whose vector arrived, those node ids, and a report per exchange. If a survivor
    fails to reveal, its own vector cannot be unmasked and the phase raises.
    """
    if protocol == "shamir":
        return shamir_sum(
            grid, node_ids, message_type, content, timeout, phase, round_, threshold, min_uploads
        )
    if protocol != "pairwise":
        raise ValueError(f"{phase}: unknown secure-aggregation protocol {protocol!r}")
    reports: list[PhaseReport] = []
    round_tag = os.urandom(16)  # names the session: a node keeps its key for this tag only
    ask_keys = to_record_dict(encode_session(round_tag))
    replies, rep = exchange(
        grid, node_ids, "query.keys", ask_keys, timeout, f"{phase}/keys", round_
    )
    reports.append(rep)
    public = {n: decode_public_key(from_record_dict(r.content)) for n, r in replies.items()}
    cohort = _cohort(public, rep, phase)
    degree = neighbours or auto_degree(len(cohort))
    graph = mask_graph(cohort, degree, np.random.default_rng(list(round_tag)))
    near = {n: {j: public[j] for j in sorted(graph[n] | {n})} for n in cohort}
    downs = {}
    for n in cohort:  # each node gets its mask neighbours' keys only
        downs[n] = RecordDict({name: rec for name, rec in content.items()})
        downs[n]["secagg"] = ConfigRecord(encode_peer_keys(near[n], round_tag))
    replies, rep = exchange(grid, cohort, message_type, downs, timeout, phase, round_)
    reports.append(rep)
    masked, length = _masked_uploads(replies, rep, public, phase)
    _enough_noise(len(masked), min_uploads, rep, phase)
    dropped = [n for n in cohort if n not in masked]
    revealed: dict[int, dict[int, bytes]] = {}
    if dropped:
        if not connected(list(masked), graph):  # a cut-off part's sum would be exposed
            raise RuntimeError(
                f"{phase}: {len(dropped)} dropouts cut the mask graph (degree {degree}) of "
                f"{len(cohort)} nodes; the sum stays masked" + _reasons(rep)
            )
        asks = {
            n: RecordDict(
                {
                    "secagg": ConfigRecord(
                        encode_peer_keys(near[n], round_tag, sorted(set(dropped) & graph[n]))
                    )
                }
            )
            for n in sorted(masked)
            if graph[n] & set(dropped)
        }
        replies, rep = exchange(
            grid, list(asks), "query.reveal", asks, timeout, f"{phase}/reveal", round_
        )
        reports.append(rep)
        revealed = {n: decode_revealed(from_record_dict(r.content)) for n, r in replies.items()}
    total = SecAggServer().unmask_sum(masked, cohort, revealed, length, FixedPoint(), graph)
    return total, sorted(masked), reports


def _reasons(rep: PhaseReport) -> str:
    reasons = "; ".join(sorted(set(rep.failed.values())))
    return f" ({reasons})" if reasons else ""


def _enough_noise(uploads: int, needed: int, rep: PhaseReport, phase: str) -> None:
    """Distributed DP: refuse to unmask a sum of fewer noise shares than the noise assumes."""
    if uploads < needed:
        why = f"at least the {needed} noise shares it was noised for; the sum stays masked"
        raise RuntimeError(
            f"{phase}: {uploads} masked uploads arrived, and distributed DP "
            f"unmasks a sum only with {why}{_reasons(rep)}"
        )


def _cohort(public: dict[int, bytes], rep: PhaseReport, phase: str) -> list[int]:
    """The nodes whose public keys arrived (at least 2)."""
    if len(public) < 2:
        raise RuntimeError(
            f"{phase}: secure aggregation needs at least 2 nodes, got {len(public)}" + _reasons(rep)
        )
    return sorted(public)


def _masked_uploads(
    replies: dict[int, Message], rep: PhaseReport, public: dict[int, bytes], phase: str
) -> tuple[dict[int, np.ndarray], int]:
    """The masked uploads masked under the session's keys (others are dropouts) and their
    common length; at least 2 of them."""
    masked = {}
    for n, r in replies.items():
        up = from_record_dict(r.content)
        if decode_masked_key(up) != public[n]:  # its masks would not cancel: a dropout
            rep.failed[n] = "masked under another key than the session's"
            rep.replied.remove(n)
            continue
        masked[n] = decode_masked(up)
    if not masked:
        raise RuntimeError(f"{phase}: no node sent its masked vector{_reasons(rep)}")
    if len(masked) < 2:
        # unmasking one survivor's upload would hand the server that node's own vector
        raise RuntimeError(
            f"{phase}: only {len(masked)} node sent its masked vector; "
            "secure aggregation needs at least 2 survivors"
        )
    lengths = {n: m.shape[0] for n, m in masked.items()}
    if len(set(lengths.values())) > 1:
        raise RuntimeError(
            f"{phase}: nodes sent vectors of different lengths {lengths} (do they load the same "
            "dataset and agree on num-partitions?)"
        )
    return masked, next(iter(lengths.values()))


def _enough(left: int, t: int, n: int, rep: PhaseReport, phase: str, step: str) -> None:
    if left < t:
        raise RuntimeError(
            f"{phase}: secure aggregation (shamir) has {left} of {n} nodes left after {step}, "
            f"fewer than the threshold t={t}{_reasons(rep)}"
        )


def shamir_sum(
    grid: Grid,
    node_ids: list[int],
    message_type: str,
    content: RecordDict,
    timeout: float,
    phase: str,
    round_: int = 0,
    threshold: float = 0.67,
    min_uploads: int = 0,
) -> tuple[np.ndarray, list[int], list[PhaseReport]]:
    """Sum of one vector per node by double masking with Shamir shares (``peel_fed.secagg_shamir``).

    Four exchanges, always: ``query.keys`` (the session; 64 B of public keys up), ``query.shares``
    (the cohort's keys and ``t`` down, a share ciphertext per peer up, relayed by the server),
    ``message_type`` (``content`` with the node's inbox of ciphertexts down, the masked vector up)
    and ``query.reveal`` (survivors and dropped down, shares up). A node failing at any step is a
    dropout; fewer than ``t`` nodes left at any step raises. Returns the sum over the nodes whose
    upload was accepted, those node ids, and a report per exchange.
    """
    reports: list[PhaseReport] = []
    round_tag = os.urandom(16)
    ask = to_record_dict(encode_session(round_tag, "shamir"))
    replies, rep = exchange(grid, node_ids, "query.keys", ask, timeout, f"{phase}/keys", round_)
    reports.append(rep)
    public = {n: decode_public_key(from_record_dict(r.content)) for n, r in replies.items()}
    n = len(_cohort(public, rep, phase))
    t = shamir_threshold(threshold, n)
    ask = to_record_dict(encode_share_request(public, round_tag, t))
    replies, rep = exchange(
        grid, sorted(public), "query.shares", ask, timeout, f"{phase}/shares", round_
    )
    reports.append(rep)
    outgoing = {
        s: decode_share_ciphertexts(from_record_dict(r.content)) for s, r in replies.items()
    }
    shared = sorted(outgoing)
    _enough(len(shared), t, n, rep, phase, "query.shares")
    inbox = relay(outgoing)
    downs = {}
    for node in shared:
        downs[node] = RecordDict({name: rec for name, rec in content.items()})
        downs[node]["secagg"] = ConfigRecord(encode_inbox(inbox.get(node, {}), round_tag))
    replies, rep = exchange(grid, shared, message_type, downs, timeout, phase, round_)
    reports.append(rep)
    masked, length = _masked_uploads(replies, rep, public, phase)
    _enough(len(masked), t, n, rep, phase, message_type)
    _enough_noise(len(masked), min_uploads, rep, phase)
    survivors, dropped = unmask_request(shared, masked)
    ask = RecordDict({"secagg": ConfigRecord(encode_unmask_request(round_tag, survivors, dropped))})
    replies, rep = exchange(
        grid, survivors, "query.reveal", ask, timeout, f"{phase}/reveal", round_
    )
    reports.append(rep)
    reveals = {
        r: Reveal(*decode_shares_revealed(from_record_dict(m.content))) for r, m in replies.items()
    }
    _enough(len(reveals), t, n, rep, phase, "query.reveal")
    try:
        total = ShamirSecAggServer(t).unmask_sum(masked, reveals, public, shared, round_tag, length)
    except ValueError as exc:
        raise RuntimeError(f"{phase}: {exc}") from None
    return total, survivors, reports
