"""The study's report: ``results.json`` content and ``study.md``, built from the saved steps.

Nothing here runs a step; the plots are in ``sim.study.plots``.
"""

from __future__ import annotations

import platform
import re
from dataclasses import asdict

from peel_fed.atomic import portable_path
from peel_fed.loading import dataset_name
from sim.study.baseline_steps import RETRAINED_QUANTIZED
from sim.study.steps import STEPS, StudyConfig
from strategies.report import drill_lines

CENTRAL_PEEL = "PEEL blocks (G_u=4) (centralized)"  # the ablations' references
CENTRAL_PLANES = "PEEL bit-planes (G_u=4)"


def current_label(method: str) -> str:
    """A method label as the steps write it now: steps saved before PEEL's block rows were
    labelled "PEEL blocks" wrote "PEEL (G_u=4) (centralized)", "PEEL (G_u=4), ..." (federated
    and cold-start labels are unchanged)."""
    return re.sub(r"^PEEL \(G_u=(\d+)\)", r"PEEL blocks (G_u=\1)", method)


def _relabelled(rows: list[dict]) -> list[dict]:
    return [{**r, "method": current_label(r["method"])} for r in rows]


def build_report(cfg: StudyConfig, done: dict[str, dict]) -> dict:
    rows = _relabelled([r for step in done.values() for r in step["result"]["rows"]])
    ablation_rows = _relabelled(
        [r for step in done.values() for r in step["result"].get("ablation_rows", [])]
    )
    if ablation_rows:  # the references: PEEL blocks and bit-planes, G_u = 4, centralized
        reference = [r for r in rows if r["method"] in (CENTRAL_PEEL, CENTRAL_PLANES)]
        ablation_rows = reference + ablation_rows
    central = done.get("centralized", {}).get("result", {})
    cold = done.get("cold-start", {}).get("result", {})
    return {
        "ablation_rows": ablation_rows,
        "cold_start_rows": cold.get("cold_start_rows", []),
        "cold_start": cold.get("cold_start"),
        "own_bytes_rows": [
            r for step in done.values() for r in step["result"].get("own_bytes_rows", [])
        ],
        "trace": dynamic_trace(done),
        "config": {
            **{k: v for k, v in asdict(cfg).items() if k != "progress"},
            **{
                k: portable_path(getattr(cfg, k))
                for k in ("data_dir", "out_dir", "cache_dir", "work_dir")
            },
        },
        "dataset": central.get("dataset"),
        "layout": central.get("layout"),
        "rows": rows,
        "drill": done.get("federated", {}).get("result", {}).get("drill", []),
        "pretraining_choice": done.get("recipe-choice", {}).get("result"),
        "step_seconds": {name: step["seconds"] for name, step in done.items()},
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
    }


def dynamic_trace(done: dict[str, dict]) -> list[dict]:
    """A device at the largest budget whose budget drops to each smaller one: Recall@20 and
    NDCG@20 after each drop, per method, with what each drop asks of the server."""

    def result(step: str) -> dict:
        return done.get(step, {}).get("result", {})

    trace = []
    fed_rows, drill = result("federated").get("rows", []), result("federated").get("drill", [])
    fed_rows = [r for r in fed_rows if r["method"].startswith("PEEL bit-planes")]  # the drill's
    if fed_rows and drill:
        top = max(fed_rows, key=lambda r: r["budget_bytes"])
        own = next(  # the own-budget class of the largest budget, matched by bytes
            (
                d["own_budget"]
                for d in drill
                if d["fraction_of_own"] == 1.0 and d["budget_bytes"] == top["budget_bytes"]
            ),
            None,
        )
        for d in drill:
            if d["own_budget"] == own and d["users"]:
                trace.append(
                    {
                        "method": f"{top['method']}: cut on the device",
                        "budget_fraction": top["budget_fraction"] * d["fraction_of_own"],
                        "recall@20": d["recall@20"],
                        "ndcg@20": d["ndcg@20"],
                        "contact": "none: it drops its lowest bit-planes",
                        "devices": d["users"],
                    }
                )
    for r in result("centralized").get("rows", []):
        if current_label(r["method"]) == CENTRAL_PEEL:
            trace.append(
                {
                    **_metrics(r),
                    "method": "PEEL blocks (G_u=4, centralized): cut on the device",
                    "contact": "none: it drops its lowest-priority units",
                }
            )
    for r in result("pruning").get("trace", []):
        trace.append(
            {
                **_metrics(r),
                "method": f"{r.get('method', 'magnitude pruning')}: cut on the device",
                "contact": "none: it zeroes its smallest kept values",
            }
        )
    for r in result("lightgcn-per-budget").get("rows", []):
        trace.append(
            {
                **_metrics(r),
                "method": "LightGCN retrained per budget",
                "contact": "downloads a new table, trained for the new budget",
                "download_bytes": r["used_bytes"],
                "train_seconds": r["train_seconds"],
            }
        )
    for r in result("matryoshka").get("trace", []):
        trace.append(
            {
                **_metrics(r),
                "method": f"{r['method']}: cut on the device",
                "contact": "none: it drops its trailing columns",
            }
        )
    for r in result("bit-planes").get("trace", []):
        trace.append(
            {
                **_metrics(r),
                "method": f"{r['method']}: cut on the device",
                "contact": "none: it drops its lowest bit-planes",
            }
        )
    return trace


def _metrics(r: dict) -> dict:
    return {k: r[k] for k in ("budget_fraction", "recall@20", "ndcg@20")}


def trace_lines(trace: list[dict]) -> list[str]:
    """The trace as markdown: one row per method, a column per budget after the drop."""
    fracs = sorted({round(t["budget_fraction"], 4) for t in trace}, reverse=True)
    lines = [
        "| method | " + " | ".join(f"{100 * f:g}%" for f in fracs) + " | server contact per drop |",
        "|---|" + "---|" * (len(fracs) + 1),
    ]
    for m in dict.fromkeys(t["method"] for t in trace):
        mine = {round(t["budget_fraction"], 4): t for t in trace if t["method"] == m}
        cells = [
            f"{mine[f]['recall@20']:.4f} / {mine[f]['ndcg@20']:.4f}" if f in mine else "-"
            for f in fracs
        ]
        contact = next(iter(mine.values()))["contact"]
        down = [t["download_bytes"] for t in mine.values() if "download_bytes" in t]
        if down:
            secs = [t["train_seconds"] for t in mine.values()]
            contact += (
                f" ({_size(min(down))} to {_size(max(down))}; one training per budget, "
                f"{min(secs):.0f}-{max(secs):.0f} s each)"
            )
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {contact} |")
    return lines


def report_markdown(report: dict) -> str:
    rows = report["rows"]
    every = rows + report.get("cold_start_rows", []) + report.get("ablation_rows", [])
    budgets = sorted({(r["budget_fraction"], r["budget"]) for r in every})
    ds = report.get("dataset") or {}
    cfg = report["config"]
    lines = [
        f"# The study on {ds.get('name') or dataset_name(cfg['dataset'], cfg['data_dir'])}: "
        "Recall@20 / NDCG@20 at equal bytes",
        "",
        "Every method keeps at most the budget's bytes of item embeddings on the device "
        "(a fraction of the full float32 item table; the header gives the bytes too), counting "
        "every byte it holds: values, scales, offsets, indices and bitmaps. Magnitude pruning "
        "counts its sparse storage (CSR or bitmap with float32 values; with int8 values: a "
        "bitmap, a float16 scale per row and one byte per kept value); the retrained LightGCN "
        "is one model per budget, at the largest dimension that fits; quantized, the best of "
        "those models (d) at 8, 4, 2 or 1 bits per value plus float16 row offsets and scales "
        "that fits, chosen by validation Recall@20. PEEL as published: block units, trained on "
        "the full table only, each user group's units in the order of its learned weights.",
        "",
        *_metric_table(rows, budgets, "method"),
    ]
    chosen = [r for r in rows if r["method"] == RETRAINED_QUANTIZED]
    if chosen:
        lines += [
            "",
            f"{RETRAINED_QUANTIZED}: chosen "
            + "; ".join(f"{r['budget']}: d={r['dim']} at {r['bits']} bit(s)" for r in chosen)
            + ".",
        ]
    if any(r["method"].startswith("PEEL bit-planes") for r in rows):
        lines += ["", *bit_plane_lines(rows, report.get("own_bytes_rows", []))]
    if any(r["method"].startswith("Matryoshka") for r in rows):
        lines += ["", *matryoshka_lines(rows)]
    if report.get("pretraining_choice"):
        lines += ["", *pretraining_choice_lines(report["pretraining_choice"])]
    if report.get("drill"):
        lines += [
            "",
            "## Heterogeneous budgets (federated PEEL)",
            "",
            "Each device draws its own budget from the study's budgets (by a hash of its id) and "
            "is served its group's units that fit it; Recall@20 per own-budget class (fraction "
            "kept 1), then after each cut of that budget on the device (the drill, no server "
            "contact). '-' with 0 devices: a cut below one unit, where nothing fits.",
            "",
            *drill_lines(report["drill"]),
        ]
    if report.get("trace"):
        lines += [
            "",
            "## Dynamic budgets against retraining",
            "",
            "A device holding the largest budget's embeddings sees its budget drop to each "
            "smaller one in turn. Recall@20 / NDCG@20 after each drop. PEEL and magnitude "
            "pruning cut what the device holds (federated PEEL: measured on the devices of the "
            "largest own-budget class; centralized PEEL: a cut keeps the same units as being "
            "served the smaller budget, as `tests/test_store.py` checks; magnitude pruning: each "
            "cut prunes the previous cut's table, with int8 values its dequantized values, "
            "re-quantized; Matryoshka LightGCN: each cut drops trailing columns, checked to "
            "equal the served table). The retrained LightGCN cannot shrink: each drop needs a "
            "new model from the server.",
            "",
            *trace_lines(report["trace"]),
        ]
    if report.get("cold_start_rows"):
        info = report["cold_start"]
        per_group = "; ".join(f"{k}: {v}" for k, v in info["cold_users_per_group"].items())
        lines += [
            "",
            "## Cold-start users",
            "",
            f"{info['held_users']:,} users ({info['held_fraction']:.0%}, drawn by the seed among "
            "users with training and test items) are held out of pretraining, grouping and PEE "
            f"learning; the model is trained on the other {info['warm_users']:,}. Each held-out "
            "device builds its vector from its own training items (one LightGCN propagation step "
            "over the pretrained item table), joins the nearest group centroid and ranks with "
            "that group's units within the budget. Warm users are the same run's trained users. "
            f"Cold-start users per group: {per_group}.",
            "",
            *_metric_table(report["cold_start_rows"], budgets, "method, users"),
        ]
    if report.get("ablation_rows"):
        lines += [
            "",
            "## Ablations (centralized PEEL, Recall@20 / NDCG@20)",
            "",
            *_metric_table(report["ablation_rows"], budgets, "variant"),
        ]
    secs = report["step_seconds"]
    default = StudyConfig()
    lines += [
        "",
        "Step wall times: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items())
        + f"; seed {cfg['seed']}; {report['machine']}.",
        "",
        "Command: `peel-fed study"
        + (
            f" --data-dir {cfg['data_dir']}"
            if cfg.get("data_dir")
            else f" --dataset {cfg['dataset']}"
        )
        + f" --seed {cfg['seed']}"
        + (
            f" --budgets {','.join(cfg['budgets'])}"
            if tuple(cfg["budgets"]) != default.budgets
            else ""
        )
        + (
            f" --cold-start-fraction {cfg['cold_start_fraction']:g}"
            if cfg.get("cold_start_fraction", default.cold_start_fraction)
            != default.cold_start_fraction
            else ""
        )
        + (f" --steps {','.join(secs)}" if set(secs) != set(STEPS) else "")
        + (" --quick" if cfg.get("quick") else "")
        + "`",
    ]
    return "\n".join(lines) + "\n"


def bit_plane_lines(rows: list[dict], own_bytes_rows: list[dict]) -> list[str]:
    """What the bit-plane rows and the row-quantization rows are, and how their bytes count."""
    from peel_fed.plane_eval import BEST_DIRECT

    best = [r for r in rows if r["method"] == BEST_DIRECT]
    chosen = "; ".join(f"{r['budget']}: {r['bits']} bit(s) x {r['dims']} dims" for r in best)
    lines = [
        "## Bit-plane units and direct row quantization",
        "",
        "PEEL bit-planes: every item row gets one affine 16-bit code (a float16 offset and a "
        "float16 scale per row, `peel_fed.planes`), and a unit is one bit-plane of one "
        "popularity item group: plane p (most significant first) of all the group's rows. A unit "
        "costs ceil(rows x dims / 8) bytes, and a group's first plane also its rows' offset and "
        "scale (4 B a row); a budget keeps the longest prefix of a greedy order (benefit per "
        "byte: the popularity^0.5-weighted drop of the squared error, each dimension weighted by "
        "the users' second moment), and a device reconstructs dropped bits at the midpoint. "
        "G_u=1: one order from all users; G_u=4: one order per K-Means user group (as PEEL's "
        "groups), from its users' vectors and item counts, each user ranked with its group's "
        "table (bytes: the largest group's). Items of a group with no plane are not ranked. "
        "Row quantization: every row's leading d' columns at k bits, packed, plus the row's "
        "float16 offset and scale (4 B), all counted; at each budget the (k, d') that fits with "
        "the best Recall@20 on the validation split (held-out training interactions; the model "
        "is trained on the rest), reported on test"
        + (f" ({chosen})" if chosen else "")
        + ". The item-to-group map is not counted (items stored sorted by group need none), as "
        "for PEEL. In the trace a device served the largest budget's planes cuts them on the "
        "device; the run checks that each cut equals, bit for bit, the table served at that "
        "budget, so its numbers are the served ones.",
    ]
    if own_bytes_rows:
        lines += [
            "",
            "Fixed bit widths over all columns, each at its own bytes:",
            "",
            "| method | bytes (of the float32 table) | Recall@20 | NDCG@20 |",
            "|---|---|---|---|",
            *(
                f"| {r['method']} | {r['used_bytes']:,} B ({r['budget']}) | "
                f"{r['recall@20']:.4f} | {r['ndcg@20']:.4f} |"
                for r in own_bytes_rows
            ),
        ]
    return lines


def pretraining_choice_lines(choice: dict) -> list[str]:
    """The ``recipe-choice`` step: each recipe's validation Recall@20 and the one chosen."""
    found = "; ".join(f"{n}: {r['val_recall@20']:.4f}" for n, r in choice["recipes"].items())
    return [
        "## Pretraining recipe chosen on validation",
        "",
        "Full-table Recall@20 on the validation split (fit items excluded) of the study's plain "
        f"pretraining and of the nested model the Matryoshka rows cut: {found}. Chosen: "
        f"**{choice['choice']}**; the headline's default is the bit-plane row on the recipe "
        "with the better median over seeds.",
    ]


def matryoshka_lines(rows: list[dict]) -> list[str]:
    """What the nested (Matryoshka) LightGCN rows are, and which quantized cut each budget got."""
    from peel_fed.matryoshka import QUANTIZED

    best = [r for r in rows if r["method"] == QUANTIZED]
    chosen = "; ".join(f"{r['budget']}: {r['bits']} bit(s) x {r['dims']} dims" for r in best)
    return [
        "## Nested (Matryoshka) LightGCN",
        "",
        "One LightGCN (Kusupati et al., NeurIPS 2022) trained on the fit split with the mean of "
        "the BPR losses of its leading 2, 4, 8, ... dimensions and of the full dimension (the "
        "powers of two below d; no blocks, no diversity regulariser), so that every leading "
        "prefix is a model. Leading dims: at each budget the most leading columns whose float32 "
        "table fits (users rank with the same columns of their vectors); a device shrinks by "
        "dropping trailing columns, with no server contact. Quantized: row quantization of the "
        "nested table (every row's leading d' columns at k = 8, 4, 2 or 1 bits, packed, plus "
        "its float16 offset and scale, 4 B; per k the most columns that fit), the (k, d') "
        "chosen by validation Recall@20 (fit items excluded, validation items as targets; no "
        "test data) and its test metrics reported" + (f" ({chosen})" if chosen else "") + ".",
    ]


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.3g} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:.3g} KB"


def _metric_table(rows: list[dict], budgets: list[tuple], first: str) -> list[str]:
    """Markdown rows: one line per method, Recall@20 / NDCG@20 per budget ('-' if not run)."""
    size = {r["budget_fraction"]: r["budget_bytes"] for r in rows}
    lines = [
        f"| {first} | "
        + " | ".join(
            f"{label} ({_size(size[frac])})" if frac in size else label for frac, label in budgets
        )
        + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for m in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for frac, _ in budgets:
            r = next((x for x in rows if x["method"] == m and x["budget_fraction"] == frac), None)
            cells.append(f"{r['recall@20']:.4f} / {r['ndcg@20']:.4f}" if r else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines
