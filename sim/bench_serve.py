"""Benchmark: what one device downloads for its own PEE, at each budget (issue 14, item 1).

On a dataset's shapes (default: bundled Gowalla), a device that hosts one user builds the
serving phase's messages as the Flower apps do (:mod:`strategies.serve`,
:mod:`clients.client_app`): the offer (its group's bit-plane unit order and the item-group
map) and the units it asks for at its budget, and counts their bytes with the same
``record_bytes`` the run's report uses. It then shrinks to each drill fraction and counts what
growing back downloads. Bytes do not depend on the table's values (seeded random float32 table,
std 0.1, as in ``sim.bench_device``), only on its shape, the item groups and the order; the
order here is the greedy plane order from random user vectors.

    python -m sim.bench_serve       # writes docs/results/gowalla/serve-bench.json and .md
"""

from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np

from clients.records import to_record_dict
from peel_fed.atomic import write_report
from peel_fed.blocks import FLOAT32_BYTES, parse_budget, popularity_item_groups
from peel_fed.fedserve import NodePlanes, encode_units, serve_overhead_bytes, serve_units
from peel_fed.loading import load_dataset
from peel_fed.messages import DataSpec, ServeOffer, encode_serve_offer, encode_units_down
from peel_fed.own_budget import drill_cut
from peel_fed.planes import PlaneCode, greedy_plane_order, second_moments
from strategies.phases import record_bytes


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="gowalla")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--num-item-groups", type=int, default=20)
    p.add_argument("--budgets", default="5%,10%,25%,50%,100%")
    p.add_argument("--drill", default="0.5,0.25")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/gowalla/serve-bench.json")
    args = p.parse_args(argv)

    ds = load_dataset(args.dataset, args.data_dir)
    rng = np.random.default_rng(args.seed)
    table = rng.normal(0.0, 0.1, (ds.n_items, args.dim)).astype(np.float32)
    users = rng.normal(0.0, 0.1, (1000, args.dim)).astype(np.float32)
    pop = ds.item_popularity()
    item_groups = popularity_item_groups(pop, args.num_item_groups)
    code = PlaneCode.encode(table)
    order = greedy_plane_order(code, table, item_groups, pop, second_moments(users))
    full = ds.n_items * args.dim * FLOAT32_BYTES
    data = DataSpec(args.dataset, job="0123456789abcdef")
    budgets = [b.strip() for b in args.budgets.split(",")]
    offer = ServeOffer(data, {0: order}, item_groups, args.dim, tuple(budgets), full, ())
    offer_bytes = record_bytes(to_record_dict(encode_serve_offer(offer)))
    rows = []
    for text in budgets:
        budget = parse_budget(text, full)
        planes = NodePlanes({0: order}, item_groups, args.dim)
        wanted = planes.wanted({0: budget})
        units = serve_units(code, item_groups, wanted)
        down = record_bytes(to_record_dict(encode_units_down(data, *encode_units(units))))
        planes.add(units)
        payload = sum(u.nbytes for u in units)
        grow = {}
        for f in [float(x) for x in args.drill.split(",") if x.strip()]:
            planes.stores[0].shrink(drill_cut(budget, f))
            again = serve_units(code, item_groups, planes.wanted({0: budget}))
            msg = to_record_dict(encode_units_down(data, *encode_units(again)))
            grow[f] = record_bytes(msg) + offer_bytes
            planes.add(again)
        rows.append(
            {
                "budget": text,
                "budget_bytes": budget,
                "units": len(units),
                "payload_bytes": payload,
                "bytes_down": offer_bytes + down,
                "overhead_bytes": offer_bytes + down - payload,
                "stated_overhead_bytes": serve_overhead_bytes(
                    ds.n_items, len(order), len(units), 2
                ),
                "grow_back_bytes": grow,
            }
        )
    report = {"dataset": ds.name, "args": vars(args), "full_table_bytes": full, "rows": rows}
    command = "python -m sim.bench_serve " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"## What one device downloads for its own PEE ({ds.name})",
        "",
        f"One user per device; {ds.n_items:,} items x {args.dim} float32 = {full:,} B; "
        f"{args.num_item_groups} item groups, one user group's bit-plane order "
        f"({len(order)} units). Bytes of the serving messages as the report counts them "
        f"(`record_bytes`). Command: `{command.strip()}`.",
        "",
        "| budget | budget B | units | units' B | downloaded B | overhead B | stated overhead B "
        "| downloaded / budget | grow back after a cut to "
        + " / ".join(f"{f:g}" for f in rows[0]["grow_back_bytes"])
        + " |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['budget']} | {r['budget_bytes']:,} | {r['units']} | {r['payload_bytes']:,} | "
            f"{r['bytes_down']:,} | {r['overhead_bytes']:,} | {r['stated_overhead_bytes']:,} | "
            f"{r['bytes_down'] / r['budget_bytes']:.3f} | "
            + " / ".join(f"{v:,} B" for v in r["grow_back_bytes"].values())
            + " |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    print(f"saved {args.out} and {write_report(args.out, report, text)}")
    return report


if __name__ == "__main__":
    main()
