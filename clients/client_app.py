"""The device: a Flower ClientApp with one named action per phase.

A node hosts the users of its partition (``partition-id`` / ``num-partitions`` from the node
config). Each hosted user acts as if alone; the node only batches their work. The data to load
comes from the server's message (dataset name, data folder, seed); a ``data-dir`` in the node
config (deployment: each SuperNode's own data) takes precedence, and so does its ``budget-bytes``
(the phone's memory budget; simulation draws one per user from ``device-budgets``). Device state
(user vectors,
their optimiser moments, group, PEE user vectors) lives in ``context.state`` between messages.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from peel_fed.blocks import BlockLayout
from peel_fed.clustering import UserGroups, kmeans_partial_sums
from peel_fed.data import Dataset, Interactions, TrainValSplit, load_dataset, split_validation
from peel_fed.partition import partition_users
from peel_fed.secagg import SecAggClient

if TYPE_CHECKING:
    from peel_fed.fedlightgcn import PretrainDevices
    from peel_fed.lightgcn import NegativeSampler

# Deployment starts a fresh process for every message, so imports are paid per message: torch
# (about 1.5 s here) is imported only by the handlers that train or rank (``_torch``), not by
# the secure-aggregation and grouping messages.
_APP_LOADED_AT = time.time()


def _torch():
    import torch

    torch.set_num_threads(1)
    return torch


@dataclass
class NodeData:
    ds: Dataset
    users: np.ndarray
    split: TrainValSplit

    @cached_property
    def fit_sampler(self) -> NegativeSampler:
        from peel_fed.lightgcn import NegativeSampler

        return NegativeSampler(self.split.fit, self.ds.n_items)


_DATA_CACHE: dict[tuple, NodeData] = {}


def _node_data(msg: Message, context: Context) -> NodeData:
    """The dataset, its fit/validation split and the ids of the users this node hosts.

    Cached per process as a speed-up only: deployment starts a fresh process per message.
    """
    spec = msg.content.config_records["data"]
    name = str(spec["dataset"])
    data_dir = str(context.node_config.get("data-dir", "") or spec.get("data-dir", ""))
    seed = int(spec.get("seed", 0))
    val_fraction = float(spec.get("val-fraction", 0.1))
    pid = int(context.node_config.get("partition-id", 0))
    num = int(context.node_config.get("num-partitions", 1))
    key = (name, data_dir, seed, val_fraction, pid, num)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        ds = load_dataset(name, data_dir or None)
        split = split_validation(ds.train, ds.n_users, val_fraction, seed=seed)
        _DATA_CACHE[key] = NodeData(ds, partition_users(ds.n_users, num, pid), split)
    return _DATA_CACHE[key]


def _items_of(edges: Interactions, n_users: int, users: np.ndarray) -> np.ndarray:
    bounds = edges.user_bounds(n_users)
    if not users.size:
        return np.zeros(0, dtype=np.int64)
    return edges.items[bounds[users[0]] : bounds[users[-1] + 1]]


def _reply(msg: Message, **records) -> Message:
    return Message(RecordDict(records), reply_to=msg)


def _arrays(rec: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in rec.items()}


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


# --- hosts and secure aggregation ---------------------------------------------------------------
def hosts(msg: Message, context: Context) -> Message:
    """How many users this node hosts (the server cannot read node configs)."""
    node = _node_data(msg, context)
    return _reply(msg, hosts=MetricRecord({"users": int(node.users.size)}))


def _secagg_client(context: Context) -> SecAggClient:
    """This node's secure-aggregation identity, kept in ``context.state`` between messages."""
    rec = context.state.config_records.get("secagg")
    if rec is None:
        raise RuntimeError("secure aggregation used before query.keys")
    key = X25519PrivateKey.from_private_bytes(bytes(rec["private-key"]))
    return SecAggClient(context.node_id, private_key=key)


def _peer_keys(rec: ConfigRecord) -> dict[int, bytes]:
    return {int(k[3:]): bytes(v) for k, v in rec.items() if k.startswith("pk-")}


def _masked_reply(msg: Message, context: Context, vector: np.ndarray) -> Message:
    rec = msg.content.config_records["secagg"]
    masked = _secagg_client(context).masked(
        np.asarray(vector, dtype=np.float64), _peer_keys(rec), bytes(rec["round-tag"])
    )
    return _reply(msg, secagg=ArrayRecord({"masked": Array(masked)}))


def keys(msg: Message, context: Context) -> Message:
    """Start a secure-aggregation session: a fresh X25519 key pair; the public half goes up."""
    private = X25519PrivateKey.generate()
    context.state["secagg"] = ConfigRecord({"private-key": private.private_bytes_raw()})
    public = SecAggClient(context.node_id, private_key=private).public_key()
    return _reply(msg, secagg=ConfigRecord({"public-key": public}))


def reveal(msg: Message, context: Context) -> Message:
    """Round keys shared with peers that dropped out, so the server can remove their masks."""
    rec = msg.content.config_records["secagg"]
    dropped = [int(d) for d in rec["dropped"]]
    revealed = _secagg_client(context).reveal_pair_seeds(
        dropped, _peer_keys(rec), bytes(rec["round-tag"])
    )
    return _reply(msg, secagg=ConfigRecord({f"key-{j}": k for j, k in revealed.items()}))


# --- statistics ---------------------------------------------------------------------------------
def stats(msg: Message, context: Context) -> Message:
    """Item counts of the hosted users (all training items, and the fit split), and their number,
    securely aggregated: ``[train counts | fit counts | users]`` plus pairwise masks, so the
    server learns only the sums over all nodes, never a node's items.
    """
    node = _node_data(msg, context)
    n_items, n_users = node.ds.n_items, node.ds.n_users
    train = np.bincount(_items_of(node.ds.train, n_users, node.users), minlength=n_items)
    fit = np.bincount(_items_of(node.split.fit, n_users, node.users), minlength=n_items)
    return _masked_reply(msg, context, np.concatenate([train, fit, [node.users.size]]))


# --- pretraining --------------------------------------------------------------------------------
def _pretrain_devices(msg: Message, context: Context) -> tuple[NodeData, PretrainDevices]:
    _torch()
    from peel_fed.fedlightgcn import FedLightGCNConfig, PretrainDevices

    node = _node_data(msg, context)
    cfg_rec = msg.content.config_records["pretrain"]
    cfg = FedLightGCNConfig(
        dim=int(cfg_rec["dim"]),
        layers=int(cfg_rec["layers"]),
        local_steps=int(cfg_rec["local-steps"]),
        user_lr=float(cfg_rec["user-lr"]),
    )
    degree = msg.content.array_records["degree"]["degree"].numpy()
    seed = int(msg.content.config_records["data"]["seed"])
    devices = PretrainDevices(
        node.users,
        node.ds.n_users,
        node.ds.n_items,
        node.split.fit,
        degree,
        cfg,
        seed,
        sampler=node.fit_sampler,
    )
    if "pretrain" in context.state.array_records:
        devices.load_state(_arrays(context.state.array_records["pretrain"]))
    return node, devices


def pretrain(msg: Message, context: Context) -> Message:
    """Federated LightGCN: ``step = init`` sends the first contributions of layer ``k``,
    ``step = round`` trains the hosted users taking part in the round, ``step = final`` keeps the
    final user vectors on the device for grouping and PEE learning (nothing goes up)."""
    from peel_fed.fedlightgcn import round_participants

    torch = _torch()
    node, devices = _pretrain_devices(msg, context)
    rec = msg.content.config_records["pretrain"]
    tables = msg.content.array_records["tables"]
    layers = [torch.from_numpy(tables[f"layer-{k}"].numpy()) for k in range(devices.cfg.layers + 1)]
    step = str(rec["step"])
    out: dict[str, np.ndarray] = {}
    metrics: dict[str, float] = {}
    if step == "init":
        rows, delta = devices.initial_contribution(int(rec["k"]), layers)
        out = {"contrib-rows": rows, "contrib-delta": delta.numpy()}
        metrics = {"users": int(node.users.size)}
    elif step == "round":
        users = round_participants(
            devices.seed, node.users, int(rec["round"]), int(rec["rounds-per-pass"])
        )
        up = devices.device_round(users, layers, int(rec["round"]))
        out = {
            "rows": up.rows,
            "grad": up.grad.numpy(),
            "row-devices": up.row_devices,
            "contrib-rows": up.contrib_rows,
            "contrib-delta": up.contrib_delta.numpy(),
        }
        metrics = {"users": up.users, "loss-sum": up.loss_sum, "solo-bytes": up.solo_bytes}
    elif step == "final":
        context.state["user-vectors"] = ArrayRecord(
            {"vectors": Array(devices.final_user_vectors(layers))}
        )
        metrics = {"users": int(node.users.size)}
    else:
        raise ValueError(f"unknown pretrain step {step!r}")
    if bool(rec.get("secure", False)) and step != "final":
        return _secure_pretrain_counts(msg, context, node, devices, out, metrics)
    context.state["pretrain"] = _to_record(devices.state_arrays())
    return _reply(msg, upload=_to_record(out), metrics=MetricRecord(metrics))


def _secure_pretrain_counts(
    msg: Message, context: Context, node: NodeData, devices, out: dict, metrics: dict
) -> Message:
    """Secure-rows mode, first half: keep the upload on the device and send only the masked
    per-row device counts (``[counts, loss sum, users]``), from which the server learns the union
    of the cohort's rows. The contribution change is committed only once its values have been
    aggregated (``train.rows``), so a failure in between is resent in a later round."""
    n_items = node.ds.n_items
    rows = out.get("rows", out["contrib-rows"])
    counts = np.zeros(n_items)
    counts[rows] = out.get("row-devices", np.ones(rows.size))
    pending = {k: v for k, v in out.items() if k not in ("row-devices",)}
    pending["contrib-new"] = devices.contrib.numpy().copy()
    context.state["pretrain-pending"] = _to_record(pending)
    state = devices.state_arrays()
    if "pretrain" in context.state.array_records:
        state["contrib"] = context.state.array_records["pretrain"]["contrib"].numpy()
    else:
        state["contrib"] = np.zeros_like(state["contrib"])
    context.state["pretrain"] = _to_record(state)
    vector = np.concatenate([counts, [metrics.get("loss-sum", 0.0), metrics.get("users", 0)]])
    return _masked_reply(msg, context, vector)


def rows(msg: Message, context: Context) -> Message:
    """Secure-rows mode, second half: the pending upload laid out densely over the cohort's row
    union (``E0`` gradient rows, then the contribution change per layer), masked."""
    if "pretrain-pending" not in context.state.array_records:
        raise RuntimeError("train.rows without a pending pretraining upload")
    pending = _arrays(context.state.array_records["pretrain-pending"])
    union = msg.content.array_records["rows"]["rows"].numpy()
    delta = pending["contrib-delta"]
    dim = delta.shape[-1]
    grad = np.zeros((union.size, dim))
    if "rows" in pending and pending["rows"].size:
        grad[np.searchsorted(union, pending["rows"])] = pending["grad"]
    contrib = np.zeros((delta.shape[0], union.size, dim))
    if pending["contrib-rows"].size:
        contrib[:, np.searchsorted(union, pending["contrib-rows"])] = delta
    reply = _masked_reply(msg, context, np.concatenate([grad.ravel(), contrib.ravel()]))
    state = _arrays(context.state.array_records["pretrain"])
    state["contrib"] = pending["contrib-new"]
    context.state["pretrain"] = _to_record(state)
    del context.state["pretrain-pending"]
    return reply


# --- grouping -----------------------------------------------------------------------------------
def _user_vectors(context: Context) -> np.ndarray:
    if "user-vectors" not in context.state.array_records:
        raise RuntimeError("grouping before pretraining finished on this node")
    return context.state.array_records["user-vectors"]["vectors"].numpy()


def kmeans(msg: Message, context: Context) -> Message:
    """One Lloyd step's share, securely aggregated: per-centroid sums and counts."""
    centroids = msg.content.array_records["kmeans"]["centroids"].numpy()
    sums, counts = kmeans_partial_sums(_user_vectors(context), centroids)
    return _masked_reply(msg, context, np.concatenate([sums.ravel(), counts]))


def group(msg: Message, context: Context) -> Message:
    """Join the nearest final centroid; the server learns how many hosted users joined each."""
    node = _node_data(msg, context)
    centroids = msg.content.array_records["kmeans"]["centroids"].numpy()
    groups = UserGroups(np.zeros(0, dtype=np.int64), centroids).nearest(_user_vectors(context))
    context.state["group"] = ArrayRecord({"group": Array(groups.astype(np.int64))})
    counts = np.bincount(groups, minlength=centroids.shape[0])
    return _reply(
        msg,
        groups=MetricRecord({f"g{g}": int(c) for g, c in enumerate(counts)}),
        hosts=MetricRecord({"users": int(node.users.size)}),
    )


# --- PEE learning -------------------------------------------------------------------------------
def _layout(msg: Message) -> BlockLayout:
    rec = msg.content.array_records["layout"]
    blocks = int(msg.content.config_records["pee"]["blocks"])
    item_groups = rec["item-groups"].numpy()
    dim = int(msg.content.config_records["pee"]["dim"])
    return BlockLayout(item_groups, dim, blocks)


def pee(msg: Message, context: Context) -> Message:
    """Fine-tune the tables of the hosted users' groups; gradients and dL_val/d alpha go up."""
    _torch()
    from peel_fed.fedlightgcn import round_participants
    from peel_fed.fedpee import PEE_SLOT_STREAM, FedPEEConfig, PEEDevices

    node = _node_data(msg, context)
    rec = msg.content.config_records["pee"]
    layout = _layout(msg)
    cfg = FedPEEConfig(
        local_steps=int(rec["local-steps"]), user_lr=float(rec["user-lr"]), elastic=True
    )
    seed = int(msg.content.config_records["data"]["seed"])
    groups = context.state.array_records["group"]["group"].numpy()
    devices = PEEDevices(
        node.users,
        _user_vectors(context),
        node.ds.n_users,
        node.split.fit,
        node.split.val,
        layout,
        cfg,
        seed,
    )
    if "pee" in context.state.array_records:
        devices.load_state(_arrays(context.state.array_records["pee"]))
    round_no, per_pass = int(rec["round"]), int(rec["rounds-per-pass"])
    taking_part = np.isin(
        node.users, round_participants(seed, node.users, round_no, per_pass, PEE_SLOT_STREAM)
    )
    tables = msg.content.array_records["tables"]
    out: dict[str, np.ndarray] = {}
    users_total, solo_total = 0, 0
    for g in sorted(set(groups.tolist())):
        users = node.users[(groups == g) & taking_part]
        up = devices.device_round(
            users, tables[f"table-{g}"].numpy(), tables[f"alpha-{g}"].numpy(), round_no
        )
        users_total += up.users
        solo_total += up.solo_bytes
        out.update(
            {
                f"g{g}-rows": up.rows,
                f"g{g}-grad": up.grad,
                f"g{g}-row-devices": up.row_devices,
                f"g{g}-weight-grad": up.weight_grad,
                f"g{g}-stats": np.concatenate(
                    [[up.val_devices, up.users], up.loss_sum, up.loss_count]
                ),
            }
        )
    context.state["pee"] = _to_record(devices.state_arrays())
    if bool(rec.get("secure", False)):
        # secure rows: keep the upload, send masked per-group row counts and the user count
        context.state["pee-pending"] = _to_record(out)
        counts = np.zeros((int(rec["user-groups"]), layout.n_items))
        for g in sorted(set(groups.tolist())):
            counts[g, out[f"g{g}-rows"]] = out[f"g{g}-row-devices"]
        return _masked_reply(msg, context, np.concatenate([counts.ravel(), [users_total]]))
    return _reply(
        msg,
        upload=_to_record(out),
        metrics=MetricRecord({"users": users_total, "solo-bytes": solo_total}),
    )


def pee_rows(msg: Message, context: Context) -> Message:
    """Secure rows, second half of a PEE round: per user group, the pending table-row gradients
    laid out over the group's row union, then dL_val/d alpha and the loss statistics, masked."""
    if "pee-pending" not in context.state.array_records:
        raise RuntimeError("train.peerows without a pending PEE upload")
    pending = _arrays(context.state.array_records["pee-pending"])
    unions = _arrays(msg.content.array_records["rows"])
    rec = msg.content.config_records["pee"]
    n_groups, n_blocks, dim = int(rec["item-groups"]), int(rec["blocks"]), int(rec["dim"])
    parts = []
    for g in range(int(rec["user-groups"])):
        union = unions[f"union-{g}"]
        grad = np.zeros((union.size, dim))
        weight_grad = np.zeros(n_groups * n_blocks)
        stats = np.zeros(2 + 2 * n_groups)
        if f"g{g}-rows" in pending:
            rows = pending[f"g{g}-rows"]
            if rows.size:
                grad[np.searchsorted(union, rows)] = pending[f"g{g}-grad"]
            weight_grad = pending[f"g{g}-weight-grad"].ravel()
            stats = pending[f"g{g}-stats"]
        parts += [grad.ravel(), weight_grad, stats]
    reply = _masked_reply(msg, context, np.concatenate(parts))
    del context.state["pee-pending"]
    return reply


# --- deployment and evaluation ------------------------------------------------------------------
def evaluate(msg: Message, context: Context) -> Message:
    """Keep the units that fit each budget, rank all items on the device, and send up Recall and
    NDCG sums (securely aggregated) per method and budget level, per own-budget class, and after
    each step of the dynamic-budget drill (shrinking with no server contact)."""
    _torch()
    from peel_fed.fedpee import EvalSpec, evaluation_vector

    node = _node_data(msg, context)
    layout = _layout(msg)
    if "group" in context.state.array_records:
        groups = context.state.array_records["group"]["group"].numpy()
    else:  # missed the grouping round (late or timed out): join the nearest group now
        centroids = msg.content.array_records["kmeans"]["centroids"].numpy()
        groups = UserGroups(np.zeros(0, dtype=np.int64), centroids).nearest(_user_vectors(context))
    pee_vecs = (
        context.state.array_records["pee"]["vecs"].numpy()
        if "pee" in context.state.array_records
        else _user_vectors(context)
    )
    vector = evaluation_vector(
        EvalSpec.from_config(msg.content.config_records["evaluate"]),
        _arrays(msg.content.array_records["tables"]),
        layout,
        node.users,
        groups,
        pee_vecs,
        _user_vectors(context),
        node.ds.n_users,
        node.ds.train,
        node.ds.test,
        int(msg.content.config_records["data"]["seed"]),
        node_budget=str(context.node_config["budget-bytes"])
        if "budget-bytes" in context.node_config
        else None,
    )
    return _masked_reply(msg, context, vector)


def _process_started_at() -> float:
    """Wall-clock start of this process (Linux ``/proc``; else when this module was loaded)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(ln.split()[1]) for ln in f if ln.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _APP_LOADED_AT


def timing_mod(msg: Message, context: Context, call_next) -> Message:
    """With run config ``timing = true``, add the device's wall-clock timestamps to the reply:
    process start, handler start and end. The server subtracts them from its own push and
    receive times to split an exchange into pickup (polls), process startup, handler and return
    (meaningful where server and devices share a clock, as on one machine)."""
    if not context.run_config.get("timing", False):
        return call_next(msg, context)
    start = time.time()
    reply = call_next(msg, context)
    if not reply.has_error():
        reply.content["timing"] = ConfigRecord(
            {
                "process-start": _process_started_at(),
                "handler-start": start,
                "handler-end": time.time(),
            }
        )
    return reply


def make_client_app(mods: list[Mod] | None = None) -> ClientApp:
    """The device app; ``mods`` wrap every handler (tests use one to inject failures)."""
    client = ClientApp(mods=[timing_mod, *(mods or [])])
    client.query("hosts")(hosts)
    client.query("keys")(keys)
    client.query("reveal")(reveal)
    client.query("stats")(stats)
    client.train("pretrain")(pretrain)
    client.train("rows")(rows)
    client.query("kmeans")(kmeans)
    client.query("group")(group)
    client.train("pee")(pee)
    client.train("peerows")(pee_rows)
    client.evaluate("budgets")(evaluate)
    return client


app = make_client_app()
