"""The budget table of a run's report: Recall@20 / NDCG@20 per method at every budget."""

from __future__ import annotations


def budget_table_lines(rows: list[dict]) -> list[str]:
    """Markdown lines of the budget table: one line per budget, one column per method.

    Each row is one (method, budget) result with keys ``method``, ``budget_bytes``,
    ``budget_fraction``, ``recall@20`` and ``ndcg@20``, and optionally ``budget`` (the budget as
    the user wrote it, e.g. ``"10%"``). Budgets are keyed by ``budget`` where rows have it, else by
    ``budget_bytes``; methods and budgets keep the order in which ``rows`` first list them. A
    method with no row at a budget (one below its smallest storage) shows ``-``.
    """
    methods = list(dict.fromkeys(r["method"] for r in rows))
    budgets = list(dict.fromkeys(_budget_key(r) for r in rows))
    lines = [
        "| budget | bytes | " + " | ".join(methods) + " |",
        "|---|---:|" + "---:|" * len(methods),
    ]
    for b in budgets:
        cells = {r["method"]: r for r in rows if _budget_key(r) == b}
        first = next(iter(cells.values()))
        label = f"{first['budget_fraction']:.1%}"
        if "budget" in first:
            label = f"{first['budget']} ({label})"
        line = f"| {label} | {first['budget_bytes']:,} |"
        for m in methods:
            r = cells.get(m)
            line += f" {r['recall@20']:.4f} / {r['ndcg@20']:.4f} |" if r else " - |"
        lines.append(line)
    return lines


def _budget_key(row: dict) -> str | int:
    return row["budget"] if "budget" in row else int(row["budget_bytes"])
