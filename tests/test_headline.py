"""The headline over seeds: medians, ranges and verdicts from saved study steps, by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim.study.headline import DEFAULT_METHOD, collect, dataset_headline, main

BUDGETS = ("10%", "50%", "100%")


def _save(folder: Path, step: str, rows: list[tuple[str, str, float]]) -> None:
    (folder / "steps").mkdir(parents=True, exist_ok=True)
    result = {"rows": [{"method": m, "budget": b, "recall@20": r} for m, b, r in rows]}
    (folder / "steps" / f"{step}.json").write_text(json.dumps({"key": "k", "result": result}))


@pytest.fixture()
def study(tmp_path: Path) -> Path:
    """Three seeds of the default and of 'pruning'; 'retrained' only for seed 0."""
    ds = tmp_path / "toy"
    default = {0: (0.30, 0.50, 0.60), 1: (0.20, 0.52, 0.62), 2: (0.25, 0.48, 0.58)}
    pruning = {0: (0.10, 0.49, 0.60), 1: (0.12, 0.47, 0.62), 2: (0.11, 0.45, 0.58)}
    for seed in (0, 1, 2):
        folder = ds if seed == 0 else ds / f"seed-{seed}"
        rows = [(DEFAULT_METHOD, b, r) for b, r in zip(BUDGETS, default[seed], strict=True)]
        rows.append((DEFAULT_METHOD, "3 MB", 0.99))  # not a study budget: left out
        _save(folder, "bit-planes", rows)
        _save(
            folder,
            "pruning",
            [("magnitude pruning", b, r) for b, r in zip(BUDGETS, pruning[seed], strict=True)],
        )
    _save(ds, "retrained", [("retrained", "10%", 0.31), ("retrained", "50%", 0.40)])
    _save(ds, "federated", [("PEEL bit-planes (G_u=4, federated)", "10%", 0.27)])
    # a step saved before the block rows were renamed: read under its current label
    _save(ds, "centralized", [("PEEL (G_u=4) (centralized)", "10%", 0.05)])
    return ds


def test_collect_reads_every_seed_and_only_study_budgets(study):
    table = collect(study, BUDGETS)
    assert table[DEFAULT_METHOD]["10%"] == {0: 0.30, 1: 0.20, 2: 0.25}
    assert "3 MB" not in table[DEFAULT_METHOD]
    assert table["PEEL blocks (G_u=4) (centralized)"] == {"10%": {0: 0.05}}


def test_medians_ranges_verdicts_and_share_by_hand(study):
    h = dataset_headline(study, BUDGETS)
    assert h["rows"][DEFAULT_METHOD]["10%"] == {
        "median": 0.25,
        "min": 0.20,
        "max": 0.30,
        "seeds": [0, 1, 2],
    }
    # 10%: default [0.20, 0.30] above pruning's [0.10, 0.12]; retrained's one seed 0.31 above it
    assert h["verdicts"]["10%"] == {
        "magnitude pruning": "win",
        "retrained": "loss",
        "PEEL blocks (G_u=4) (centralized)": "win",
    }
    # 50%: [0.48, 0.52] overlaps pruning's [0.45, 0.49]; retrained's 0.40 is below it
    assert h["verdicts"]["50%"] == {"magnitude pruning": "tie", "retrained": "win"}
    assert "100%" not in h["verdicts"]  # the full table gets no verdict
    assert h["share_of_own_full"]["10%"] == pytest.approx(0.25 / 0.60)
    # federated over centralized of the same seed (0.27 / 0.30), not over the median (0.25)
    assert h["federated_over_centralized"] == {"federated": {"10%": pytest.approx(0.9)}}


def test_main_writes_the_report_and_names_a_missing_folder(study, capsys):
    main(["--results", str(study.parent), "--datasets", "toy"])
    text = (study.parent / "headline.md").read_text()
    assert "| PEEL bit-planes (G_u=4) | - | 0.2500 [0.2000, 0.3000] |" in text
    assert "**loses to retrained**" in text
    assert json.loads((study.parent / "headline.json").read_text())["toy"]["verdicts"]
    with pytest.raises(SystemExit):
        main(["--results", str(study.parent), "--datasets", "nope"])
    assert "no study folder" in capsys.readouterr().err


def test_a_corrupt_step_or_no_default_is_a_one_line_error(study, tmp_path):
    (study / "steps" / "pruning.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"pruning.json: not a saved study step"):
        collect(study, BUDGETS)
    empty = tmp_path / "empty"
    _save(empty, "pruning", [("magnitude pruning", "10%", 0.1)])
    with pytest.raises(ValueError, match="no saved 'PEEL bit-planes \\(G_u=4\\)' rows"):
        dataset_headline(empty, BUDGETS)


def _save_choice(folder: Path, plain: float, nested: float) -> None:
    recipes = {"plain": {"val_recall@20": plain}, "nested": {"val_recall@20": nested}}
    (folder / "steps").mkdir(parents=True, exist_ok=True)
    blob = {"key": "k", "result": {"rows": [], "recipes": recipes, "choice": "?"}}
    (folder / "steps" / "recipe-choice.json").write_text(json.dumps(blob))


def test_the_default_sits_on_the_recipe_with_the_better_median_validation(study):
    """Seeds 0 and 1 saved a choice; nested's median (0.31) beats plain's (0.30) though plain
    wins seed 1, so the default is the nested bit-planes row (the plain one, like every
    bit-planes row, is the project's own and gets no verdict)."""
    nested = "PEEL bit-planes (G_u=4, nested pretraining)"
    assert dataset_headline(study, BUDGETS)["default"] == DEFAULT_METHOD  # no choice saved
    _save_choice(study, plain=0.30, nested=0.34)
    _save_choice(study / "seed-1", plain=0.30, nested=0.28)
    _save(study, "bit-planes-nested", [(nested, "10%", 0.40), (nested, "100%", 0.80)])
    h = dataset_headline(study, BUDGETS)
    assert h["pretraining_choice"] == {
        "recipe": "nested",
        "val_recall@20": {"plain": 0.30, "nested": pytest.approx(0.31)},
        "seeds": [0, 1],
    }
    assert h["default"] == nested
    # judged from the nested row: 0.40 beats retrained's 0.31 (the plain row lost to it)
    assert h["verdicts"]["10%"]["retrained"] == "win"
    assert h["share_of_own_full"]["10%"] == pytest.approx(0.40 / 0.80)
    # the federated run (plain pretraining) is still compared with the plain centralized row
    assert h["federated_over_centralized"] == {"federated": {"10%": pytest.approx(0.9)}}
    main(["--results", str(study.parent), "--datasets", "toy"])
    text = (study.parent / "headline.md").read_text()
    assert f"Default: `{nested}` (nested pretraining;" in text


def test_compact_tables_put_the_default_first_in_bold(study):
    from sim.study.headline import compact_tables

    h = dataset_headline(study, BUDGETS)
    text = compact_tables({"toy": h}, BUDGETS, methods=("magnitude pruning", "retrained", "nope"))
    lines = text.splitlines()
    assert lines[4] == "| **PEEL bit-planes (G_u=4), the default** | 0.2500 (0.2000-0.3000) | " + (
        "0.5000 (0.4800-0.5200) | 0.6000 (0.5800-0.6200) |"
    )
    assert lines[5].startswith("| magnitude pruning | 0.1100 (0.1000-0.1200) |")
    assert lines[6] == "| retrained | 0.3100¹ | 0.4000¹ | - |"
    assert "nope" not in text


def _report(folder: Path, cfg) -> None:
    from dataclasses import asdict

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"config": asdict(cfg)}))


def test_steps_saved_for_other_inputs_are_left_out_until_none_is_current(tmp_path):
    """A seed's report names its inputs: a step whose key is not theirs (an earlier recipe)
    is left out; a dataset with no current default row falls back to every step, marked
    stale."""
    from dataclasses import replace

    from sim.study.config import StudyConfig
    from sim.study.headline import headline_markdown

    ds = tmp_path / "toy"
    cfg = StudyConfig(dataset="checkerboard-tiny", quick=True, budgets=BUDGETS)
    _report(ds, cfg)
    _report(ds / "seed-1", replace(cfg, seed=1))
    for folder, planes in ((ds, 0.30), (ds / "seed-1", 0.20)):
        _save(
            folder, "bit-planes", [(DEFAULT_METHOD, "10%", planes), (DEFAULT_METHOD, "100%", 0.6)]
        )
        _save(folder, "pruning", [("magnitude pruning", "10%", 0.10)])
    path = ds / "steps" / "bit-planes.json"  # seed 0's bit-planes are current, its pruning not
    path.write_text(json.dumps({**json.loads(path.read_text()), "key": cfg.key("bit-planes")}))
    table = collect(ds, BUDGETS)
    assert table == {DEFAULT_METHOD: {"10%": {0: 0.30}, "100%": {0: 0.6}}}
    assert collect(ds, BUDGETS, current=False)["magnitude pruning"]["10%"] == {0: 0.1, 1: 0.1}
    h = dataset_headline(ds, BUDGETS)
    assert not h["stale"] and h["verdicts"] == {"10%": {}}  # pruning's row is not current
    assert h["recipe"] == "BPR, DNS, 64 candidates, cosine rate, 5 epochs"  # quick study
    # seed 0's bit-planes saved for other inputs too: the stale rows, said to be stale
    path.write_text(json.dumps({**json.loads(path.read_text()), "key": "earlier"}))
    h = dataset_headline(ds, BUDGETS)
    assert h["stale"] and h["rows"][DEFAULT_METHOD]["10%"]["seeds"] == [0, 1]
    assert "**these rows are stale**" in headline_markdown({"toy": h}, BUDGETS)
