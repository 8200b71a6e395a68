"""Shamir secret sharing over GF(2**128), byte-compatible with pycryptodome and Flower.

The field and encodings are those of pycryptodome's ``Crypto.Protocol.SecretSharing.Shamir``
with ``ssss=False``: polynomials over GF(2) modulo ``x**128 + x**7 + x**2 + x + 1``, an element
held as a Python int whose bit ``i`` is the coefficient of ``x**i``, written as 16 big-endian
bytes; a share index ``k`` is the element whose integer is ``k``. A secret is split in Flower's
layout (``flwr.common.secure_aggregation.crypto.shamir``): PKCS#7-pad it to 16-byte chunks, share
each chunk with its own random polynomial of degree ``t - 1``, and write share ``k`` as
``k`` (4 bytes little-endian) followed by one 16-byte value per chunk. So Flower's and
pycryptodome's ``combine`` read these shares, and ``combine_shares`` reads theirs.

Why not call pycryptodome: its multiplication walks the 128 bits of an operand with big-int
masks and ``combine`` inverts ``t`` denominators per 16-byte chunk, some 84 ms a chunk at
``t = 67``: 30 s for a server unmasking 100 devices. Here every secret of a round comes from
shares of the same answering devices, so the Lagrange coefficients at 0 depend only on the
indices: they are computed once per set of indices (cached), each with a 256-entry table of its
products with a byte, and a chunk is rebuilt as ``sum_k coeff_k * y_k`` (``t * 16`` lookups).
Splitting evaluates all chunks' polynomials at once (Horner on one int holding each chunk in its
own 160-bit lane), since a share index has at most 32 bits and multiplying by it is a few shifts.

Not constant time (no Python big-int code is); secrets are split on their own device and only
the server, to whom the revealed shares are not secret, combines them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

from Crypto.Util.Padding import pad, unpad

POLY = (1 << 128) | 0b10000111  # x^128 + x^7 + x^2 + x + 1
MASK = (1 << 128) - 1
INDEX_BYTES = 4
_LANE = 160  # 128 bits of a chunk's value + room for the product with a 32-bit index


def _fold(z: int) -> int:
    """Reduce a carry-less product of at most 255 bits modulo ``POLY``."""
    for _ in range(2):  # x^128 = x^7 + x^2 + x + 1; the second pass takes the last 7 bits
        high = z >> 128
        z = (z & MASK) ^ high ^ (high << 1) ^ (high << 2) ^ (high << 7)
    return z


def gf_mul(a: int, b: int) -> int:
    """Product of two field elements (ints below ``2**128``)."""
    if a < b:
        a, b = b, a
    z = 0
    while b:
        if b & 1:
            z ^= a
        a <<= 1
        b >>= 1
    return _fold(z)


def gf_inv(a: int) -> int:
    """Inverse of a non-zero field element (binary extended Euclid, invariant ``g * a = u``)."""
    if not 0 < a <= MASK:
        raise ZeroDivisionError("gf_inv: zero or not a field element")
    u, v, g1, g2 = a, POLY, 1, 0
    while u != 1:
        shift = u.bit_length() - v.bit_length()
        if shift < 0:
            u, v, g1, g2, shift = v, u, g2, g1, -shift
        u ^= v << shift
        g1 ^= g2 << shift
    return g1


def lagrange_at_zero(indices: Sequence[int]) -> list[int]:
    """Coefficients ``l_j = prod_{m != j} x_m / (x_j + x_m)``: ``p(0) = sum_j l_j p(x_j)``."""
    if len(set(indices)) != len(indices):
        raise ValueError("lagrange_at_zero: duplicate share index")
    out = []
    for j, xj in enumerate(indices):
        num = den = 1
        for m, xm in enumerate(indices):
            if m != j:
                num, den = gf_mul(num, xm), gf_mul(den, xj ^ xm)
        out.append(gf_mul(num, gf_inv(den)))
    return out


@lru_cache(maxsize=4)
def _tables(indices: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Per index, the unreduced products of its Lagrange coefficient with every byte."""
    out = []
    for coeff in lagrange_at_zero(indices):
        table = [0, coeff]
        for b in range(2, 256):
            table.append(table[b >> 1] << 1 if b % 2 == 0 else table[b - 1] ^ coeff)
        out.append(tuple(table))
    return tuple(out)


def _combine(indices: tuple[int, ...], values: Sequence[bytes]) -> bytes:
    """``p(0)`` from the 16-byte ``values`` of ``p`` at ``indices`` (sorted, distinct)."""
    acc, tables = 0, _tables(indices)
    for j in range(16):  # byte j of every value: XOR the table entries, then shift once
        column = 0
        for table, y in zip(tables, values, strict=True):
            column ^= table[y[j]]
        acc ^= column << (8 * (15 - j))
    return _fold(acc).to_bytes(16, "big")


def combine_chunk(points: Sequence[tuple[int, bytes]]) -> bytes:
    """Same as pycryptodome's ``Shamir.combine(points, ssss=False)``, a 16-byte secret."""
    pairs = sorted((int(k), bytes(y)) for k, y in points)
    if not pairs or any(len(y) != 16 for _, y in pairs):
        raise ValueError("combine_chunk: need one or more (index, 16-byte share) points")
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError("combine_chunk: duplicate share index")
    return _combine(tuple(k for k, _ in pairs), [y for _, y in pairs])


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """Split ``secret`` into ``num`` Shamir shares, any ``threshold`` of which rebuild it.

    Flower's layout: ``index (4 bytes LE) || one 16-byte share per chunk of pad(secret, 16)``.
    """
    if not 1 <= threshold <= num < 2**32:
        raise ValueError(f"create_shares: need 1 <= threshold <= num < 2**32, {threshold}, {num}")
    padded = pad(bytes(secret), 16)
    chunks = [int.from_bytes(padded[i : i + 16], "big") for i in range(0, len(padded), 16)]
    width = _LANE * len(chunks)
    low = sum(MASK << (_LANE * c) for c in range(len(chunks)))
    high = sum(((1 << (_LANE - 128)) - 1) << (_LANE * c) for c in range(len(chunks)))
    # p(x) = sum_i coeffs[i] x^(t-1-i): random coefficients, the secret chunks last (p(0)).
    coeffs = [int.from_bytes(os.urandom(width // 8), "big") & low for _ in range(threshold - 1)]
    coeffs.append(sum(v << (_LANE * c) for c, v in enumerate(chunks)))
    bits = range(32)
    out = []
    for k in range(1, num + 1):
        set_bits = [i for i in bits if k >> i & 1]
        acc = 0
        for coeff in coeffs:  # Horner: acc = acc * k + coeff, in every lane at once
            z = 0
            for i in set_bits:
                z ^= acc << i
            top = (z >> 128) & high
            acc = (z & low) ^ top ^ (top << 1) ^ (top << 2) ^ (top << 7) ^ coeff
        lanes = [((acc >> (_LANE * c)) & MASK).to_bytes(16, "big") for c in range(len(chunks))]
        out.append(k.to_bytes(INDEX_BYTES, "little") + b"".join(lanes))
    return out


def combine_shares(shares: Sequence[bytes]) -> bytes:
    """Rebuild a secret from shares of ``create_shares`` (at least the threshold of them).

    Fewer shares than the threshold give a wrong value, caught by the padding check with
    probability about ``1 - 2**-8`` (``ValueError``); otherwise a wrong secret comes back.
    """
    sizes = {len(s) for s in shares}
    if not shares or len(sizes) != 1 or (sizes.pop() - INDEX_BYTES) % 16:
        raise ValueError("combine_shares: need one or more shares of equal, valid length")
    pairs = sorted((int.from_bytes(s[:INDEX_BYTES], "little"), bytes(s)) for s in shares)
    indices = tuple(k for k, _ in pairs)
    if len(set(indices)) != len(indices):
        raise ValueError("combine_shares: duplicate share index")
    pieces = [
        _combine(indices, [s[start : start + 16] for _, s in pairs])
        for start in range(INDEX_BYTES, len(pairs[0][1]), 16)
    ]
    try:
        return unpad(b"".join(pieces), 16)
    except ValueError:
        raise ValueError("combine_shares: too few or corrupted shares") from None
