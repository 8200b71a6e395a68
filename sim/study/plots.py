"""The study's plots: a metric against device bytes, and the dynamic-budget panels (PNG)."""

from __future__ import annotations

from pathlib import Path

from peel_fed.atomic import write_atomic


def plot_metric_vs_bytes(report: dict, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in report["rows"])):
        pts = sorted(
            (r["budget_bytes"], r[metric]) for r in report["rows"] if r["method"] == method
        )
        style = "-" if i < 10 else "--"  # past the 10 colours of the cycle, dashed
        ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], style, marker="o", label=method)
    for r in report.get("own_bytes_rows", []):  # fixed widths: one point each, at own bytes
        ax.plot(
            [r["used_bytes"] / 1e6], [r[metric]], marker="x", linestyle="none", label=r["method"]
        )
    ax.set_xscale("log")
    ax.set_xlabel("item-embedding bytes on the device (MB, log scale)")
    ax.set_ylabel({"recall@20": "Recall@20", "ndcg@20": "NDCG@20"}[metric])
    ax.set_title(f"{metric} against bytes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)


def plot_dynamic_budgets(report: dict, path: Path) -> None:
    """Left: the trace (a device at the largest budget dropping to each smaller one, per method);
    right: the federated drill per own-budget class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace, drill = report.get("trace", []), report.get("drill", [])
    panels = [name for name, data in (("trace", trace), ("drill", drill)) if data]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    ax_of = dict(zip(panels, axes[0], strict=True))
    left, right = ax_of.get("trace"), ax_of.get("drill")
    for method in dict.fromkeys(t["method"] for t in trace):
        pts = sorted((t["budget_fraction"], t["recall@20"]) for t in trace if t["method"] == method)
        left.plot([100 * f for f, _ in pts], [r for _, r in pts], marker="o", label=method)
    if left is not None:
        retrained = any("download_bytes" in t for t in trace)
        left.set_title("Budget drops: cut on the device" + (" vs retrained" if retrained else ""))
        left.set_xlabel("budget after the drop (% of the full table, log scale)")
    for own in dict.fromkeys(d["own_budget"] for d in drill):
        pts = [d for d in drill if d["own_budget"] == own and d["users"]]
        if pts:
            right.plot(
                [d["budget_bytes"] / 1e6 for d in pts],
                [d["recall@20"] for d in pts],
                marker="o",
                label=f"own budget {own}",
            )
    if right is not None:
        right.set_title("Federated PEEL: each own-budget class, cut on the device")
        right.set_xlabel("bytes kept after each cut (MB, log scale)")
    for ax in axes[0]:
        ax.set_xscale("log")
        ax.set_ylabel("Recall@20")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)
