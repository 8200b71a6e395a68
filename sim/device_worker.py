"""The worker of :mod:`sim.bench_device`: one device store, measured in its own process.

``python -m sim.device_worker SPEC.json`` reads the spec (kind, budget, the inputs the parent
wrote: the downloaded unit payloads and the timed users), grows the store from the payloads,
decodes it, ranks, and writes its figures to the spec's ``result`` path. The parent starts it
with ``OMP_NUM_THREADS=1`` (and the other BLAS thread variables) set, so numpy and torch load
single-threaded; it also calls ``torch.set_num_threads(1)``. What each figure means is in
:data:`INCLUDES`.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from peel_fed.blocks import BlockLayout
from peel_fed.plane_store import PlaneStore, PlaneUnit
from peel_fed.store import PEEStore

KINDS = ("bit-planes", "blocks")
NOTES = (
    "bit-planes: the store holds its codes unpacked in memory (`HeldPlanes.top`, a uint16 a "
    "value at every budget), so its npz is about the same at every budget; the packed payload "
    "file is what the budget counts. Decoding (`HeldPlanes.decode`) goes through int64 and "
    "float64 tables, which sets its decode time and peak memory at every budget.",
    "blocks: decoding places the kept float32 units in a zero table and folds in the unit weights "
    "(`PEEStore.score_fn`); items of item groups with no kept unit are not rankable.",
)
INCLUDES = {
    "build_ms": "growing the store from the downloaded unit payloads (once per budget change)",
    "decode_ms": "turning the store into the table it ranks with: store.score_fn (once per "
    "budget change)",
    "warm_ms": "per user, decode once: scores of all items (one matrix-vector product), the "
    "user's training items set to -inf, top-k with torch.topk; median / p90 over users",
    "cold_ms": "per user, cold: decode + the same scoring and top-k, for each user",
    "disk_payload_bytes": "a file of the unit payloads the store keeps, as downloaded (what the "
    "budget counts; the order, user vector and item-to-group map are not in it)",
    "disk_npz_bytes": "np.savez of the store's in-memory arrays (bit-planes: the unpacked uint16 "
    "codes, planes per row, offsets, scales and the kept order; blocks: the float32 units, "
    "weights, kept order and user vector)",
    "peak_rss_growth_mb": "worker's peak RSS (VmHWM of /proc/self/status, reset through "
    "/proc/self/clear_refs after an untimed dry run; not ru_maxrss, which keeps the peak of the "
    "parent the worker was forked from) minus its RSS just before building, over build, decode "
    "and every ranking, decode once and cold",
    "tracemalloc_peak_mb": "peak of tracemalloc (Python and numpy allocations; torch's own "
    "allocator is not traced) over build, decode and one ranking, in a separate pass",
}


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _rss_bytes() -> int:
    """Resident memory now (Linux), else the peak so far."""
    kib = _proc_status_kib("VmRSS")
    return _peak_rss_bytes() if kib is None else kib * 1024


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its RSS now (Linux >= 4.0: ``/proc/self/clear_refs``);
    False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_bytes() -> int:
    """Peak resident memory: ``VmHWM`` (Linux; what :func:`_reset_peak_rss` resets), else
    ``ru_maxrss``, which also holds the peak of the process this one was forked from."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; Linux: KiB


def _build(kind: str, inp: dict, budget_bytes: int, user_vector: np.ndarray):
    """The device's store at ``budget_bytes``, grown from the downloaded payloads in ``inp``."""
    order, item_groups, dim = inp["order"], inp["item_groups"], int(inp["dim"])
    buf, off = inp["payload"], inp["offsets"]
    index = {(int(g), int(p)): i for i, (g, p) in enumerate(order.tolist())}
    if kind == "bit-planes":
        nbits = inp["bits_len"]

        def fetch_plane(g: int, p: int) -> PlaneUnit:
            i = index[(g, p)]
            a, m, b = int(off[i]), int(off[i] + nbits[i]), int(off[i + 1])
            return PlaneUnit(g, p, bytes(buf[a:m]), bytes(buf[m:b]))

        store = PlaneStore(order, item_groups, dim)
        store.grow(budget_bytes, fetch_plane)
        return store
    layout = BlockLayout(item_groups, dim, int(inp["num_blocks"]))
    store = PEEStore(layout, inp["weights"], order, user_vector)

    def fetch_block(g: int, n: int) -> np.ndarray:
        i = index[(g, n)]
        block = np.frombuffer(bytes(buf[int(off[i]) : int(off[i + 1])]), dtype=np.float32)
        return block.reshape(-1, layout.block_dim)

    store.grow(budget_bytes, fetch_block)
    return store


def _kept(store) -> tuple[int, int, int]:
    """(units kept, unit bytes held, rankable items)."""
    if isinstance(store, PlaneStore):
        return store.kept, store.used_bytes, int(store.held.rankable.sum())
    layout = store.layout
    covered = np.zeros(layout.num_item_groups, dtype=bool)
    covered[store.kept_units[:, 0]] = True
    return len(store.units), store.unit_bytes, int(covered[layout.item_groups].sum())


def _save_npz(path: Path, store) -> None:
    if isinstance(store, PlaneStore):
        h = store.held
        np.savez(
            path,
            top=h.top,
            planes=h.planes,
            offset=h.offset,
            scale=h.scale,
            order=store.order[: store.kept].astype(np.int16),
        )
    else:
        units = {f"unit_{g}_{n}": block for (g, n), block in store.units.items()}
        np.savez(
            path,
            weights=store.unit_weights.astype(np.float32),
            order=store.kept_units.astype(np.int16),
            user_vector=store.user_vector,
            **units,
        )


def run_worker(spec_path: str) -> dict:
    """Measure one store (see the module docstring); writes and returns the result."""
    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    kind, budget, k = spec["kind"], int(spec["budget_bytes"]), int(spec["k"])
    with np.load(spec["inputs"]) as z:
        inp = {name: z[name] for name in z.files}
    with np.load(spec["users"]) as z:
        vectors, ptr, items = z["vectors"], z["ptr"], z["items"]
    n_users = vectors.shape[0]
    exclude = [torch.from_numpy(items[ptr[j] : ptr[j + 1]]) for j in range(n_users)]

    def rank(score_fn, j: int) -> torch.Tensor:
        s = score_fn(np.array([j]))[0]
        s[exclude[j]] = -torch.inf
        return torch.topk(s, k).indices

    # an untimed dry run first: torch's lazy set-up and the first touch of the code pages of
    # every kernel used (counted in RSS) happen here, not in what is measured
    dry = _build(kind, inp, budget, vectors[0])
    for j in range(min(int(spec["warmup"]), n_users)):
        rank(dry.score_fn(vectors), j)
    del dry
    peak_reset = _reset_peak_rss()  # else the inputs' loading or the dry run set the peak
    rss_before = _rss_bytes()

    t0 = time.perf_counter()
    store = _build(kind, inp, budget, vectors[0])
    build_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    score_fn = store.score_fn(vectors)
    decode_ms = (time.perf_counter() - t0) * 1e3
    for j in range(min(int(spec["warmup"]), n_users)):
        rank(score_fn, j)
    warm = []
    for j in range(n_users):
        t0 = time.perf_counter()
        rank(score_fn, j)
        warm.append((time.perf_counter() - t0) * 1e3)
    cold = []
    for j in range(min(int(spec["cold_users"]), n_users)):
        t0 = time.perf_counter()
        rank(store.score_fn(vectors), j)
        cold.append((time.perf_counter() - t0) * 1e3)
    rss_growth = _peak_rss_bytes() - rss_before

    units, used, rankable = _kept(store)
    folder = Path(spec["result"]).parent
    payload_file = folder / f"{kind}-{budget}.units"
    payload_file.write_bytes(inp["payload"][: int(inp["offsets"][units])].tobytes())
    npz_file = folder / f"{kind}-{budget}.npz"
    _save_npz(npz_file, store)
    del store, score_fn

    tracemalloc.start()
    store = _build(kind, inp, budget, vectors[0])
    rank(store.score_fn(vectors), 0)
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    result = {
        "kind": kind,
        "budget_bytes": budget,
        "units": units,
        "used_bytes": used,
        "rankable_items": rankable,
        "disk_payload_bytes": payload_file.stat().st_size,
        "disk_npz_bytes": npz_file.stat().st_size,
        "build_ms": build_ms,
        "decode_ms": decode_ms,
        "warm_ms_median": statistics.median(warm),
        "warm_ms_p90": float(np.percentile(warm, 90)),
        "cold_ms_median": statistics.median(cold) if cold else None,
        "cold_ms_p90": float(np.percentile(cold, 90)) if cold else None,
        "users": len(warm),
        "cold_users": len(cold),
        "peak_rss_growth_mb": rss_growth / 2**20 if peak_reset else None,
        "peak_rss_reset": peak_reset,
        "tracemalloc_peak_mb": traced_peak / 2**20,
        "torch_threads": torch.get_num_threads(),
    }
    payload_file.unlink()
    npz_file.unlink()
    Path(spec["result"]).write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    run_worker(sys.argv[1])
