"""Secure aggregation by pairwise masks: sums are exact, single uploads look random."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from peel_fed.secagg import (
    FixedPoint,
    SecAggClient,
    SecAggServer,
    auto_degree,
    connected,
    mask_graph,
    mask_vector,
    pair_seed,
)

LENGTH = 1000
TOL = 2.0**-20


def _clients(ids: list[int], seed: int) -> dict[int, SecAggClient]:
    # Deterministic keys so the statistical checks below cannot flake.
    rng = np.random.default_rng(seed)
    return {i: SecAggClient(i, X25519PrivateKey.from_private_bytes(rng.bytes(32))) for i in ids}


def _vectors(ids: list[int], seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-10.0, 10.0, LENGTH) for i in ids}


def _run_round(
    clients: dict[int, SecAggClient],
    vectors: dict[int, np.ndarray],
    round_tag: bytes,
    dropped: tuple[int, ...] = (),
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    keys = {i: c.public_key() for i, c in clients.items()}
    survivors = [i for i in clients if i not in dropped]
    uploads = {i: clients[i].masked(vectors[i], keys, round_tag) for i in survivors}
    revealed = {i: clients[i].reveal_pair_seeds(list(dropped), keys, round_tag) for i in survivors}
    total = SecAggServer().unmask_sum(uploads, list(clients), revealed, LENGTH, FixedPoint())
    return total, uploads


def test_sum_of_five_clients_matches_numpy():
    ids = [0, 1, 2, 3, 4]
    clients, vectors = _clients(ids, 1), _vectors(ids, 2)
    total, _ = _run_round(clients, vectors, b"round-1")
    expected = np.sum([vectors[i] for i in ids], axis=0)
    assert total.dtype == np.float64 and total.shape == (LENGTH,)
    assert np.max(np.abs(total - expected)) < TOL


def test_single_masked_upload_reveals_nothing_obvious():
    ids = [0, 1, 2, 3, 4]
    clients, vectors = _clients(ids, 3), _vectors(ids, 4)
    _, uploads = _run_round(clients, vectors, b"round-1")
    fp = FixedPoint()
    for i in ids:
        alone = fp.decode(uploads[i])
        r = np.corrcoef(alone, vectors[i])[0, 1]
        assert abs(r) < 0.1
        # Uniform over the whole int64 range: typical magnitude ~ 2**38, data is <= 10.
        assert np.median(np.abs(alone)) > 1e6
        assert not np.any(uploads[i] == fp.encode(vectors[i]))


def test_dropout_survivors_reveal_seeds_and_sum_is_right():
    ids = [0, 1, 2, 3, 4, 5]
    clients, vectors = _clients(ids, 5), _vectors(ids, 6)
    total, uploads = _run_round(clients, vectors, b"round-7", dropped=(2, 4))
    assert sorted(uploads) == [0, 1, 3, 5]
    expected = np.sum([vectors[i] for i in (0, 1, 3, 5)], axis=0)
    assert np.max(np.abs(total - expected)) < TOL


def test_dropout_missing_revealed_seed_raises():
    ids = [0, 1, 2, 3, 4, 5]
    clients, vectors = _clients(ids, 7), _vectors(ids, 8)
    keys = {i: c.public_key() for i, c in clients.items()}
    survivors = [0, 1, 3, 5]
    uploads = {i: clients[i].masked(vectors[i], keys, b"r") for i in survivors}
    revealed = {i: clients[i].reveal_pair_seeds([2, 4], keys, b"r") for i in survivors}
    del revealed[3][4]
    with pytest.raises(ValueError, match=r"pair \(3, 4\)"):
        SecAggServer().unmask_sum(uploads, ids, revealed, LENGTH, FixedPoint())
    del revealed[5]
    with pytest.raises(ValueError, match="missing revealed seed"):
        SecAggServer().unmask_sum(uploads, ids, revealed, LENGTH, FixedPoint())


def test_dropout_without_reveal_leaves_garbage():
    # Sanity check of the test set-up: the revealed seeds are what makes the sum right.
    ids = [0, 1, 2]
    clients, vectors = _clients(ids, 9), _vectors(ids, 10)
    keys = {i: c.public_key() for i, c in clients.items()}
    uploads = {i: clients[i].masked(vectors[i], keys, b"r") for i in (0, 1)}
    plain = FixedPoint().decode(uploads[0] + uploads[1])
    assert np.max(np.abs(plain - (vectors[0] + vectors[1]))) > 1e6


def test_round_tag_changes_masks_and_sums_stay_right():
    ids = [0, 1, 2, 3]
    clients, vectors = _clients(ids, 11), _vectors(ids, 12)
    total_a, up_a = _run_round(clients, vectors, b"round-a")
    total_b, up_b = _run_round(clients, vectors, b"round-b", dropped=(1,))
    for i in (0, 2, 3):
        assert not np.array_equal(up_a[i], up_b[i])
        assert np.mean(up_a[i] == up_b[i]) < 0.01
    assert np.max(np.abs(total_a - np.sum([vectors[i] for i in ids], axis=0))) < TOL
    assert np.max(np.abs(total_b - np.sum([vectors[i] for i in (0, 2, 3)], axis=0))) < TOL
    seed = pair_seed(X25519PrivateKey.generate(), clients[0].public_key(), (5, 0))
    assert not np.array_equal(mask_vector(seed, b"a", 8), mask_vector(seed, b"b", 8))
    assert np.array_equal(mask_vector(seed, b"a", 8), mask_vector(seed, b"a", 8))


def test_fixed_point_round_trip_and_wraparound():
    fp = FixedPoint(scale_bits=24)
    x = np.array([-1234.5678, -1.0, -(2.0**-10), 0.0, 3.25, 98765.4321])
    enc = fp.encode(x)
    assert enc.dtype == np.uint64
    assert np.max(np.abs(fp.decode(enc) - x)) <= 2.0**-25
    # Sums of negatives and positives wrap mod 2**64 and still decode right.
    rng = np.random.default_rng(13)
    parts = rng.uniform(-1e4, 1e4, size=(7, 50))
    total = np.zeros(50, dtype=np.uint64)
    for p in parts:
        total += fp.encode(p)
    assert np.max(np.abs(fp.decode(total) - parts.sum(axis=0))) < 7 * 2.0**-24
    assert fp.decode(fp.encode(np.array([-3.0])) + fp.encode(np.array([1.0])))[0] == -2.0
    with pytest.raises(ValueError):
        fp.encode(np.array([fp.max_abs]))
    with pytest.raises(ValueError):
        fp.encode(np.array([np.nan]))


def test_pair_seed_symmetric_and_pair_specific():
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    ca, cb = SecAggClient(3, a), SecAggClient(8, b)
    assert len(ca.public_key()) == 32
    s_ab = pair_seed(a, cb.public_key(), (3, 8))
    s_ba = pair_seed(b, ca.public_key(), (8, 3))
    assert s_ab == s_ba and len(s_ab) == 32
    assert pair_seed(a, cb.public_key(), (3, 9)) != s_ab
    assert np.array_equal(mask_vector(s_ab, b"t", 16), mask_vector(s_ba, b"t", 16))


def test_the_mask_graph_is_k_regular_symmetric_and_survives_fewer_than_k_dropouts():
    from itertools import combinations

    rng = np.random.default_rng(0)
    ids = list(range(100, 112))
    graph = mask_graph(ids, 4, rng)
    assert all(len(graph[i]) == 4 and i not in graph[i] for i in ids)
    assert all(i in graph[j] for i in ids for j in graph[i])
    # a Harary graph of degree 4 is 4-connected: any 3 dropouts leave the rest connected
    assert all(connected([i for i in ids if i not in gone], graph) for gone in combinations(ids, 3))
    assert not all(
        connected([i for i in ids if i not in gone], graph) for gone in combinations(ids, 4)
    )
    assert mask_graph(ids, 3, rng) != graph and all(
        len(n) == 4 for n in mask_graph(ids, 3, rng).values()
    )
    assert mask_graph(ids, 11, rng) == {i: set(ids) - {i} for i in ids}  # every pair
    assert {n: auto_degree(n) for n in (2, 3, 5, 8, 10, 100, 1000)} == {
        2: 1,
        3: 2,
        5: 4,
        8: 6,
        10: 8,
        100: 14,
        1000: 20,
    }


def test_masks_over_the_graph_sum_exactly_with_dropouts_and_a_lone_survivor_refuses():
    ids = list(range(20))
    clients, vectors = _clients(ids, 1), _vectors(ids, 2)
    graph = mask_graph(ids, 4, np.random.default_rng(3))
    keys = {i: c.public_key() for i, c in clients.items()}
    near = {i: {j: keys[j] for j in graph[i] | {i}} for i in ids}
    tag = b"graph-round"
    dropped = [5, 11]
    uploads = {i: clients[i].masked(vectors[i], near[i], tag) for i in ids if i not in dropped}
    revealed = {
        i: clients[i].reveal_pair_seeds(sorted(graph[i] & set(dropped)), near[i], tag)
        for i in uploads
        if graph[i] & set(dropped)
    }
    total = SecAggServer().unmask_sum(uploads, ids, revealed, LENGTH, FixedPoint(), graph)
    np.testing.assert_allclose(total, sum(vectors[i] for i in uploads), atol=TOL * 20)
    # masked with 4 neighbours only, an upload is still far from its encoding
    one = FixedPoint().decode(uploads[0])
    assert np.abs(one - vectors[0]).mean() > 1e6
    with pytest.raises(ValueError, match="every mask neighbour dropped"):
        clients[0].reveal_pair_seeds(sorted(graph[0]), near[0], tag)
