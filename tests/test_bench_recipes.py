"""The pretraining-recipe benchmark: its time-to-quality arithmetic by hand, and a tiny run."""

from __future__ import annotations

import json

import pytest

from sim.bench_pretrain_recipes import main, seconds_to_reach, summarise


def _run(points: list[tuple[float, float]]) -> dict:
    """A bench_lightgcn report from (train_seconds, recall) points, one evaluated epoch each."""
    epochs = [
        {"epoch": e + 1, "train_seconds": t, "recall@20": r, "ndcg@20": r / 2}
        for e, (t, r) in enumerate(points)
    ]
    best = max(epochs, key=lambda row: row["recall@20"])
    return {
        "epochs": epochs,
        "best_recall@20": best["recall@20"],
        "best_ndcg@20": best["ndcg@20"],
        "best_epoch": best["epoch"],
        "median_seconds_per_epoch": points[0][0],
    }


def test_speedup_is_the_published_time_to_its_best_over_the_recipe_time_to_it():
    # published: best 0.12, first reached at 300 s; fast: reaches 0.12 at 60 s (0.10 at 30 s)
    runs = {
        "published": _run([(100, 0.05), (200, 0.10), (300, 0.12), (400, 0.12)]),
        "fast": _run([(30, 0.10), (60, 0.13), (90, 0.18)]),
        "slow": _run([(500, 0.11)]),
    }
    assert seconds_to_reach(runs["fast"]["epochs"], 0.12) == 60
    assert seconds_to_reach(runs["slow"]["epochs"], 0.12) is None
    s = summarise(runs)
    assert s["target_recall@20"] == 0.12
    assert s["recipes"]["published"]["speedup_vs_published"] == pytest.approx(1.0)
    assert s["recipes"]["fast"]["speedup_vs_published"] == pytest.approx(5.0)
    assert s["recipes"]["fast"]["train_seconds_at_best"] == 90
    assert s["recipes"]["slow"]["speedup_vs_published"] is None


def test_tiny_run_writes_both_recipes_and_a_table(tmp_path):
    out = tmp_path / "recipes.json"
    report = main(
        [
            "--dataset",
            "checkerboard-tiny",
            "--minutes",
            "0.05",
            "--recipes",
            "published,dns-cosine",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert set(saved["runs"]) == {"published", "dns-cosine"} == set(report["summary"]["recipes"])
    assert "| dns-cosine |" in out.with_suffix(".md").read_text()


def test_unknown_recipe_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        main(["--recipes", "published,fastest"])
    assert "unknown recipe(s) fastest" in capsys.readouterr().err
