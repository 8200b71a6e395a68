"""Secure aggregation by pairwise additive masks (Bonawitz et al. SecAgg, without Shamir shares).

Threat model: an honest-but-curious server that follows the protocol but would like to read an
individual device's vector. It should learn only the SUM over the surviving devices.

Protocol for one round with cohort ``P`` (ids are ints, each device ``i`` holds an X25519 key):

1. Every device publishes ``public_key()``; the server relays the cohort's keys to all of them.
2. Device ``i`` encodes its vector in fixed point (int64 with wrap-around, seen as uint64) and
   adds, for every peer ``j`` in ``P``, ``+mask_ij`` if ``j > i`` and ``-mask_ij`` if ``j < i``.
   ``mask_ij`` is a ChaCha20 stream keyed by ``round_key(pair_seed_ij, round_tag)``, where
   ``pair_seed_ij`` comes from X25519 + HKDF-SHA256 and is the same on both sides.
3. The server adds the masked vectors it received; masks of pairs that both sent cancel mod 2**64.
4. For every device ``j`` that did not send, each survivor reveals its *round-scoped* key with
   ``j`` (``reveal_pair_seeds``), and the server subtracts those left-over masks.

Revealed values are round keys, not the long-lived pair seeds, so a revelation exposes the pair's
mask of that round only; the same X25519 keys can then be reused across rounds.

Masks over a sparse graph (as SecAgg+, Bell et al., CCS 2020): instead of every pair, device
``i`` masks with its neighbours in a ``k``-regular Harary graph over the cohort (a ring in a
random order, each device joined to the ``k / 2`` nearest on either side; ``mask_graph``), so a
device's work and the keys it receives grow with ``k``, not with the cohort. The server sends
each device only its neighbours' keys. The Harary graph is ``k``-connected, so fewer than ``k``
dropouts leave the survivors connected; the server unmasks only when the survivors' graph is
connected (``connected``), since the sum of a cut-off part would be exposed on its own, and a
device refuses to reveal its keys with all of its neighbours (its own vector would be exposed).
With ``k >= n - 1`` the graph is every pair, the protocol above.

Limitations (no Shamir secret sharing, no self-masks):

* A dropped device's own contribution is simply absent from the sum.
* A survivor that drops after sending but before revealing makes the round fail (``ValueError``).
* If a device's masked vector reaches the server after its peers revealed their keys with it
  (a late, not a dropped, device), the server can unmask that vector: the server must discard late
  uploads; the double masking of full SecAgg is what removes this trust.
* Public keys are not authenticated: a server that forges keys (active attacker) is out of scope.
* Exact only while every partial sum fits the fixed-point range (see ``FixedPoint``).

Long file: a little over 400 lines, the whole pairwise protocol (encoding, keys, masks, the mask
graph, device and server) in one place, so that it can be audited as one.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

_PAIR_INFO = b"peel_fed.secagg.pair-seed.v1"
_ROUND_INFO = b"peel_fed.secagg.round-key.v1"
_ZERO_NONCE = bytes(16)


class FixedPoint:
    """Fixed-point encoding of floats into uint64 with two's-complement wrap-around.

    ``encode(x)`` is ``round(x * 2**scale_bits)`` as int64 viewed as uint64, so sums of encodings
    computed with wrapping uint64 arithmetic decode to the sum of the floats as long as the true
    sum satisfies ``|sum| < 2**(63 - scale_bits)`` (``2**39`` for the default 24 bits); beyond
    that it silently wraps. Resolution is ``2**-scale_bits`` per value (rounding error at most
    ``2**-(scale_bits + 1)`` per encoded value).

    Parameters
    ----------
    scale_bits : int
        Number of fractional bits, in ``[0, 62]``.
    """

    def __init__(self, scale_bits: int = 24) -> None:
        if not 0 <= scale_bits <= 62:
            raise ValueError(f"scale_bits must be in [0, 62], got {scale_bits}")
        self.scale_bits = int(scale_bits)
        self._scale = float(2**self.scale_bits)

    @property
    def max_abs(self) -> float:
        """Exclusive bound ``2**(63 - scale_bits)`` on the magnitude of values and sums."""
        return float(2 ** (63 - self.scale_bits))

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Encode floats as uint64.

        Parameters
        ----------
        x : array_like of float
            Finite values with ``|x| < 2**(63 - scale_bits)``.

        Returns
        -------
        numpy.ndarray
            uint64 array of the same shape.
        """
        arr = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError("FixedPoint.encode: non-finite value")
        scaled = np.rint(arr * self._scale)
        if arr.size and float(np.max(np.abs(scaled))) >= 2.0**63:
            raise ValueError(f"FixedPoint.encode: |value| must be < {self.max_abs:g}")
        return scaled.astype(np.int64).view(np.uint64)

    def decode(self, u: np.ndarray) -> np.ndarray:
        """Decode uint64 (two's complement) back to float64.

        Parameters
        ----------
        u : array_like of uint64
            Encoded values (or wrapped sums of encoded values).

        Returns
        -------
        numpy.ndarray
            float64 array of the same shape.
        """
        arr = np.ascontiguousarray(u, dtype=np.uint64)
        return arr.view(np.int64).astype(np.float64) / self._scale


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def pair_seed(
    own_private: X25519PrivateKey, peer_public_bytes: bytes, ids: tuple[int, int]
) -> bytes:
    """32-byte seed shared by a pair of devices (X25519 agreement, then HKDF-SHA256).

    Parameters
    ----------
    own_private : X25519PrivateKey
        This device's private key.
    peer_public_bytes : bytes
        The peer's 32-byte raw X25519 public key.
    ids : tuple of int
        The two device ids (any order); HKDF's info holds them sorted, so the seed is
        pair-specific and identical on both sides.

    Returns
    -------
    bytes
        32-byte seed.
    """
    a, b = sorted((int(ids[0]), int(ids[1])))
    if a == b:
        raise ValueError(f"pair_seed: a device has no pair with itself (id {a})")
    shared = own_private.exchange(X25519PublicKey.from_public_bytes(peer_public_bytes))
    # 16-byte signed encoding: Flower node ids are unsigned 64-bit, tests use small ints
    info = _PAIR_INFO + a.to_bytes(16, "big", signed=True) + b.to_bytes(16, "big", signed=True)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def round_key(seed: bytes, round_tag: bytes) -> bytes:
    """Round-scoped 32-byte key ``HMAC-SHA256(seed, info || round_tag)`` for a pair's mask.

    Revealing it exposes the pair's mask for this ``round_tag`` only, not the pair seed.
    """
    return hmac.new(seed, _ROUND_INFO + bytes(round_tag), hashlib.sha256).digest()


def expand_mask(key: bytes, length: int) -> np.ndarray:
    """``length`` uint64 words of the ChaCha20 keystream under a 32-byte ``key`` (zero nonce).

    A zero nonce is safe because every key is used for a single stream (one pair, one round).
    """
    if len(key) != 32:
        raise ValueError(f"expand_mask: key must be 32 bytes, got {len(key)}")
    if length < 0:
        raise ValueError(f"expand_mask: negative length {length}")
    encryptor = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * int(length)))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def mask_vector(seed: bytes, round_tag: bytes, length: int) -> np.ndarray:
    """Pairwise mask of one round: ``expand_mask(round_key(seed, round_tag), length)``.

    Parameters
    ----------
    seed : bytes
        Pair seed from ``pair_seed``.
    round_tag : bytes
        Round identifier; different tags give independent masks.
    length : int
        Number of uint64 words.

    Returns
    -------
    numpy.ndarray
        uint64 array of shape ``(length,)``.
    """
    return expand_mask(round_key(seed, round_tag), length)


def auto_degree(n: int) -> int:
    """The default mask-graph degree for a cohort of ``n``: ``2 ceil(log2 n)``, at most
    ``n - 1`` (every pair), so that dropouts rarely cut the graph while the work per device
    grows as ``log n``."""
    return max(1, min(n - 1, 2 * math.ceil(math.log2(max(n, 2)))))


def mask_graph(ids: Sequence[int], degree: int, rng: np.random.Generator) -> dict[int, set[int]]:
    """Each device's mask neighbours: every other device when ``degree >= len(ids) - 1``, else
    a Harary graph of even degree (``degree`` rounded up) on a ring in ``rng``'s order.

    Parameters
    ----------
    ids : sequence of int
        The cohort's device ids.
    degree : int
        Wanted neighbours per device (at least 1).
    rng : numpy.random.Generator
        The order of the ring.

    Returns
    -------
    dict of int to set of int
        A symmetric neighbour map.
    """
    ids = sorted(int(i) for i in ids)
    n = len(ids)
    if degree < 1:
        raise ValueError(f"mask_graph: degree must be >= 1, got {degree}")
    half = (degree + 1) // 2
    if 2 * half >= n - 1:
        return {i: set(ids) - {i} for i in ids}
    ring = [ids[p] for p in rng.permutation(n)]
    graph: dict[int, set[int]] = {i: set() for i in ids}
    for p, i in enumerate(ring):
        for d in range(1, half + 1):
            j = ring[(p + d) % n]
            graph[i].add(j)
            graph[j].add(i)
    return graph


def connected(nodes: Sequence[int], graph: Mapping[int, set[int]]) -> bool:
    """Whether ``nodes`` form one connected part of ``graph`` (edges among them only)."""
    left = {int(n) for n in nodes}
    if not left:
        return True
    todo = [left.pop()]
    while todo:
        i = todo.pop()
        near = graph[i] & left
        left -= near
        todo.extend(near)
    return not left


class SecAggClient:
    """Device side: holds an X25519 key and produces masked uploads.

    Parameters
    ----------
    client_id : int
        This device's id in the cohort.
    private_key : X25519PrivateKey, optional
        Key to use; a fresh one from OS randomness when omitted.
    fixed_point : FixedPoint, optional
        Encoding (default ``FixedPoint()``); must match the server's.
    """

    def __init__(
        self,
        client_id: int,
        private_key: X25519PrivateKey | None = None,
        fixed_point: FixedPoint | None = None,
    ) -> None:
        self.client_id = int(client_id)
        self._key = private_key if private_key is not None else X25519PrivateKey.generate()
        self.fixed_point = fixed_point if fixed_point is not None else FixedPoint()

    def public_key(self) -> bytes:
        """This device's 32-byte raw X25519 public key."""
        return _public_bytes(self._key)

    def _seed_with(self, peer: int, peer_public_keys: Mapping[int, bytes]) -> bytes:
        if peer not in peer_public_keys:
            raise ValueError(f"client {self.client_id}: no public key for peer {peer}")
        return pair_seed(self._key, peer_public_keys[peer], (self.client_id, peer))

    def masked(
        self, vector: np.ndarray, peer_public_keys: Mapping[int, bytes], round_tag: bytes
    ) -> np.ndarray:
        """Fixed-point encoding of ``vector`` plus the cancelling pairwise masks (mod 2**64).

        Parameters
        ----------
        vector : array_like of float, 1-D
            This device's private vector.
        peer_public_keys : mapping of int to bytes
            Public keys of the whole cohort (this device's own entry, if present, is skipped).
        round_tag : bytes
            Round identifier, the same for the whole cohort.

        Returns
        -------
        numpy.ndarray
            uint64 array ``encode(vector) + sum_{j>i} mask_ij - sum_{j<i} mask_ij``.
        """
        arr = np.asarray(vector, dtype=np.float64)
        if arr.ndim != 1:
            raise ValueError(f"masked: vector must be 1-D, got shape {arr.shape}")
        out = self.fixed_point.encode(arr).copy()
        for peer in sorted(peer_public_keys):
            if peer == self.client_id:
                continue
            mask = mask_vector(self._seed_with(peer, peer_public_keys), round_tag, arr.size)
            if peer > self.client_id:
                out += mask
            else:
                out -= mask
        return out

    def reveal_pair_seeds(
        self, dropped: Sequence[int], peer_public_keys: Mapping[int, bytes], round_tag: bytes
    ) -> dict[int, bytes]:
        """Round-scoped keys shared with the dropped peers, so the server can remove their masks.

        Parameters
        ----------
        dropped : sequence of int
            Peers that did not send their masked vector this round.
        peer_public_keys : mapping of int to bytes
            Public keys of the cohort.
        round_tag : bytes
            The round whose masks are to be removed.

        Returns
        -------
        dict of int to bytes
            ``{j: round_key(pair_seed_ij, round_tag)}`` for each dropped ``j`` other than self.

        Raises ``ValueError`` when every peer in ``peer_public_keys`` (its mask neighbours)
        dropped: revealing all its keys would expose this device's own vector.
        """
        peers = set(peer_public_keys) - {self.client_id}
        if peers and peers <= {int(j) for j in dropped}:
            raise ValueError(
                f"client {self.client_id}: every mask neighbour dropped; revealing all its pair "
                "keys would expose its own vector"
            )
        return {
            int(j): round_key(self._seed_with(int(j), peer_public_keys), round_tag)
            for j in dropped
            if int(j) != self.client_id
        }


class SecAggServer:
    """Server side: sums masked uploads and removes the masks left by dropped devices."""

    def unmask_sum(
        self,
        masked: Mapping[int, np.ndarray],
        participants: Sequence[int],
        revealed: Mapping[int, Mapping[int, bytes]],
        length: int,
        fixed_point: FixedPoint,
        graph: Mapping[int, set[int]] | None = None,
    ) -> np.ndarray:
        """Sum of the survivors' vectors.

        Parameters
        ----------
        masked : mapping of int to numpy.ndarray
            Masked uint64 uploads received, keyed by device id (the survivors).
        participants : sequence of int
            The whole cohort whose public keys were distributed; ids in it without an upload in
            ``masked`` are the dropped devices.
        revealed : mapping of int to mapping of int to bytes
            ``revealed[i][j]``: survivor ``i``'s round key with dropped ``j``
            (from ``SecAggClient.reveal_pair_seeds``).
        length : int
            Vector length.
        fixed_point : FixedPoint
            Encoding used by the devices.
        graph : mapping of int to set of int, optional
            The mask neighbours (``mask_graph``); every pair when omitted.

        Returns
        -------
        numpy.ndarray
            float64 array of shape ``(length,)``: the sum over survivors.
        """
        cohort = {int(p) for p in participants}
        unknown = sorted(set(masked) - cohort)
        if unknown:
            raise ValueError(f"unmask_sum: uploads from ids outside the cohort: {unknown}")
        survivors = sorted(masked)
        dropped = sorted(cohort - set(masked))
        total = np.zeros(length, dtype=np.uint64)
        for i in survivors:
            upload = np.asarray(masked[i])
            if upload.dtype != np.uint64 or upload.shape != (length,):
                raise ValueError(f"unmask_sum: upload of {i} is not uint64 of shape ({length},)")
            total += upload
        for i in survivors:
            for j in dropped:
                if graph is not None and j not in graph[i]:
                    continue
                key = revealed.get(i, {}).get(j)
                if key is None:
                    raise ValueError(f"unmask_sum: missing revealed seed for pair ({i}, {j})")
                mask = expand_mask(key, length)
                # Survivor i added +mask if j > i and -mask if j < i: undo it.
                if j > i:
                    total -= mask
                else:
                    total += mask
        return fixed_point.decode(total)
