"""Double-masking secure aggregation with Shamir shares: exact sums under dropouts, late uploads
stay masked, devices never hand out both halves of a peer's secrets, shares travel encrypted."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from Crypto.Protocol.SecretSharing import Shamir, _Element
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from peel_fed.secagg import FixedPoint, mask_vector, pair_seed
from peel_fed.secagg_shamir import (
    KEY_BYTES,
    ShamirSecAggClient,
    ShamirSecAggServer,
    check_threshold,
    combine_shares,
    create_shares,
    relay,
    unmask_request,
)
from peel_fed.shamir import combine_chunk, gf_inv, gf_mul

LENGTH = 500
TOL = 2.0**-20
TAG = b"round-1"


def _vectors(ids, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-10.0, 10.0, LENGTH) for i in ids}


def _round(n, t, seed, before_share=(), before_upload=(), after_upload=(), hop=None):
    """One round in process; the ``before_*``/``after_upload`` devices drop at that step.

    ``hop(client)``, if given, replaces every device before each of its steps (a new process).
    """
    rng = np.random.default_rng(seed)
    clients = {i: ShamirSecAggClient(i, random_bytes=rng.bytes) for i in range(n)}
    vectors = _vectors(range(n), seed + 1)

    def on(i):
        if hop is not None:
            clients[i] = hop(clients[i])
        return clients[i]

    keys = {i: on(i).setup(TAG) for i in range(n)}
    outgoing = {i: on(i).share_keys(keys, t) for i in range(n) if i not in before_share}
    shared = sorted(outgoing)
    inbox = relay(outgoing)
    for i in shared:
        on(i).receive_shares(inbox.get(i, {}))
    uploads = {i: on(i).masked(vectors[i]) for i in shared if i not in before_upload}
    survivors, dropped = unmask_request(shared, uploads)
    reveals = {
        i: on(i).unmask_shares(survivors, dropped) for i in survivors if i not in after_upload
    }
    for i in range(n):
        on(i)
    total = ShamirSecAggServer(t).unmask_sum(uploads, reveals, keys, shared, TAG, LENGTH)
    expected = np.sum([vectors[i] for i in survivors], axis=0)
    run = dict(clients=clients, keys=keys, vectors=vectors, shared=shared)
    return total, expected, run | dict(uploads=uploads, reveals=reveals)


def test_shamir_t_shares_rebuild_the_secret_and_t_minus_1_do_not():
    secret = bytes(range(32))
    shares = create_shares(secret, 4, 7)
    assert len(shares) == 7 and {len(s) for s in shares} == {4 + 48}
    for subset in itertools.combinations(shares, 4):
        assert combine_shares(list(subset)) == secret
    assert combine_shares(shares) == secret  # more than t is fine too
    for subset in itertools.combinations(shares, 3):
        try:
            assert combine_shares(list(subset)) != secret
        except ValueError as err:
            assert "too few or corrupted" in str(err)
    with pytest.raises(ValueError, match="duplicate"):
        combine_shares([shares[0], shares[0], shares[1], shares[2]])


def test_shares_use_flowers_layout():
    from flwr.common.secure_aggregation.crypto import shamir as flower

    secret = b"\x07" * 32
    assert flower.combine_shares(create_shares(secret, 3, 5)[1:4]) == secret
    assert combine_shares(flower.create_shares(secret, 3, 5)[:3]) == secret


def test_field_arithmetic_matches_pycryptodome():
    rng = np.random.default_rng(10)
    for bits in (3, 8, 64, 127, 128, 128, 128):
        for _ in range(20):
            a, b = (int.from_bytes(rng.bytes(16), "big") >> (128 - bits) for _ in range(2))
            assert gf_mul(a, b) == int(_Element(a) * _Element(b))
            if a:
                assert gf_inv(a) == int(_Element(a).inverse()) and gf_mul(a, gf_inv(a)) == 1


@pytest.mark.parametrize("t", [1, 2, 5, 67])
def test_fast_combine_matches_pycryptodome(t):
    rng = np.random.default_rng(t)
    secret = rng.bytes(16)
    split = Shamir.split(t, t + 3, secret, ssss=False)
    shares = [split[k] for k in rng.permutation(t + 3)]
    assert combine_chunk(shares[:t]) == Shamir.combine(shares[:t], ssss=False) == secret
    # any points at all: the same interpolation at 0, byte for byte
    xs = rng.choice(np.arange(1, 2**16), size=t, replace=False)
    points = [(int(x), rng.bytes(16)) for x in xs]
    assert combine_chunk(points) == Shamir.combine(points, ssss=False)
    if t > 1:  # t - 1 shares: some other value
        assert combine_chunk(shares[: t - 1]) != secret


@pytest.mark.parametrize("t", [1, 2, 5, 67])
def test_pycryptodome_rebuilds_fast_shares(t):
    rng = np.random.default_rng(100 + t)
    secret, n = rng.bytes(32), t + 4
    shares = create_shares(secret, t, n)
    assert [int.from_bytes(s[:4], "little") for s in shares] == list(range(1, n + 1))
    padded = secret + bytes([16] * 16)
    picks = [shares[k] for k in rng.permutation(n)]
    for c in range(3):
        chunk = slice(4 + 16 * c, 20 + 16 * c)
        points = [(int.from_bytes(s[:4], "little"), s[chunk]) for s in picks]
        assert Shamir.combine(points[:t], ssss=False) == padded[16 * c : 16 * (c + 1)]
        if t > 1:
            assert Shamir.combine(points[: t - 1], ssss=False) != padded[16 * c : 16 * (c + 1)]
    assert combine_shares(picks[:t]) == combine_shares(picks) == secret
    if t > 1:
        assert len({s[4:] for s in shares}) == n  # random polynomial: shares differ
        try:
            assert combine_shares(picks[: t - 1]) != secret
        except ValueError as err:
            assert "too few or corrupted" in str(err)
    else:
        assert {s[4:] for s in shares} == {padded}


def test_threshold_must_be_a_strict_majority():
    check_threshold(6, 10)
    check_threshold(2, 2)
    for t, n in [(5, 10), (11, 10), (1, 1), (1, 2)]:
        with pytest.raises(ValueError, match="n/2 < t <= n"):
            check_threshold(t, n)


def test_sum_without_dropouts_matches_numpy():
    total, expected, _ = _round(7, 5, seed=1)
    assert total.dtype == np.float64 and total.shape == (LENGTH,)
    assert np.max(np.abs(total - expected)) < TOL


@pytest.mark.parametrize(
    "n, t, before_share, before_upload",
    [(8, 6, (), (2, 5)), (10, 7, (0,), (4, 9)), (5, 3, (4,), (0,))],
)
def test_sum_with_n_minus_t_dropouts_before_upload(n, t, before_share, before_upload):
    total, expected, run = _round(n, t, 2, before_share=before_share, before_upload=before_upload)
    assert len(run["uploads"]) == t
    assert np.max(np.abs(total - expected)) < TOL


def test_dropout_after_upload_before_unmasking_keeps_its_vector_in_the_sum():
    total, expected, run = _round(6, 4, 3, before_upload=(1,), after_upload=(4,))
    assert 4 in run["uploads"] and 4 not in run["reveals"]
    assert np.max(np.abs(total - expected)) < TOL
    vectors = run["vectors"]
    assert np.max(np.abs(expected - sum(vectors[i] for i in (0, 2, 3, 4, 5)))) < 1e-9


def test_late_upload_cannot_be_unmasked():
    n, t, late = 6, 4, 3
    _, _, run = _round(n, t, 4, before_upload=(late,))
    clients, keys = run["clients"], run["keys"]
    survivors = sorted(run["uploads"])
    # The server rebuilt the late device's mask key from the survivors' shares ...
    shares = [run["reveals"][i].pair_secret[late] for i in survivors][:t]
    key = X25519PrivateKey.from_private_bytes(combine_shares(shares))
    # ... and now its masked vector arrives; the server removes every pairwise mask.
    y = clients[late].masked(run["vectors"][late])
    for i in survivors:
        mask = mask_vector(pair_seed(key, keys[i][KEY_BYTES:], (late, i)), TAG, LENGTH)
        y = y - mask if i > late else y + mask
    fp, x = FixedPoint(), run["vectors"][late]
    best = fp.decode(y)
    assert np.median(np.abs(best - x)) > 1e6 and abs(np.corrcoef(best, x)[0, 1]) < 0.2
    # PRG(b_k) is all that is left (so the subtraction above is right) ...
    self_mask = mask_vector(clients[late]._self_seed, TAG, LENGTH)
    assert np.max(np.abs(fp.decode(y - self_mask) - x)) < TOL
    # ... and no survivor hands out its share of b_k now.
    for i in survivors:
        with pytest.raises(
            ValueError, match=rf"refuses both shares of the same device: \[{late}\]"
        ):
            clients[i].unmask_shares(survivors + [late], [])


def test_survivor_refuses_pair_secret_of_a_device_that_survived():
    _, _, run = _round(5, 3, 5)
    clients, everyone = run["clients"], list(range(5))
    for i in range(4):  # 4 was unmasked as a survivor: its s-share is never handed out
        with pytest.raises(ValueError, match=r"refuses both shares of the same device: \[4\]"):
            clients[i].unmask_shares([j for j in everyone if j != 4], [4])
    assert clients[0].unmask_shares(everyone, []).self_mask.keys() == set(everyone)  # same ask
    with pytest.raises(ValueError, match="listed as dropped"):
        clients[1].unmask_shares([0, 2, 3, 4], [1])
    with pytest.raises(ValueError, match="survivors < threshold"):
        clients[0].unmask_shares([0, 1], [2, 3, 4])
    with pytest.raises(ValueError, match="do not split"):
        clients[0].unmask_shares([0, 1, 2], [3])


def test_fewer_than_t_survivors_is_a_clear_one_line_error():
    # The devices refuse to answer an unmasking request with fewer than t survivors ...
    with pytest.raises(ValueError, match=r"^client \d+: 3 survivors < threshold 4$"):
        _round(6, 4, 6, before_upload=(0, 5, 2))
    # ... and the server stops with one line, whatever it holds.
    _, _, run = _round(6, 4, 7)
    server = ShamirSecAggServer(4)
    args = (run["keys"], run["shared"], TAG, LENGTH)
    few = {i: run["uploads"][i] for i in (1, 3, 4)}
    with pytest.raises(ValueError, match=r"^unmask_sum: 3 uploads and 3 answers, fewer th") as e:
        server.unmask_sum(few, run["reveals"], *args)
    assert "\n" not in str(e.value) and str(e.value).endswith("t=4: the round cannot be unmasked")
    answers = {i: run["reveals"][i] for i in (0, 2, 5)}
    with pytest.raises(ValueError, match=r"6 uploads and 3 answers, fewer than the threshold t=4"):
        server.unmask_sum(run["uploads"], answers, *args)


def test_relayed_shares_are_ciphertexts():
    rng = np.random.default_rng(8)
    clients = {i: ShamirSecAggClient(i, random_bytes=rng.bytes) for i in range(4)}
    keys = {i: c.setup(TAG) for i, c in clients.items()}
    outgoing = {i: c.share_keys(keys, 3) for i, c in clients.items()}
    inbox = relay(outgoing)
    assert sorted(inbox[2]) == [0, 1, 3] and inbox[2][0] == outgoing[0][2]
    for i, c in clients.items():
        c.receive_shares(inbox[i])
    for sender, out in outgoing.items():
        for recipient, ct in out.items():
            b_share, s_share = clients[recipient]._shares[sender]
            for plain in (b_share, s_share, b_share[4:20], s_share[4:20]):
                assert plain not in ct
            assert clients[sender]._self_seed not in ct
    tampered = dict(inbox[1])
    tampered[0] = tampered[0][:-1] + bytes([tampered[0][-1] ^ 1])
    with pytest.raises(ValueError, match="bad share ciphertext from 0"):
        clients[1].receive_shares(tampered)
    with pytest.raises(ValueError, match="bad share ciphertext from 3"):
        clients[1].receive_shares({3: outgoing[3][2]})  # meant for 2, not 1


def test_bench_secagg_smoke(tmp_path, capsys):
    from sim import bench_secagg

    out = tmp_path / "bench"
    report = bench_secagg.main(
        [
            "--clients",
            "3,4",
            "--length",
            "64",
            "--repeats",
            "1",
            "--dropouts",
            "0,0.25",
            "--out",
            str(out),
        ]
    )
    rows = report["rows"]
    assert [(r["protocol"], r["clients"], r["threshold"], r["dropped"]) for r in rows] == [
        (p, n, t if p == "shamir" else None, d)
        for n, t, d in [(3, 2, 0), (3, 2, 0), (4, 3, 0), (4, 3, 1)]
        for p in ("pairwise", "shamir")
    ]
    assert all(r["max_abs_error"] < 1e-4 for r in rows)
    shamir = [r for r in rows if r["protocol"] == "shamir"]
    assert all(r["client_up_bytes"] > 64 * 8 and r["server_s"] > 0 for r in shamir)
    assert json.loads((out / "bench_secagg.json").read_text())["rows"] == rows
    assert "| shamir |" in (out / "bench_secagg.md").read_text()


def _through_flower(state: dict) -> dict:
    """``state`` in a ``ConfigRecord`` of a ``RecordDict``, to protobuf bytes and back."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    wire = recorddict_to_proto(RecordDict({"secagg": ConfigRecord(state)})).SerializeToString()
    proto = ProtoRecordDict()
    proto.ParseFromString(wire)
    return dict(recorddict_from_proto(proto).config_records["secagg"])


def _new_process(client: ShamirSecAggClient) -> ShamirSecAggClient:
    state = client.to_state()
    restored = ShamirSecAggClient.from_state(_through_flower(state))
    assert restored.to_state() == state
    return restored


def test_clients_restored_from_state_before_every_step_sum_exactly():
    steps = []

    def hop(client):
        steps.append(client.to_state()["step"])
        return _new_process(client)

    total, expected, run = _round(
        8, 5, 11, before_share=(7,), before_upload=(2,), after_upload=(4,), hop=hop
    )
    assert np.max(np.abs(total - expected)) < TOL
    assert set(steps) == {"new", "setup", "shared", "received", "uploaded"}
    # the restored devices still hold what a late upload needs to stay masked
    clients = run["clients"]
    assert all(clients[i].to_state()["revealed_pair_secret"] == [2] for i in run["reveals"])
    assert clients[7].to_state()["step"] == "setup" and clients[2].to_state()["step"] == "received"


def test_refusal_memory_survives_a_round_trip():
    _, _, run = _round(5, 3, 12, before_upload=(3,))
    survivors, dropped = [0, 1, 2, 4], [3]
    for i in survivors:
        client = _new_process(run["clients"][i])
        with pytest.raises(ValueError, match=r"refuses both shares of the same device: \[3\]"):
            client.unmask_shares(survivors + [3], [])
        other = 4 if i != 4 else 0
        with pytest.raises(
            ValueError, match=rf"refuses both shares of the same device: \[{other}\]"
        ):
            client.unmask_shares([j for j in survivors if j != other], [3, other])
        again = client.unmask_shares(survivors, dropped)  # the same request is answered again
        assert again == run["reveals"][i]


def test_from_state_rejects_malformed_states():
    _, _, run = _round(4, 3, 13)
    state = run["clients"][0].to_state()
    assert (
        ShamirSecAggClient.from_state(
            {"format": state["format"], "client_id": 5, "step": "new"}
        ).to_state()["step"]
        == "new"
    )
    bad = [
        state | {"format": "other"},
        state | {"step": "done"},
        state | {"revealed_pair_secret": [1]},  # 1 was revealed as a survivor
        state | {"public_keys": state["public_keys"][:-1]},
        state | {"enc_key": b"\x01" * 31},
        state | {"client_id": 1},  # keys of another device
        {k: v for k, v in state.items() if k != "mask_key"},
    ]
    for broken in bad:
        with pytest.raises(ValueError, match="from_state"):
            ShamirSecAggClient.from_state(broken)
