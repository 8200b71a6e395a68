"""Benchmark: what double masking with Shamir shares costs over pairwise masks, in bytes and time.

Runs whole secure-aggregation rounds in one process, for ``peel_fed.secagg`` (pairwise masks,
the devices reveal round keys of dropped peers) and ``peel_fed.secagg_shamir`` (self-masks and
pairwise keys Shamir-shared with threshold ``t``, shares encrypted peer to peer), at each cohort
size and dropout fraction; dropped devices go away after the key exchange (and, for Shamir,
the share exchange), before uploading. Measured:

* bytes per surviving device, up and down (keys, share ciphertexts, the masked vector, the
  dropout lists, the revealed keys or shares; every device id counts 8 bytes), and the server's
  total (everything it receives plus everything it sends);
* seconds of client computation per surviving device (all its protocol calls, the median over
  the survivors) and of the server's ``unmask_sum``; each the median of ``--repeats`` rounds.

Prints a markdown table and saves JSON and markdown (atomically) in ``--out``.

    python -m sim.bench_secagg --clients 10,50,100 --length 100000 --repeats 3
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from peel_fed.atomic import write_report
from peel_fed.secagg import FixedPoint, SecAggClient, SecAggServer
from peel_fed.secagg_shamir import (
    ShamirSecAggClient,
    ShamirSecAggServer,
    relay,
    unmask_request,
)

ID_BYTES = 8  # a Flower node id


def nbytes(obj: Any) -> int:
    """Payload bytes of a message: raw bytes and arrays as they are, ids and ints 8 bytes."""
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(ID_BYTES + nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    if isinstance(obj, int):
        return ID_BYTES
    raise TypeError(f"nbytes: no size for {type(obj).__name__}")


class Meter:
    """Per-device seconds and bytes up/down of one round."""

    def __init__(self, ids: list[int]) -> None:
        self.seconds = dict.fromkeys(ids, 0.0)
        self.up = dict.fromkeys(ids, 0)
        self.down = dict.fromkeys(ids, 0)

    def call(self, i: int, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on device ``i``: its time, and its result as an upload."""
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds[i] += time.perf_counter() - t0
        if out is not None:
            self.up[i] += nbytes(out)
        return out

    def summary(self, survivors: list[int], server_s: float) -> dict:
        return {
            "client_up_bytes": int(np.median([self.up[i] for i in survivors])),
            "client_down_bytes": int(np.median([self.down[i] for i in survivors])),
            "server_bytes": sum(self.up.values()) + sum(self.down.values()),
            "client_s": float(np.median([self.seconds[i] for i in survivors])),
            "server_s": server_s,
        }


def pairwise_round(vectors: dict[int, np.ndarray], dropped: set[int], tag: bytes) -> tuple:
    """One ``peel_fed.secagg`` round; returns (sum, survivors, measures)."""
    ids, length = sorted(vectors), len(next(iter(vectors.values())))
    clients = {i: SecAggClient(i, X25519PrivateKey.generate()) for i in ids}
    m = Meter(ids)
    keys = {i: m.call(i, clients[i].public_key) for i in ids}
    survivors = [i for i in ids if i not in dropped]
    for i in ids:
        m.down[i] += nbytes(keys)
    uploads = {i: m.call(i, clients[i].masked, vectors[i], keys, tag) for i in survivors}
    revealed = {}
    for i in survivors:
        m.down[i] += nbytes(sorted(dropped))
        revealed[i] = m.call(i, clients[i].reveal_pair_seeds, sorted(dropped), keys, tag)
    t0 = time.perf_counter()
    total = SecAggServer().unmask_sum(uploads, ids, revealed, length, FixedPoint())
    return total, survivors, m.summary(survivors, time.perf_counter() - t0)


def shamir_round(
    vectors: dict[int, np.ndarray], dropped: set[int], tag: bytes, threshold: int
) -> tuple:
    """One ``peel_fed.secagg_shamir`` round; returns (sum, survivors, measures)."""
    ids, length = sorted(vectors), len(next(iter(vectors.values())))
    clients = {i: ShamirSecAggClient(i) for i in ids}
    m = Meter(ids)
    keys = {i: m.call(i, clients[i].setup, tag) for i in ids}
    for i in ids:
        m.down[i] += nbytes(keys) + nbytes(threshold)
    outgoing = {i: m.call(i, clients[i].share_keys, keys, threshold) for i in ids}
    inbox = relay(outgoing)
    for i in ids:
        m.down[i] += nbytes(inbox[i])
        m.call(i, clients[i].receive_shares, inbox[i])
    uploads = {i: m.call(i, clients[i].masked, vectors[i]) for i in ids if i not in dropped}
    survivors, gone = unmask_request(ids, uploads)
    reveals = {}
    for i in survivors:
        m.down[i] += nbytes(survivors) + nbytes(gone)
        reveals[i] = m.call(i, clients[i].unmask_shares, survivors, gone)
    t0 = time.perf_counter()
    server = ShamirSecAggServer(threshold)
    total = server.unmask_sum(uploads, reveals, keys, ids, tag, length)
    return total, survivors, m.summary(survivors, time.perf_counter() - t0)


def default_threshold(n: int, fraction: float) -> int:
    """``max(ceil(fraction * n), n // 2 + 1)``, capped at ``n``."""
    return min(n, max(math.ceil(fraction * n - 1e-9), n // 2 + 1))


def human_bytes(b: float) -> str:
    """``b`` bytes as B, KiB or MiB, for the tables."""
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b:.0f} B"


def markdown(report: dict, command: str) -> str:
    a = report["args"]
    lines = [
        "## Secure aggregation: pairwise masks against double masking with Shamir shares",
        "",
        f"Vector length {a['length']} (uint64 words), threshold t = max(ceil({a['threshold']:.3g}"
        f" n), n/2 + 1), dropouts before upload, medians of {a['repeats']} rounds, "
        f"{report['cpus']} CPUs ({report['machine']}). Bytes per surviving device (median); "
        f"client s: its computation over the whole round; server s: `unmask_sum`. "
        f"Command: `{command}`.",
        "",
        "| protocol | clients | t | dropped | client up | client down | server in+out "
        "| client s | server s | max error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['protocol']} | {r['clients']} | {r['threshold'] or '-'} | {r['dropped']} | "
            f"{human_bytes(r['client_up_bytes'])} | {human_bytes(r['client_down_bytes'])} | "
            f"{human_bytes(r['server_bytes'])} | {r['client_s']:.3f} | {r['server_s']:.3f} | "
            f"{r['max_abs_error']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", default="10,50,100", help="comma-separated cohort sizes")
    p.add_argument("--length", type=int, default=100_000, help="vector length (statistics)")
    p.add_argument("--dropouts", default="0,0.1", help="comma-separated dropout fractions")
    p.add_argument("--threshold", type=float, default=2 / 3, help="t as a fraction of n")
    p.add_argument("--repeats", type=int, default=3, help="rounds per setting (medians)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_secagg", help="folder for the JSON and markdown")
    args = p.parse_args(argv)
    command = "python -m sim.bench_secagg " + shlex.join(sys.argv[1:] if argv is None else argv)
    report: dict = {
        "args": vars(args),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
        "rows": [],
    }
    rng = np.random.default_rng(args.seed)
    for n in [int(x) for x in args.clients.split(",") if x.strip()]:
        t = default_threshold(n, args.threshold)
        vectors = {i: rng.uniform(-1.0, 1.0, args.length) for i in range(n)}
        for frac in [float(x) for x in args.dropouts.split(",") if x.strip()]:
            dropped = set(rng.permutation(n)[: math.floor(frac * n + 1e-9)].tolist())
            if len(dropped) > n - t:
                raise ValueError(f"{len(dropped)} dropouts of {n} exceed n - t = {n - t}")
            for protocol in ("pairwise", "shamir"):
                runs, errors = [], []
                for rep in range(args.repeats):
                    tag = f"bench-{n}-{frac}-{rep}".encode()
                    if protocol == "pairwise":
                        total, survivors, meas = pairwise_round(vectors, dropped, tag)
                    else:
                        total, survivors, meas = shamir_round(vectors, dropped, tag, t)
                    expected = np.sum([vectors[i] for i in survivors], axis=0)
                    errors.append(float(np.max(np.abs(total - expected))))
                    runs.append(meas)
                row = {
                    "protocol": protocol,
                    "clients": n,
                    "threshold": t if protocol == "shamir" else None,
                    "dropped": len(dropped),
                    "length": args.length,
                    **{k: runs[-1][k] for k in ("client_up_bytes", "client_down_bytes")},
                    "server_bytes": runs[-1]["server_bytes"],
                    "client_s": float(np.median([r["client_s"] for r in runs])),
                    "server_s": float(np.median([r["server_s"] for r in runs])),
                    "client_s_runs": [r["client_s"] for r in runs],
                    "server_s_runs": [r["server_s"] for r in runs],
                    "max_abs_error": max(errors),
                }
                report["rows"].append(row)
                print({k: v for k, v in row.items() if not k.endswith("_runs")}, flush=True)
    text = markdown(report, command)
    print(text)
    path = Path(args.out) / "bench_secagg.json"
    print(f"saved {path} and {write_report(path, report, text)}")
    return report


if __name__ == "__main__":
    main()
