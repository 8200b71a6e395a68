"""The device: a Flower ClientApp with one named action per phase.

A node hosts the users of its partition (``partition-id`` / ``num-partitions`` from the node
config). Each hosted user acts as if alone; the node only batches their work. The data to load
comes from the server's message (dataset name, data folder, seed); a ``data-dir`` in the node
config (deployment: each SuperNode's own data) takes precedence.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from peel_fed.data import Dataset, load_dataset
from peel_fed.partition import partition_users
from peel_fed.secagg import SecAggClient

_DATA_CACHE: dict[tuple[str, str], Dataset] = {}


def _node_data(msg: Message, context: Context) -> tuple[Dataset, np.ndarray]:
    """The dataset and the ids of the users this node hosts."""
    spec = msg.content.config_records["data"]
    name = str(spec["dataset"])
    data_dir = str(context.node_config.get("data-dir", "") or spec.get("data-dir", ""))
    key = (name, data_dir)
    if key not in _DATA_CACHE:  # a speed cache only: deployment starts a fresh process per message
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = load_dataset(name, data_dir or None)
    ds = _DATA_CACHE[key]
    pid = int(context.node_config.get("partition-id", 0))
    num = int(context.node_config.get("num-partitions", 1))
    return ds, partition_users(ds.n_users, num, pid)


def _hosted_train_items(ds: Dataset, users: np.ndarray) -> np.ndarray:
    bounds = ds.train.user_bounds(ds.n_users)
    return ds.train.items[bounds[users[0]] : bounds[users[-1] + 1]] if users.size else np.zeros(0)


def hosts(msg: Message, context: Context) -> Message:
    """How many users this node hosts (the server cannot read node configs)."""
    ds, users = _node_data(msg, context)
    reply = RecordDict({"hosts": MetricRecord({"users": int(users.size)})})
    return Message(reply, reply_to=msg)


def _secagg_client(context: Context) -> SecAggClient:
    """This node's secure-aggregation identity, kept in ``context.state`` between messages."""
    rec = context.state.config_records.get("secagg")
    if rec is None:
        raise RuntimeError("secure aggregation used before query.keys")
    key = X25519PrivateKey.from_private_bytes(bytes(rec["private-key"]))
    return SecAggClient(context.node_id, private_key=key)


def _peer_keys(rec: ConfigRecord) -> dict[int, bytes]:
    return {int(k[3:]): bytes(v) for k, v in rec.items() if k.startswith("pk-")}


def keys(msg: Message, context: Context) -> Message:
    """Start a secure-aggregation session: a fresh X25519 key pair; the public half goes up."""
    private = X25519PrivateKey.generate()
    context.state["secagg"] = ConfigRecord({"private-key": private.private_bytes_raw()})
    public = SecAggClient(context.node_id, private_key=private).public_key()
    return Message(RecordDict({"secagg": ConfigRecord({"public-key": public})}), reply_to=msg)


def reveal(msg: Message, context: Context) -> Message:
    """Round keys shared with peers that dropped out, so the server can remove their masks."""
    rec = msg.content.config_records["secagg"]
    dropped = [int(d) for d in rec["dropped"]]
    revealed = _secagg_client(context).reveal_pair_seeds(
        dropped, _peer_keys(rec), bytes(rec["round-tag"])
    )
    out = ConfigRecord({f"key-{j}": k for j, k in revealed.items()})
    return Message(RecordDict({"secagg": out}), reply_to=msg)


def stats(msg: Message, context: Context) -> Message:
    """Training-item counts of the hosted users, and their number, securely aggregated.

    The upload is the dense vector ``[count of item 0, ..., count of item I-1, users]`` plus
    pairwise masks: the server learns only the sum over all nodes, never a node's items.
    """
    ds, users = _node_data(msg, context)
    counts = np.bincount(_hosted_train_items(ds, users), minlength=ds.n_items)
    vector = np.concatenate([counts, [users.size]]).astype(np.float64)
    rec = msg.content.config_records["secagg"]
    masked = _secagg_client(context).masked(vector, _peer_keys(rec), bytes(rec["round-tag"]))
    return Message(RecordDict({"secagg": ArrayRecord({"masked": Array(masked)})}), reply_to=msg)


def make_client_app(mods: list[Mod] | None = None) -> ClientApp:
    """The device app; ``mods`` wrap every handler (tests use one to inject failures)."""
    client = ClientApp(mods=mods or [])
    client.query("hosts")(hosts)
    client.query("keys")(keys)
    client.query("reveal")(reveal)
    client.query("stats")(stats)
    return client


app = make_client_app()
