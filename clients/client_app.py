"""The device: a Flower ClientApp with one named action per phase.

A node hosts the users of its partition (``partition-id`` / ``num-partitions`` from the node
config). Each hosted user acts as if alone; the node only batches their work. The data to load
comes from the server's message (dataset name, data folder, seed); a ``data-dir`` in the node
config (deployment: each SuperNode's own data) takes precedence.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from peel_fed.data import Dataset, load_dataset
from peel_fed.partition import partition_users
from peel_fed.sparse import sparse_counts

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


def stats(msg: Message, context: Context) -> Message:
    """Sparse training-item counts of the hosted users: (idx, count).

    Privacy: the row ids reveal which items the node's users interacted with (see the threat
    model in docs/federated.md); counts are summed over the node's users.
    """
    ds, users = _node_data(msg, context)
    idx, cnt = sparse_counts(_hosted_train_items(ds, users))
    reply = RecordDict(
        {
            "counts": ArrayRecord({"idx": Array(idx), "count": Array(cnt)}),
            "meta": MetricRecord({"users": int(users.size), "n-items": int(ds.n_items)}),
        }
    )
    return Message(reply, reply_to=msg)


def make_client_app(mods: list[Mod] | None = None) -> ClientApp:
    """The device app; ``mods`` wrap every handler (tests use one to inject failures)."""
    client = ClientApp(mods=mods or [])
    client.query("hosts")(hosts)
    client.query("stats")(stats)
    return client


app = make_client_app()
