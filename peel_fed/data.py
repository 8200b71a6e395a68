"""Interaction data in LightGCN format: reading, validation split, popularity, summary.

Datasets by name (bundled, synthetic) are resolved in :mod:`peel_fed.loading`.

A LightGCN-format folder holds ``train.txt`` and ``test.txt`` (plain or gzip as ``.txt.gz``), one
line per user: ``user_id item_id item_id ...`` with 0-based contiguous ids. Lines with a user id
and no items are accepted (that user simply has no interactions in that file).

Ids are range-checked, since every id up to the largest gets a table row: a user (item) id above
``min(2**31 - 1, 100 * distinct user (item) ids in train and test + 1,000,000)`` is a one-line
``DataError`` naming the file and the id, rather than a huge allocation later.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peel_fed.console import log

MAX_ID = 2**31 - 1
"""No user or item id may exceed this (nor :func:`id_limit`)."""
ID_SPREAD, ID_SLACK = 100, 1_000_000
"""An id may exceed its kind's distinct ids by this factor, plus this many."""


class DataError(ValueError):
    """A dataset folder or file is missing, corrupt or inconsistent."""


@dataclass(frozen=True)
class Interactions:
    """A set of (user, item) pairs as two aligned int64 arrays, sorted by user then item."""

    users: np.ndarray
    items: np.ndarray

    def __len__(self) -> int:
        return int(self.users.shape[0])

    def per_user(self, n_users: int) -> list[np.ndarray]:
        """Item arrays, one per user (empty arrays for users without interactions)."""
        bounds = np.searchsorted(self.users, np.arange(n_users + 1))
        return [self.items[bounds[u] : bounds[u + 1]] for u in range(n_users)]

    def user_bounds(self, n_users: int) -> np.ndarray:
        """CSR-style row pointer: user u's items are ``items[b[u]:b[u+1]]``."""
        return np.searchsorted(self.users, np.arange(n_users + 1))


def concat_ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(lo[j], hi[j])``, vectorised: with ``lo, hi`` from
    :meth:`Interactions.user_bounds`, the positions of some users' interactions."""
    lens = hi - lo
    if lens.sum() == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return starts + np.arange(lens.sum())


def _sorted_pairs(users: np.ndarray, items: np.ndarray) -> Interactions:
    order = np.lexsort((items, users))
    return Interactions(users[order].astype(np.int64), items[order].astype(np.int64))


@dataclass(frozen=True)
class Dataset:
    """A recommendation dataset: train and test interactions over fixed user and item id ranges."""

    name: str
    n_users: int
    n_items: int
    train: Interactions
    test: Interactions

    @property
    def density(self) -> float:
        return (len(self.train) + len(self.test)) / float(self.n_users * self.n_items)

    def summary(self) -> str:
        """One line: name, users, items, interactions, density."""
        return (
            f"{self.name}: {self.n_users:,} users, {self.n_items:,} items, "
            f"{len(self.train) + len(self.test):,} interactions "
            f"({len(self.train):,} train / {len(self.test):,} test), density {self.density:.6f}"
        )

    def item_popularity(self) -> np.ndarray:
        """Training interaction count of every item (int64, length ``n_items``)."""
        return np.bincount(self.train.items, minlength=self.n_items).astype(np.int64)

    def user_degree(self) -> np.ndarray:
        return np.bincount(self.train.users, minlength=self.n_users).astype(np.int64)

    def fingerprint(self) -> str:
        """A digest of the content (id ranges, train and test pairs), not of the name or the
        path: saved results keyed on it are redone when the data changes in place."""
        h = hashlib.sha256(f"{self.n_users},{self.n_items}".encode())
        for edges in (self.train, self.test):
            for ids in (edges.users, edges.items):
                h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]


def _find_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.txt", f"{stem}.txt.gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"dataset file missing: no {stem}.txt or {stem}.txt.gz in {folder}")


def _read_text(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="ascii") as fh:
                return fh.read()
        return path.read_text(encoding="ascii")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise DataError(f"corrupt or truncated dataset file {path}: {exc}") from None


def read_lightgcn_file(path: str | Path) -> tuple[Interactions, int]:
    """Parse one LightGCN-format file into sorted (user, item) pairs and the largest user id."""
    path = Path(path)
    text = _read_text(path)
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    max_user = -1
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            ids = np.asarray(fields, dtype=np.int64)
        except (ValueError, OverflowError):
            raise DataError(f"corrupt dataset file {path}, line {lineno}: non-integer id") from None
        if (ids < 0).any():
            raise DataError(f"corrupt dataset file {path}, line {lineno}: negative id")
        max_user = max(max_user, int(ids[0]))
        users.append(np.full(ids.shape[0] - 1, ids[0], dtype=np.int64))
        items.append(ids[1:])
    if not users:
        raise DataError(f"dataset file {path} holds no users")
    pairs = _sorted_pairs(np.concatenate(users), np.concatenate(items))
    if len(pairs) > 1:
        dup = (np.diff(pairs.users) == 0) & (np.diff(pairs.items) == 0)
        if dup.any():
            k = int(np.flatnonzero(dup)[0])
            raise DataError(
                f"corrupt dataset file {path}: user {pairs.users[k]} "
                f"lists item {pairs.items[k]} twice"
            )
    return pairs, max_user


def _count_id_map(folder: Path, stem: str) -> int | None:
    """Rows in ``user_list``/``item_list`` (minus the header), if the folder has one."""
    for name in (f"{stem}.txt", f"{stem}.txt.gz"):
        if (folder / name).is_file():
            lines = [ln for ln in _read_text(folder / name).splitlines() if ln.strip()]
            return max(0, len(lines) - 1)
    return None


def verify_checksums(folder: str | Path) -> None:
    """Check files against a ``SHA256SUMS`` file in the folder, if there is one."""
    folder = Path(folder)
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        return
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split()
        path = folder / name.lstrip("*")
        if not path.is_file():
            raise DataError(f"dataset file missing: {path} (listed in {sums})")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != digest:
            raise DataError(
                f"corrupt dataset file {path}: sha256 {actual[:12]}... != {digest[:12]}..."
            )


def read_lightgcn_folder(folder: Path, name: str, check_overlap: bool = True) -> Dataset:
    """Read the LightGCN-format ``train``/``test`` files (and optional ``user_list``/``item_list``)
    of ``folder`` as dataset ``name``.

    Raises
    ------
    DataError
        Missing file, corrupt or truncated file, ids out of range, train/test overlap.
    """
    train_path, test_path = _find_file(folder, "train"), _find_file(folder, "test")
    train, max_user_train = read_lightgcn_file(train_path)
    test, max_user_test = read_lightgcn_file(test_path)
    n_users = 1 + max(max_user_train, max_user_test)
    n_items = 1 + int(max(train.items.max(initial=-1), test.items.max(initial=-1)))
    if n_items <= 0:
        raise DataError(f"dataset in {folder} has no interactions")
    _check_id_range(
        "user",
        [(train_path, max_user_train), (test_path, max_user_test)],
        np.union1d(train.users, test.users).size,
    )
    _check_id_range(
        "item",
        [
            (train_path, int(train.items.max(initial=-1))),
            (test_path, int(test.items.max(initial=-1))),
        ],
        np.union1d(train.items, test.items).size,
    )
    for stem, seen, what in (("user_list", n_users, "user"), ("item_list", n_items, "item")):
        declared = _count_id_map(folder, stem)
        if declared is not None and seen > declared:
            raise DataError(
                f"{what} ids out of range in {folder}: largest id {seen - 1}, "
                f"but {stem} declares {declared} {what}s"
            )
        if declared is not None:
            if what == "user":
                n_users = declared
            else:
                n_items = declared
    if check_overlap:
        tr = train.users * n_items + train.items
        te = test.users * n_items + test.items
        both = np.intersect1d(tr, te, assume_unique=True)
        if both.size:
            u, i = divmod(int(both[0]), n_items)
            raise DataError(
                f"train/test overlap in {folder}: {both.size} pairs are in both, "
                f"e.g. user {u} item {i}"
            )
    cold = np.setdiff1d(test.users, train.users).size
    if cold:
        log(
            f"warning: {cold:,} test users in {test_path} have no training interactions; "
            "they are evaluated like every other user"
        )
    return Dataset(name=name, n_users=n_users, n_items=n_items, train=train, test=test)


def id_limit(distinct: int) -> int:
    """The largest id allowed for a kind (users or items) with ``distinct`` ids in the data."""
    return min(MAX_ID, ID_SPREAD * distinct + ID_SLACK)


def _check_id_range(kind: str, largest: list[tuple[Path, int]], distinct: int) -> None:
    """A one-line ``DataError`` naming the file and the id if the largest ``kind`` id, over the
    (file, largest id) pairs, is above :func:`id_limit`."""
    path, top = max(largest, key=lambda pair: pair[1])
    if top > id_limit(distinct):
        raise DataError(
            f"{kind} id {top} in {path} is too large: {distinct:,} distinct {kind} ids allow ids "
            f"up to {id_limit(distinct):,} (ids are 0-based and contiguous)"
        )


def from_pairs(
    name: str,
    n_users: int,
    n_items: int,
    train_pairs: np.ndarray,
    test_pairs: np.ndarray,
) -> Dataset:
    """Build a dataset from ``(k, 2)`` arrays of (user, item) pairs; checks ids are in range."""
    for label, pairs in (("train", train_pairs), ("test", test_pairs)):
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if pairs.size and (
            pairs[:, 0].min() < 0
            or pairs[:, 0].max() >= n_users
            or pairs[:, 1].min() < 0
            or pairs[:, 1].max() >= n_items
        ):
            raise DataError(f"{label} ids out of range for {n_users} users and {n_items} items")
    tr = np.asarray(train_pairs, dtype=np.int64).reshape(-1, 2)
    te = np.asarray(test_pairs, dtype=np.int64).reshape(-1, 2)
    return Dataset(
        name=name,
        n_users=n_users,
        n_items=n_items,
        train=_sorted_pairs(tr[:, 0], tr[:, 1]),
        test=_sorted_pairs(te[:, 0], te[:, 1]),
    )


@dataclass(frozen=True)
class TrainValSplit:
    """Training interactions split per user into an inner (fit) part and a validation part."""

    fit: Interactions
    val: Interactions


def split_validation(
    train: Interactions, n_users: int, val_fraction: float = 0.1, seed: int = 0
) -> TrainValSplit:
    """Carve a seeded per-user validation slice from the training interactions (never from test).

    Every user with at least two training items gives ``max(1, round(val_fraction * n))`` of them
    to validation and keeps at least one for fitting; users with fewer items keep all for fitting.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    bounds = train.user_bounds(n_users)
    is_val = np.zeros(len(train), dtype=bool)
    for u in range(n_users):
        lo, hi = bounds[u], bounds[u + 1]
        n = hi - lo
        if n < 2:
            continue
        k = min(n - 1, max(1, int(round(val_fraction * n))))
        pick = rng.choice(n, size=k, replace=False)
        is_val[lo + pick] = True
    fit = Interactions(train.users[~is_val], train.items[~is_val])
    val = Interactions(train.users[is_val], train.items[is_val])
    return TrainValSplit(fit=fit, val=val)
