"""What a node keeps: its data (cached per process) and the device state in ``context.state``.

``context.state`` persists between the messages of a run on a node in both runtimes; module
globals do not in deployment (a fresh process per message), so the data cache is a speed-up only.
State records, by name: ``secagg`` (this node's secure-aggregation key), ``pretrain`` (ego
vectors, their Adam moments, last contributions), ``pretrain-pending`` and ``pee-pending``
(an upload held back between the two halves of a secure-rows round), ``user-vectors`` (final
pretrained user vectors), ``group`` (each hosted user's group), ``pee`` (PEE user vectors and
their moments).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Context

from clients.records import from_array_record, to_array_record
from peel_fed.data import Dataset, Interactions, TrainValSplit, split_validation
from peel_fed.loading import load_dataset
from peel_fed.messages import Arrays, DataSpec
from peel_fed.partition import partition_users
from peel_fed.renames import RENAMED_NODE_CONFIG_KEYS, renamed_key
from peel_fed.secagg import SecAggClient

if TYPE_CHECKING:
    from peel_fed.lightgcn import NegativeSampler


@dataclass
class NodeData:
    """The dataset, its fit/validation split and the ids of the users this node hosts."""

    ds: Dataset
    users: np.ndarray
    split: TrainValSplit

    @cached_property
    def fit_sampler(self) -> NegativeSampler:
        from peel_fed.lightgcn import NegativeSampler

        return NegativeSampler(self.split.fit, self.ds.n_items)

    def items_of(self, edges: Interactions) -> np.ndarray:
        """The items of the hosted users' interactions in ``edges`` (users are contiguous)."""
        if not self.users.size:
            return np.zeros(0, dtype=np.int64)
        bounds = edges.user_bounds(self.ds.n_users)
        return edges.items[bounds[self.users[0]] : bounds[self.users[-1] + 1]]


_DATA_CACHE: dict[tuple, NodeData] = {}


def partition(context: Context) -> tuple[int, int]:
    """This node's user partition: (``partition-id``, ``num-partitions``) of its node config."""
    pid = int(context.node_config.get("partition-id", 0))
    num = int(context.node_config.get("num-partitions", 1))
    return pid, num


def node_data(data: DataSpec, context: Context) -> NodeData:
    """This node's data as the server names it; the node config's ``data-dir`` (deployment:
    each SuperNode's own data) takes precedence."""
    data_dir = str(context.node_config.get("data-dir", "") or data.data_dir)
    pid, num = partition(context)
    key = (data.dataset, data_dir, data.seed, data.val_fraction, pid, num)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        ds = load_dataset(data.dataset, data_dir or None)
        split = split_validation(ds.train, ds.n_users, data.val_fraction, seed=data.seed)
        _DATA_CACHE[key] = NodeData(ds, partition_users(ds.n_users, num, pid), split)
    return _DATA_CACHE[key]


def node_budget(context: Context) -> str | None:
    """The SuperNode's own memory budget (node config ``device-budget``; deployment), or None
    (simulation draws one per user). The old key ``budget-bytes`` is accepted until 0.3."""
    for given in ("device-budget", "budget-bytes"):
        if given in context.node_config:
            renamed_key(given, RENAMED_NODE_CONFIG_KEYS, "node-config key")
            return str(context.node_config[given])
    return None


def load_arrays(context: Context, name: str) -> Arrays | None:
    """The state record ``name`` as numpy arrays, or None when the node has none."""
    if name not in context.state.array_records:
        return None
    return from_array_record(context.state.array_records[name])


def save_arrays(context: Context, name: str, arrays: Arrays) -> None:
    context.state[name] = to_array_record(arrays)


def drop(context: Context, name: str) -> None:
    del context.state[name]


def user_vectors(context: Context) -> np.ndarray:
    """The final pretrained user vectors of the hosted users."""
    if "user-vectors" not in context.state.array_records:
        raise RuntimeError("grouping before pretraining finished on this node")
    return context.state.array_records["user-vectors"]["vectors"].numpy()


def save_user_vectors(context: Context, vectors: np.ndarray) -> None:
    save_arrays(context, "user-vectors", {"vectors": vectors})


def user_groups(context: Context) -> np.ndarray | None:
    """Each hosted user's group, or None when this node missed the grouping round."""
    state = load_arrays(context, "group")
    return None if state is None else state["group"]


def save_user_groups(context: Context, groups: np.ndarray) -> None:
    save_arrays(context, "group", {"group": groups.astype(np.int64)})


def new_secagg_key(context: Context, round_tag: bytes) -> X25519PrivateKey:
    """A fresh secure-aggregation key pair for this node's session ``round_tag``, kept for the
    session's messages."""
    private = X25519PrivateKey.generate()
    context.state["secagg"] = ConfigRecord(
        {"private-key": private.private_bytes_raw(), "round-tag": round_tag}
    )
    return private


def secagg_client(context: Context, round_tag: bytes) -> SecAggClient:
    """This node's secure-aggregation identity for the session ``round_tag``, kept in
    ``context.state`` between messages.

    A message of another session (a late one, or state overwritten by one) raises: masking
    under another session's key would make the server's sum garbage, while a node that fails
    is a dropout the server recovers from.
    """
    rec = context.state.config_records.get("secagg")
    if rec is None:
        raise RuntimeError("secure aggregation used before query.keys")
    if bytes(rec["round-tag"]) != round_tag:
        raise RuntimeError("secure-aggregation message of another session than this node's key")
    key = X25519PrivateKey.from_private_bytes(bytes(rec["private-key"]))
    return SecAggClient(context.node_id, private_key=key)
