"""The device: a Flower ClientApp with one named action per phase.

A node hosts the users of its partition (``partition-id`` / ``num-partitions`` from the node
config). Each hosted user acts as if alone; the node only batches their work. The data to load
comes from the server's message (dataset name, data folder, seed); a ``data-dir`` in the node
config (deployment: each SuperNode's own data) takes precedence, and so does its ``device-budget``
(the phone's memory budget; simulation draws one per user from ``device-budgets``). Device state
(user vectors, their optimiser moments, group, PEE user vectors) lives in ``context.state``
between messages (:mod:`clients.state`).

Every handler decodes its message (:mod:`peel_fed.messages`), calls the core, and encodes the
reply; secure-aggregation uploads go up masked (:func:`masked_reply`).

Long file: one named action per phase, each a thin adapter; they share the reply and state
helpers and read best side by side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from clients import state
from clients.records import from_record_dict, to_record_dict
from clients.timing import timing_mod
from peel_fed.clustering import UserGroups, fold_in_user_vectors, kmeans_partial_sums
from peel_fed.messages import (
    Content,
    DataSpec,
    PEERound,
    PretrainStep,
    answer_ahead,
    asked_ahead,
    decode_centroids,
    decode_data,
    decode_dropped,
    decode_evaluate_down,
    decode_inbox,
    decode_noise_share,
    decode_pee_down,
    decode_pee_rows_down,
    decode_pee_rows_request,
    decode_pee_uploads,
    decode_peer_keys,
    decode_pretrain_down,
    decode_protocol,
    decode_rows_down,
    decode_rows_request,
    decode_serve_offer,
    decode_session,
    decode_share_request,
    decode_units_down,
    decode_unmask_request,
    encode_contribution,
    encode_device_update,
    encode_final_reply,
    encode_group_counts,
    encode_held,
    encode_kmeans_sums,
    encode_masked,
    encode_pee_reply,
    encode_pee_row_counts,
    encode_pee_rows,
    encode_pee_rows_wanted,
    encode_pee_uploads,
    encode_pretrain_row_counts,
    encode_pretrain_rows,
    encode_public_key,
    encode_revealed,
    encode_rows_wanted,
    encode_share_ciphertexts,
    encode_shares_revealed,
    encode_stats,
    encode_wanted,
    pee_rows_released,
    pretrain_rows_released,
)
from peel_fed.secagg import SecAggClient

if TYPE_CHECKING:
    from peel_fed.fedlightgcn import PretrainDevices

# Deployment starts a fresh process for every message, so imports are paid per message: torch
# (about 1.5 s here) is imported only by the handlers that train or rank (``_torch``), not by
# the secure-aggregation and grouping messages.


def _torch():
    import torch

    torch.set_num_threads(1)
    return torch


def _reply(msg: Message, content: Content) -> Message:
    return Message(to_record_dict(content), reply_to=msg)


def masked_reply(msg: Message, context: Context, content: Content, vector: np.ndarray) -> Message:
    """``vector`` masked for the session named in ``content`` (the decoded contents of ``msg``):
    pairwise masks for the cohort's keys, or (Shamir) the self-mask and pairwise masks after
    taking the shares in the node's inbox. The upload names the public keys it was masked under.
    """
    vector = np.asarray(vector, dtype=np.float64)
    if decode_protocol(content) == "shamir":
        inbox, round_tag = decode_inbox(content)
        client = state.shamir_client(context, round_tag)
        client.receive_shares(inbox)
        masked = client.masked(vector)
        state.save_shamir_client(context, client)
        return _reply(msg, encode_masked(masked, state.shamir_public_keys(client)))
    peer_keys, round_tag = decode_peer_keys(content)
    client = state.secagg_client(context, round_tag)
    masked = client.masked(vector, peer_keys, round_tag)
    return _reply(msg, encode_masked(masked, client.public_key()))


def _noise_share(
    content: Content,
    context: Context,
    vector: np.ndarray,
    released: list[slice],
    exchange: tuple[int, int, int],
) -> np.ndarray:
    """Distributed DP: ``vector`` with this node's share of the noise on its ``released`` parts
    (as the server asked: none without distributed DP)."""
    std, source = decode_noise_share(content)
    if not std:
        return vector
    from peel_fed.privacy import add_noise_share, noise_share_rng  # torch: training messages only

    pid, _ = state.partition(context)
    rng = noise_share_rng(source, decode_data(content).seed, pid, exchange)
    return add_noise_share(vector, released, std, rng)


# --- secure aggregation -------------------------------------------------------------------------
def keys(msg: Message, context: Context) -> Message:
    """Start a secure-aggregation session for the round tag and protocol named in the message:
    a fresh X25519 key pair (pairwise; its public half goes up), or a fresh Shamir round (two
    key pairs and a self-mask seed; both public halves go up)."""
    content = from_record_dict(msg.content)
    round_tag = decode_session(content)
    if decode_protocol(content) == "shamir":
        return _reply(msg, encode_public_key(state.new_shamir_client(context, round_tag)))
    private = state.new_secagg_key(context, round_tag)
    public = SecAggClient(context.node_id, private_key=private).public_key()
    return _reply(msg, encode_public_key(public))


def shares(msg: Message, context: Context) -> Message:
    """Shamir only: split this node's self-mask seed and mask key among the cohort (threshold
    ``t``) and send each peer's pair of shares encrypted to that peer (the server relays them)."""
    keys_, round_tag, threshold = decode_share_request(from_record_dict(msg.content))
    client = state.shamir_client(context, round_tag)
    ciphertexts = client.share_keys(keys_, threshold)
    state.save_shamir_client(context, client)
    return _reply(msg, encode_share_ciphertexts(ciphertexts))


def reveal(msg: Message, context: Context) -> Message:
    """Pairwise: round keys shared with peers that dropped out, so the server can remove their
    masks. Shamir: shares of the survivors' self-mask seeds and of the dropped nodes' mask keys
    (never both for one node: the client refuses)."""
    content = from_record_dict(msg.content)
    if decode_protocol(content) == "shamir":
        round_tag, survivors, dropped = decode_unmask_request(content)
        client = state.shamir_client(context, round_tag)
        answer = client.unmask_shares(survivors, dropped)
        state.save_shamir_client(context, client)
        return _reply(msg, encode_shares_revealed(answer.self_mask, answer.pair_secret))
    peer_keys, round_tag = decode_peer_keys(content)
    revealed = state.secagg_client(context, round_tag).reveal_pair_seeds(
        decode_dropped(content), peer_keys, round_tag
    )
    return _reply(msg, encode_revealed(revealed))


# --- statistics ---------------------------------------------------------------------------------
def stats(msg: Message, context: Context) -> Message:
    """Item counts of the hosted users (all training items, and the fit split), and their number,
    securely aggregated, so the server learns only the sums over all nodes, never a node's items.
    """
    content = from_record_dict(msg.content)
    node = state.node_data(decode_data(content), context)
    n_items = node.ds.n_items
    train = np.bincount(node.items_of(node.ds.train), minlength=n_items)
    fit = np.bincount(node.items_of(node.split.fit), minlength=n_items)
    pid, num = state.partition(context)
    vector = encode_stats(train, fit, node.users.size, pid, num)
    return masked_reply(msg, context, content, vector)


# --- pretraining --------------------------------------------------------------------------------
def _pretrain_devices(
    node: state.NodeData, step: PretrainStep, degree: np.ndarray, seed: int
) -> PretrainDevices:
    """The hosted users' side of federated LightGCN for a pretraining ``step``."""
    from peel_fed.fedlightgcn import FedLightGCNConfig, PretrainDevices

    cfg = FedLightGCNConfig(
        dim=step.dim,
        layers=step.layers,
        local_steps=step.local_steps,
        user_lr=step.user_lr,
        decoys=step.decoys,
        ldp_noise=step.ldp_noise,
        negative_sampling=step.negative_sampling,
        dns_candidates=step.dns_candidates,
        lr_schedule=step.lr_schedule,
        rounds=step.total_rounds,
    )
    return PretrainDevices(
        node.users,
        node.ds.n_users,
        node.ds.n_items,
        node.split.fit,
        degree,
        cfg,
        seed,
        sampler=node.fit_sampler,
    )


def pretrain_rows(msg: Message, context: Context) -> Message:
    """Sparse downloads: the item rows this node will read in the pretraining step it is asked
    about (its users' items; in a round also the taking-part users' negatives and decoys), all
    drawn by the users' own generators, so known before the tables come."""
    data, step = decode_rows_request(from_record_dict(msg.content))
    node = state.node_data(data, context)
    rows = _rows_read(node, step, data.seed)
    return _reply(msg, encode_rows_wanted(rows, int(node.users.size)))


def _rows_read(node: state.NodeData, step: PretrainStep, seed: int) -> np.ndarray:
    """The item rows the hosted users read in pretraining ``step`` (``PretrainDevices.rows_read``:
    drawn by the users' own generators, so known before the tables come)."""
    from peel_fed.fedlightgcn import round_participants

    devices = _pretrain_devices(node, step, np.ones(node.ds.n_items), seed)
    taking_part = None
    if step.step == "round":
        taking_part = round_participants(seed, node.users, step.round, step.rounds_per_pass)
    return devices.rows_read(step.step, taking_part, step.round or 0)


def _pretrain_reply(msg: Message, content: Content, reply: Content, node, seed: int) -> Message:
    """A clear pretraining reply; where the message names the next step (sparse downloads),
    it also carries the rows the node reads in that step, so the server need not ask."""
    ahead = asked_ahead(content, "pretrain")
    if ahead is not None:
        rows = _rows_read(node, PretrainStep.from_config(ahead), seed)
        wanted = encode_rows_wanted(rows, int(node.users.size))
        reply = answer_ahead(reply, "pretrain", ahead, wanted)
    return _reply(msg, reply)


def pretrain(msg: Message, context: Context) -> Message:
    """Federated LightGCN: ``step = init`` sends the first contributions of layer ``k``,
    ``step = round`` trains the hosted users taking part in the round, ``step = final`` keeps the
    final user vectors on the device for grouping and PEE learning (nothing goes up)."""
    torch = _torch()
    from peel_fed.fedlightgcn import round_participants

    content = from_record_dict(msg.content)
    down = decode_pretrain_down(content)
    node = state.node_data(down.data, context)
    store = state.device_store(context, down.data)
    step = down.step
    devices = _pretrain_devices(node, step, down.degree, down.data.seed)
    # the state after the previous step: a step the server redoes after a crash starts from it
    version = step.k - step.layers if step.step == "init" else step.round
    saved = store.load("pretrain", before=None if step.step == "final" else version)
    if saved is not None:
        devices.load_state(saved)
    elif down.data.resumed and (step.step != "init" or step.k > 0):
        if step.step != "final":
            raise state.DeviceStateLost(
                "device state lost: no saved pretraining state on this node after the server "
                "resumed; its users sit out pretraining and fold in at the end"
            )
    layers = [torch.from_numpy(layer) for layer in down.layers]
    users = int(node.users.size)
    clip = step.dp_clip or None
    if step.step == "final":
        if saved is None and down.data.resumed:  # lost: rebuild as a cold-start user would
            bounds = node.split.fit.user_bounds(node.ds.n_users)
            own = [node.split.fit.items[bounds[u] : bounds[u + 1]] for u in node.users]
            table = torch.stack(layers).mean(0).numpy()
            vectors = fold_in_user_vectors(node.users, own, table, down.degree)
        else:
            vectors = devices.final_user_vectors(layers)
        store.save_user_vectors(vectors)
        return _pretrain_reply(msg, content, encode_final_reply(users), node, down.data.seed)
    if step.step == "init":
        rows, delta = devices.initial_contribution(step.k, layers, clip=clip)
        if not step.secure:
            store.save("pretrain", devices.state_arrays(), version)
            reply = encode_contribution(rows, delta.numpy(), users)
            return _pretrain_reply(msg, content, reply, node, down.data.seed)
        pending = {"contrib-rows": rows, "contrib-delta": delta.numpy()}
        counts = encode_pretrain_row_counts(
            node.ds.n_items, rows, np.ones(rows.size), 0.0, users, hide_rows=step.dp_private
        )
    elif step.step == "round":
        taking_part = round_participants(devices.seed, node.users, step.round, step.rounds_per_pass)
        up = devices.device_round(taking_part, layers, step.round, clip, step.dp_private)
        if not step.secure:
            store.save("pretrain", devices.state_arrays(), version)
            return _pretrain_reply(msg, content, encode_device_update(up), node, devices.seed)
        pending = {
            "rows": up.rows,
            "grad": up.grad.numpy(),
            "contrib-rows": up.contrib_rows,
            "contrib-delta": up.contrib_delta.numpy(),
        }
        counts = encode_pretrain_row_counts(
            node.ds.n_items,
            up.rows,
            up.row_devices,
            up.loss_sum,
            up.users,
            hide_rows=step.dp_private,
        )
    else:
        raise ValueError(f"unknown pretrain step {step.step!r}")
    return _hold_pretrain_upload(msg, context, content, devices, pending, counts, saved, version)


def _hold_pretrain_upload(
    msg: Message,
    context: Context,
    content: Content,
    devices: PretrainDevices,
    pending: dict[str, np.ndarray],
    counts: np.ndarray,
    saved: dict[str, np.ndarray] | None,
    version: int,
) -> Message:
    """Secure-rows mode, first half: keep the upload on the device and send only the masked
    per-row device counts, from which the server learns the union of the cohort's rows. The
    contribution change is committed only once its values have been aggregated (``train.rows``),
    so a failure in between is resent in a later round."""
    store = state.device_store(context, decode_data(content))
    store.save(
        "pretrain-pending",
        {
            **pending,
            "contrib-new": devices.contrib.numpy().copy(),
            "version": np.array([version]),
        },
    )
    device_state = devices.state_arrays()
    if saved is not None:
        device_state["contrib"] = saved["contrib"]
    else:
        device_state["contrib"] = np.zeros_like(device_state["contrib"])
    store.save("pretrain", device_state, version)
    return masked_reply(msg, context, content, counts)


def rows(msg: Message, context: Context) -> Message:
    """Secure-rows mode, second half: the pending upload laid out densely over the cohort's row
    union (``E0`` gradient rows, then the contribution change per layer), masked."""
    content = from_record_dict(msg.content)
    store = state.device_store(context, decode_data(content))
    pending = store.load("pretrain-pending")
    if pending is None:
        raise RuntimeError("train.rows without a pending pretraining upload")
    union = decode_rows_down(content)
    delta = pending["contrib-delta"]
    vector = encode_pretrain_rows(
        union, pending.get("rows"), pending.get("grad"), pending["contrib-rows"], delta
    )
    version = int(pending["version"][0])  # init: k - layers (negative); a round: its number
    layers, dim = delta.shape[0], delta.shape[-1]
    init_layer = version + layers if version < 0 else None
    released = pretrain_rows_released(union.size, dim, layers, init_layer)
    exchange = (1, 0, init_layer) if init_layer is not None else (1, 1, version)
    vector = _noise_share(content, context, vector, released, exchange)
    reply = masked_reply(msg, context, content, vector)
    device_state = {**store.load("pretrain"), "contrib": pending["contrib-new"]}
    store.save("pretrain", device_state, int(pending["version"][0]))
    store.drop("pretrain-pending")
    return reply


# --- grouping -----------------------------------------------------------------------------------
def kmeans(msg: Message, context: Context) -> Message:
    """One Lloyd step's share, securely aggregated: per-centroid sums and counts."""
    content = from_record_dict(msg.content)
    centroids = decode_centroids(content)
    store = state.device_store(context, decode_data(content))
    sums, counts = kmeans_partial_sums(store.user_vectors(), centroids)
    return masked_reply(msg, context, content, encode_kmeans_sums(sums, counts))


def _nearest_groups(store: state.DeviceStore, centroids: np.ndarray) -> np.ndarray:
    return UserGroups(np.zeros(0, dtype=np.int64), centroids).nearest(store.user_vectors())


def group(msg: Message, context: Context) -> Message:
    """Join the nearest final centroid; the server learns how many hosted users joined each."""
    content = from_record_dict(msg.content)
    centroids = decode_centroids(content)
    store = state.device_store(context, decode_data(content))
    groups = _nearest_groups(store, centroids)
    store.save_user_groups(groups)
    return _reply(msg, encode_group_counts(np.bincount(groups, minlength=centroids.shape[0])))


def planes(msg: Message, context: Context) -> Message:
    """The hosted users' share of the bit-plane statistics, securely aggregated: per user group
    the sum of their vectors' squares, their number and their training item counts."""
    from peel_fed.fedplanes import plane_stats_vector

    content = from_record_dict(msg.content)
    centroids = decode_centroids(content)
    node = state.node_data(decode_data(content), context)
    store = state.device_store(context, decode_data(content))
    groups = store.user_groups()
    if groups is None:  # missed the grouping round: join the nearest centroid now
        groups = _nearest_groups(store, centroids)
    vector = plane_stats_vector(
        node.users,
        store.user_vectors(),
        groups,
        centroids.shape[0],
        node.ds.train,
        node.ds.n_items,
    )
    return masked_reply(msg, context, content, vector)


# --- PEE learning -------------------------------------------------------------------------------
def _pee_round_users(
    node: state.NodeData, store: state.DeviceStore, round_: PEERound, seed: int
) -> dict[int, np.ndarray]:
    """Per user group of the hosted users, those of them that take part in the round."""
    from peel_fed.fedlightgcn import round_participants
    from peel_fed.fedpee import PEE_SLOT_STREAM

    groups = store.user_groups()
    if groups is None:
        raise RuntimeError("PEE learning before grouping on this node")
    taking_part = np.isin(
        node.users,
        round_participants(seed, node.users, round_.round, round_.rounds_per_pass, PEE_SLOT_STREAM),
    )
    return {g: node.users[(groups == g) & taking_part] for g in sorted(set(groups.tolist()))}


def pee_read(msg: Message, context: Context) -> Message:
    """Sparse PEE downloads: per user group of the hosted users, the table rows the round's
    taking-part users will read (their training and validation items and negatives, all drawn
    by their own generators, so known before the tables come)."""
    data, round_ = decode_pee_rows_request(from_record_dict(msg.content))
    node = state.node_data(data, context)
    store = state.device_store(context, data)
    return _reply(msg, _pee_rows_wanted(node, store, round_, data.seed))


def _pee_rows_wanted(
    node: state.NodeData, store: state.DeviceStore, round_: PEERound, seed: int
) -> Content:
    """Per user group of the hosted users, the table rows they read in ``round_``."""
    from peel_fed.fedpee import PEEPairs

    split = node.split
    pairs = PEEPairs(
        node.ds.n_users, node.ds.n_items, split.fit, split.val, seed, node.known_sampler
    )
    rows = {
        g: pairs.rows_read(users, round_.round)
        for g, users in _pee_round_users(node, store, round_, seed).items()
    }
    return encode_pee_rows_wanted(rows, int(node.users.size))


def pee(msg: Message, context: Context) -> Message:
    """Fine-tune the tables of the hosted users' groups; gradients and dL_val/d alpha go up."""
    _torch()
    from peel_fed.fedpee import FedPEEConfig, PEEDevices

    content = from_record_dict(msg.content)
    down = decode_pee_down(content)
    node = state.node_data(down.data, context)
    round_, seed = down.round, down.data.seed
    store = state.device_store(context, down.data)
    round_users = _pee_round_users(node, store, round_, seed)
    cfg = FedPEEConfig(
        local_steps=round_.local_steps,
        user_lr=round_.user_lr,
        elastic=True,
        ldp_noise=round_.ldp_noise,
    )
    devices = PEEDevices(
        node.users,
        store.user_vectors(),
        node.ds.n_users,
        node.split.fit,
        node.split.val,
        down.layout,
        cfg,
        seed,
        node.known_sampler,
    )
    # the state after the previous round (a PEE state lost with its device starts over from
    # the pretrained vectors, as in round 1)
    saved = store.load("pee", before=round_.round)
    if saved is not None:
        devices.load_state(saved)
    uploads = {}
    for g, users in round_users.items():
        uploads[g] = devices.device_round(
            users,
            down.tables[g],
            down.alphas[g],
            round_.round,
            round_.dp_clip or None,
            round_.dp_private,
        )
    store.save("pee", devices.state_arrays(), round_.round)
    if round_.secure:
        # secure rows: keep the upload, send masked per-group row counts and the user count
        store.save("pee-pending", encode_pee_uploads(uploads))
        counts = encode_pee_row_counts(
            uploads, round_.num_user_groups, down.layout.n_items, hide_rows=round_.dp_private
        )
        return masked_reply(msg, context, content, counts)
    reply = encode_pee_reply(uploads)
    if (ahead := asked_ahead(content, "pee")) is not None:  # sparse downloads: next round's rows
        wanted = _pee_rows_wanted(node, store, PEERound.from_config(ahead), seed)
        reply = answer_ahead(reply, "pee", ahead, wanted)
    return _reply(msg, reply)


def pee_rows(msg: Message, context: Context) -> Message:
    """Secure rows, second half of a PEE round: per user group, the pending table-row gradients
    laid out over the group's row union, then dL_val/d alpha and the loss statistics, masked."""
    content = from_record_dict(msg.content)
    store = state.device_store(context, decode_data(content))
    pending = store.load("pee-pending")
    if pending is None:
        raise RuntimeError("train.peerows without a pending PEE upload")
    round_, unions = decode_pee_rows_down(content)
    uploads = decode_pee_uploads(pending, round_.num_item_groups)
    vector = encode_pee_rows(uploads, unions, round_)
    released = pee_rows_released(unions, round_)
    vector = _noise_share(content, context, vector, released, (2, 1, round_.round))
    reply = masked_reply(msg, context, content, vector)
    store.drop("pee-pending")
    return reply


# --- deployment and evaluation ------------------------------------------------------------------
def evaluate(msg: Message, context: Context) -> Message:
    """Keep the units that fit each budget, rank all items on the device, and send up Recall and
    NDCG sums (securely aggregated) per method and budget level, per own-budget class, and after
    each step of the dynamic-budget drill (shrinking with no server contact)."""
    _torch()
    from peel_fed.fedeval import evaluation_vector

    content = from_record_dict(msg.content)
    down = decode_evaluate_down(content)
    node = state.node_data(down.data, context)
    store = state.device_store(context, down.data)
    groups = store.user_groups()
    if groups is None:  # missed the grouping round (late or timed out): join the nearest now
        groups = _nearest_groups(store, down.centroids)
    pee_state = store.load("pee")
    pretrained = store.user_vectors()
    vector = evaluation_vector(
        down.spec,
        down.tables,
        down.planes,
        down.layout,
        node.users,
        groups,
        pee_state["vecs"] if pee_state is not None else pretrained,
        pretrained,
        node.ds.n_users,
        node.ds.train,
        node.ds.test,
        down.data.seed,
        node_budget=state.node_budget(context),
        validation=(node.split.fit, node.split.val),
    )
    if down.spec.with_served:  # the drill ranked with its own units, in the same secure sum
        served = _served_drill(
            store, node, down.data, down.spec.device_budgets, down.spec.full_table_bytes,
            down.spec.drill, groups, pretrained, context,
        )  # fmt: skip
        vector = np.concatenate([vector, served])
    return masked_reply(msg, context, content, vector)


# --- serving each device its own units ----------------------------------------------------------
def _served(store: state.DeviceStore):
    """The node's bit-plane stores as saved (None before its first offer)."""
    from peel_fed.fedserve import NodePlanes

    saved = store.load("served")
    if saved is None:
        return None
    return NodePlanes.from_state_arrays(saved, saved["item-groups"], int(saved["dim"][0]))


def _save_served(store: state.DeviceStore, planes) -> None:
    store.save(
        "served",
        {**planes.state_arrays(), "item-groups": planes.item_groups, "dim": np.array([planes.dim])},
    )


def serve_offer(msg: Message, context: Context) -> Message:
    """Work out the units the hosted users need (per group, the order's prefix at the largest
    own budget among its users) beyond those held, and ask for them."""
    from peel_fed.fedserve import NodePlanes, group_targets
    from peel_fed.own_budget import own_budget_bytes

    offer = decode_serve_offer(from_record_dict(msg.content))
    node = state.node_data(offer.data, context)
    store = state.device_store(context, offer.data)
    groups = store.user_groups()
    if groups is None:
        raise RuntimeError("no user group on this node: it missed grouping")
    own = own_budget_bytes(
        offer.data.seed,
        node.users,
        offer.device_budgets,
        offer.full_table_bytes,
        state.node_budget(context),
    )
    planes = _served(store)
    if planes is None:
        planes = NodePlanes(offer.orders, offer.item_groups, offer.dim)
    wanted = planes.wanted(group_targets(groups, own))
    _save_served(store, planes)
    return _reply(msg, encode_wanted(wanted))


def serve_units(msg: Message, context: Context) -> Message:
    """Keep the units the server sent (each in its group's store); the bytes held go up."""
    from peel_fed.fedserve import decode_units

    content = from_record_dict(msg.content)
    store = state.device_store(context, decode_data(content))
    planes = _served(store)
    if planes is None:
        raise RuntimeError("query.units before query.offer on this node")
    planes.add(decode_units(*decode_units_down(content)))
    _save_served(store, planes)
    # the budget the union answers to: per group its users joined, the largest own budget
    return _reply(msg, encode_held(planes.payload_bytes, sum(planes.targets.values())))


def _served_drill(
    store: state.DeviceStore,
    node: state.NodeData,
    data: DataSpec,
    choices: tuple[str, ...],
    full_table_bytes: int,
    drill: tuple[float, ...],
    groups: np.ndarray,
    vectors: np.ndarray,
    context: Context,
) -> np.ndarray:
    """Rank with the units held at each user's own budget, then cut the budget step by step as
    in the drill (shrinking in place, no server contact); the stores are saved as cut."""
    from peel_fed.blocks import parse_budget
    from peel_fed.fedserve import served_sums
    from peel_fed.own_budget import own_budget_bytes

    planes = _served(store)
    if planes is None:  # never served (it failed then): it counts no user here
        return np.zeros(len(choices) * (1 + len(drill)) * 3)
    own = own_budget_bytes(
        data.seed, node.users, choices, full_table_bytes, state.node_budget(context)
    )
    vector = served_sums(
        planes,
        node.users,
        vectors,
        groups,
        own,
        [parse_budget(c, full_table_bytes) for c in choices],
        drill,
        node.ds.n_users,
        node.ds.train,
        node.ds.test,
    )
    _save_served(store, planes)  # what is left after the deepest cut
    return vector


def serve_evaluate(msg: Message, context: Context) -> Message:
    """The drill ranked with the units the node holds, when the method comparison does not run
    (otherwise it rides in ``evaluate.budgets``); the sums go up masked."""
    _torch()
    content = from_record_dict(msg.content)
    offer = decode_serve_offer(content)
    node = state.node_data(offer.data, context)
    store = state.device_store(context, offer.data)
    vector = _served_drill(
        store,
        node,
        offer.data,
        offer.device_budgets,
        offer.full_table_bytes,
        offer.drill,
        store.user_groups(),
        store.user_vectors(),
        context,
    )
    return masked_reply(msg, context, content, vector)


def make_client_app(mods: list[Mod] | None = None) -> ClientApp:
    """The device app; ``mods`` wrap every handler (tests use one to inject failures)."""
    client = ClientApp(mods=[timing_mod, *(mods or [])])
    client.query("keys")(keys)
    client.query("shares")(shares)
    client.query("reveal")(reveal)
    client.query("stats")(stats)
    client.train("pretrain")(pretrain)
    client.query("rows")(pretrain_rows)
    client.train("rows")(rows)
    client.query("kmeans")(kmeans)
    client.query("group")(group)
    client.query("planes")(planes)
    client.query("peeread")(pee_read)
    client.train("pee")(pee)
    client.train("peerows")(pee_rows)
    client.evaluate("budgets")(evaluate)
    client.query("offer")(serve_offer)
    client.query("units")(serve_units)
    client.evaluate("served")(serve_evaluate)
    return client


app = make_client_app()
