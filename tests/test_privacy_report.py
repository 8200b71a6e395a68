"""``peel-fed privacy``: one command, one report (every setting run through the real ServerApp
and ClientApp in process), reused on a rerun, and bad values refused before anything runs."""

from __future__ import annotations

import json

import pytest
from test_adapters import SMALL, TINY

import sim.privacy_report as privacy_report
from peel_fed.fedconfig import ConfigError, FedConfig
from peel_fed.privacy import local_epsilon
from sim.cli import main
from sim.local_grid import LocalGrid, server_identity
from strategies.server_app import run_pipeline

RUN_CONFIG = {
    k.replace("_", "-"): v
    for k, v in SMALL.items()
    if k not in ("dataset", "min_nodes", "progress", "budgets", "device_budgets")
}
ARGS = dict(
    dataset=TINY,
    num_nodes=3,
    epsilons=(2.0, 8.0),
    decoys=3,
    ldp_noise=3.0,
    clip=0.5,
    attack_targets=6,
    run_config=RUN_CONFIG,
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("privacy")
    return out, privacy_report.build_report(**ARGS, out=out, command="test")


def test_the_report_has_every_setting_with_its_epsilon_bytes_and_attacks(report):
    out, rep = report
    assert {p.name for p in out.iterdir()} >= {"privacy.md", "privacy.json", "privacy.png"}
    assert json.loads((out / "privacy.json").read_text())["rows"] == json.loads(
        json.dumps(rep["rows"])
    )
    rows = {r["setting"]: r for r in rep["rows"]}
    assert list(rows) == [
        "clear uploads",
        "secure rows",
        "3 decoy items",
        "local DP, noise 3 x clip",
        "central DP, epsilon 2",
        "central DP, epsilon 8",
        "distributed DP, epsilon 8",
    ]
    md = (out / "privacy.md").read_text()
    assert all(f"| {name} |" in md for name in rows)
    # epsilon is the run's own accounting: the target for central DP, the local accountant's
    releases = FedConfig.from_run_config({**RUN_CONFIG, "dataset": TINY}).dp_releases()
    assert rows["central DP, epsilon 2"]["epsilon"] == pytest.approx(2.0, rel=1e-3)
    assert rows["central DP, epsilon 8"]["epsilon"] == pytest.approx(8.0, rel=1e-3)
    assert rows["distributed DP, epsilon 8"]["epsilon"] == rows["central DP, epsilon 8"]["epsilon"]
    assert rows["local DP, noise 3 x clip"]["epsilon"] == pytest.approx(
        local_epsilon(3.0, releases["pretrain"] + releases["pee"], rep["delta"]), rel=1e-3
    )
    assert rows["clear uploads"]["epsilon"] is None and rep["delta"] == 1e-5
    assert (
        rows["central DP, epsilon 2"]["noise_multiplier"]
        > rows["central DP, epsilon 8"]["noise_multiplier"]
    )
    # secure rows send more up (masked dense layouts) and hide a user inside the cohort sum
    clear, secure = rows["clear uploads"], rows["secure rows"]
    assert secure["up_bytes_total"] > clear["up_bytes_total"]
    assert clear["attack"]["auc_median"] > 0.99 and clear["attack"]["precision_at_k"] == 1.0
    assert secure["attack"]["auc_median"] < clear["attack"]["auc_median"] - 0.1
    assert rows["3 decoy items"]["attack"]["precision_at_k"] < 1.0
    # central DP: the server reads the clipped uploads before it noises them, at every epsilon
    assert rows["central DP, epsilon 2"]["attack"] == rows["central DP, epsilon 8"]["attack"]
    # distributed DP: the server sees only (noised) cohort sums, as with secure rows
    ddp = rows["distributed DP, epsilon 8"]
    assert ddp["attack"]["view"] == "secure rows" and ddp["dp"] == "distributed"
    assert ddp["attack"]["auc_median"] < clear["attack"]["auc_median"] - 0.1
    assert ddp["up_bytes_total"] > clear["up_bytes_total"]
    assert not any(r["failures"] for r in rep["rows"])


def test_the_recall_columns_are_the_pipeline_s_own(report):
    """The clear row's Recall@20 is what the ServerApp reports for the same run config."""
    _, rep = report
    cfg = FedConfig.from_run_config(rep["run_config"])
    with server_identity():
        direct = run_pipeline(LocalGrid(3), cfg)
    method = rep["rows"][0]["method"]
    mine = [r for r in direct["rows"] if r["method"] == method]
    want = {f"{r['budget_fraction']:.2f}": r["recall@20"] for r in mine}
    got = rep["rows"][0]["recall@20"]
    assert got == {"0.1": want["0.10"], "0.25": want["0.25"], "1": want["1.00"]}


def test_a_rerun_reuses_every_saved_setting(report, monkeypatch):
    out, rep = report

    def no(*_a, **_k):
        raise AssertionError("ran again")

    monkeypatch.setattr(privacy_report, "run_setting", no)
    monkeypatch.setattr(privacy_report, "run_attacks", no)
    again = privacy_report.build_report(**ARGS, out=out, command="test")
    assert [r["recall@20"] for r in again["rows"]] == [r["recall@20"] for r in rep["rows"]]


def test_bad_values_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    with pytest.raises(ConfigError, match="noise multiplier"):
        privacy_report.build_report(**{**ARGS, "epsilons": (1e-4,)}, out=tmp_path / "a")
    with pytest.raises(ConfigError, match="attack-targets"):
        privacy_report.build_report(**{**ARGS, "attack_targets": 0}, out=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    argv = ["privacy", "--dataset", TINY, "--epsilons", "1,x", "--out", str(tmp_path / "c")]
    with pytest.raises(SystemExit):
        main(argv)
    assert "expected comma-separated numbers" in capsys.readouterr().err
    code = main(["privacy", "--dataset", TINY, "--run-config", "dim=0", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("peel-fed: error:") and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_settings_measured_two_at_a_time_give_the_same_report(report, tmp_path):
    """Worker processes (``--jobs 2``) measure the same numbers: every run takes its seed."""
    _, rep = report
    args = {**ARGS, "epsilons": (8.0,), "distributed_epsilons": (), "decoys": 0, "ldp_noise": 0.0}
    two = privacy_report.build_report(**args, jobs=2, out=tmp_path, command="test")
    want = {r["setting"]: r for r in rep["rows"]}
    for row in two["rows"]:
        for key in ("epsilon", "recall@20", "up_bytes_total", "attack"):
            got, exp = row[key], want[row["setting"]][key]
            if key == "attack":
                got, exp = ({k: v for k, v in d.items() if k != "seconds"} for d in (got, exp))
            assert got == exp, (row["setting"], key)
