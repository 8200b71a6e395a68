"""The headline over seeds: every study method's Recall@20 at every budget, as the median, min and
max over the seeds saved under ``docs/results/<dataset>/`` (seed 0) and ``seed-<n>/``, with the
default's verdict against every other method.

``python -m sim.study.headline`` writes ``docs/results/headline.md`` and ``headline.json`` from
the saved steps (it runs nothing; ``peel-fed study --seed N`` adds seeds).

The default is the bit-planes row (G_u = 4) on the pretraining recipe chosen on validation by the
``recipe-choice`` step (plain, or nested as the ``matryoshka`` step trains it): the recipe
with the higher median validation Recall@20 over the seeds it was run for; plain where it was not
run.

A verdict compares seed ranges, not single numbers: the default *wins* where its worst seed beats
the other method's best, *loses* where its best seed is below the other's worst, and *ties* where
the ranges overlap (a method saved for one seed has the range of that seed). The full table,
the last budget, gets no verdict: there every method holds the whole model.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import fields, replace
from pathlib import Path

from peel_fed.atomic import write_json_atomic, write_text_atomic
from sim.study.config import STUDY_BUDGETS, StudyConfig, pipeline_config
from sim.study.report import current_label

DEFAULT_METHOD = "PEEL bit-planes (G_u=4)"
DEFAULT_BY_RECIPE = {
    "plain": DEFAULT_METHOD,
    "nested": "PEEL bit-planes (G_u=4, nested pretraining)",
}
FULL_TABLE = "LightGCN (full table)"
DATASETS = ("gowalla", "ml-1m-lcf", "yelp2018")
METRIC = "recall@20"


def seed_folders(dataset_dir: Path) -> dict[int, Path]:
    """Seed -> its study folder: ``dataset_dir`` for seed 0, ``dataset_dir/seed-<n>`` for n."""
    found = {0: dataset_dir} if (dataset_dir / "steps").is_dir() else {}
    for sub in sorted(dataset_dir.glob("seed-*")):
        if (sub / "steps").is_dir() and sub.name[5:].isdigit():
            found[int(sub.name[5:])] = sub
    return found


def report_config(folder: Path) -> StudyConfig | None:
    """The inputs of the study whose report (``results.json``) is in ``folder``, or ``None``
    where there is none."""
    path = folder / "results.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())["config"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise ValueError(f"{path}: not a study report ({exc})") from None
    names = {f.name for f in fields(StudyConfig)}
    cfg = StudyConfig(**{k: v for k, v in config.items() if k in names})
    return replace(cfg, budgets=tuple(cfg.budgets))


def saved_steps(folder: Path, current: bool = True) -> list[Path]:
    """``folder``'s saved step files; with ``current``, only those saved for the inputs of its
    report (the key check of ``sim.study.runner``: a step saved on an earlier pretraining recipe
    or step version is left out). A folder with no report keeps every step."""
    paths = sorted((folder / "steps").glob("*.json"))
    cfg = report_config(folder) if current else None
    if cfg is None:
        return paths
    kept = []
    for path in paths:
        try:
            key = json.loads(path.read_text())["key"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{path}: not a saved study step ({exc})") from None
        if key == cfg.key(path.stem):
            kept.append(path)
    return kept


def collect(
    dataset_dir: Path, budgets: tuple[str, ...] = STUDY_BUDGETS, current: bool = True
) -> dict:
    """``{method: {budget: {seed: Recall@20}}}`` from the saved step rows at a study budget
    (rows at other sizes, such as fixed bit widths at their own bytes, are left out); with
    ``current``, only the steps saved for the current inputs (:func:`saved_steps`)."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    for seed, folder in seed_folders(dataset_dir).items():
        for path in saved_steps(folder, current):
            try:
                rows = json.loads(path.read_text())["result"]["rows"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ValueError(f"{path}: not a saved study step ({exc})") from None
            for row in rows:
                if row.get("budget") in budgets and METRIC in row:
                    method = current_label(row["method"])
                    table.setdefault(method, {}).setdefault(row["budget"], {})[seed] = float(
                        row[METRIC]
                    )
    return table


def pretraining_choice(dataset_dir: Path, current: bool = True) -> dict:
    """The recipe under the default: ``{"recipe", "val_recall@20": {recipe: median}, "seeds"}``
    from the saved ``recipe-choice`` steps (``recipe`` "plain" and no seeds where none is
    saved; ``current`` as in :func:`collect`)."""
    per_recipe: dict[str, list[float]] = {}
    seeds = []
    for seed, folder in seed_folders(dataset_dir).items():
        path = folder / "steps" / "recipe-choice.json"
        if path not in saved_steps(folder, current):
            continue
        try:
            recipes = json.loads(path.read_text())["result"]["recipes"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{path}: not a saved recipe-choice step ({exc})") from None
        seeds.append(seed)
        for name, found in recipes.items():
            per_recipe.setdefault(name, []).append(float(found["val_recall@20"]))
    medians = {name: statistics.median(v) for name, v in per_recipe.items()}
    recipe = max(medians, key=medians.get) if medians else "plain"
    return {"recipe": recipe, "val_recall@20": medians, "seeds": seeds}


def summarise(values: dict[int, float]) -> dict:
    v = list(values.values())
    return {
        "median": statistics.median(v),
        "min": min(v),
        "max": max(v),
        "seeds": sorted(values),
    }


def verdict(default: dict, other: dict) -> str:
    """'win', 'tie' or 'loss' of ``default`` against ``other`` (summaries), by seed ranges."""
    if default["min"] > other["max"]:
        return "win"
    if default["max"] < other["min"]:
        return "loss"
    return "tie"


def is_comparison(method: str) -> bool:
    """Methods the default is judged against: every centralized method at equal bytes except the
    default itself, its G_u = 1 twin and the full table (federated and cold-start rows measure
    other things)."""
    return not (
        method.startswith("PEEL bit-planes")
        or method == FULL_TABLE
        or "federated" in method
        or "cold-start" in method
    )


def recipe_text(folder: Path) -> str:
    """The pretraining recipe of the current inputs of ``folder``'s study, in words."""
    cfg = report_config(folder)
    if cfg is None:
        return "the recipe is not recorded (no results.json)"
    r = pipeline_config(cfg).lightgcn.identity()
    sampling = r.get("negative_sampling", "uniform")
    if sampling == "dns":
        sampling = f"DNS, {r['dns_candidates']} candidates"
    return (
        f"{r.get('loss', 'bpr').upper()}, {sampling}, {r.get('lr_schedule', 'constant')} rate, "
        f"{r['epochs']} epochs"
    )


def dataset_headline(dataset_dir: Path, budgets: tuple[str, ...] = STUDY_BUDGETS) -> dict:
    """One dataset's headline from the steps saved for the current inputs (the current
    pretraining recipe); where no seed has the default's rows on them yet, from every saved
    step, with ``stale`` set (their recipe is an earlier one: rerun ``peel-fed study``)."""
    stale = False
    table = collect(dataset_dir, budgets)
    choice = pretraining_choice(dataset_dir)
    default = DEFAULT_BY_RECIPE[choice["recipe"]]
    if default not in table:
        stale = True
        table = collect(dataset_dir, budgets, current=False)
        choice = pretraining_choice(dataset_dir, current=False)
        default = DEFAULT_BY_RECIPE[choice["recipe"]]
    if default not in table:
        raise ValueError(f"{dataset_dir}: no saved '{default}' rows (run the bit-planes step)")
    rows = {
        m: {b: summarise(per_budget[b]) for b in budgets if b in per_budget}
        for m, per_budget in table.items()
    }
    mine = rows[default]
    verdicts = {}
    for b in budgets[:-1]:  # the last budget is the full table, where every method is whole
        if b not in mine:
            continue
        verdicts[b] = {
            m: verdict(mine[b], r[b]) for m, r in rows.items() if is_comparison(m) and b in r
        }
    full = mine.get(budgets[-1], {}).get("median")
    share = {b: mine[b]["median"] / full for b in budgets if b in mine and full}
    federated = {
        tag: ratio
        for tag in ("federated", "federated, equal passes")
        if (ratio := federated_ratio(table, budgets, tag))
    }
    return {
        "default": default,
        "stale": stale,
        "recipe": "an earlier recipe (rerun peel-fed study)" if stale else recipe_text(dataset_dir),
        "pretraining_choice": choice,
        "rows": rows,
        "verdicts": verdicts,
        "share_of_own_full": share,
        "federated_over_centralized": federated,
    }


def federated_ratio(
    table: dict, budgets: tuple[str, ...] = STUDY_BUDGETS, tag: str = "federated"
) -> dict[str, float]:
    """Federated bit-planes (G_u = 4; ``tag`` "federated", or "federated, equal passes" for the
    run that pretrains as many passes as the centralized epochs) over centralized bit-planes
    (G_u = 4) on the same, plain, pretraining recipe and seed, per budget: the median over the
    seeds both are saved for. ``table`` is :func:`collect`'s."""
    fed = table.get(f"PEEL bit-planes (G_u=4, {tag})", {})
    central = table.get(DEFAULT_METHOD, {})
    out = {}
    for b in budgets:
        seeds = sorted(set(fed.get(b, {})) & set(central.get(b, {})))
        if seeds:
            out[b] = statistics.median(fed[b][s] / central[b][s] for s in seeds)
    return out


def _cell(s: dict | None, compact: bool = False) -> str:
    """``median [min, max]`` or ``median (seed n)``; compact (the README's): ``median
    (min-max)`` or ``value¹``."""
    if s is None:
        return "-"
    if len(s["seeds"]) == 1:
        return f"{s['median']:.4f}¹" if compact else f"{s['median']:.4f} (seed {s['seeds'][0]})"
    if compact:
        return f"{s['median']:.4f} ({s['min']:.4f}-{s['max']:.4f})"
    return f"{s['median']:.4f} [{s['min']:.4f}, {s['max']:.4f}]"


def headline_markdown(headlines: dict[str, dict], budgets: tuple[str, ...] = STUDY_BUDGETS) -> str:
    lines = [
        "# Headline: every method at equal bytes, over seeds",
        "",
        "Recall@20 at a share of the float32 item table's bytes: the median over the saved seeds "
        "with [min, max], or the one seed a method was run for. Made by "
        "`python -m sim.study.headline` from the saved study steps. The default is "
        f"`{DEFAULT_METHOD}` on the pretraining recipe chosen on validation (the "
        "`recipe-choice` step: plain, or nested as the Matryoshka baseline trains it). It "
        "*wins* against a method where its worst seed beats that method's best, *ties* where the "
        "seed ranges overlap, and *loses* otherwise.",
        "",
    ]
    for name, h in headlines.items():
        rows = h["rows"]
        order = sorted(
            rows,
            key=lambda m: (
                "federated" in m,
                not m.startswith("PEEL bit-planes"),
                -rows[m].get(budgets[0], {"median": 0.0})["median"],
            ),
        )
        choice = h["pretraining_choice"]
        if choice["seeds"]:
            val = ", ".join(f"{r} {v:.4f}" for r, v in choice["val_recall@20"].items())
            why = (
                f"validation Recall@20 of the full table, median over seeds "
                f"{', '.join(map(str, choice['seeds']))}: {val}"
            )
        else:
            why = "no recipe-choice step saved: plain"
        lines += [
            f"## {name}",
            "",
            f"Pretraining: {h['recipe']}; steps saved for other inputs (an earlier recipe or "
            "step version) are left out"
            + (
                " (none is saved on the current one yet: **these rows are stale**)."
                if h["stale"]
                else "."
            ),
            "",
            f"Default: `{h['default']}` ({choice['recipe']} pretraining; {why}).",
            "",
            "| method | " + " | ".join(budgets) + " |",
        ]
        lines.append("|---|" + "---:|" * len(budgets))
        for m in order:
            lines.append(f"| {m} | " + " | ".join(_cell(rows[m].get(b)) for b in budgets) + " |")
        counts = []
        for b, vs in h["verdicts"].items():
            losses = sorted(m for m, v in vs.items() if v == "loss")
            ties = sorted(m for m, v in vs.items() if v == "tie")
            text = f"{b}: wins {sum(v == 'win' for v in vs.values())}/{len(vs)}"
            if ties:
                text += f", ties {', '.join(ties)}"
            if losses:
                text += f", **loses to {', '.join(losses)}**"
            counts.append(text)
        lines += ["", "Default against every other centralized method: " + "; ".join(counts) + "."]
        share = ", ".join(f"{b} {s:.1%}" for b, s in h["share_of_own_full"].items())
        lines += ["", f"Default's share of its own full-table Recall@20: {share}."]
        for tag, what in (
            ("federated", "`peel-fed simulate` defaults"),
            ("federated, equal passes", "as many pretraining passes as centralized epochs"),
        ):
            fed = h["federated_over_centralized"].get(tag)
            if fed:
                ratio = ", ".join(f"{b} {r:.1%}" for b, r in fed.items())
                lines += [
                    "",
                    f"Federated ({what}) over centralized bit-planes (G_u=4) on the same plain "
                    f"pretraining recipe, same seed: {ratio}.",
                ]
        lines.append("")
    return "\n".join(lines)


# The README's tables: the default first, then these (where saved), in this order. (Row
# quantization of the nested model is the Matryoshka quantized row: the same choice on the same
# model, by another code path, and it gives the same numbers.)
COMPACT_METHODS = (
    "PEEL bit-planes (G_u=4)",
    "PEEL bit-planes (G_u=1)",
    "PEEL bit-planes (G_u=4, nested pretraining)",
    "row quantization, best bits x dims",
    "magnitude pruning, int8 values",
    "magnitude pruning",
    "magnitude pruning, int8 values (nested pretraining)",
    "LightGCN retrained per budget, quantized",
    "LightGCN retrained per budget",
    "Matryoshka LightGCN, quantized",
    "Matryoshka LightGCN, leading dims",
    "PEEL blocks (G_u=4) (centralized)",
    "PEEL as published (G_u=4)",
)


def compact_tables(
    headlines: dict[str, dict],
    budgets: tuple[str, ...] = STUDY_BUDGETS,
    methods: tuple[str, ...] = COMPACT_METHODS,
) -> str:
    """The README's form of the headline: per dataset, the default (bold) and ``methods``;
    cells ``median (min-max)``, or ``value¹`` for a method saved for one seed."""
    lines = []
    for name, h in headlines.items():
        rows, default = h["rows"], h["default"]
        lines += [f"**{name}** ({h['recipe']})", "", "| method | " + " | ".join(budgets) + " |"]
        lines.append("|---|" + "---:|" * len(budgets))
        for m in (default, *(m for m in methods if m != default and m in rows)):
            label = f"**{m}, the default**" if m == default else m
            cells = " | ".join(_cell(rows[m].get(b), compact=True) for b in budgets)
            lines.append(f"| {label} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="docs/results", help="folder of dataset folders")
    parser.add_argument(
        "--datasets", default=",".join(DATASETS), help="comma-separated dataset folder names"
    )
    parser.add_argument(
        "--compact", action="store_true", help="also print the README's tables (selected methods)"
    )
    args = parser.parse_args(argv)
    root = Path(args.results)
    headlines = {}
    for name in args.datasets.split(","):
        if not (root / name).is_dir():
            parser.error(f"no study folder {root / name}")
        headlines[name] = dataset_headline(root / name)
    text = headline_markdown(headlines)
    write_json_atomic(root / "headline.json", headlines)
    write_text_atomic(root / "headline.md", text)
    print(text)
    if args.compact:
        print(compact_tables(headlines))
    return headlines


if __name__ == "__main__":
    main()
