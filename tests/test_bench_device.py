"""The on-device benchmark (``sim/bench_device.py``) on the checkerboard dataset: the report's
structure, and the bytes a device keeps never above its budget. No wall-clock assertions."""

from __future__ import annotations

import json

from peel_fed.loading import load_dataset
from sim.bench_device import INCLUDES, KINDS, main

BUDGETS = ("5%", "100%")


def test_bench_device_report_structure_and_bytes_within_budget(tmp_path):
    out = tmp_path / "device-bench.json"
    argv = ["--dataset", "checkerboard", "--users", "2", "--cold-users", "1", "--warmup", "1"]
    argv += ["--repeats", "1", "--budgets", ",".join(BUDGETS), "--out", str(out)]
    report = main(argv)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    md = out.with_suffix(".md").read_text()

    ds = load_dataset("checkerboard")
    full = ds.n_items * 64 * 4
    assert (saved["dataset"], saved["n_items"], saved["dim"]) == ("checkerboard", ds.n_items, 64)
    assert saved["full_table_bytes"] == full
    assert "random" in saved["tables"] and "do not depend on the values" in saved["tables"]
    assert {"platform", "cpu_count", "torch", "numpy", "python"} <= set(saved["machine"])
    assert saved["goal"] == "under 20 ms per user at every budget"
    assert isinstance(saved["goal_met"], bool) and isinstance(saved["goal_met_cold"], bool)
    assert saved["date"] and saved["wall_seconds"] >= 0
    assert len(saved["machine"]["load_average_start"]) == 3
    assert "| < 20 ms | cold < 20 ms |" in md and "Reading:" in md
    assert saved["includes"] == INCLUDES
    assert (saved["users"], saved["cold_users"], saved["repeats"]) == (2, 1, 1)

    rows = saved["rows"]
    assert [(r["budget"], r["kind"]) for r in rows] == [(b, k) for b in BUDGETS for k in KINDS]
    for r in rows:
        assert "skipped" not in r, r
        assert r["budget_bytes"] == {"5%": full * 5 // 100, "100%": full}[r["budget"]]
        # what the device keeps on disk is exactly the unit bytes it holds, within the budget
        assert 0 < r["disk_payload_bytes"] == r["used_bytes"] <= r["budget_bytes"]
        assert 0 < r["rankable_items"] <= ds.n_items and r["units"] > 0 and r["disk_npz_bytes"] > 0
        for key in ("build_ms", "decode_ms", "warm_ms_median", "warm_ms_p90", "cold_ms_median"):
            assert r[key] >= 0, key
        assert r["warm_ms_p90"] >= r["warm_ms_median"]
        assert r["peak_rss_growth_mb"] is None or r["peak_rss_growth_mb"] >= 0
        assert r["tracemalloc_peak_mb"] > 0
        assert isinstance(r["meets_goal"], bool) and isinstance(r["cold_meets_goal"], bool)
        assert [(x["users"], x["cold_users"], x["torch_threads"]) for x in r["repeats"]] == [
            (2, 1, 1)
        ]
        assert f"| {r['budget']} | {r['kind']} | {r['disk_payload_bytes']:,} |" in md
    full_rows = {r["kind"]: r for r in rows if r["budget"] == "100%"}
    assert full_rows["blocks"]["used_bytes"] == full  # every float32 block
    assert full_rows["bit-planes"]["rankable_items"] == ds.n_items
    # 16 bits a value plus 4 B of row meta: about half the float32 table
    assert full_rows["bit-planes"]["used_bytes"] == ds.n_items * (64 * 2 + 4)
