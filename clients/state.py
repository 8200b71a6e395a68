"""What a node keeps: its data (cached per process) and the device state in ``context.state``.

``context.state`` persists between the messages of a run on a node in both runtimes; module
globals do not in deployment (a fresh process per message), so the data cache is a speed-up only.
State records, by name: ``secagg`` (this node's secure-aggregation session: the pairwise key,
or the Shamir client's ``to_state``), ``pretrain`` (ego
vectors, their Adam moments, last contributions), ``pretrain-pending`` and ``pee-pending``
(an upload held back between the two halves of a secure-rows round), ``user-vectors`` (final
pretrained user vectors), ``group`` (each hosted user's group), ``pee`` (PEE user vectors and
their moments).

With a job name (the server keeps checkpoints, :mod:`strategies.checkpoint`) and a state folder
(node config ``state-dir``, else run config ``device-state-dir``), :class:`DeviceStore` also
mirrors ``pretrain``, ``user-vectors``, ``group`` and ``pee`` to files, as a phone keeps its
state in its own storage: a resumed run reads them back. Round-versioned records keep the
version before the latest too, so a round the server redoes after a crash starts from the state
the device had before it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Context

from clients.records import from_array_record, to_array_record
from peel_fed.atomic import write_atomic
from peel_fed.data import Dataset, Interactions, TrainValSplit, split_validation
from peel_fed.loading import load_dataset
from peel_fed.messages import Arrays, DataSpec
from peel_fed.partition import partition_users
from peel_fed.renames import RENAMED_NODE_CONFIG_KEYS, renamed_key
from peel_fed.secagg import SecAggClient
from peel_fed.secagg_shamir import ShamirSecAggClient

if TYPE_CHECKING:
    from peel_fed.negatives import NegativeSampler


@dataclass
class SharedData:
    """A dataset and its fit/validation split, shared by every partition a process hosts."""

    ds: Dataset
    split: TrainValSplit

    @cached_property
    def fit_sampler(self) -> NegativeSampler:
        from peel_fed.negatives import NegativeSampler

        return NegativeSampler(self.split.fit, self.ds.n_items)

    @cached_property
    def known_sampler(self) -> NegativeSampler:
        """Negatives of PEE learning: never a fit or validation item of the user (built once per
        process: 0.6 s on Gowalla, which every PEE message paid before)."""
        from peel_fed.fedpee import known_sampler

        return known_sampler(self.split.fit, self.split.val, self.ds.n_items)


@dataclass
class NodeData:
    """The dataset, its fit/validation split and the ids of the users this node hosts."""

    shared: SharedData
    users: np.ndarray

    @property
    def ds(self) -> Dataset:
        return self.shared.ds

    @property
    def split(self) -> TrainValSplit:
        return self.shared.split

    @property
    def fit_sampler(self) -> NegativeSampler:
        return self.shared.fit_sampler

    @property
    def known_sampler(self) -> NegativeSampler:
        return self.shared.known_sampler

    def items_of(self, edges: Interactions) -> np.ndarray:
        """The items of the hosted users' interactions in ``edges`` (users are contiguous)."""
        if not self.users.size:
            return np.zeros(0, dtype=np.int64)
        bounds = edges.user_bounds(self.ds.n_users)
        return edges.items[bounds[self.users[0]] : bounds[self.users[-1] + 1]]


# one dataset per process: a simulation process hosts many partitions in turn (1,000 nodes on
# two Ray workers), and reloading the data for each of them cost seconds per message
_DATA_CACHE: dict[tuple, SharedData] = {}


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
    key = (data.dataset, data_dir, data.seed, data.val_fraction)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        ds = load_dataset(data.dataset, data_dir or None)
        split = split_validation(ds.train, ds.n_users, data.val_fraction, seed=data.seed)
        _DATA_CACHE[key] = SharedData(ds, split)
    shared = _DATA_CACHE[key]
    return NodeData(shared, partition_users(shared.ds.n_users, num, pid))


def node_budget(context: Context) -> str | None:
    """The SuperNode's own memory budget (node config ``device-budget``; deployment), or None
    (simulation draws one per user). The old key ``budget-bytes`` is accepted until 0.3."""
    for given in ("device-budget", "budget-bytes"):
        if given in context.node_config:
            renamed_key(given, RENAMED_NODE_CONFIG_KEYS, "node-config key")
            return str(context.node_config[given])
    return None


VERSION = "__version__"  # the array of a versioned record that holds its round
EPOCH = "__epoch__"  # and the run (0, then one more per resumption) that wrote it
# versioned records, and the index of their kind in a resume point (pretraining, PEE learning)
VERSIONED = {"pretrain": 0, "pee": 1}


class DeviceStateLost(RuntimeError):
    """A resumed run found no saved state on this device."""


@dataclass
class DeviceStore:
    """What a device keeps between messages: ``context.state``, mirrored to ``folder`` (files
    readable by the device's owner only) when the run has a job name and the device a state
    folder. Records held only between the two halves of a round (``*-pending``) stay in memory.

    ``save(name, arrays, version=r)`` marks the record as the state after round ``r``;
    ``load(name, before=r)`` returns the latest saved state of a round before ``r``, from memory
    or, after a restart, from the files (the version before the latest is kept on file).

    ``resume_points[e]`` is where the run resumed for the ``e + 1``-th time: the first
    (pretraining version, PEE round) it redid. A record an earlier run wrote at or past the next
    resume point was never applied by the server (the crash lost it): it is void, never loaded,
    and overwritten rather than kept as the previous version.
    """

    context: Context
    folder: Path | None = None
    resume_points: tuple[tuple[int, int], ...] = ()

    def load(self, name: str, before: int | None = None) -> Arrays | None:
        """The record ``name`` (of a round before ``before``), or None when the device has none."""
        rec = self.context.state.array_records.get(name)
        if rec is not None:
            arrays = from_array_record(rec)
            if self._usable(name, arrays, before):
                return _without_version(arrays)
        if self.folder is None:
            return None
        for path in (self._path(name), self._path(name, previous=True)):
            arrays = _read(path)
            if arrays is not None and self._usable(name, arrays, before):
                self.context.state[name] = to_array_record(arrays)
                return _without_version(arrays)
        return None

    def save(self, name: str, arrays: Arrays, version: int | None = None) -> None:
        """Keep ``arrays`` as record ``name`` (the state after round ``version``, if given)."""
        if version is not None:
            arrays = {
                **arrays,
                VERSION: np.array([version], dtype=np.int64),
                EPOCH: np.array([len(self.resume_points)], dtype=np.int64),
            }
        self.context.state[name] = to_array_record(arrays)
        if self.folder is None or name.endswith("-pending"):
            return
        path = self._path(name)
        # only the latest's round and run are read: the rest of the file is not needed here
        latest = _read(path, (VERSION, EPOCH)) if version is not None else None
        if latest is not None and self._usable(name, latest, None):
            same = int(latest[VERSION][0]) == version and int(latest[EPOCH][0]) == int(
                arrays[EPOCH][0]
            )
            if not same:  # a new round: the latest becomes the previous
                path.replace(self._path(name, previous=True))
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_atomic(path, lambda fh: fh.write(buffer.getvalue()), mode=0o600)

    def drop(self, name: str) -> None:
        del self.context.state[name]
        if self.folder is not None:
            self._path(name).unlink(missing_ok=True)

    def _usable(self, name: str, arrays: Arrays, before: int | None) -> bool:
        kind = VERSIONED.get(name)
        if kind is None:
            return True
        version = int(arrays[VERSION][0])
        if before is not None and version >= before:
            return False
        epoch = int(arrays[EPOCH][0]) if EPOCH in arrays else 0
        return epoch >= len(self.resume_points) or version < self.resume_points[epoch][kind]

    def _path(self, name: str, previous: bool = False) -> Path:
        assert self.folder is not None
        return self.folder / f"{name}{'.prev' if previous else ''}.npz"

    def user_vectors(self) -> np.ndarray:
        """The final pretrained user vectors of the hosted users."""
        saved = self.load("user-vectors")
        if saved is None:
            raise RuntimeError("grouping before pretraining finished on this node")
        return saved["vectors"]

    def save_user_vectors(self, vectors: np.ndarray) -> None:
        self.save("user-vectors", {"vectors": vectors})

    def user_groups(self) -> np.ndarray | None:
        """Each hosted user's group, or None when this node missed the grouping round."""
        saved = self.load("group")
        return None if saved is None else saved["group"]

    def save_user_groups(self, groups: np.ndarray) -> None:
        self.save("group", {"group": groups.astype(np.int64)})


def _read(path: Path, names: tuple[str, ...] | None = None) -> Arrays | None:
    """The arrays saved at ``path`` (only ``names``, when given and present), or None."""
    if not path.is_file():
        return None
    with np.load(path) as npz:  # an npz member is read only when asked for
        return {k: npz[k] for k in npz.files if names is None or k in names}


def _without_version(arrays: Arrays) -> Arrays:
    return {k: v for k, v in arrays.items() if k not in (VERSION, EPOCH)}


def device_store(context: Context, data: DataSpec) -> DeviceStore:
    """This node's store for the run ``data`` names: mirrored to
    ``<state folder>/<job>/partition-<id>-of-<n>`` when the run has a job name and the node a
    state folder (node config ``state-dir``, else the one the server names)."""
    folder = str(context.node_config.get("state-dir", "") or data.state_dir)
    if not (data.job and folder):
        return DeviceStore(context, None, data.resume_points)
    pid, num = partition(context)
    path = Path(folder) / data.job / f"partition-{pid}-of-{num}"
    return DeviceStore(context, path, data.resume_points)


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
    rec = _session(context)
    if "private-key" not in rec or bytes(rec["round-tag"]) != round_tag:
        raise RuntimeError("secure-aggregation message of another session than this node's key")
    key = X25519PrivateKey.from_private_bytes(bytes(rec["private-key"]))
    return SecAggClient(context.node_id, private_key=key)


def _session(context: Context) -> ConfigRecord:
    rec = context.state.config_records.get("secagg")
    if rec is None:
        raise RuntimeError("secure aggregation used before query.keys")
    return rec


def new_shamir_client(context: Context, round_tag: bytes) -> bytes:
    """Start this node's Shamir session ``round_tag`` (fresh keys and self-mask seed, kept in
    ``context.state``); returns its 64 bytes of public keys."""
    client = ShamirSecAggClient(context.node_id)
    public = client.setup(round_tag)
    save_shamir_client(context, client)
    return public


def shamir_client(context: Context, round_tag: bytes) -> ShamirSecAggClient:
    """This node's Shamir client for the session ``round_tag``, as the last message left it.

    As with the pairwise key, a message of another session (or protocol) raises: the node is a
    dropout, which the threshold absorbs. Save it back with :func:`save_shamir_client`.
    """
    rec = _session(context)
    if rec.get("round_tag") is None or bytes(rec["round_tag"]) != round_tag:
        raise RuntimeError("secure-aggregation message of another session than this node's key")
    client = ShamirSecAggClient.from_state(dict(rec))
    if client.client_id != context.node_id:
        raise RuntimeError("secure-aggregation state of another node")
    return client


def save_shamir_client(context: Context, client: ShamirSecAggClient) -> None:
    """Keep the client's round (private keys, shares held, what it revealed) for the next
    message: a fresh process in deployment, so nothing lives in module globals."""
    context.state["secagg"] = ConfigRecord(client.to_state())


def shamir_public_keys(client: ShamirSecAggClient) -> bytes:
    """The client's own 64 bytes of public keys (its entry in the cohort it shared with)."""
    saved = client.to_state()
    return bytes(saved["public_keys"][saved["cohort"].index(client.client_id)])
