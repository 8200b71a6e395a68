"""The scale benchmark's bookkeeping on hand-built marks and reports (no simulation started)."""

import numpy as np
import pytest

from sim import bench_scale


def _report(table: np.ndarray, losses: list[float]) -> dict:
    down = {"down_bytes_per_node_per_exchange": 1000.0, "up_bytes_per_reply": 400.0}
    ask = {"down_bytes_per_node_per_exchange": 20.0, "up_bytes_per_reply": 30.0}
    asks = {
        "pretrain-ask": {**ask, "exchange_seconds": 3.0},
        "final-ask": {"exchange_seconds": 1.0},
    }
    return {
        "bytes": {"pretrain": down, "stats": {"exchange_seconds": 7.4}, **asks},
        "losses": losses,
        "peak_rss_bytes": 2**30,
        "item_table": table,
    }


def test_round_times_are_from_the_previous_mark():
    marks = [("connected", 1.0), ("stats", 2.0), ("pretrain init 0", 3.0), ("pretrain init 1", 4.0)]
    marks += [("pretrain round 1", 6.0), ("pretrain round 2", 9.0), ("pretrain round 3", 10.0)]
    row = bench_scale.summarize(10, 0.5, 12.0, marks, None)
    assert row["round_seconds"] == [2.0, 3.0, 1.0]  # from init 1, then round to round
    assert row["median_round_seconds"] == 2.0
    assert row["seconds_to_connect"] == 0.5
    assert not row["finished"] and row["steps_done"][-1] == "pretrain round 3"
    cut = bench_scale.summarize(1000, 0.0, 30.0, [("connected", 20.0)], None)
    assert cut["round_seconds"] == [] and cut["median_round_seconds"] is None


def test_agreement_is_measured_against_the_first_finished_count(tmp_path):
    base = np.arange(12, dtype=np.float32).reshape(4, 3)
    other = base.copy()
    other[2, 1] += 0.5
    rows = [
        bench_scale.summarize(2, 0.0, 5.0, [], None),  # cut: no reference
        bench_scale.summarize(10, 0.0, 5.0, [], _report(base, [1.0, 0.5])),
        bench_scale.summarize(100, 0.0, 5.0, [], _report(other, [1.0, 0.75])),
    ]
    bench_scale._agreement(rows)
    assert "agreement" not in rows[0]
    assert rows[1]["agreement"]["item_table_max_abs_diff"] == 0.0
    ag = rows[2]["agreement"]
    assert ag["vs_nodes"] == 10
    assert ag["item_table_max_abs_diff"] == pytest.approx(0.5)
    assert ag["item_table_rel_diff"] == pytest.approx(0.5 / np.linalg.norm(base))
    assert ag["loss_max_abs_diff"] == pytest.approx(0.25)
    report = {
        "dataset": "checkerboard-tiny",
        "passes": 1,
        "rounds": 4,
        "download": "sparse",
        "num_cpus": 2,
        "command": "python -m sim.bench_scale",
        "rows": rows,
    }
    md = bench_scale.markdown(report)
    lines = [ln for ln in md.splitlines() if ln.startswith("| 100 |")]
    assert lines == [
        "| 100 | yes | 5 | - | 7 | 4 | 1,000 | 50 | 400 | 1.00 GiB | 5.0e-01, 2.2e-02 |"
    ]
    assert "| 2 | no: - |" in md


def test_bad_node_counts_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench_scale.main(["--nodes", "0,10"])
    assert "--nodes must list node counts >= 1" in capsys.readouterr().err
