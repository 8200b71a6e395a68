"""An upload audit that reads what the server can read, and says what leaks.

For every array a node sent, the audit first decodes what the server can decode: a ``uint64``
array is a fixed-point vector, masked or not, so it is decoded with ``FixedPoint`` (a masked one
decodes to values spread over +-2**39; an unmasked one to the node's own numbers). Then it looks
for the node's private data in the values:

- ``plain values``: a fixed-point upload that decodes to mostly small numbers was not masked;
- ``item list``: an integer array whose values are training items of the node's users and that
  names every item of at least one of them;
- ``item counts``: the node's, or one of its users', item-count vector, anywhere in the values.

Each finding is one line naming the message type, the array and the leak. In clear mode the
findings are the report of what leaks; under secure aggregation there should be none.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from peel_fed.data import Interactions
from peel_fed.messages import Content
from peel_fed.secagg import FixedPoint

PLAIN_BELOW = 2.0**20  # a masked value lands below this with probability 2**-19 (24-bit scale)


@dataclass
class NodeSecrets:
    """One node's private data: each hosted user's training items, and the item-count vectors
    of the node and of each user."""

    item_lists: list[np.ndarray]
    item_counts: list[np.ndarray]

    @property
    def all_items(self) -> np.ndarray:
        return np.unique(np.concatenate(self.item_lists)) if self.item_lists else np.zeros(0)

    @classmethod
    def of_users(cls, users: np.ndarray, train: Interactions, n_users: int, n_items: int):
        bounds = train.user_bounds(n_users)
        lists = [np.unique(train.items[bounds[u] : bounds[u + 1]]) for u in users]
        lists = [items for items in lists if items.size]
        counts = [np.bincount(items, minlength=n_items) for items in lists]
        mine = np.isin(train.users, users)
        counts.append(np.bincount(train.items[mine], minlength=n_items))
        return cls(lists, counts)


def _contains(values: np.ndarray, pattern: np.ndarray, atol: float) -> bool:
    """Whether ``pattern`` appears as a contiguous window of ``values`` (within ``atol``)."""
    n = pattern.size
    if values.size < n or n == 0:
        return False
    starts = np.flatnonzero(np.abs(values[: values.size - n + 1] - pattern[0]) <= atol)
    return any(np.allclose(values[s : s + n], pattern, atol=atol, rtol=0) for s in starts)


def audit_upload(
    kind: str, content: Content, secrets: NodeSecrets, fixed_point: FixedPoint | None = None
) -> list[str]:
    """The leaks found in one upload (empty when none): see the module docstring."""
    fixed_point = fixed_point or FixedPoint()
    tol = 2.0 ** -(fixed_point.scale_bits - 2)
    found = []
    known = secrets.all_items
    for record, arrays in content.arrays.items():
        for key, array in arrays.items():
            where = f"{kind}: {record}/{key}"
            values = np.asarray(array)
            if values.dtype == np.uint64:
                values = fixed_point.decode(values)
                small = float(np.mean(np.abs(values) < PLAIN_BELOW)) if values.size else 0.0
                if values.size >= 8 and small > 0.5:
                    found.append(f"{where}: plain values ({small:.0%} of a fixed-point upload)")
            elif values.dtype.kind in "iu" and values.dtype != np.uint8 and values.size >= 2:
                named = np.unique(values)
                if np.isin(named, known).all() and any(
                    np.isin(items, named).all() for items in secrets.item_lists if items.size > 1
                ):
                    found.append(f"{where}: item list (every item of a hosted user)")
            if values.dtype.kind == "f" or values.dtype.kind in "iu":
                flat = values.astype(np.float64).ravel()
                if any(_contains(flat, c.astype(np.float64), tol) for c in secrets.item_counts):
                    found.append(f"{where}: item counts of the node or of a hosted user")
    return found


def audit(uploads: Iterable[tuple[str, Content, NodeSecrets]]) -> list[str]:
    """Every finding over ``(message type, content, the sending node's secrets)`` uploads."""
    return [f for kind, content, secrets in uploads for f in audit_upload(kind, content, secrets)]
