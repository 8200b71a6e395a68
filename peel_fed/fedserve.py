"""Serving each device its own PEE: only the bit-plane units that fit its budget.

After PEE learning the server holds, per user group, the order of the bit-plane units of the
coded item table (:mod:`peel_fed.fedplanes`). A node gets:

1. an *offer*: the unit orders of the groups its users joined and the item-group map (no item
   values), from which it works out the units its users need: per group, the order's prefix at
   the largest own budget among its users in that group (a node hosting several users receives
   the union over them); it answers with that list (:meth:`NodePlanes.wanted`);
2. the *units* it asked for, each exactly the bytes the budget counts
   (:func:`peel_fed.plane_store.unit_payload`), which it keeps in one
   :class:`peel_fed.plane_store.PlaneStore` per group (:class:`NodePlanes`);
3. nothing more: it ranks with what it holds and, when its budget drops, shrinks in place with
   no server contact (:func:`served_sums` measures Recall@20 at the own budget and after each
   cut of the dynamic-budget drill). Growing back asks for the next units with a new offer.

Bytes down per node are the units' payload (at most its budget) plus the overhead that
:func:`serve_overhead_bytes` states: the item-group map, the orders, an index entry per unit,
and the messages' framing. What the server learns from the answer: which units a node wants,
hence, per group its users joined, the largest budget among them (to the unit).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from peel_fed.blocks import BudgetError
from peel_fed.data import Interactions
from peel_fed.fedeval import metric_sums
from peel_fed.own_budget import drill_cut
from peel_fed.plane_store import PlaneStore, PlaneUnit, unit_payload
from peel_fed.planes import PlaneCode, planes_at_budget

# the stated overhead of the serving exchanges, per node: 1 B per item of the item-group map,
# 4 B per unit of each offered order (int16 group, plane), 16 B per unit sent (its index entry),
# and up to FRAMING_BYTES of message framing (keys, the data spec, array headers) per exchange
ORDER_UNIT_BYTES = 4
INDEX_UNIT_BYTES = 16
FRAMING_BYTES = 2048


def serve_overhead_bytes(n_items: int, offered_units: int, sent_units: int, exchanges: int) -> int:
    """Bytes a node may download beyond its units' payload (see the module docstring)."""
    return (
        n_items
        + ORDER_UNIT_BYTES * offered_units
        + INDEX_UNIT_BYTES * sent_units
        + FRAMING_BYTES * exchanges
    )


def encode_units(units: Sequence[PlaneUnit]) -> tuple[np.ndarray, np.ndarray]:
    """Units as an index ((k, 4) int32: group, plane, bits length, meta length) and one byte
    payload."""
    index = np.array(
        [[u.group, u.plane, len(u.bits), len(u.meta)] for u in units], dtype=np.int32
    ).reshape(-1, 4)
    payload = np.frombuffer(b"".join(u.bits + u.meta for u in units), dtype=np.uint8)
    return index, payload.copy()


def decode_units(index: np.ndarray, payload: np.ndarray) -> list[PlaneUnit]:
    data, at, units = np.asarray(payload, dtype=np.uint8).tobytes(), 0, []
    for g, p, nb, nm in np.asarray(index, dtype=np.int64).reshape(-1, 4).tolist():
        units.append(PlaneUnit(g, p, data[at : at + nb], data[at + nb : at + nb + nm]))
        at += nb + nm
    if at != len(data):
        raise ValueError(f"unit payload of {len(data)} B, index names {at} B")
    return units


def serve_units(code: PlaneCode, item_groups: np.ndarray, wanted: np.ndarray) -> list[PlaneUnit]:
    """The payloads of the ``wanted`` (group, plane) units."""
    return [unit_payload(code, item_groups, int(g), int(p)) for g, p in wanted.tolist()]


class NodePlanes:
    """A node's bit-plane stores, one per user group its users joined, each grown to its target
    budget. A unit two groups' orders share, (item group, plane), is downloaded once."""

    def __init__(self, orders: dict[int, np.ndarray], item_groups: np.ndarray, dim: int) -> None:
        self.item_groups = np.asarray(item_groups, dtype=np.int64)
        self.dim = int(dim)
        self.stores = {g: PlaneStore(o, self.item_groups, self.dim) for g, o in orders.items()}
        self.targets: dict[int, int] = {}

    def wanted(self, targets: dict[int, int]) -> np.ndarray:
        """The (group, plane) units to fetch so that each user group's store holds its order's
        prefix at ``targets[group]`` bytes (nothing for a budget that holds no unit); each unit
        once."""
        self.targets = {int(g): int(b) for g, b in targets.items()}
        out: dict[tuple[int, int], None] = {}
        for g, budget in sorted(self.targets.items()):
            store = self.stores[g]
            try:
                planes, _ = planes_at_budget(store.order, store.group_sizes, self.dim, budget)
            except BudgetError:
                continue
            out.update(dict.fromkeys(map(tuple, store.order[store.kept : int(planes.sum())])))
        return np.array(list(out), dtype=np.int64).reshape(-1, 2)

    def add(self, units: Sequence[PlaneUnit]) -> None:
        """Grow every store to its target with the fetched ``units``."""
        received = {(u.group, u.plane): u for u in units}
        for g, budget in self.targets.items():
            store = self.stores[g]
            try:
                store.grow(budget, lambda i, p: _received(received, i, p))
            except BudgetError:
                continue

    @property
    def payload_bytes(self) -> int:
        """Bytes of the distinct units held (a unit two groups share counts once)."""
        held = {(u.group, u.plane): u.nbytes for s in self.stores.values() for u in s.units}
        return sum(held.values())

    def state_arrays(self) -> dict[str, np.ndarray]:
        """What the device saves: each group's order and target, and the payloads it holds."""
        out: dict[str, np.ndarray] = {
            "targets": np.array(sorted(self.targets.items()), dtype=np.int64).reshape(-1, 2)
        }
        for g, store in self.stores.items():
            out[f"order-{g}"] = store.order
            out[f"index-{g}"], out[f"payload-{g}"] = encode_units(store.units)
        return out

    @classmethod
    def from_state_arrays(
        cls, arrays: dict[str, np.ndarray], item_groups: np.ndarray, dim: int
    ) -> NodePlanes:
        groups = sorted(int(k.split("-")[1]) for k in arrays if k.startswith("order-"))
        planes = cls({g: arrays[f"order-{g}"] for g in groups}, item_groups, dim)
        planes.targets = {int(g): int(b) for g, b in arrays["targets"].tolist()}
        for g in groups:
            _grow_with(planes.stores[g], decode_units(arrays[f"index-{g}"], arrays[f"payload-{g}"]))
        return planes


def _received(received: dict[tuple[int, int], PlaneUnit], group: int, plane: int) -> PlaneUnit:
    if (group, plane) not in received:
        raise ValueError(f"unit ({group}, {plane}) was not sent")
    return received[(group, plane)]


def _grow_with(store: PlaneStore, units: Sequence[PlaneUnit]) -> None:
    """Grow ``store`` by exactly ``units`` (the next ones of its order)."""
    if not units:
        return
    queue = iter(units)
    store.grow(store.used_bytes + sum(u.nbytes for u in units), lambda *_: next(queue))
    if next(queue, None) is not None:
        raise ValueError("more units than fit after the store's held prefix")


def group_targets(groups: np.ndarray, own: np.ndarray) -> dict[int, int]:
    """Per user group of the node's users, the largest own budget among them."""
    return {int(g): int(own[groups == g].max()) for g in np.unique(groups)}


def served_sums(
    planes: NodePlanes,
    users: np.ndarray,
    user_vectors: np.ndarray,
    groups: np.ndarray,
    own: np.ndarray,
    choices: Sequence[int],
    drill: Sequence[float],
    n_users: int,
    train: Interactions,
    test: Interactions,
) -> np.ndarray:
    """(Recall@20, NDCG@20, users) sums per own-budget class ``choices`` (bytes): at the own
    budget, then after each ``drill`` cut, ranking with the node's stores shrunk in place (no
    server contact; each store ends at its smallest cut). Laid out as the own-budget part of
    :func:`peel_fed.fedeval.evaluation_vector`, so the two can be compared."""
    row_of = np.full(n_users, -1, dtype=np.int64)
    row_of[users] = np.arange(users.size)
    steps = [1.0, *drill]
    out = np.zeros((len(choices), len(steps), 3))
    for g, store in sorted(planes.stores.items()):
        mine = groups == g
        points = {}  # bytes kept -> [(class, step, users)]
        for c, budget in enumerate(choices):
            sel = users[mine & (own == budget)]
            for s, f in enumerate(steps):
                if sel.size:
                    points.setdefault(drill_cut(int(budget), f), []).append((c, s, sel))
        for kept in sorted(points, reverse=True):  # shrink only: largest first
            store.shrink(kept)
            if store.kept == 0:
                continue  # nothing fits: the device cannot rank (counted as no device)
            score = store.score_fn(user_vectors, row_of)
            for c, s, sel in points[kept]:
                out[c, s] += metric_sums(score, sel, n_users, train, test)
    return out.ravel()
