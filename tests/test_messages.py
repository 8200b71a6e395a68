"""The wire format (``peel_fed.messages``): round trips, secure layouts and bytes on tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clients.records import from_record_dict, to_record_dict
from peel_fed.blocks import BlockLayout
from peel_fed.fedeval import EvalSpec
from peel_fed.fedlightgcn import DeviceUpdate
from peel_fed.fedpee import PEEUpload
from peel_fed.fedplanes import PlaneOrders
from peel_fed.messages import (
    Content,
    DataSpec,
    EvaluateDown,
    PEEDown,
    PEERound,
    PretrainDown,
    PretrainStep,
    data_content,
    decode_contribution,
    decode_device_update,
    decode_evaluate_down,
    decode_group_counts,
    decode_inbox,
    decode_kmeans_sums,
    decode_masked,
    decode_masked_key,
    decode_pee_down,
    decode_pee_reply,
    decode_pee_row_counts,
    decode_pee_rows,
    decode_pee_rows_down,
    decode_peer_keys,
    decode_pretrain_down,
    decode_pretrain_row_counts,
    decode_pretrain_rows,
    decode_protocol,
    decode_revealed,
    decode_session,
    decode_share_ciphertexts,
    decode_share_request,
    decode_shares_revealed,
    decode_stats,
    decode_unmask_request,
    encode_contribution,
    encode_device_update,
    encode_evaluate_down,
    encode_group_counts,
    encode_inbox,
    encode_kmeans_sums,
    encode_masked,
    encode_pee_down,
    encode_pee_reply,
    encode_pee_row_counts,
    encode_pee_rows,
    encode_pee_rows_down,
    encode_peer_keys,
    encode_pretrain_down,
    encode_pretrain_row_counts,
    encode_pretrain_rows,
    encode_revealed,
    encode_session,
    encode_share_ciphertexts,
    encode_share_request,
    encode_shares_revealed,
    encode_stats,
    encode_unmask_request,
    pee_row_unions,
)
from peel_fed.planes import PlaneCode
from strategies.phases import record_bytes

NPY_HEADER = 128  # np.save's header for these small arrays (Flower's Array payload)
DATA = DataSpec("checkerboard-tiny", "", 3, 0.1)


def _wire(content):
    """Through Flower records and back, as both adapters do."""
    return from_record_dict(to_record_dict(content))


def test_record_bytes_of_known_contents():
    # 5 float64 values: npy header + 40 B of data + the key "masked"; the 32 B public key it
    # was masked under: npy header + 32 B + the key "public-key"
    masked = to_record_dict(encode_masked(np.zeros(5), b"k" * 32))
    assert record_bytes(masked) == NPY_HEADER + 40 + 6 + NPY_HEADER + 32 + 10
    # three metrics "g0".."g2": 2 B key + 8 B value each
    assert record_bytes(to_record_dict(encode_group_counts(np.array([2, 0, 1])))) == 30
    # "pk-7" + a 32 B key, "round-tag" + 16 B
    keys = Content(configs={"secagg": encode_peer_keys({7: b"k" * 32}, b"t" * 16)})
    assert record_bytes(to_record_dict(keys)) == 4 + 32 + 9 + 16
    # data: keys "dataset", "data-dir", "seed", "val-fraction", "job", "state-dir",
    # "resume-pretrain", "resume-pee"; a 17 B name, "" and two numbers, two more "", two
    # empty lists
    names = 7 + 8 + 4 + 12 + 3 + 9 + 15 + 10
    assert record_bytes(to_record_dict(data_content(DATA))) == names + 17 + 0 + 16 + 0 + 0


def test_stats_vector_layout_and_rounding():
    vector = encode_stats(
        np.array([1, 2, 0]), np.array([1, 1, 0]), 4, partition_id=1, num_partitions=2
    )
    assert vector.tolist() == [1, 2, 0, 1, 1, 0, 0, 1, 4, 1, 2]
    sums = decode_stats(vector + 1e-7)  # unmasking leaves fixed-point noise
    assert sums.train.tolist() == [1, 2, 0] and sums.fit.tolist() == [1, 1, 0]
    assert sums.train.dtype == np.int64 and sums.users == 4
    # three nodes' sum: partitions 0, 1, 1 of 2 claimed; 3 nodes; 3 x 2 closes it
    other = encode_stats(
        np.array([0, 0, 1]), np.array([0, 0, 1]), 2, partition_id=0, num_partitions=2
    )
    sums = decode_stats(2 * vector + other - 1e-7)
    assert sums.train.tolist() == [2, 4, 1] and sums.users == 10 and sums.nodes == 3
    assert sums.claims.tolist() == [1, 2]


def test_kmeans_and_group_counts():
    sums = np.array([[1.0, 2.0], [3.0, 4.0]])
    vector = encode_kmeans_sums(sums, np.array([2, 5]))
    assert vector.tolist() == [1, 2, 3, 4, 2, 5]
    got_sums, got_counts = decode_kmeans_sums(vector + 1e-9, 2, 2)
    np.testing.assert_allclose(got_sums, sums)
    assert got_counts.tolist() == [2.0, 5.0]
    counts = decode_group_counts(_wire(encode_group_counts(np.array([2, 0, 1]))), 3)
    assert counts.tolist() == [2, 0, 1]


def test_secagg_keys_and_reveals_round_trip():
    rec = encode_peer_keys({7: b"a" * 32, 12: b"b" * 32}, b"t" * 16, dropped=[12])
    assert set(rec) == {"pk-7", "pk-12", "round-tag", "dropped"}
    keys, tag = decode_peer_keys(_wire(Content(configs={"secagg": rec})))
    assert keys == {7: b"a" * 32, 12: b"b" * 32} and tag == b"t" * 16
    assert decode_revealed(_wire(encode_revealed({12: b"s" * 32}))) == {12: b"s" * 32}
    masked = np.array([1.5, -2.0])
    up = _wire(encode_masked(masked, b"p" * 32))
    assert decode_masked(up).tolist() == [1.5, -2.0]
    assert decode_masked_key(up) == b"p" * 32
    assert decode_session(_wire(encode_session(b"t" * 16))) == b"t" * 16


def test_shamir_messages_round_trip():
    big = 2**64 - 3  # Flower node ids are unsigned 64-bit
    # query.keys names the protocol; a pairwise session reads (and weighs) as before
    assert decode_protocol(_wire(encode_session(b"t" * 16))) == "pairwise"
    assert encode_session(b"t" * 16).configs == {"secagg": {"round-tag": b"t" * 16}}
    session = _wire(encode_session(b"t" * 16, "shamir"))
    assert decode_session(session) == b"t" * 16 and decode_protocol(session) == "shamir"
    # query.shares down: the cohort's 64 B public keys and t
    ask = _wire(encode_share_request({7: b"a" * 64, big: b"b" * 64}, b"t" * 16, 2))
    assert decode_share_request(ask) == ({7: b"a" * 64, big: b"b" * 64}, b"t" * 16, 2)
    assert decode_protocol(ask) == "shamir"
    # ... and a ciphertext per peer up
    cts = {7: b"c" * 132, big: b"d" * 132}
    assert decode_share_ciphertexts(_wire(encode_share_ciphertexts(cts))) == cts
    # the phase's secagg record: this node's inbox
    inbox = _wire(Content(configs={"secagg": encode_inbox(cts, b"t" * 16)}))
    assert decode_inbox(inbox) == (cts, b"t" * 16) and decode_protocol(inbox) == "shamir"
    # query.reveal down (an empty dropped list survives the records) and the shares up
    for dropped in ([big], []):
        rec = encode_unmask_request(b"t" * 16, [7, 9], dropped)
        got = decode_unmask_request(_wire(Content(configs={"secagg": rec})))
        assert got == (b"t" * 16, [7, 9], dropped)
    b_shares, s_shares = {7: b"x" * 52, 9: b"y" * 52}, {big: b"z" * 52}
    up = _wire(encode_shares_revealed(b_shares, s_shares))
    assert decode_shares_revealed(up) == (b_shares, s_shares)
    assert decode_shares_revealed(_wire(encode_shares_revealed({}, {}))) == ({}, {})


def _pretrain_down() -> PretrainDown:
    step = PretrainStep("round", 4, 2, 3, 0.01, False, round=5, rounds_per_pass=2)
    layers = [np.full((3, 4), k, dtype=np.float32) for k in range(3)]
    return PretrainDown(DATA, step, layers, np.array([1, 0, 2]))


def test_pretrain_download_round_trip():
    down = _pretrain_down()
    content = encode_pretrain_down(down)
    assert set(content.configs["pretrain"]) == {
        "dim",
        "layers",
        "local-steps",
        "user-lr",
        "secure",
        "step",
        "round",
        "rounds-per-pass",
    }
    back = decode_pretrain_down(_wire(content))
    assert back.step == down.step and back.data == DATA
    assert [x.tolist() for x in back.layers] == [x.tolist() for x in down.layers]
    assert back.degree.tolist() == [1, 0, 2]
    init = PretrainStep("init", 4, 2, 3, 0.01, True, k=1)
    assert PretrainStep.from_config(init.to_config()) == init
    assert "round" not in init.to_config()
    dns = PretrainStep(
        "round",
        4,
        2,
        3,
        0.01,
        False,
        round=5,
        rounds_per_pass=2,
        negative_sampling="dns",
        dns_candidates=32,
        lr_schedule="cosine",
        total_rounds=80,
    )
    assert PretrainStep.from_config(dns.to_config()) == dns
    assert {"negative-sampling", "dns-candidates", "lr-schedule", "total-rounds"} <= set(
        dns.to_config()
    )


def test_device_update_round_trip_and_bytes():
    update = DeviceUpdate(
        rows=np.array([0, 2]),
        grad=torch.ones(2, 4),
        row_devices=np.array([1, 2]),
        contrib_rows=np.array([2]),
        contrib_delta=torch.full((2, 1, 4), 0.5),
        loss_sum=1.25,
        users=2,
        solo_bytes=99,
    )
    records = to_record_dict(encode_device_update(update))
    # arrays: npy header + data + key, for rows, grad, row-devices, contrib-rows, contrib-delta
    arrays = (16 + 4) + (32 + 4) + (16 + 11) + (8 + 12) + (32 + 13) + 5 * NPY_HEADER
    assert record_bytes(records) == arrays + (5 + 8) + (8 + 8) + (10 + 8)
    metrics_only = from_record_dict(records, with_arrays=False)
    assert metrics_only.arrays == {} and metrics_only.metrics["metrics"]["solo-bytes"] == 99
    back = decode_device_update(from_record_dict(records))
    assert back.rows.tolist() == [0, 2] and back.row_devices.tolist() == [1, 2]
    assert torch.equal(back.grad, update.grad) and torch.equal(
        back.contrib_delta, update.contrib_delta
    )
    assert (back.loss_sum, back.users, back.solo_bytes) == (1.25, 2, 99)
    rows, delta = decode_contribution(
        _wire(encode_contribution(np.array([1]), np.ones((2, 1, 4)), 3))
    )
    assert rows.tolist() == [1] and delta.shape == (2, 1, 4)


def test_secure_pretrain_layouts_sum_to_the_clear_update():
    n_items, dim, layers = 5, 2, 1
    # two nodes: node a touched rows 1 and 3, node b row 3; b contributes to row 4
    a = encode_pretrain_row_counts(n_items, np.array([1, 3]), np.array([2, 1]), 0.5, 2)
    b = encode_pretrain_row_counts(n_items, np.array([3]), np.array([1]), 0.25, 1)
    assert a.tolist() == [0, 2, 0, 1, 0, 0.5, 2]
    first = decode_pretrain_row_counts(a + b, n_items)
    assert first.union.tolist() == [1, 3] and first.counts.tolist() == [0, 2, 0, 2, 0]
    assert (first.loss_sum, first.users) == (0.75, 3)
    union = np.array([1, 3, 4])  # as if a third node had touched row 4
    va = encode_pretrain_rows(
        union,
        np.array([1, 3]),
        np.array([[1.0, 2.0], [3.0, 4.0]]),
        np.array([1]),
        np.ones((1, 1, 2)),
    )
    assert va.tolist() == [1, 2, 3, 4, 0, 0, 1, 1, 0, 0, 0, 0]
    vb = encode_pretrain_rows(union, None, None, np.array([4]), np.full((1, 1, 2), 2.0))
    assert vb.tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2]
    first = decode_pretrain_row_counts(
        encode_pretrain_row_counts(n_items, union, np.ones(3), 0, 3), n_items
    )
    update = decode_pretrain_rows(va + vb, first, layers, dim, has_grad=True)
    assert update.rows.tolist() == [1, 3, 4] and update.row_devices.tolist() == [1, 1, 1]
    assert update.grad.tolist() == [[1, 2], [3, 4], [0, 0]]
    assert update.contrib_delta.tolist() == [[[1, 1], [0, 0], [2, 2]]]
    init = decode_pretrain_rows(va + vb, first, layers, dim, has_grad=False)
    assert (
        init.rows.size == 0
        and init.grad.shape == (0, 2)
        and init.contrib_rows.tolist() == [1, 3, 4]
    )


def _pee_upload(rows, grad, val_devices=1, users=2) -> PEEUpload:
    return PEEUpload(
        rows=np.array(rows),
        grad=np.array(grad, dtype=np.float32),
        row_devices=np.ones(len(rows), dtype=np.int64),
        weight_grad=np.arange(4.0).reshape(2, 2),
        val_devices=val_devices,
        loss_sum=np.array([0.5, 1.5]),
        loss_count=np.array([3.0, 1.0]),
        users=users,
    )


ROUND = PEERound(
    round=2,
    rounds_per_pass=5,
    local_steps=1,
    user_lr=0.1,
    num_blocks=2,
    dim=2,
    num_item_groups=2,
    num_user_groups=2,
    secure=True,
)


def _same_upload(a: PEEUpload, b: PEEUpload) -> None:
    assert a.rows.tolist() == b.rows.tolist() and a.row_devices.tolist() == b.row_devices.tolist()
    np.testing.assert_array_equal(a.grad, b.grad)
    np.testing.assert_array_equal(a.weight_grad, b.weight_grad)
    assert (a.val_devices, a.users) == (b.val_devices, b.users)
    assert a.loss_sum.tolist() == b.loss_sum.tolist()
    assert a.loss_count.tolist() == b.loss_count.tolist()


def test_pee_download_and_clear_upload_round_trip():
    layout = BlockLayout(np.array([0, 1, 1]), 2, 2)
    down = PEEDown(DATA, ROUND, {1: np.ones((3, 2))}, {1: np.full((2, 2), 0.5)}, layout)
    back = decode_pee_down(_wire(encode_pee_down(down)))
    assert (
        back.round == ROUND
        and list(back.tables) == [1]
        and back.alphas[1].tolist() == [[0.5] * 2] * 2
    )
    assert back.layout.item_groups.tolist() == [0, 1, 1] and back.layout.num_blocks == 2
    up = _pee_upload([0, 2], [[1, 2], [3, 4]])
    content = _wire(encode_pee_reply({1: up}))
    assert content.metrics["metrics"] == {"users": 2, "solo-bytes": 0}
    assert content.arrays["upload"]["g1-stats"].tolist() == [1, 2, 0.5, 1.5, 3, 1]
    _same_upload(decode_pee_reply(content, 2)[1], up)


def test_secure_pee_layouts_sum_per_group():
    n_items = 3
    a = {0: _pee_upload([0, 2], [[1, 2], [3, 4]]), 1: _pee_upload([1], [[5, 6]], users=1)}
    b = {1: _pee_upload([2], [[7, 8]], val_devices=0, users=3)}
    counts = decode_pee_row_counts(
        encode_pee_row_counts(a, 2, n_items) + encode_pee_row_counts(b, 2, n_items), 2, n_items
    )
    assert counts.tolist() == [[1, 0, 1], [0, 1, 1]]
    unions = pee_row_unions(counts)
    round_, got = decode_pee_rows_down(_wire(encode_pee_rows_down(DATA, ROUND, unions)))
    assert round_ == ROUND and [u.tolist() for u in got] == [[0, 2], [1, 2]]
    va, vb = encode_pee_rows(a, unions, ROUND), encode_pee_rows(b, unions, ROUND)
    # per group: grad over the union (2 x 2), weight grad (2 x 2), stats (2 + 2 x 2)
    assert va.size == 2 * (4 + 4 + 6)
    layout = BlockLayout(np.array([0, 1, 1]), 2, 2)
    summed = decode_pee_rows(va + vb, counts, unions, layout)
    assert summed[0].grad.tolist() == [[1, 2], [3, 4]] and summed[0].grad.dtype == np.float32
    assert summed[1].grad.tolist() == [[5, 6], [7, 8]]
    assert summed[1].weight_grad.tolist() == [[0, 2], [4, 6]]
    assert (summed[1].val_devices, summed[1].users) == (1, 4)
    assert summed[1].loss_count.tolist() == [6, 2]


def test_evaluation_download_round_trip():
    spec = EvalSpec((100, 200), ("50%", "100%"), (0.5,), 2, 200)
    layout = BlockLayout(np.array([0, 1, 1]), 4, 2)
    tables = {"pretrained": np.ones((3, 4)), "order-0": np.array([1, 0, 2, 3])}
    code = PlaneCode.encode(np.arange(12, dtype=np.float32).reshape(3, 4))
    orders = [np.array([[0, 0], [1, 0]]), np.array([[1, 0], [0, 0]])]
    down = EvaluateDown(DATA, spec, tables, PlaneOrders(code, orders), np.zeros((2, 4)), layout)
    back = decode_evaluate_down(_wire(encode_evaluate_down(down)))
    assert back.spec == spec and back.data == DATA
    assert back.planes.code.codes.dtype == np.uint16 and back.planes.code.offset.dtype == np.float16
    assert np.array_equal(back.planes.code.codes, code.codes)
    assert np.array_equal(back.planes.code.scale.view(np.uint16), code.scale.view(np.uint16))
    assert [o.tolist() for o in back.planes.orders] == [o.tolist() for o in orders]
    assert set(back.tables) == set(tables) and back.centroids.shape == (2, 4)
    assert (back.layout.dim, back.layout.num_blocks) == (4, 2)


@pytest.mark.parametrize(
    "value",
    [DATA, DataSpec("gowalla"), DataSpec("gowalla", job="j", resume_points=((4, 1), (9, 3)))],
)
def test_data_spec_round_trip(value):
    assert DataSpec.from_config(value.to_config()) == value
