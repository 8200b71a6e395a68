"""Secure aggregation with double masking and Shamir shares (Bonawitz et al. 2017, SecAgg).

Threat model: an honest-but-curious server (it follows the protocol, keeps everything it sees and
would like to read one device's vector) and honest devices. The server should learn only the SUM
over the devices whose masked vector it accepted. Unlike ``peel_fed.secagg`` (pairwise masks
only), devices may drop out at any step, including after their upload and before unmasking, as
long as ``t`` of them answer the last step, and a late upload can never be unmasked.

One round, cohort ``U1`` of ``n`` devices (int ids), threshold ``t`` with ``n/2 < t <= n``:

0. ``setup(round_tag)``: device ``i`` draws fresh X25519 keys ``c_i`` (share encryption) and
   ``s_i`` (mask agreement) and a 32-byte self-mask seed ``b_i``, and sends both public keys
   (64 bytes). Keys are per round: ``s_i`` may be revealed when ``i`` drops.
1. ``share_keys(public_keys, t)``: ``i`` splits ``b_i`` and the private bytes of ``s_i`` into
   ``n`` Shamir shares (threshold ``t``; share ``k`` goes to the ``k``-th id of sorted ``U1``,
   its own is kept) and encrypts each peer's pair of shares with AES-256-GCM under
   ``HMAC(X25519(c_i, c_j) via HKDF, round_tag)``; the server only relays ciphertexts
   (``relay``). ``U2``: the devices whose ciphertexts were relayed.
2. ``receive_shares`` then ``masked(x_i)``: ``y_i = x_i + PRG(b_i) + sum_{j in U2, j>i}
   PRG(s_ij) - sum_{j in U2, j<i} PRG(s_ij)`` mod 2**64 (``FixedPoint``, ChaCha20 masks of
   ``peel_fed.secagg``; ``s_ij`` is ``pair_seed`` of the ``s`` keys). ``U3``: uploads received.
3. ``unmask_shares(survivors=U3, dropped=U2 - U3)``: ``i`` returns its share of ``b_k`` for each
   survivor ``k`` and its share of ``s_k`` for each dropped ``k``, never both for the same ``k``:
   a device remembers what it revealed and refuses (``ValueError``) a request that would give
   the other half, or that names fewer than ``t`` survivors.
4. ``ShamirSecAggServer.unmask_sum``: sum of ``y_i`` over ``U3``, minus ``PRG(b_k)`` for each
   survivor (``b_k`` from ``t`` shares) and, for each dropped ``k``, the masks it shared with the
   survivors (``s_k`` from ``t`` shares, checked against ``k``'s public key).

What it protects: the server sees one vector masked by ``PRG(b_i)`` and can remove it only with
``t`` shares of ``b_i``, which honest devices give only when ``i`` is listed as a survivor. Once
``i`` was unmasked as dropped, a late ``y_i`` stays hidden under ``PRG(b_i)``. Since ``2t > n``,
any ``t`` devices revealing ``b_k`` and any ``t`` revealing ``s_k`` would share a device, which
refuses: even a server that sends different lists to different devices cannot get both halves.
Up to ``n - t`` devices may drop, at any step.

What it does not protect: public keys are not signed, so a server that forges keys (active
man-in-the-middle) reads every share; there is no consistency round (step 3 of the paper);
``t - 1`` colluding devices plus the server learn nothing, ``t`` can reconstruct anyone's
secrets; the sum itself is released (add DP for that); a device that sends garbage corrupts the
sum undetected. Sums are exact only within the ``FixedPoint`` range.

Shamir: ``peel_fed.shamir`` (pycryptodome's field in Flower's layout, which
``flwr.common.secure_aggregation.crypto.shamir`` reads and writes too; Flower's module is not
imported, the core may not import Flower). AES-GCM replaces Flower's Fernet helper. A device
carries its round from one message (process) to the next with ``to_state``/``from_state``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from peel_fed.secagg import FixedPoint, mask_vector, pair_seed
from peel_fed.shamir import combine_shares, create_shares

KEY_BYTES = 32
PUBLIC_KEYS_BYTES = 2 * KEY_BYTES  # c_i public || s_i public
SHARE_BYTES = 4 + 48  # index, then 3 chunks of a padded 32-byte secret
_NONCE_BYTES = 12
_SHARE_KEY_INFO = b"peel_fed.secagg_shamir.share-key.v1"
_STATE_FORMAT = "peel_fed.secagg_shamir.client.v1"
_STEPS = ("new", "setup", "shared", "received", "uploaded")


class Reveal(NamedTuple):
    """A device's answer to the unmasking request (step 3): share bytes by owner id."""

    self_mask: dict[int, bytes]  # its share of b_k for every survivor k
    pair_secret: dict[int, bytes]  # its share of s_k (mask-agreement private key), dropped k


def check_threshold(threshold: int, n: int) -> None:
    """Raise ``ValueError`` unless ``n/2 < threshold <= n`` (and ``n >= 2``)."""
    if n < 2 or not (2 * threshold > n and threshold <= n):
        raise ValueError(f"threshold needs n/2 < t <= n, n >= 2; got t={threshold}, n={n}")


def _ids(a: int, b: int) -> bytes:
    return int(a).to_bytes(16, "big", signed=True) + int(b).to_bytes(16, "big", signed=True)


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)


def _private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())


def _zip(state: Mapping[str, Any], *names: str) -> zip:
    return zip(*(state[name] for name in names), strict=True)


def relay(outgoing: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
    """Server: ``{sender: {recipient: ct}}`` to ``{recipient: {sender: ct}}`` (ciphertexts only)."""
    inbox: dict[int, dict[int, bytes]] = {}
    for sender, messages in outgoing.items():
        for recipient, ct in messages.items():
            inbox.setdefault(int(recipient), {})[int(sender)] = bytes(ct)
    return inbox


def unmask_request(shared: Iterable[int], uploaded: Iterable[int]) -> tuple[list[int], list[int]]:
    """Server: the lists sent in step 3, ``(survivors, dropped)`` = ``(U3, U2 - U3)``."""
    shared_set, up = {int(i) for i in shared}, {int(i) for i in uploaded}
    if up - shared_set:
        raise ValueError(f"unmask_request: uploads from ids outside U2: {sorted(up - shared_set)}")
    return sorted(up), sorted(shared_set - up)


class ShamirSecAggClient:
    """Device side of one round at a time (``setup`` starts a round and forgets the last).

    Parameters
    ----------
    client_id : int
        This device's id in the cohort.
    fixed_point : FixedPoint, optional
        Encoding (default ``FixedPoint()``); must match the server's.
    random_bytes : callable, optional
        Source of keys and seeds, ``os.urandom`` unless a test needs determinism.
    """

    def __init__(
        self,
        client_id: int,
        fixed_point: FixedPoint | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.client_id = int(client_id)
        self.fixed_point = fixed_point if fixed_point is not None else FixedPoint()
        self._random = random_bytes
        self._round_tag: bytes | None = None

    def setup(self, round_tag: bytes) -> bytes:
        """Start a round: fresh keys and self-mask seed; returns the 64-byte public keys."""
        self._round_tag = bytes(round_tag)
        self._enc = X25519PrivateKey.from_private_bytes(self._random(KEY_BYTES))
        self._mask = X25519PrivateKey.from_private_bytes(self._random(KEY_BYTES))
        self._self_seed = self._random(KEY_BYTES)
        self._keys: dict[int, bytes] = {}
        self._threshold = 0
        self._shares: dict[int, tuple[bytes, bytes]] = {}  # holder's (b-share, s-share) per owner
        self._revealed: dict[int, str] = {}  # owner -> "self_mask" | "pair_secret"
        self._received = self._uploaded = False
        return _public(self._enc) + _public(self._mask)

    def to_state(self) -> dict[str, int | bytes | str | list[int] | list[bytes]]:
        """Everything ``from_state`` needs to go on with the round, as ``ConfigRecord`` values.

        In Flower's deployment each message runs in a fresh process: keep this dict in
        ``context.state`` between messages, on the device (it holds private keys and shares).
        Fields: ``format``, ``client_id``, ``step`` (``new``, ``setup``, ``shared``, ``received``,
        ``uploaded``); after ``setup`` also ``round_tag``, the private ``enc_key``,
        ``mask_key`` and ``self_seed``, ``threshold``, ``cohort`` with its ``public_keys``,
        ``share_owners`` with ``self_mask_shares`` and ``pair_secret_shares``, and the owners
        whose shares were handed out, ``revealed_self_mask`` and ``revealed_pair_secret``.
        """
        state: dict = {"format": _STATE_FORMAT, "client_id": self.client_id, "step": "new"}
        if self._round_tag is None:
            return state
        owners, cohort, shown = sorted(self._shares), sorted(self._keys), self._revealed.items()
        return state | {
            "step": _STEPS[4 if self._uploaded else 3 if self._received else 2 if cohort else 1],
            "round_tag": self._round_tag,
            "enc_key": _private(self._enc),
            "mask_key": _private(self._mask),
            "self_seed": bytes(self._self_seed),
            "threshold": self._threshold,
            "cohort": cohort,
            "public_keys": [self._keys[k] for k in cohort],
            "share_owners": owners,
            "self_mask_shares": [self._shares[k][0] for k in owners],
            "pair_secret_shares": [self._shares[k][1] for k in owners],
            "revealed_self_mask": sorted(k for k, v in shown if v == "self_mask"),
            "revealed_pair_secret": sorted(k for k, v in shown if v == "pair_secret"),
        }

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        fixed_point: FixedPoint | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> ShamirSecAggClient:
        """The client ``to_state`` saved, at the same step; ``ValueError`` if it is malformed."""
        try:
            if state["format"] != _STATE_FORMAT:
                raise ValueError(f"format {state['format']!r}")
            client, step = cls(int(state["client_id"]), fixed_point, random_bytes), state["step"]
            if _STEPS.index(step) == 0:
                return client
            client._round_tag = bytes(state["round_tag"])
            client._enc = X25519PrivateKey.from_private_bytes(bytes(state["enc_key"]))
            client._mask = X25519PrivateKey.from_private_bytes(bytes(state["mask_key"]))
            client._self_seed = bytes(state["self_seed"])
            client._threshold = int(state["threshold"])
            client._keys = {int(k): bytes(v) for k, v in _zip(state, "cohort", "public_keys")}
            client._shares = {
                int(k): (bytes(b), bytes(s))
                for k, b, s in _zip(state, "share_owners", "self_mask_shares", "pair_secret_shares")
            }
            shown = {kind: {int(k) for k in state[f"revealed_{kind}"]} for kind in Reveal._fields}
            if shown["self_mask"] & shown["pair_secret"]:
                raise ValueError("both shares of a device revealed")
            client._revealed = {k: kind for kind, ids in shown.items() for k in ids}
            client._received, client._uploaded = step in _STEPS[3:], step == _STEPS[4]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"from_state: not a valid ShamirSecAggClient state: {err}") from None
        own = _public(client._enc) + _public(client._mask)
        if client._keys and client._keys.get(client.client_id) != own:
            raise ValueError(f"from_state: client {client.client_id}'s keys are not in its cohort")
        return client

    def _box(self, peer: int) -> AESGCM:
        seed = pair_seed(self._enc, self._keys[peer][:KEY_BYTES], (self.client_id, peer))
        key = hmac.new(seed, _SHARE_KEY_INFO + self._round_tag, hashlib.sha256).digest()
        return AESGCM(key)

    def share_keys(self, public_keys: Mapping[int, bytes], threshold: int) -> dict[int, bytes]:
        """Step 1: encrypted shares of ``b_i`` and ``s_i`` for every other cohort member.

        ``public_keys``: the ``setup`` outputs of the whole cohort ``U1``, this device included;
        ``threshold``: ``t``, with ``n/2 < t <= n``. Returns ``{peer: nonce || AES-GCM(b-share
        || s-share)}`` for the server to relay.
        """
        if self._round_tag is None:
            raise ValueError(f"client {self.client_id}: share_keys before setup")
        keys = {int(k): bytes(v) for k, v in public_keys.items()}
        if keys.get(self.client_id) != _public(self._enc) + _public(self._mask):
            raise ValueError(f"client {self.client_id}: own public keys missing or altered")
        if any(len(v) != PUBLIC_KEYS_BYTES for v in keys.values()):
            raise ValueError(f"share_keys: public keys must be {PUBLIC_KEYS_BYTES} bytes")
        cohort = sorted(keys)
        check_threshold(threshold, len(cohort))
        self._keys, self._threshold = keys, int(threshold)
        b_shares = create_shares(self._self_seed, threshold, len(cohort))
        s_shares = create_shares(_private(self._mask), threshold, len(cohort))
        out = {}
        for pos, peer in enumerate(cohort):
            if peer == self.client_id:
                self._shares[peer] = (b_shares[pos], s_shares[pos])
                continue
            nonce = self._random(_NONCE_BYTES)
            aad = _ids(self.client_id, peer) + self._round_tag
            out[peer] = nonce + self._box(peer).encrypt(nonce, b_shares[pos] + s_shares[pos], aad)
        return out

    def receive_shares(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Step 2a: decrypt the shares relayed to this device, ``{sender: ciphertext}``."""
        if not self._keys:
            raise ValueError(f"client {self.client_id}: receive_shares before share_keys")
        for sender, ct in sorted(ciphertexts.items()):
            sender = int(sender)
            if sender == self.client_id or sender not in self._keys:
                raise ValueError(f"client {self.client_id}: shares from unexpected sender {sender}")
            aad = _ids(sender, self.client_id) + self._round_tag
            try:
                plain = self._box(sender).decrypt(ct[:_NONCE_BYTES], ct[_NONCE_BYTES:], aad)
            except InvalidTag:
                msg = f"client {self.client_id}: bad share ciphertext from {sender}"
                raise ValueError(msg) from None
            self._shares[sender] = (plain[:SHARE_BYTES], plain[SHARE_BYTES:])
        if len(self._shares) < self._threshold:
            raise ValueError(
                f"client {self.client_id}: shares from {len(self._shares)} devices, "
                f"fewer than the threshold t={self._threshold}"
            )
        self._received = True

    def masked(self, vector: np.ndarray) -> np.ndarray:
        """Step 2b: ``encode(x) + PRG(b_i) + sum_j ±PRG(s_ij)`` mod 2**64 over ``j`` in ``U2``.

        ``vector``: this device's private vector (1-D floats); returns uint64, same length.
        """
        if not self._received:
            raise ValueError(f"client {self.client_id}: masked before receive_shares")
        arr = np.asarray(vector, dtype=np.float64)
        if arr.ndim != 1:
            raise ValueError(f"masked: vector must be 1-D, got shape {arr.shape}")
        out = self.fixed_point.encode(arr) + mask_vector(self._self_seed, self._round_tag, arr.size)
        for peer in sorted(self._shares):
            if peer == self.client_id:
                continue
            seed = pair_seed(self._mask, self._keys[peer][KEY_BYTES:], (self.client_id, peer))
            mask = mask_vector(seed, self._round_tag, arr.size)
            if peer > self.client_id:
                out += mask
            else:
                out -= mask
        self._uploaded = True
        return out

    def unmask_shares(self, survivors: Sequence[int], dropped: Sequence[int]) -> Reveal:
        """Step 3: shares of ``b_k`` for survivors and of ``s_k`` for dropped devices.

        Refuses (``ValueError``) unless this device uploaded and is a survivor, the two lists
        split ``U2`` exactly, there are at least ``t`` survivors, and no listed device had the
        other half of its secrets revealed by this device before.
        """
        alive, gone = {int(k) for k in survivors}, {int(k) for k in dropped}
        me = self.client_id
        if not self._uploaded or me not in alive:
            raise ValueError(f"client {me}: did not upload, or listed as dropped: no shares")
        if alive & gone or alive | gone != set(self._shares):
            raise ValueError(f"client {me}: survivors and dropped do not split the cohort")
        if len(alive) < self._threshold:
            raise ValueError(f"client {me}: {len(alive)} survivors < threshold {self._threshold}")
        wanted = {k: "self_mask" for k in alive} | {k: "pair_secret" for k in gone}
        clash = sorted(k for k, kind in wanted.items() if self._revealed.get(k, kind) != kind)
        if clash:
            raise ValueError(f"client {me}: refuses both shares of the same device: {clash}")
        self._revealed.update(wanted)
        return Reveal(
            {k: self._shares[k][0] for k in sorted(alive)},
            {k: self._shares[k][1] for k in sorted(gone)},
        )


class ShamirSecAggServer:
    """Server side: relays shares (``relay``) and unmasks the sum of the survivors.

    Parameters
    ----------
    threshold : int
        ``t`` sent to the devices with the public keys.
    fixed_point : FixedPoint, optional
        Encoding used by the devices (default ``FixedPoint()``).
    """

    def __init__(self, threshold: int, fixed_point: FixedPoint | None = None) -> None:
        self.threshold = int(threshold)
        self.fixed_point = fixed_point if fixed_point is not None else FixedPoint()

    def _secret(self, kind: str, owner: int, answers: Mapping[int, Reveal]) -> bytes:
        held = [getattr(a, kind) for _, a in sorted(answers.items())]
        shares = [h[owner] for h in held if owner in h]
        if len(shares) < self.threshold:
            raise ValueError(
                f"unmask_sum: {len(shares)} {kind} shares of {owner}, threshold t={self.threshold}"
            )
        return combine_shares(shares[: self.threshold])

    def unmask_sum(
        self,
        masked: Mapping[int, np.ndarray],
        reveals: Mapping[int, Reveal],
        public_keys: Mapping[int, bytes],
        shared: Sequence[int],
        round_tag: bytes,
        length: int,
    ) -> np.ndarray:
        """Step 4: the sum (float64, ``(length,)``) over the devices whose upload was accepted.

        ``masked``: the uint64 uploads ``U3`` (the survivors sent in ``unmask_request``);
        ``reveals``: the ``unmask_shares`` answers, at least ``t`` of them from survivors;
        ``public_keys``: the cohort's ``setup`` outputs (``U1``); ``shared``: ``U2``, the devices
        whose shares were relayed; ``round_tag``: as given to ``setup``; ``length``: of vectors.
        """
        t = self.threshold
        check_threshold(t, len(public_keys))
        survivors, dropped = unmask_request(shared, masked)
        answers = {int(r): a for r, a in reveals.items() if int(r) in survivors}
        if len(survivors) < t or len(answers) < t:
            raise ValueError(
                f"unmask_sum: {len(survivors)} uploads and {len(answers)} answers, "
                f"fewer than the threshold t={t}: the round cannot be unmasked"
            )
        total = np.zeros(length, dtype=np.uint64)
        for i in survivors:
            upload = np.asarray(masked[i])
            if upload.dtype != np.uint64 or upload.shape != (length,):
                raise ValueError(f"unmask_sum: upload of {i} is not uint64 of shape ({length},)")
            total += upload
            total -= mask_vector(self._secret("self_mask", i, answers), round_tag, length)
        for k in dropped:
            key = X25519PrivateKey.from_private_bytes(self._secret("pair_secret", k, answers))
            if _public(key) != bytes(public_keys[k])[KEY_BYTES:]:
                raise ValueError(f"unmask_sum: rebuilt key of {k} does not match its public key")
            for i in survivors:
                seed = pair_seed(key, bytes(public_keys[i])[KEY_BYTES:], (k, i))
                mask = mask_vector(seed, round_tag, length)
                if k > i:  # survivor i added +mask for a larger peer: undo it
                    total -= mask
                else:
                    total += mask
        return self.fixed_point.decode(total)
