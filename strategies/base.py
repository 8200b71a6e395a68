"""What every phase strategy shares: the run config, the data to name, the log, client sampling.

A phase strategy has ``configure`` steps (build a message's contents from the server state) and
``aggregate`` steps (decode the reply contents, or a secure sum, and call the core); its ``run``
only loops configure -> exchange -> aggregate. ``configure`` and ``aggregate`` take and return
plain objects (``RecordDict`` contents, numpy arrays), so they are tested without a grid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from clients.records import from_record_dict
from peel_fed.fedconfig import FedConfig
from peel_fed.messages import DataSpec, answered_ahead, decode_upload_users
from peel_fed.privacy import noise_share_std
from strategies.log import PhaseLog
from strategies.phases import PhaseReport, secure_sum, shamir_threshold


class PhaseStrategy:
    """A phase of the pipeline: the run config, the data devices load, and the log every
    exchange is written to."""

    def __init__(self, cfg: FedConfig, log: PhaseLog, data: DataSpec) -> None:
        self.cfg, self.log, self.data = cfg, log, data

    def secure_sum(
        self,
        grid: Grid,
        node_ids: list[int],
        message_type: str,
        content: RecordDict,
        timeout: float,
        phase: str,
        round_: int = 0,
        min_uploads: int = 0,
    ) -> tuple[np.ndarray, list[int], list[PhaseReport]]:
        """:func:`strategies.phases.secure_sum` with the run's protocol (run config ``secagg``
        and ``secagg-threshold``): the one place a phase reads them."""
        return secure_sum(
            grid,
            node_ids,
            message_type,
            content,
            timeout,
            phase,
            round_,
            protocol=self.cfg.secagg,
            threshold=self.cfg.secagg_threshold,
            min_uploads=min_uploads,
            neighbours=self.cfg.secagg_neighbours,
        )

    def noise_shares(self, nodes: list[int]) -> tuple[int, float]:
        """Distributed DP, for a secure sum over ``nodes``: the fewest uploads it may be unmasked
        with (all of them with pairwise masks, the threshold with Shamir shares) and the standard
        deviation of each node's noise share; (0, 0.0) without distributed DP."""
        if not self.cfg.distributed_dp:
            return 0, 0.0
        n = len(nodes)
        shares = (
            shamir_threshold(self.cfg.secagg_threshold, n) if self.cfg.secagg == "shamir" else n
        )
        return shares, noise_share_std(self.cfg.dp_settings(), shares)


def reply_contents(replies: dict[int, Message]) -> dict[int, RecordDict]:
    """The contents of good replies by node id (in the order they arrived)."""
    return {node: reply.content for node, reply in replies.items()}


class RowsAhead:
    """Sparse downloads: the rows each node named, in its last reply, for the next step of
    ``kind`` ("pretrain" or "pee"; ``peel_fed.messages.answered_ahead``), decoded by ``decode``
    as an ask's answer. A resumed run's new node ids name nothing here, so those nodes are asked.
    """

    def __init__(self, kind: str, decode: Callable) -> None:
        self.kind, self.decode = kind, decode
        self.named: dict[int, tuple[dict, object]] = {}

    def get(self, node: int, settings: dict):
        """What ``node`` named for the step of ``settings`` (as the wire carries them), or
        ``None``."""
        named = self.named.get(node)
        return named[1] if named is not None and named[0] == settings else None

    def remember(self, replies: dict[int, RecordDict]) -> None:
        """Keep what each of ``replies`` named for the next step (and forget the rest)."""
        self.named = {}
        for node, content in replies.items():
            found = answered_ahead(from_record_dict(content), self.kind)
            if found is not None:
                self.named[node] = (found[0], self.decode(found[1]))


def node_sample(nodes: list[int], fraction: float, rng: np.random.Generator) -> list[int]:
    """Client sampling: a seeded ``fraction`` of the nodes (at least one)."""
    if fraction >= 1.0:
        return list(nodes)
    k = max(1, int(round(fraction * len(nodes))))
    return sorted(rng.choice(nodes, size=k, replace=False).tolist())


def upload_users(replies: dict[int, RecordDict]) -> dict[int, tuple[int, int]]:
    """Per node of a clear training round: taking-part users and the bytes they would upload
    alone (for the bytes log)."""
    return {
        node: decode_upload_users(from_record_dict(c, with_arrays=False))
        for node, c in replies.items()
    }
