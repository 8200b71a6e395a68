"""The wire format of the federated protocol, without Flower: one encode/decode per download and
upload, shared by the ClientApp (``clients``) and the ServerApp (``strategies``).

A message's contents are a :class:`Content`: named records of arrays, of config values and of
metrics, as plain dicts. The adapters turn a :class:`Content` into a Flower ``RecordDict`` and
back with one helper (``clients.records``). Securely aggregated uploads are one flat float vector
per node; the functions here write and read their layouts:

- statistics: ``[train counts | fit counts | partitions claimed (one-hot) | users | 1 | P]``
- K-Means: ``[centroid sums (k x dim) | counts (k)]``
- pretraining, secure rows: ``[row counts (items) | loss sum | users]``, then
  ``[E0 gradient over the row union | contribution change per layer over the union]``
- PEE learning, secure rows: ``[row counts (user groups x items) | users]``, then per user group
  ``[gradient over the group's row union | dL_val/d alpha | loss statistics]``
- bit-plane statistics: per user group ``[square sums of user vectors (dim) | users | training
  item counts (items)]`` (:class:`peel_fed.fedplanes.PlaneStats`)
- evaluation: :func:`peel_fed.fedeval.evaluation_vector` (read by ``evaluation_table``)

Where a core dataclass is the payload (``DeviceUpdate``, ``PEEUpload``, ``EvalSpec``) it is
encoded and decoded as is. Those live in modules that import torch; they are imported inside the
functions that need them, so that the device's secure-aggregation and grouping messages (a fresh
process per message in deployment) do not pay for torch.

Long file: over the project's ~400 lines on purpose, as it is the whole protocol, one
section per phase, and reads best in one place (each encode next to its decode).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from peel_fed.blocks import BlockLayout

if TYPE_CHECKING:
    from peel_fed.fedeval import EvalSpec
    from peel_fed.fedlightgcn import DeviceUpdate
    from peel_fed.fedpee import PEEUpload
    from peel_fed.fedplanes import PlaneOrders

Scalar = int | float | str | bool | bytes
ConfigValue = Scalar | list[int] | list[float] | list[str] | list[bool] | list[bytes]
Arrays = dict[str, np.ndarray]
Config = dict[str, ConfigValue]
Metrics = dict[str, int | float]


@dataclass
class Content:
    """A message's contents: record name -> arrays, config values or metrics."""

    arrays: dict[str, Arrays] = field(default_factory=dict)
    configs: dict[str, Config] = field(default_factory=dict)
    metrics: dict[str, Metrics] = field(default_factory=dict)


# --- what every phase sends: the data to load ---------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    """What devices need to load their data (a node's own ``data-dir`` takes precedence), and
    where they keep their state.

    ``job`` names the run across a crash and its resumption (empty: the server keeps no
    checkpoint, so devices keep their state in memory only); ``state_dir`` is the folder devices
    mirror their state to under that name (a node's own ``state-dir`` takes precedence);
    ``resume_points`` lists, for each time the server resumed the job from a checkpoint, the
    first (pretraining version, PEE round) it redid (:class:`clients.state.DeviceStore`): state a
    device wrote from there on before the crash is void, and a device that finds no saved state
    in a resumed job has lost it (rather than never having had any).
    """

    dataset: str
    data_dir: str = ""
    seed: int = 0
    val_fraction: float = 0.1
    job: str = ""
    state_dir: str = ""
    resume_points: tuple[tuple[int, int], ...] = ()

    @property
    def resumed(self) -> bool:
        return bool(self.resume_points)

    def to_config(self) -> Config:
        return {
            "dataset": self.dataset,
            "data-dir": self.data_dir,
            "seed": self.seed,
            "val-fraction": self.val_fraction,
            "job": self.job,
            "state-dir": self.state_dir,
            "resume-pretrain": [p[0] for p in self.resume_points],
            "resume-pee": [p[1] for p in self.resume_points],
        }

    @classmethod
    def from_config(cls, rec: Config) -> DataSpec:
        return cls(
            dataset=str(rec["dataset"]),
            data_dir=str(rec.get("data-dir", "")),
            seed=int(rec.get("seed", 0)),
            val_fraction=float(rec.get("val-fraction", 0.1)),
            job=str(rec.get("job", "")),
            state_dir=str(rec.get("state-dir", "")),
            resume_points=tuple(
                zip(
                    (int(v) for v in rec.get("resume-pretrain", [])),
                    (int(v) for v in rec.get("resume-pee", [])),
                    strict=True,
                )
            ),
        )


def data_content(data: DataSpec) -> Content:
    """A message that only names the data (the statistics download)."""
    return Content(configs={"data": data.to_config()})


def decode_data(content: Content) -> DataSpec:
    return DataSpec.from_config(content.configs["data"])


# --- secure aggregation -------------------------------------------------------------------------
def encode_public_key(public_key: bytes) -> Content:
    return Content(configs={"secagg": {"public-key": public_key}})


def decode_public_key(content: Content) -> bytes:
    return bytes(content.configs["secagg"]["public-key"])


def encode_peer_keys(
    public_keys: dict[int, bytes], round_tag: bytes, dropped: list[int] | None = None
) -> Config:
    """The cohort's public keys and the round tag (and, to ask for reveals, the dropped nodes)."""
    rec: Config = {f"pk-{n}": pk for n, pk in public_keys.items()}
    rec["round-tag"] = round_tag
    if dropped is not None:
        rec["dropped"] = list(dropped)
    return rec


def decode_peer_keys(content: Content) -> tuple[dict[int, bytes], bytes]:
    """The cohort's public keys by node id, and the round tag."""
    rec = content.configs["secagg"]
    keys = {int(k[3:]): bytes(v) for k, v in rec.items() if k.startswith("pk-")}
    return keys, bytes(rec["round-tag"])


def decode_dropped(content: Content) -> list[int]:
    return [int(d) for d in content.configs["secagg"]["dropped"]]


def encode_session(round_tag: bytes, protocol: str = "pairwise") -> Content:
    """``query.keys``: the secure-aggregation session (its round tag) the new key is for, and
    its protocol (named only when it is not ``pairwise``, so pairwise sessions read as before)."""
    rec: Config = {"round-tag": round_tag}
    if protocol != "pairwise":
        rec["protocol"] = protocol
    return Content(configs={"secagg": rec})


def decode_session(content: Content) -> bytes:
    return bytes(content.configs["secagg"]["round-tag"])


def decode_protocol(content: Content) -> str:
    """The protocol a secure-aggregation message belongs to (``pairwise`` when unnamed)."""
    return str(content.configs["secagg"].get("protocol", "pairwise"))


def encode_masked(masked: np.ndarray, public_key: bytes) -> Content:
    """A masked vector with the public key it was masked under (the server drops an upload
    whose key is not the one it collected for the session: its masks would not cancel)."""
    key = np.frombuffer(public_key, dtype=np.uint8).copy()
    return Content(arrays={"secagg": {"masked": masked, "public-key": key}})


def decode_masked(content: Content) -> np.ndarray:
    return content.arrays["secagg"]["masked"]


def decode_masked_key(content: Content) -> bytes:
    return np.asarray(content.arrays["secagg"]["public-key"], dtype=np.uint8).tobytes()


# Double masking with Shamir shares (``peel_fed.secagg_shamir``): ``query.keys`` (as above, the
# protocol named; 64 B of public keys up), ``query.shares`` (the cohort's keys and the threshold
# down, a share ciphertext per peer up), the phase's message (the node's inbox of ciphertexts
# down with the phase contents, the masked vector up), ``query.reveal`` (survivors and dropped
# down, shares of self-mask seeds and of dropped nodes' mask keys up).
def encode_share_request(
    public_keys: dict[int, bytes], round_tag: bytes, threshold: int
) -> Content:
    """``query.shares``: the cohort's public keys, the round tag and the threshold ``t``."""
    rec = encode_peer_keys(public_keys, round_tag)
    rec.update({"protocol": "shamir", "threshold": int(threshold)})
    return Content(configs={"secagg": rec})


def decode_share_request(content: Content) -> tuple[dict[int, bytes], bytes, int]:
    """The cohort's public keys by node id, the round tag and the threshold."""
    keys, round_tag = decode_peer_keys(content)
    return keys, round_tag, int(content.configs["secagg"]["threshold"])


def _by_node(prefix: str, rec: Config) -> dict[int, bytes]:
    return {int(k[len(prefix) :]): bytes(v) for k, v in rec.items() if k.startswith(prefix)}


def encode_share_ciphertexts(ciphertexts: dict[int, bytes]) -> Content:
    """A node's share ciphertexts, by the peer each is for (the server relays them)."""
    return Content(configs={"secagg": {f"ct-{n}": ct for n, ct in ciphertexts.items()}})


def decode_share_ciphertexts(content: Content) -> dict[int, bytes]:
    return _by_node("ct-", content.configs["secagg"])


def encode_inbox(inbox: dict[int, bytes], round_tag: bytes) -> Config:
    """The ``secagg`` record of a phase's message: the ciphertexts for this node by sender."""
    rec: Config = {f"ct-{n}": ct for n, ct in inbox.items()}
    rec.update({"round-tag": round_tag, "protocol": "shamir"})
    return rec


def decode_inbox(content: Content) -> tuple[dict[int, bytes], bytes]:
    """The ciphertexts for this node by sender, and the round tag."""
    rec = content.configs["secagg"]
    return _by_node("ct-", rec), bytes(rec["round-tag"])


def encode_unmask_request(round_tag: bytes, survivors: list[int], dropped: list[int]) -> Config:
    """The ``secagg`` record of ``query.reveal``: who uploaded and who dropped after sharing."""
    return {
        "round-tag": round_tag,
        "protocol": "shamir",
        "survivors": [int(n) for n in survivors],
        "dropped": [int(n) for n in dropped],
    }


def decode_unmask_request(content: Content) -> tuple[bytes, list[int], list[int]]:
    rec = content.configs["secagg"]
    survivors, dropped = rec["survivors"], rec["dropped"]
    return bytes(rec["round-tag"]), [int(n) for n in survivors], [int(n) for n in dropped]


def encode_shares_revealed(self_mask: dict[int, bytes], pair_secret: dict[int, bytes]) -> Content:
    """A node's answer to ``query.reveal``: its shares of survivors' self-mask seeds (``b-``)
    and of dropped nodes' mask keys (``s-``)."""
    rec: Config = {f"b-{n}": share for n, share in self_mask.items()}
    rec.update({f"s-{n}": share for n, share in pair_secret.items()})
    return Content(configs={"secagg": rec})


def decode_shares_revealed(content: Content) -> tuple[dict[int, bytes], dict[int, bytes]]:
    rec = content.configs["secagg"]
    return _by_node("b-", rec), _by_node("s-", rec)


def encode_revealed(revealed: dict[int, bytes]) -> Content:
    return Content(configs={"secagg": {f"key-{j}": k for j, k in revealed.items()}})


def decode_revealed(content: Content) -> dict[int, bytes]:
    rec = content.configs["secagg"]
    return {int(k[4:]): bytes(v) for k, v in rec.items() if k.startswith("key-")}


# --- statistics ---------------------------------------------------------------------------------
@dataclass
class StatsSums:
    """Item counts over all training interactions and over the fit split, the users, the nodes,
    and how many nodes claimed each of the ``num-partitions`` user partitions (1 each when the
    partitions cover the users exactly once)."""

    train: np.ndarray
    fit: np.ndarray
    users: int
    nodes: int = 0
    claims: np.ndarray | None = None


def encode_stats(
    train: np.ndarray,
    fit: np.ndarray,
    users: int,
    partition_id: int = 0,
    num_partitions: int = 1,
) -> np.ndarray:
    """One node's statistics vector; it claims its partition ``partition_id`` of
    ``num_partitions`` (the node count and ``num_partitions`` close it, so the sum decodes
    without knowing either)."""
    claims = np.zeros(num_partitions)
    claims[partition_id] = 1
    return np.concatenate([train, fit, claims, [users, 1, num_partitions]])


def decode_stats(total: np.ndarray) -> StatsSums:
    nodes = int(round(total[-2]))
    num_partitions = int(round(total[-1] / max(nodes, 1)))
    n_items = (total.size - 3 - num_partitions) // 2
    return StatsSums(
        train=np.rint(total[:n_items]).astype(np.int64),
        fit=np.rint(total[n_items : 2 * n_items]).astype(np.int64),
        users=int(round(total[-3])),
        nodes=nodes,
        claims=np.rint(total[2 * n_items : 2 * n_items + num_partitions]).astype(np.int64),
    )


# --- K-Means and grouping -----------------------------------------------------------------------
def encode_centroids(data: DataSpec, centroids: np.ndarray) -> Content:
    return Content(arrays={"kmeans": {"centroids": centroids}}, configs={"data": data.to_config()})


def decode_centroids(content: Content) -> np.ndarray:
    return content.arrays["kmeans"]["centroids"]


def encode_kmeans_sums(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.concatenate([sums.ravel(), counts])


def decode_kmeans_sums(total: np.ndarray, k: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-centroid sums (k x dim) and member counts (rounded: masking adds float noise)."""
    return total[: k * dim].reshape(k, dim), np.rint(total[k * dim :])


def encode_group_counts(counts: np.ndarray) -> Content:
    """How many hosted users joined each group."""
    return Content(metrics={"groups": {f"g{g}": int(c) for g, c in enumerate(counts)}})


def decode_group_counts(content: Content, k: int) -> np.ndarray:
    rec = content.metrics["groups"]
    return np.array([int(rec[f"g{g}"]) for g in range(k)])


# --- the block layout (PEE learning and evaluation) ---------------------------------------------
def encode_layout(layout: BlockLayout) -> Arrays:
    return {"item-groups": layout.item_groups}


def decode_layout(content: Content) -> BlockLayout:
    """The layout from the ``layout`` arrays and the ``pee`` config's ``num-blocks`` and ``dim``."""
    rec = content.configs["pee"]
    item_groups = content.arrays["layout"]["item-groups"]
    return BlockLayout(item_groups, int(rec["dim"]), int(rec["num-blocks"]))


# --- pretraining --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainStep:
    """One pretraining message: ``step`` is ``init`` (first contributions of layer ``k``),
    ``round`` (train the hosted users taking part in ``round``) or ``final`` (keep the final
    user vectors on the device)."""

    step: str
    dim: int
    layers: int
    local_steps: int
    user_lr: float
    secure: bool
    k: int | None = None
    round: int | None = None
    rounds_per_pass: int | None = None
    dp_clip: float = 0.0  # user-level DP: each user's upload scaled to this L2 bound (0: off)
    decoys: int = 0  # decoy items per user, uploaded as if interacted
    dp_private: bool = False  # DP noise on the server: the loss stays on the device
    ldp_noise: float = 0.0  # local DP: each user's noise on its upload, in multiples of dp_clip
    negative_sampling: str = "uniform"  # or "dns": the device picks hard negatives
    dns_candidates: int = 16
    lr_schedule: str = "constant"  # or "cosine" over ``total_rounds``
    total_rounds: int = 0

    def to_config(self) -> Config:
        rec: Config = {
            "dim": self.dim,
            "layers": self.layers,
            "local-steps": self.local_steps,
            "user-lr": self.user_lr,
            "secure": self.secure,
            "step": self.step,
        }
        if self.dp_clip:
            rec["dp-clip"] = float(self.dp_clip)
        if self.decoys:
            rec["decoys"] = int(self.decoys)
        if self.dp_private:
            rec["dp-private"] = True
        if self.ldp_noise:
            rec["ldp-noise"] = float(self.ldp_noise)
        if self.negative_sampling != "uniform":
            rec["negative-sampling"] = self.negative_sampling
            rec["dns-candidates"] = int(self.dns_candidates)
        if self.lr_schedule != "constant":
            rec["lr-schedule"] = self.lr_schedule
            rec["total-rounds"] = int(self.total_rounds)
        if self.k is not None:
            rec["k"] = self.k
        if self.round is not None:
            rec["round"] = self.round
        if self.rounds_per_pass is not None:
            rec["rounds-per-pass"] = self.rounds_per_pass
        return rec

    @classmethod
    def from_config(cls, rec: Config) -> PretrainStep:
        def opt(key: str) -> int | None:
            return int(rec[key]) if key in rec else None

        return cls(
            step=str(rec["step"]),
            dim=int(rec["dim"]),
            layers=int(rec["layers"]),
            local_steps=int(rec["local-steps"]),
            user_lr=float(rec["user-lr"]),
            secure=bool(rec.get("secure", False)),
            k=opt("k"),
            round=opt("round"),
            rounds_per_pass=opt("rounds-per-pass"),
            dp_clip=float(rec.get("dp-clip", 0.0)),
            decoys=int(rec.get("decoys", 0)),
            dp_private=bool(rec.get("dp-private", False)),
            ldp_noise=float(rec.get("ldp-noise", 0.0)),
            negative_sampling=str(rec.get("negative-sampling", "uniform")),
            dns_candidates=int(rec.get("dns-candidates", 16)),
            lr_schedule=str(rec.get("lr-schedule", "constant")),
            total_rounds=int(rec.get("total-rounds", 0)),
        )


@dataclass
class PretrainDown:
    """A pretraining download: the step, the item layers ``E0..EK`` and the fit item degree.

    With ``rows`` (a sparse download, ``pretrain-download``), ``layers`` and ``degree`` hold just
    those rows; :func:`decode_pretrain_down` lays them out over the whole table, zero elsewhere,
    so the device computes as it does on the full tables (it reads only the rows it asked for).
    """

    data: DataSpec
    step: PretrainStep
    layers: list[np.ndarray]
    degree: np.ndarray
    rows: np.ndarray | None = None
    n_items: int = 0  # the table's rows (sparse downloads)


def encode_pretrain_down(down: PretrainDown) -> Content:
    arrays = {
        "tables": {f"layer-{k}": layer for k, layer in enumerate(down.layers)},
        "degree": {"degree": down.degree},
    }
    configs = {"data": down.data.to_config(), "pretrain": down.step.to_config()}
    if down.rows is not None:
        arrays["rows"] = {"rows": np.asarray(down.rows, dtype=np.int64)}
        configs["sparse"] = {"n-items": int(down.n_items)}
    return Content(arrays=arrays, configs=configs)


def decode_pretrain_down(content: Content) -> PretrainDown:
    """The download, with sparse rows laid out over the whole table (zero elsewhere)."""
    step = PretrainStep.from_config(content.configs["pretrain"])
    tables = content.arrays["tables"]
    layers = [tables[f"layer-{k}"] for k in range(step.layers + 1)]
    degree = content.arrays["degree"]["degree"]
    if "rows" in content.arrays:
        rows = content.arrays["rows"]["rows"]
        n_items = int(content.configs["sparse"]["n-items"])
        _check_rows([rows], n_items, "sparse pretraining rows")
        layers = [_scatter(rows, layer, n_items) for layer in layers]
        degree = _scatter(rows, degree, n_items)
    return PretrainDown(data=decode_data(content), step=step, layers=layers, degree=degree)


def _scatter(rows: np.ndarray, values: np.ndarray, n_items: int) -> np.ndarray:
    """A sparse download's ``values`` (one per row of ``rows``) laid out over the whole table,
    zero elsewhere."""
    table = np.zeros((n_items, *values.shape[1:]), dtype=values.dtype)
    table[rows] = values
    return table


def encode_rows_request(data: DataSpec, step: PretrainStep) -> Content:
    """Sparse pretraining downloads, first half: the step, without tables; the node answers with
    the rows it will read (:func:`encode_rows_wanted`)."""
    return Content(configs={"data": data.to_config(), "pretrain": step.to_config()})


def decode_rows_request(content: Content) -> tuple[DataSpec, PretrainStep]:
    return decode_data(content), PretrainStep.from_config(content.configs["pretrain"])


def encode_rows_wanted(rows: np.ndarray, users: int) -> Content:
    """The item rows a node reads in the step it was asked about (sorted, unique)."""
    return Content(
        arrays={"rows": {"rows": np.asarray(rows, dtype=np.int64)}},
        metrics={"metrics": {"users": users}},
    )


def decode_rows_wanted(content: Content, n_items: int) -> np.ndarray:
    """The rows a node asked for; a one-line error for ids outside the table."""
    rows = np.asarray(content.arrays["rows"]["rows"], dtype=np.int64)
    _check_rows([rows], n_items, "a node asked for pretraining rows")
    return np.unique(rows)


# Sparse downloads without an ask exchange per step: a pretraining or PEE message may name the
# next step (``kind`` "pretrain" or "pee", with that step's settings), and the node's reply then
# carries the rows it will read in it, laid out as its answer to an ask would be (the rows depend
# only on the users' own generators, never on the tables), so the server skips that step's ask.
def ask_ahead(content: Content, kind: str, settings: Config) -> Content:
    """``content`` (a training message) that also asks for the rows of the next step."""
    return replace(content, configs={**content.configs, f"next-{kind}": settings})


def asked_ahead(content: Content, kind: str) -> Config | None:
    """The settings of the next step a training message asks the rows of, if any."""
    return content.configs.get(f"next-{kind}")


def answer_ahead(reply: Content, kind: str, settings: Config, wanted: Content) -> Content:
    """A training reply that also carries ``wanted`` (the node's answer to an ask for the step
    of ``settings``: :func:`encode_rows_wanted`, :func:`encode_pee_rows_wanted`)."""
    return replace(
        reply,
        arrays={**reply.arrays, "next-rows": wanted.arrays["rows"]},
        configs={**reply.configs, f"next-{kind}": settings},
    )


def answered_ahead(reply: Content, kind: str) -> tuple[Config, Content] | None:
    """(settings of the next step, the answer to its ask) that a training reply carries, if
    any; decode the answer as an ask's."""
    if "next-rows" not in reply.arrays or f"next-{kind}" not in reply.configs:
        return None
    return reply.configs[f"next-{kind}"], Content(arrays={"rows": reply.arrays["next-rows"]})


def encode_contribution(rows: np.ndarray, delta: np.ndarray, users: int) -> Content:
    """The first contributions of one layer (``init`` step) in the clear."""
    return Content(
        arrays={"upload": {"contrib-rows": rows, "contrib-delta": delta}},
        metrics={"metrics": {"users": users}},
    )


def decode_contribution(content: Content) -> tuple[np.ndarray, np.ndarray]:
    """Rows and contribution change (layers x rows x dim) of an ``init`` upload."""
    up = content.arrays["upload"]
    return up["contrib-rows"], up["contrib-delta"]


def encode_final_reply(users: int) -> Content:
    """The ``final`` step's reply: nothing goes up but the number of hosted users."""
    return Content(arrays={"upload": {}}, metrics={"metrics": {"users": users}})


def encode_device_update(update: DeviceUpdate) -> Content:
    """A pretraining round's upload in the clear."""
    return Content(
        arrays={"upload": _device_update_arrays(update)},
        metrics={
            "metrics": {
                "users": update.users,
                "loss-sum": update.loss_sum,
                "solo-bytes": update.solo_bytes,
            }
        },
    )


def _device_update_arrays(update: DeviceUpdate) -> Arrays:
    return {
        "rows": update.rows,
        "grad": update.grad.numpy(),
        "row-devices": update.row_devices,
        "contrib-rows": update.contrib_rows,
        "contrib-delta": update.contrib_delta.numpy(),
    }


def decode_device_update(content: Content) -> DeviceUpdate:
    import torch

    from peel_fed.fedlightgcn import DeviceUpdate

    up, m = content.arrays["upload"], content.metrics["metrics"]
    return DeviceUpdate(
        rows=up["rows"],
        grad=torch.from_numpy(up["grad"]),
        row_devices=up["row-devices"],
        contrib_rows=up["contrib-rows"],
        contrib_delta=torch.from_numpy(up["contrib-delta"]),
        loss_sum=float(m["loss-sum"]),
        users=int(m["users"]),
        solo_bytes=int(m["solo-bytes"]),
    )


def decode_upload_users(content: Content) -> tuple[int, int]:
    """A clear upload's taking-part users and the bytes they would upload alone."""
    m = content.metrics["metrics"]
    return int(m["users"]), int(m["solo-bytes"])


def encode_pretrain_row_counts(
    n_items: int,
    rows: np.ndarray,
    row_devices: np.ndarray,
    loss_sum: float,
    users: int,
    hide_rows: bool = False,
) -> np.ndarray:
    """Secure rows, first half: ``[devices per row (items) | loss sum | users]``; ``hide_rows``
    (distributed DP) sends zero counts, as the server then takes every row."""
    counts = np.zeros(n_items)
    if not hide_rows:
        counts[rows] = row_devices
    return np.concatenate([counts, [loss_sum, users]])


@dataclass
class RowCounts:
    """The summed first half of a secure pretraining round."""

    counts: np.ndarray  # devices per item row
    loss_sum: float
    users: int

    @property
    def union(self) -> np.ndarray:
        """The rows any device of the cohort touched."""
        return np.flatnonzero(self.counts > 0)


def decode_pretrain_row_counts(total: np.ndarray, n_items: int) -> RowCounts:
    return RowCounts(
        counts=np.rint(total[:n_items]).astype(np.int64),
        loss_sum=float(total[n_items]),
        users=int(round(total[n_items + 1])),
    )


def encode_rows_down(
    data: DataSpec, union: np.ndarray, noise_std: float = 0.0, noise_source: str = "seed"
) -> Content:
    """Secure rows, second half (pretraining): the cohort's row union goes down, and under
    distributed DP each node's noise share (its standard deviation and where it is drawn)."""
    configs = {"data": data.to_config(), **_noise_share_config(noise_std, noise_source)}
    return Content(arrays={"rows": {"rows": union}}, configs=configs)


def decode_rows_down(content: Content) -> np.ndarray:
    return content.arrays["rows"]["rows"]


def _noise_share_config(noise_std: float, noise_source: str) -> dict[str, Config]:
    """Distributed DP: the config record that names each node's noise share (none without)."""
    if not noise_std:
        return {}
    return {"ddp": {"noise-std": float(noise_std), "noise-source": noise_source}}


def decode_noise_share(content: Content) -> tuple[float, str]:
    """Distributed DP: the standard deviation of this node's noise share (0: none) and its
    source (``peel_fed.privacy.NOISE_SOURCES``)."""
    ddp = content.configs.get("ddp", {})
    return float(ddp.get("noise-std", 0.0)), str(ddp.get("noise-source", "seed"))


def pretrain_rows_released(
    union_size: int, dim: int, layers: int, init_layer: int | None
) -> list[slice]:
    """The parts of a second-half pretraining upload (:func:`encode_pretrain_rows`) that the
    server releases: all of it in a round, only layer ``init_layer``'s contributions in an
    ``init`` step (where distributed DP puts its noise)."""
    block = union_size * dim
    if init_layer is None:
        return [slice(0, block * (1 + layers))]
    if not 0 <= init_layer < layers:
        raise ValueError(f"init layer {init_layer} outside 0..{layers - 1}")
    start = block * (1 + init_layer)
    return [slice(start, start + block)]


def encode_pretrain_rows(
    union: np.ndarray,
    rows: np.ndarray | None,
    grad: np.ndarray | None,
    contrib_rows: np.ndarray,
    contrib_delta: np.ndarray,
) -> np.ndarray:
    """Secure rows, second half: ``[E0 gradient over union | contribution change per layer over
    union]``, zero where this node did not touch a row; ``rows`` is None for an ``init`` step."""
    dim = contrib_delta.shape[-1]
    dense_grad = np.zeros((union.size, dim))
    if rows is not None and rows.size:
        dense_grad[np.searchsorted(union, rows)] = grad
    contrib = np.zeros((contrib_delta.shape[0], union.size, dim))
    if contrib_rows.size:
        contrib[:, np.searchsorted(union, contrib_rows)] = contrib_delta
    return np.concatenate([dense_grad.ravel(), contrib.ravel()])


def decode_pretrain_rows(
    values: np.ndarray, first: RowCounts, layers: int, dim: int, has_grad: bool
) -> DeviceUpdate:
    """The cohort's summed update from both halves; ``has_grad`` is False for an ``init`` step
    (contributions only)."""
    import torch

    from peel_fed.fedlightgcn import DeviceUpdate

    union, counts = first.union, first.counts
    grad = values[: union.size * dim].reshape(union.size, dim)
    delta = values[union.size * dim :].reshape(layers, union.size, dim)
    return DeviceUpdate(
        rows=union if has_grad else union[:0],
        grad=torch.from_numpy(grad if has_grad else grad[:0]).float(),
        row_devices=counts[union] if has_grad else counts[:0],
        contrib_rows=union,
        contrib_delta=torch.from_numpy(delta).float(),
        loss_sum=first.loss_sum,
        users=first.users,
    )


# --- PEE learning -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PEERound:
    """One PEE learning round's settings, as every device of the round receives them."""

    round: int
    rounds_per_pass: int
    local_steps: int
    user_lr: float
    num_blocks: int
    dim: int
    num_item_groups: int
    num_user_groups: int
    secure: bool
    dp_clip: float = 0.0  # user-level DP: each user's upload scaled to this L2 bound (0: off)
    dp_private: bool = False  # DP noise on the server: loss statistics stay on the device
    ldp_noise: float = 0.0  # local DP: each user's noise on its upload, in multiples of dp_clip

    def to_config(self) -> Config:
        rec: Config = {
            "round": self.round,
            "rounds-per-pass": self.rounds_per_pass,
            "local-steps": self.local_steps,
            "user-lr": self.user_lr,
            "num-blocks": self.num_blocks,
            "dim": self.dim,
            "num-item-groups": self.num_item_groups,
            "num-user-groups": self.num_user_groups,
            "secure": self.secure,
        }
        if self.dp_clip:
            rec["dp-clip"] = float(self.dp_clip)
            rec["dp-private"] = bool(self.dp_private)
        if self.ldp_noise:
            rec["ldp-noise"] = float(self.ldp_noise)
        return rec

    @classmethod
    def from_config(cls, rec: Config) -> PEERound:
        return cls(
            round=int(rec["round"]),
            rounds_per_pass=int(rec["rounds-per-pass"]),
            local_steps=int(rec["local-steps"]),
            user_lr=float(rec["user-lr"]),
            num_blocks=int(rec["num-blocks"]),
            dim=int(rec["dim"]),
            num_item_groups=int(rec["num-item-groups"]),
            num_user_groups=int(rec["num-user-groups"]),
            secure=bool(rec.get("secure", False)),
            dp_clip=float(rec.get("dp-clip", 0.0)),
            dp_private=bool(rec.get("dp-private", False)),
            ldp_noise=float(rec.get("ldp-noise", 0.0)),
        )


@dataclass
class PEEDown:
    """A PEE learning download: per user group sent, its table and unit weights (alpha).

    With ``rows`` (a sparse download, ``pee-download``), ``tables[g]`` holds just the rows
    ``rows[g]``; :func:`decode_pee_down` lays them out over the whole table, zero elsewhere.
    """

    data: DataSpec
    round: PEERound
    tables: dict[int, np.ndarray]
    alphas: dict[int, np.ndarray]
    layout: BlockLayout
    rows: dict[int, np.ndarray] | None = None


def encode_pee_down(down: PEEDown) -> Content:
    tables: Arrays = {}
    for g, table in down.tables.items():
        tables[f"table-{g}"] = table
        tables[f"alpha-{g}"] = down.alphas[g]
    arrays = {"tables": tables, "layout": encode_layout(down.layout)}
    if down.rows is not None:
        arrays["rows"] = {f"rows-{g}": np.asarray(r, dtype=np.int64) for g, r in down.rows.items()}
    return Content(
        arrays=arrays,
        configs={"data": down.data.to_config(), "pee": down.round.to_config()},
    )


def decode_pee_down(content: Content) -> PEEDown:
    """The download, with sparse rows laid out over the whole table (zero elsewhere)."""
    named = content.arrays["tables"]
    groups = sorted(int(k[len("table-") :]) for k in named if k.startswith("table-"))
    layout = decode_layout(content)
    tables = {g: named[f"table-{g}"] for g in groups}
    if "rows" in content.arrays:
        rows = {g: content.arrays["rows"][f"rows-{g}"] for g in groups}
        _check_rows(rows.values(), layout.n_items, "sparse PEE rows")
        tables = {g: _scatter(rows[g], t, layout.n_items) for g, t in tables.items()}
    return PEEDown(
        data=decode_data(content),
        round=PEERound.from_config(content.configs["pee"]),
        tables=tables,
        alphas={g: named[f"alpha-{g}"] for g in groups},
        layout=layout,
    )


def _check_rows(rows: Iterable[np.ndarray], n_items: int, what: str) -> None:
    """A one-line error when any row id of ``rows`` lies outside a table of ``n_items``."""
    for r in rows:
        if r.size and (r.min() < 0 or r.max() >= n_items):
            raise ValueError(f"{what} outside the table of {n_items} items")


def encode_pee_rows_request(data: DataSpec, round_: PEERound) -> Content:
    """Sparse PEE downloads, first half: the round's settings, without tables; the node answers
    with the rows it will read per user group (:func:`encode_pee_rows_wanted`)."""
    return Content(configs={"data": data.to_config(), "pee": round_.to_config()})


def decode_pee_rows_request(content: Content) -> tuple[DataSpec, PEERound]:
    return decode_data(content), PEERound.from_config(content.configs["pee"])


def encode_pee_rows_wanted(rows: dict[int, np.ndarray], users: int) -> Content:
    """Per user group of the node's users, the table rows they read in the round asked about."""
    return Content(
        arrays={"rows": {f"group-{g}": np.asarray(r, dtype=np.int64) for g, r in rows.items()}},
        metrics={"metrics": {"users": users}},
    )


def decode_pee_rows_wanted(
    content: Content, n_items: int, num_user_groups: int
) -> dict[int, np.ndarray]:
    """The rows a node asked for, per user group; a one-line error for an unknown group or ids
    outside the table."""
    rows = {}
    for name, r in content.arrays["rows"].items():
        g = int(name[len("group-") :])
        if not 0 <= g < num_user_groups:
            raise ValueError(f"a node asked for PEE rows of user group {g} of {num_user_groups}")
        rows[g] = np.unique(np.asarray(r, dtype=np.int64))
    _check_rows(rows.values(), n_items, "a node asked for PEE rows")
    return rows


def _pee_stats(up: PEEUpload) -> np.ndarray:
    """``[validation devices, users | loss sums per item group | loss counts per item group]``."""
    return np.concatenate([[up.val_devices, up.users], up.loss_sum, up.loss_count])


def _pee_upload_from(
    rows: np.ndarray,
    grad: np.ndarray,
    row_devices: np.ndarray,
    weight_grad: np.ndarray,
    stats: np.ndarray,
    n_item_groups: int,
) -> PEEUpload:
    from peel_fed.fedpee import PEEUpload

    n = n_item_groups
    return PEEUpload(
        rows=rows,
        grad=grad,
        row_devices=row_devices,
        weight_grad=weight_grad,
        val_devices=int(round(stats[0])),
        loss_sum=stats[2 : 2 + n],
        loss_count=np.rint(stats[2 + n : 2 + 2 * n]),
        users=int(round(stats[1])),
    )


def encode_pee_uploads(uploads: dict[int, PEEUpload]) -> Arrays:
    """Per user group ``g`` the node hosts: ``g{g}-rows``, ``-grad``, ``-row-devices``,
    ``-weight-grad`` and ``-stats``."""
    out: Arrays = {}
    for g, up in uploads.items():
        out[f"g{g}-rows"] = up.rows
        out[f"g{g}-grad"] = up.grad
        out[f"g{g}-row-devices"] = up.row_devices
        out[f"g{g}-weight-grad"] = up.weight_grad
        out[f"g{g}-stats"] = _pee_stats(up)
    return out


def decode_pee_uploads(arrays: Arrays, n_item_groups: int) -> dict[int, PEEUpload]:
    groups = sorted(int(k[1:].split("-")[0]) for k in arrays if k.endswith("-stats"))
    return {
        g: _pee_upload_from(
            arrays[f"g{g}-rows"],
            arrays[f"g{g}-grad"],
            arrays[f"g{g}-row-devices"],
            arrays[f"g{g}-weight-grad"],
            arrays[f"g{g}-stats"],
            n_item_groups,
        )
        for g in groups
    }


def encode_pee_reply(uploads: dict[int, PEEUpload]) -> Content:
    """A PEE round's upload in the clear, with the node's users and solo bytes summed."""
    return Content(
        arrays={"upload": encode_pee_uploads(uploads)},
        metrics={
            "metrics": {
                "users": sum(up.users for up in uploads.values()),
                "solo-bytes": sum(up.solo_bytes for up in uploads.values()),
            }
        },
    )


def decode_pee_reply(content: Content, n_item_groups: int) -> dict[int, PEEUpload]:
    return decode_pee_uploads(content.arrays["upload"], n_item_groups)


def encode_pee_row_counts(
    uploads: dict[int, PEEUpload], user_groups: int, n_items: int, hide_rows: bool = False
) -> np.ndarray:
    """Secure rows, first half: ``[devices per row per user group (groups x items) | users]``;
    ``hide_rows`` (distributed DP) sends zero counts, as the server then takes every row."""
    counts = np.zeros((user_groups, n_items))
    for g, up in uploads.items():
        if not hide_rows:
            counts[g, up.rows] = up.row_devices
    users = sum(up.users for up in uploads.values())
    return np.concatenate([counts.ravel(), [users]])


def decode_pee_row_counts(total: np.ndarray, user_groups: int, n_items: int) -> np.ndarray:
    """Devices per row per user group (the trailing user count is not needed)."""
    return np.rint(total[: user_groups * n_items]).reshape(user_groups, n_items).astype(np.int64)


def pee_row_unions(counts: np.ndarray) -> list[np.ndarray]:
    """Per user group, the rows any device of the cohort touched."""
    return [np.flatnonzero(c > 0) for c in counts]


def encode_pee_rows_down(
    data: DataSpec,
    round_: PEERound,
    unions: list[np.ndarray],
    noise_std: float = 0.0,
    noise_source: str = "seed",
) -> Content:
    """Secure rows, second half (PEE learning): each group's row union, and under distributed
    DP each node's noise share (read by :func:`decode_noise_share`)."""
    configs = {
        "data": data.to_config(),
        "pee": round_.to_config(),
        **_noise_share_config(noise_std, noise_source),
    }
    return Content(
        arrays={"rows": {f"union-{g}": u for g, u in enumerate(unions)}}, configs=configs
    )


def decode_pee_rows_down(content: Content) -> tuple[PEERound, list[np.ndarray]]:
    round_ = PEERound.from_config(content.configs["pee"])
    rows = content.arrays["rows"]
    return round_, [rows[f"union-{g}"] for g in range(round_.num_user_groups)]


def encode_pee_rows(
    uploads: dict[int, PEEUpload], unions: list[np.ndarray], round_: PEERound
) -> np.ndarray:
    """Secure rows, second half: per user group ``[gradient over the group's row union |
    dL_val/d alpha (item groups x blocks) | loss statistics]``, zeros for groups not hosted."""
    n, dim = round_.num_item_groups, round_.dim
    parts = []
    for g, union in enumerate(unions):
        grad = np.zeros((union.size, dim))
        weight_grad = np.zeros(n * round_.num_blocks)
        stats = np.zeros(2 + 2 * n)
        if g in uploads:
            up = uploads[g]
            if up.rows.size:
                grad[np.searchsorted(union, up.rows)] = up.grad
            weight_grad = up.weight_grad.ravel()
            stats = _pee_stats(up)
        parts += [grad.ravel(), weight_grad, stats]
    return np.concatenate(parts)


def pee_rows_released(unions: list[np.ndarray], round_: PEERound) -> list[slice]:
    """The parts of a second-half PEE upload (:func:`encode_pee_rows`) that the server
    releases: per user group the row gradients and dL_val/d alpha (not the loss statistics,
    which stay zero on the devices under DP, nor the user counts)."""
    n, dim = round_.num_item_groups, round_.dim
    out, at = [], 0
    for union in unions:
        size = union.size * dim + n * round_.num_blocks
        out.append(slice(at, at + size))
        at += size + 2 + 2 * n
    return out


def decode_pee_rows(
    values: np.ndarray, counts: np.ndarray, unions: list[np.ndarray], layout: BlockLayout
) -> list[PEEUpload]:
    """The cohort's summed upload per user group from both halves."""
    n, blocks, dim = layout.num_item_groups, layout.num_blocks, layout.dim
    out, at = [], 0
    for g, union in enumerate(unions):
        grad = values[at : at + union.size * dim].reshape(union.size, dim)
        at += union.size * dim
        wgrad = values[at : at + n * blocks].reshape(n, blocks)
        at += n * blocks
        stats = values[at : at + 2 + 2 * n]
        at += 2 + 2 * n
        out.append(
            _pee_upload_from(union, grad.astype(np.float32), counts[g, union], wgrad, stats, n)
        )
    return out


# --- serving each device its own units (peel_fed.fedserve) ------------------------------------
@dataclass
class ServeOffer:
    """What a node needs to ask for its own units: the bit-plane unit orders of its users'
    groups, the item-group map, the embedding dimension, and how own budgets and the drill are
    set (as in the evaluation)."""

    data: DataSpec
    orders: dict[int, np.ndarray]
    item_groups: np.ndarray
    dim: int
    device_budgets: tuple[str, ...]
    full_table_bytes: int
    drill: tuple[float, ...]


def encode_serve_offer(offer: ServeOffer) -> Content:
    small = np.uint8 if int(offer.item_groups.max(initial=0)) < 256 else np.uint16
    arrays = {f"order-{g}": o.astype(np.int16) for g, o in offer.orders.items()}
    arrays["item-groups"] = offer.item_groups.astype(small)
    return Content(
        arrays={"serve": arrays},
        configs={
            "data": offer.data.to_config(),
            "serve-spec": {
                "dim": offer.dim,
                "device-budgets": list(offer.device_budgets),
                "full-table-bytes": offer.full_table_bytes,
                "drill": list(offer.drill),
            },
        },
    )


def decode_serve_offer(content: Content) -> ServeOffer:
    arrays, rec = content.arrays["serve"], content.configs["serve-spec"]
    return ServeOffer(
        data=decode_data(content),
        orders={
            int(k.split("-")[1]): np.asarray(v, dtype=np.int64)
            for k, v in arrays.items()
            if k.startswith("order-")
        },
        item_groups=np.asarray(arrays["item-groups"], dtype=np.int64),
        dim=int(rec["dim"]),
        device_budgets=tuple(str(b) for b in rec["device-budgets"]),
        full_table_bytes=int(rec["full-table-bytes"]),
        drill=tuple(float(f) for f in rec["drill"]),
    )


def encode_wanted(units: np.ndarray) -> Content:
    """The (group, plane) units a node asks for."""
    return Content(arrays={"wanted": {"units": np.asarray(units, dtype=np.int16).reshape(-1, 2)}})


def decode_wanted(content: Content) -> np.ndarray:
    return np.asarray(content.arrays["wanted"]["units"], dtype=np.int64).reshape(-1, 2)


def encode_units_down(data: DataSpec, index: np.ndarray, payload: np.ndarray) -> Content:
    """The units a node asked for (:func:`peel_fed.fedserve.encode_units`)."""
    return Content(
        arrays={"units": {"index": index, "payload": payload}}, configs={"data": data.to_config()}
    )


def decode_units_down(content: Content) -> tuple[np.ndarray, np.ndarray]:
    rec = content.arrays["units"]
    return np.asarray(rec["index"]), np.asarray(rec["payload"])


def encode_held(payload_bytes: int, budget_bytes: int) -> Content:
    """Bytes of the units a node holds, and the budget they answer to: per user group its users
    joined, the largest own budget among them, summed (one user: its own budget)."""
    return Content(
        metrics={"held": {"payload-bytes": int(payload_bytes), "budget-bytes": int(budget_bytes)}}
    )


def decode_held(content: Content) -> tuple[int, int]:
    rec = content.metrics["held"]
    return int(rec["payload-bytes"]), int(rec["budget-bytes"])


# --- evaluation ---------------------------------------------------------------------------------
@dataclass
class EvaluateDown:
    """The evaluation download: what to evaluate, every group's table, unit weights and unit
    order with the baselines' (see :func:`peel_fed.fedpee.evaluation_vector`), the final
    centroids (for a device that missed grouping) and the block layout."""

    data: DataSpec
    spec: EvalSpec
    tables: Arrays
    planes: PlaneOrders
    centroids: np.ndarray
    layout: BlockLayout


def encode_plane_orders(planes: PlaneOrders) -> Arrays:
    """The coded item table (uint16 codes, float16 row offsets and scales) and each user group's
    bit-plane unit order."""
    code = planes.code
    arrays = {"codes": code.codes, "offset": code.offset, "scale": code.scale}
    arrays.update({f"order-{g}": order for g, order in enumerate(planes.orders)})
    return arrays


def decode_plane_orders(arrays: Arrays, num_user_groups: int) -> PlaneOrders:
    from peel_fed.fedplanes import PlaneOrders
    from peel_fed.planes import PlaneCode

    code = PlaneCode(
        codes=np.asarray(arrays["codes"], dtype=np.uint16),
        offset=np.asarray(arrays["offset"], dtype=np.float16),
        scale=np.asarray(arrays["scale"], dtype=np.float16),
    )
    return PlaneOrders(code, [arrays[f"order-{g}"] for g in range(num_user_groups)])


def encode_evaluate_down(down: EvaluateDown) -> Content:
    return Content(
        arrays={
            "tables": dict(down.tables),
            "planes": encode_plane_orders(down.planes),
            "kmeans": {"centroids": down.centroids},
            "layout": encode_layout(down.layout),
        },
        configs={
            "data": down.data.to_config(),
            "evaluate": down.spec.to_config(),
            "pee": {"num-blocks": down.layout.num_blocks, "dim": down.layout.dim},
        },
    )


def decode_evaluate_down(content: Content) -> EvaluateDown:
    from peel_fed.fedeval import EvalSpec

    return EvaluateDown(
        data=decode_data(content),
        spec=(spec := EvalSpec.from_config(content.configs["evaluate"])),
        tables=dict(content.arrays["tables"]),
        planes=decode_plane_orders(content.arrays["planes"], spec.num_user_groups),
        centroids=decode_centroids(content),
        layout=decode_layout(content),
    )
