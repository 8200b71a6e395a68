"""The study runner: every method at equal bytes, resumable, with its report (``sim.study``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peel_fed.baselines import direct_quantization_bytes
from sim.study import STEPS, StudyConfig, run_study
from sim.study.report import current_label

# a unit is 6.25% of the quick table, so the 12.5% devices' deepest drill cut holds nothing
QUICK_BUDGETS = ("12.5%", "25%", "50%", "100%")


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
        "PEEL blocks (G_u=4) (centralized)",
        "PEEL blocks (G_u=1) (centralized)",
        "PEEL as published (G_u=4)",
        "first-k blocks",
        "random units",
        "LightGCN (full table)",
        "magnitude pruning",
        "magnitude pruning, int8 values",
        "LightGCN retrained per budget",
        "LightGCN retrained per budget, quantized",
        "PEEL bit-planes (G_u=2, federated)",
        "PEEL blocks (G_u=2, federated)",
        "PEEL bit-planes (G_u=2, federated, equal passes)",
        "PEEL blocks (G_u=2, federated, equal passes)",
        "PEEL bit-planes (G_u=1)",
        "PEEL bit-planes (G_u=4)",
        "PEEL bit-planes (G_u=1, nested pretraining)",
        "PEEL bit-planes (G_u=4, nested pretraining)",
        "row quantization, best bits x dims",
        "Matryoshka LightGCN, leading dims",
        "Matryoshka LightGCN, quantized",
        "row quantization, best bits x dims (nested pretraining)",
        "magnitude pruning (nested pretraining)",
        "magnitude pruning, int8 values (nested pretraining)",
    }
    for method in methods - {"LightGCN (full table)"}:
        fracs = sorted(r["budget_fraction"] for r in report["rows"] if r["method"] == method)
        assert fracs == [0.125, 0.25, 0.5, 1.0], method
    for r in report["rows"]:  # equal bytes: nobody uses more than its budget
        if "used_bytes" in r:
            assert r["used_bytes"] <= r["budget_bytes"], r
    assert report["drill"]
    for key in ("out_dir", "cache_dir", "work_dir"):  # no absolute paths of this machine
        assert not Path(report["config"][key]).is_absolute(), key
    ablations = {r["method"] for r in report["ablation_rows"]}
    assert ablations == {
        "PEEL blocks (G_u=4) (centralized)",
        "PEEL bit-planes (G_u=4)",
        "PEEL bit-planes (G_u=1, cover first)",
        "PEEL bit-planes (G_u=4, cover first)",
        "PEEL blocks (G_u=4), no diversity regulariser",
        "PEEL blocks (G_u=4), uniform weights (no controller)",
        "PEEL blocks (G_u=4), joint training (not bi-level)",
        "PEEL blocks (G_u=2)",
        "PEEL blocks (G_u=8)",
        "PEEL blocks (G_u=4), half the blocks",
        "PEEL blocks (G_u=4), twice the blocks",
        "PEEL blocks (G_u=4), half the blocks, same pretraining",
        "PEEL blocks (G_u=4), twice the blocks, same pretraining",
    }
    for r in report["ablation_rows"]:  # cover first: every item rankable from 12.5% (the cover
        if "cover first" in r["method"]:  # of 16 dims: 4 B meta + 2 B a row, 9.4%) up
            assert r["unrankable_items"] == [0] * len(r["planes_per_group"]), r
    # the trace: a device at 100% dropping to each smaller budget, cut on the device or retrained
    trace = report["trace"]
    by_method = {}
    for t in trace:
        by_method.setdefault(t["method"], []).append(t)
    assert set(by_method) == {
        "PEEL bit-planes (G_u=2, federated): cut on the device",
        "PEEL blocks (G_u=4, centralized): cut on the device",
        "magnitude pruning: cut on the device",
        "magnitude pruning, int8 values: cut on the device",
        "LightGCN retrained per budget",
        "PEEL bit-planes (G_u=1): cut on the device",
        "PEEL bit-planes (G_u=4): cut on the device",
        "Matryoshka LightGCN, leading dims: cut on the device",
    }
    for method, points in by_method.items():
        fracs = sorted(t["budget_fraction"] for t in points)
        assert fracs == pytest.approx([0.125, 0.25, 0.5, 1.0], abs=1e-6), method
    # the drill: every own-budget class cut to each smaller budget; a cut below a unit counts
    # no device (12.5% x 0.125) instead of failing the run
    drill = {(d["own_budget"], d["fraction_of_own"]): d for d in report["drill"]}
    assert drill[("12.5%", 0.125)]["users"] == 0 and drill[("12.5%", 0.5)]["users"] > 0
    assert drill[("100%", 0.125)]["budget_bytes"] == drill[("12.5%", 1.0)]["budget_bytes"]
    pruned = {r["budget_fraction"]: r for r in report["rows"] if r["method"] == "magnitude pruning"}
    for t in by_method["magnitude pruning: cut on the device"]:  # successive cuts = fresh prunes
        assert t["recall@20"] == pytest.approx(pruned[t["budget_fraction"]]["recall@20"])
    for g in (1, 4):  # the cut equals the served table (checked in the step): same numbers
        served = {
            r["budget_fraction"]: r
            for r in report["rows"]
            if r["method"] == f"PEEL bit-planes (G_u={g})"
        }
        for t in by_method[f"PEEL bit-planes (G_u={g}): cut on the device"]:
            assert t["recall@20"] == served[t["budget_fraction"]]["recall@20"]
    own = report["own_bytes_rows"]  # fixed widths at their own bytes: 160 x (16 x bits / 8 + 4)
    assert [(r["method"], r["used_bytes"]) for r in own] == [
        ("row quantization, int8", 3200),
        ("row quantization, int4", 1920),
        ("row quantization, int2", 1280),
        ("row quantization, 1-bit", 960),
    ]
    assert all(
        "downloads a new table" in t["contact"] for t in by_method["LightGCN retrained per budget"]
    )
    # retrained and quantized: one of the retrained models (d = 2, 4, 8, 16 at 12.5 ... 100%) at
    # 8, 4, 2 or 1 bits, chosen on validation, its bytes counted with the row meta
    quantized = [
        r for r in report["rows"] if r["method"] == "LightGCN retrained per budget, quantized"
    ]
    for r in quantized:
        assert r["dim"] in (2, 4, 8, 16) and r["bits"] in (8, 4, 2, 1), r
        assert r["used_bytes"] == direct_quantization_bytes(160, r["dim"], r["bits"])
        assert 0.0 <= r["val_recall@20"] <= 1.0
    int8 = [r for r in report["rows"] if r["method"] == "magnitude pruning, int8 values"]
    assert {r["storage"] for r in int8} == {"bitmap-int8"}
    md = (out / "study.md").read_text()
    assert "LightGCN retrained per budget, quantized: chosen 12.5%: d=" in md
    # cold-start users: held out of all training, ranked per budget next to the warm users
    cold = report["cold_start_rows"]
    assert report["cold_start"]["held_users"] == round(0.1 * 240)
    assert {r["method"] for r in cold} == {
        "PEEL (G_u=4), warm users",
        "PEEL (G_u=4), cold-start users",
        "PEEL (G_u=1), warm users",
        "PEEL (G_u=1), cold-start users",
        "first-k blocks, cold-start users",
        "LightGCN (full table), cold-start users",
        "LightGCN (full table), warm users",
    }
    for r in cold:
        assert r["used_bytes"] <= r["budget_bytes"], r
    uniform = [r for r in report["ablation_rows"] if "uniform" in r["method"]]
    first_k = [r for r in report["rows"] if r["method"] == "first-k blocks"]
    assert len(uniform) == len(first_k) == len(QUICK_BUDGETS)
    assert json.loads((out / "results.json").read_text()) == report
    for section in (
        "## Heterogeneous budgets",
        "## Dynamic budgets against retraining",
        "## Cold-start users",
        "## Ablations",
        "## Bit-plane units and direct row quantization",
        "## Nested (Matryoshka) LightGCN",
        "| row quantization, 1-bit | 960 B (9.38%) |",
    ):
        assert section in md
    assert "| 25% (2.56 KB) |" in md  # budgets in bytes beside the fractions (16 x 160 x 4 B / 4)
    for png in ("recall_vs_bytes.png", "ndcg_vs_bytes.png", "dynamic_budget.png"):
        assert (out / png).stat().st_size > 1000
    assert {r["method"] for r in first["rows"]} < methods


def test_changed_inputs_change_the_step_key(quick_study):
    cfg, _, _, _, out = quick_study
    assert cfg.key("pruning") != StudyConfig(**{**cfg.__dict__, "seed": 1}).key("pruning")
    with pytest.raises(ValueError, match="unknown study step 'nope'"):
        run_study(cfg, ["nope"])


def test_study_command_line(tmp_path, capsys):
    from sim.cli import main

    code = main(["study", "--dataset", "checkerboard", "--steps", "nope", "--out", str(tmp_path)])
    assert code == 2 and "unknown study step 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["study", "--dataset", "checkerboard", "--budgets", "5%,lots", "--out", str(tmp_path)])
    assert (
        exc.value.code == 2 and "--budgets: cannot parse budget 'lots'" in capsys.readouterr().err
    )


@pytest.mark.parametrize("text", ['{"key": "abc", "seconds": 1.0, "res', "", "[]", '{"key": 1}'])
def test_a_corrupt_saved_step_is_a_one_line_error_naming_the_file(tmp_path, capsys, text):
    from sim.cli import main

    steps = tmp_path / "steps"
    steps.mkdir()
    (steps / "pruning.json").write_text(text)
    argv = ["study", "--dataset", "checkerboard", "--steps", "pruning", "--out", str(tmp_path)]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--quick", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("peel-fed: error: corrupt study step file ")
    assert f"{steps / 'pruning.json'} (" in err and err.endswith("to run step pruning again")
    assert not (tmp_path / "cache").exists()  # refused before running anything


def _quick_config(tmp_path: Path, **fields) -> StudyConfig:
    """A quick study (checkerboard by default) writing under ``tmp_path``."""
    where = {k: str(tmp_path / k.removesuffix("_dir")) for k in ("cache_dir", "work_dir")}
    base = dict(dataset="checkerboard", out_dir=str(tmp_path / "report"), **where)
    return StudyConfig(**{**base, "quick": True, "progress": False, **fields})


def test_budgets_given_as_sizes_sit_beside_fractions(tmp_path):
    # the quick table is 160 items x 16 x 4 B = 10,240 B
    cfg = _quick_config(tmp_path, budgets=("2560B", "50%", "10.24KB"))
    report = run_study(cfg, ["pruning"])
    got = sorted(
        (r["budget"], r["budget_bytes"], r["budget_fraction"])
        for r in report["rows"]
        if r["method"] == "magnitude pruning"
    )
    assert got == [("10.24KB", 10240, 1.0), ("2560B", 2560, 0.25), ("50%", 5120, 0.5)]
    md = (tmp_path / "report" / "study.md").read_text()
    assert "| 2560B (2.56 KB) | 50% (5.12 KB) | 10.24KB (10.2 KB) |" in md
    assert "--budgets 2560B,50%,10.24KB" in md


def test_matryoshka_step_cuts_one_nested_model_to_every_budget(tmp_path):
    """Quick mode (d = 16, nested on 2, 4, 8; 160 items): leading dims at float32 take
    budget / (160 x 4 B) columns; the quantized cut is the candidate with the best validation
    Recall@20; the trace (cut on the device) equals the served rows."""
    from dataclasses import replace

    from peel_fed.data import split_validation
    from peel_fed.loading import load_dataset
    from peel_fed.matryoshka import LEADING, QUANTIZED, matryoshka_dims
    from peel_fed.pipeline import PipelineConfig, default_pretraining, pretrain
    from sim.study.steps import step_matryoshka

    cfg = _quick_config(tmp_path, budgets=("12.5%", "25%", "100%"))
    assert matryoshka_dims(64) == (2, 4, 8, 16, 32)
    assert (matryoshka_dims(16), matryoshka_dims(3), matryoshka_dims(2)) == ((2, 4, 8), (2,), ())
    report = run_study(cfg, ["matryoshka"])
    leading = {r["budget"]: r for r in report["rows"] if r["method"] == LEADING}
    assert {b: (r["dims"], r["bits"], r["used_bytes"]) for b, r in leading.items()} == {
        "12.5%": (2, 32, 1280),
        "25%": (4, 32, 2560),
        "100%": (16, 32, 10240),
    }
    quantized = [r for r in report["rows"] if r["method"] == QUANTIZED]
    assert len(quantized) == 3
    for r in quantized:
        assert r["used_bytes"] <= r["budget_bytes"]
        best = max(r["candidates"], key=lambda c: c["val_recall@20"])
        assert (r["bits"], r["dims"]) == (best["bits"], best["dims"])
        assert len(r["candidates"]) == 4  # 8, 4, 2 and 1 bit(s) each fit some columns
    trace = [t for t in report["trace"] if t["method"].startswith(LEADING)]
    assert [t["budget_fraction"] for t in trace] == [1.0, 0.25, 0.125]
    for t in trace:
        assert t["recall@20"] == leading[f"{100 * t['budget_fraction']:g}%"]["recall@20"]
    md = (tmp_path / "report" / "study.md").read_text()
    assert "## Nested (Matryoshka) LightGCN" in md
    assert "| Matryoshka LightGCN, leading dims: cut on the device |" in md
    # the step trained the quick config nested on (2, 4, 8), and cached it under that key
    ds = load_dataset("checkerboard")
    split = split_validation(ds.train, ds.n_users, 0.1, seed=0)
    nested = replace(
        default_pretraining(),
        dim=16,
        epochs=5,
        batch_size=1024,
        diversity_weight=0.0,
        num_blocks=1,
        nested_dims=(2, 4, 8),
    )
    pcfg = PipelineConfig(dataset="checkerboard", cache_dir=cfg.cache_dir, lightgcn=nested)
    assert pretrain(ds, split.fit, pcfg).reused
    assert step_matryoshka(cfg)["nested_dims"] == [2, 4, 8]


def test_labels_saved_before_the_rename_read_as_peel_blocks():
    """Steps saved before PEEL's block rows were labelled "PEEL blocks" are read with the new
    labels (so the ablations still find their reference); federated labels are unchanged."""
    assert current_label("PEEL (G_u=4) (centralized)") == "PEEL blocks (G_u=4) (centralized)"
    assert current_label("PEEL (G_u=4), joint training") == "PEEL blocks (G_u=4), joint training"
    assert current_label("PEEL (G_u=2, federated)") == "PEEL (G_u=2, federated)"
    assert current_label("PEEL bit-planes (G_u=4)") == "PEEL bit-planes (G_u=4)"


def test_retrained_models_skip_a_budget_below_one_dimension(tmp_path):
    """5% of the quick table (512 B) is below a 1-dimensional float32 table of 160 items (640 B)
    and below any quantized one (row meta alone is 640 B): no model, no row, no failure."""
    cfg = _quick_config(tmp_path, budgets=("5%", "100%"))
    report = run_study(cfg, ["lightgcn-per-budget", "per-budget-quantized"])
    got = sorted((r["method"], r["budget"]) for r in report["rows"])
    assert got == [
        ("LightGCN retrained per budget", "100%"),
        ("LightGCN retrained per budget, quantized", "100%"),
    ]
    best = report["rows"][-1]  # at 100% the d=16 model alone, at its best validation width
    assert best["dim"] == 16 and best["used_bytes"] <= best["budget_bytes"]


def test_pretraining_choice_scores_both_cached_models_on_validation(quick_study):
    """The step's validation Recall@20 of each recipe is that of the cached plain and nested
    models (the ones the bit-planes and matryoshka steps read), and it picks the better."""
    from peel_fed.metrics import evaluate_ranking
    from peel_fed.scoring import dot_score_fn
    from sim.study.baseline_steps import _nested_config
    from sim.study.config import data_and_pretrained, pipeline_config

    cfg, _, _, _, out = quick_study
    saved = json.loads((out / "steps" / "recipe-choice.json").read_text())["result"]
    for name, pcfg in (("plain", pipeline_config(cfg)), ("nested", _nested_config(cfg)[0])):
        ds, split, pre = data_and_pretrained(cfg, pcfg)
        assert pre.reused  # no step trained a model the others did not
        m = evaluate_ranking(
            dot_score_fn(pre.user_emb, pre.item_emb), ds.n_users, split.fit, split.val
        )
        assert saved["recipes"][name]["val_recall@20"] == pytest.approx(m["recall@20"])
    assert saved["recipes"]["plain"] != saved["recipes"]["nested"]
    recipes = saved["recipes"]
    assert saved["choice"] == max(recipes, key=lambda r: recipes[r]["val_recall@20"])
    md = (out / "study.md").read_text()
    assert "## Pretraining recipe chosen on validation" in md
    assert f"Chosen: **{saved['choice']}**" in md


def test_baselines_nested_compress_the_nested_model(quick_study):
    """The nested pretraining's pruning rows are magnitude pruning of that (cached) model."""
    from peel_fed.blocks import FLOAT32_BYTES
    from peel_fed.budget_rows import pruning_rows
    from sim.study.baseline_steps import _nested_config
    from sim.study.config import budget_bytes, data_and_pretrained

    cfg, _, report, _, _ = quick_study
    ds, _, pre = data_and_pretrained(cfg, _nested_config(cfg)[0])
    budgets = budget_bytes(cfg, pre.item_emb.size * FLOAT32_BYTES)
    want, _ = pruning_rows(ds, pre.user_emb, pre.item_emb, budgets, int8=True)
    got = [r for r in report["rows"] if r["method"].endswith("int8 values (nested pretraining)")]
    assert [r["recall@20"] for r in got] == [r["recall@20"] for r in want]
    plain = [r for r in report["rows"] if r["method"] == "magnitude pruning, int8 values"]
    assert [r["recall@20"] for r in plain] != [r["recall@20"] for r in want]


def test_a_step_is_redone_when_the_data_changes_in_place(tmp_path, write_lightgcn_folder):
    """Step keys name the inputs, not the data's content: the saved data fingerprint catches a
    dataset edited in place (a step saved before fingerprints existed matches on its key)."""
    from peel_fed.loading import load_dataset
    from sim.study import runner

    board = load_dataset("checkerboard")

    def by_user(edges, drop: int = 0) -> dict:
        rows: dict = {}
        for u, i in zip(edges.users[drop:], edges.items[drop:], strict=True):
            rows.setdefault(int(u), []).append(int(i))
        return rows

    folder = tmp_path / "data"
    write_lightgcn_folder(folder, by_user(board.train), by_user(board.test))
    cfg = _quick_config(tmp_path, dataset="gowalla", data_dir=str(folder), budgets=QUICK_BUDGETS)
    first = run_study(cfg, ["pruning"])
    path = runner.step_path(cfg, "pruning")
    saved = json.loads(path.read_text())
    assert saved["data"] == load_dataset("gowalla", str(folder)).fingerprint()
    assert runner.saved_step(cfg, "pruning") is not None  # same data: reused

    write_lightgcn_folder(folder, by_user(board.train), by_user(board.test, drop=5))
    runner._FINGERPRINTS.clear()  # a new run reads the data again
    assert runner.saved_step(cfg, "pruning") is None  # the test split changed
    second = run_study(cfg, ["pruning"])
    assert json.loads(path.read_text())["data"] != saved["data"]
    assert [r["recall@20"] for r in second["rows"]] != [r["recall@20"] for r in first["rows"]]

    del saved["data"]  # as saved before fingerprints: matched on its key alone
    path.write_text(json.dumps(saved))
    assert runner.saved_step(cfg, "pruning") is not None


def test_the_pretraining_recipe_enters_the_step_keys_unless_it_is_the_legacy_one(monkeypatch):
    """Steps saved with the original recipe (uniform BPR, constant rate, 50 epochs) keep their
    keys (computed before the recipe was keyed); the default DNS + cosine recipe gets new keys
    for every step, so a study rerun redoes them instead of reusing stale results."""
    from dataclasses import replace

    import sim.study.config as study_config
    from peel_fed.lightgcn import LightGCNConfig

    default_keys = (StudyConfig().key("pruning"), StudyConfig(quick=True).key("bit-planes"))
    current = study_config.pipeline_config

    def legacy(cfg):
        pcfg = current(cfg)
        old = LightGCNConfig(diversity_weight=0.01)
        if cfg.quick:
            old = replace(old, dim=16, epochs=5, batch_size=1024)
        return replace(pcfg, lightgcn=old)

    monkeypatch.setattr(study_config, "pipeline_config", legacy)
    assert StudyConfig().key("pruning") == "f7336922ae6feed3"
    assert StudyConfig(quick=True).key("bit-planes") == "2f2e080c8ca00906"
    assert "f7336922ae6feed3" not in default_keys and "2f2e080c8ca00906" not in default_keys
