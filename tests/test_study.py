"""The study runner: every method at equal bytes, resumable, with its report (``sim.study``)."""

from __future__ import annotations

import json

import pytest

from sim.study import STEPS, StudyConfig, run_study

QUICK_BUDGETS = ("25%", "50%", "100%")  # half the blocks: a unit is 12.5% here


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    cfg = StudyConfig(
        dataset="checkerboard",
        budgets=QUICK_BUDGETS,
        out_dir=str(out / "report"),
        cache_dir=str(out / "cache"),
        work_dir=str(out / "work"),
        quick=True,
        progress=False,
    )
    first = run_study(cfg, ["centralized", "pruning"])  # as if interrupted after two steps
    steps = out / "report" / "steps"
    mtimes = {p.name: p.stat().st_mtime_ns for p in steps.glob("*.json")}
    report = run_study(cfg)  # resumes: runs retrained and federated only
    return cfg, first, report, mtimes, out / "report"


def test_study_resumes_and_reports_every_method(quick_study):
    cfg, first, report, mtimes, out = quick_study
    steps = out / "steps"
    assert set(mtimes) == {"centralized.json", "pruning.json"}
    for name, mtime in mtimes.items():  # not recomputed on resume
        assert (steps / name).stat().st_mtime_ns == mtime
    assert {p.name for p in steps.glob("*.json")} == {f"{name}.json" for name in STEPS}
    methods = {r["method"] for r in report["rows"]}
    assert methods == {
        "PEEL (G_u=4) (centralized)",
        "PEEL (G_u=1) (centralized)",
        "first-k blocks",
        "random units",
        "LightGCN (full table)",
        "magnitude pruning",
        "LightGCN retrained per budget",
        "PEEL (G_u=2, federated)",
    }
    for method in methods - {"LightGCN (full table)"}:
        fracs = sorted(r["budget_fraction"] for r in report["rows"] if r["method"] == method)
        assert fracs == [0.25, 0.5, 1.0], method
    for r in report["rows"]:  # equal bytes: nobody uses more than its budget
        if "used_bytes" in r:
            assert r["used_bytes"] <= r["budget_bytes"], r
    assert report["drill"]
    ablations = {r["method"] for r in report["ablation_rows"]}
    assert ablations == {
        "PEEL (G_u=4) (centralized)",
        "PEEL (G_u=4), no diversity regulariser",
        "PEEL (G_u=4), uniform weights (no controller)",
        "PEEL (G_u=4), joint training (not bi-level)",
        "PEEL (G_u=2)",
        "PEEL (G_u=8)",
        "PEEL (G_u=4), half the blocks",
        "PEEL (G_u=4), twice the blocks",
    }
    uniform = [r for r in report["ablation_rows"] if "uniform" in r["method"]]
    first_k = [r for r in report["rows"] if r["method"] == "first-k blocks"]
    assert len(uniform) == len(first_k) == len(QUICK_BUDGETS)
    assert json.loads((out / "results.json").read_text()) == report
    md = (out / "study.md").read_text()
    assert "magnitude pruning" in md and "Dynamic budgets" in md and "## Ablations" in md
    for png in ("recall_vs_bytes.png", "ndcg_vs_bytes.png", "dynamic_budget.png"):
        assert (out / png).stat().st_size > 1000
    assert {r["method"] for r in first["rows"]} < methods


def test_changed_inputs_change_the_step_key(quick_study):
    cfg, _, _, _, out = quick_study
    assert cfg.key("pruning") != StudyConfig(**{**cfg.__dict__, "seed": 1}).key("pruning")
    with pytest.raises(ValueError, match="unknown study step 'nope'"):
        run_study(cfg, ["nope"])


def test_study_command_line(tmp_path, capsys):
    from peel_fed.cli import main

    code = main(["study", "--dataset", "checkerboard", "--steps", "nope", "--out", str(tmp_path)])
    assert code == 2 and "unknown study step 'nope'" in capsys.readouterr().err
