"""Report artifacts of a federated run: the markdown summary and the budget plot."""

from __future__ import annotations

from pathlib import Path

from peel_fed.budget_table import budget_table_lines


def plot_recall_vs_budget(report: dict, path: Path) -> None:
    """Recall@20 against budget (fraction of the full table), one line per method, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from peel_fed.atomic import write_atomic

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in report["rows"]):
        pts = sorted(
            (r["budget_fraction"], r["recall@20"]) for r in report["rows"] if r["method"] == method
        )
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xlabel("budget (% of the full item table)")
    ax.set_ylabel("Recall@20")
    ax.set_title(f"Federated PEEL on {report['dataset']['name']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)


def serve_lines(serve: dict) -> list[str]:
    """What each node downloaded for its own PEE, against its budget."""
    nodes = serve["nodes"]
    if not nodes:
        return []
    over = [n for n, c in nodes.items() if c["payload_bytes"] > c["budget_bytes"]]
    ratio = [c["payload_bytes"] / max(c["budget_bytes"], 1) for c in nodes.values()]
    extra = [c["bytes_down"] - c["payload_bytes"] for c in nodes.values()]
    stated = [c["stated_overhead_bytes"] for c in nodes.values()]
    return [
        f"Own PEE downloads: {len(nodes)} nodes received only the bit-plane units of their users' "
        f"groups that fit their budget (a node hosting several users: the union). Units' bytes "
        f"are {min(ratio):.0%}-{max(ratio):.0%} of the node's budget"
        + (f" (over budget: {over})" if over else "")
        + f"; everything else downloaded {min(extra):,}-{max(extra):,} B per node (stated "
        f"overhead at most {max(stated):,} B). After the drill, devices grew back by asking for "
        f"the units they had dropped.",
    ]


def results_markdown(report: dict) -> str:
    """The budget table, the drill and the bytes per phase, as markdown."""
    rows = sorted(report.get("rows", []), key=lambda r: r["budget_bytes"])
    lines = [
        f"## Federated PEEL on {report['dataset']['name']}: Recall@20 / NDCG@20 by budget",
        "",
        *(
            budget_table_lines(rows)
            if rows
            else ["(compare-methods=false: only each device's own units were served and ranked)"]
        ),
    ]
    if report.get("drill"):
        lines += [
            "",
            "Dynamic-budget drill (PEEL bit-planes; each device cuts its own budget, no server "
            "contact):",
            "",
            *drill_lines(report["drill"]),
        ]
    if report.get("serve"):
        lines += ["", *serve_lines(report["serve"])]
    if report.get("bytes"):
        lines += [
            "",
            "| phase | exchanges | seconds | down B / node / exchange | up B / reply "
            "| up B / device / round, alone |",
            "|---|---|---|---|---|---|",
        ]
        for phase, b in report["bytes"].items():
            per_dev = b.get("up_bytes_per_device_per_round")
            lines.append(
                f"| {phase} | {b['exchanges']} | {b['exchange_seconds']:.0f} | "
                f"{b['down_bytes_per_node_per_exchange']:,.0f} | "
                f"{b['up_bytes_per_reply']:,.0f} | "
                + (f"{per_dev:,.0f}" if per_dev is not None else "-")
                + " |"
            )
        pre = report["bytes"].get("pretrain", {})
        if "sparse_over_dense" in pre:
            lines.append(
                "\nPretraining up-link per device per round (as if alone): "
                f"{pre['up_bytes_per_device_per_round']:,.0f} B, "
                f"{100 * pre['sparse_over_dense']:.2f}% of a dense upload of the same tensors "
                f"({pre['dense_upload_bytes']:,} B)."
            )
    lines += _participation_lines(report.get("participation"))
    lines += privacy_lines(report.get("privacy"))
    timing = report.get("timing")
    if timing:
        lines.append(
            f"\nWhere an exchange's time goes (medians over {timing['replies']} replies): "
            f"{timing['median_exchange_s']:.2f} s per exchange: "
            f"{timing['median_pickup_s']:.2f} s until the device's app process starts "
            "(SuperNode and SuperExec polls, process spawn), "
            f"{timing['median_startup_s']:.2f} s starting it (Python, Flower and app imports, "
            f"message pull, app unpack), {timing['median_handler_s']:.2f} s in the handler, "
            f"{timing['median_return_s']:.2f} s until the reply reaches the server."
        )
    fails = report.get("failures", {})
    total_failed = sum(f["failed_replies"] for f in fails.values())
    lines.append(
        f"\nFailed node replies: {total_failed} ("
        + ", ".join(f"{p}: {f['failed_replies']}" for p, f in fails.items() if f["failed_replies"])
        + ")"
    )
    return "\n".join(lines) + "\n"


def privacy_lines(privacy: dict | None) -> list[str]:
    """The privacy paragraph: epsilon per phase, its settings, and what it does not cover."""
    if not privacy:
        return ["\nPrivacy: no differential privacy (dp-clip 0)."]
    eps = ", ".join(f"{phase} {value}" for phase, value in privacy["epsilon"].items())
    return [
        f"\nPrivacy: {privacy['mechanism']}. Epsilon at delta {privacy['delta']:g}: {eps} "
        f"(clip {privacy['clip']:g}, noise multiplier {privacy['noise_multiplier']:g}, "
        f"{privacy['dp_event']}, accountant {privacy['accountant']}). Not covered: "
        + "; ".join(privacy["not_covered"])
        + "."
    ] + (
        [
            f"Local DP: {privacy['local']['mechanism']}. Epsilon at delta "
            f"{privacy['local']['delta']:g}: {privacy['local']['epsilon']['covered']} per user "
            f"over {sum(privacy['local']['releases'].values())} uploads (noise "
            f"{privacy['local']['noise_multiplier_per_value']:g} x clip per value)."
        ]
        if "local" in privacy
        else []
    )


MAX_NODE_ROWS = 40


def _participation_lines(part: dict | None) -> list[str]:
    """Per node and phase: answered / sent exchanges; late and gone nodes."""
    if not part or not part.get("nodes"):
        return []
    phases = list(dict.fromkeys(p for per in part["nodes"].values() for p in per))
    lines = [
        "",
        "Participation (exchanges answered / sent, per node and phase):",
        "",
        "| node | " + " | ".join(phases) + " |",
        "|---|" + "---|" * len(phases),
    ]
    nodes = list(part["nodes"].items())
    for node, per in nodes[:MAX_NODE_ROWS]:
        cells = [f"{per[p]['replied']}/{per[p]['sent']}" if p in per else "-" for p in phases]
        lines.append(f"| {node} | " + " | ".join(cells) + " |")
    if len(nodes) > MAX_NODE_ROWS:
        lines.append(f"\n({len(nodes) - MAX_NODE_ROWS} more nodes in results.json)")
    for node, phase in part.get("late", {}).items():
        lines.append(
            f"\nNode {node} connected late (first seen in {phase}): not used, since the "
            "federation's users are fixed when the statistics are taken."
        )
    for node, phase in part.get("gone", {}).items():
        lines.append(f"\nNode {node} left the SuperLink's node list (missing from {phase} on).")
    return lines


def drill_lines(drill: list[dict]) -> list[str]:
    """The dynamic-budget drill as a markdown table: per own-budget class and kept fraction."""
    lines = [
        "| own budget | fraction kept | budget | Recall@20 | NDCG@20 | devices |",
        "|---|---|---|---|---|---|",
    ]
    for d in drill:
        # '-': no device had this own budget, or the cut is below one unit (nothing fits)
        metrics = f"{d['recall@20']:.4f} | {d['ndcg@20']:.4f}" if d["users"] else "- | -"
        lines.append(
            f"| {d['own_budget']} | {d['fraction_of_own']:.4g} | {d['budget_bytes']:,} B | "
            f"{metrics} | {d['users']} |"
        )
    return lines
