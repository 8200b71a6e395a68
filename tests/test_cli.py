"""``peel-fed`` command line: bad inputs fail fast with exit code 2 and a one-line error."""

from __future__ import annotations

import pytest

from sim.cli import main

TRAIN = {u: [u % 8, (u + 3) % 8, (u + 5) % 8] for u in range(10)}
TEST = {u: [(u + 1) % 8] for u in range(10)}


@pytest.fixture
def tiny_dir(tmp_path, write_lightgcn_folder):
    return write_lightgcn_folder(tmp_path / "tiny", TRAIN, TEST)


def _run(capsys, tmp_path, *args):
    argv = [
        "centralized",
        *args,
        "--num-item-groups",
        "2",
        "--num-blocks",
        "2",
        "--dim",
        "4",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
    ]
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1, err
    assert lines[0].startswith("peel-fed: error: ")
    # failed before any training or output
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "out").exists()
    return lines[0]


def test_unknown_dataset(capsys, tmp_path):
    line = _run(capsys, tmp_path, "--dataset", "no-such-set")
    assert "unknown dataset 'no-such-set'" in line


def test_missing_data_dir(capsys, tmp_path):
    line = _run(capsys, tmp_path, "--data-dir", str(tmp_path / "absent"))
    assert "dataset folder not found" in line


def test_budget_below_one_block(capsys, tmp_path, tiny_dir):
    # a unit is 4 items x 2 values x 4 bytes = 32 B
    line = _run(capsys, tmp_path, "--data-dir", str(tiny_dir), "--budgets", "1B")
    assert "below one block" in line
    assert "32 B" in line


def test_budget_above_the_table(capsys, tmp_path, tiny_dir):
    # the table is 8 items x 4 values x 4 bytes = 128 B
    line = _run(capsys, tmp_path, "--data-dir", str(tiny_dir), "--budgets", "100%,1KB")
    assert "budget '1KB' (1,000 B) is above the full item table (128 B)" in line


def test_unparsable_budget(capsys, tmp_path, tiny_dir):
    line = _run(capsys, tmp_path, "--data-dir", str(tiny_dir), "--budgets", "25%,lots")
    assert "cannot parse budget 'lots'" in line


def test_zero_user_groups(capsys, tmp_path, tiny_dir):
    line = _run(capsys, tmp_path, "--data-dir", str(tiny_dir), "--num-user-groups", "0")
    assert "num-user-groups" in line


def test_more_user_groups_than_users(capsys, tmp_path, tiny_dir):
    line = _run(capsys, tmp_path, "--data-dir", str(tiny_dir), "--num-user-groups", "11")
    assert "more user groups" in line


@pytest.mark.parametrize("nested", ["4", "2,1", "0,2", "2,2"])
def test_bad_nested_dims(capsys, tmp_path, tiny_dir, nested):
    line = _run(capsys, tmp_path, "--data-dir", str(tiny_dir), "--nested-dims", nested)
    assert "nested dims must be strictly increasing and each in (0, 4)" in line  # --dim 4


def test_unparsable_nested_dims(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["centralized", "--nested-dims", "2,x"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "argument --nested-dims: expected comma-separated integers, got '2,x'" in err


def test_nested_dims_reach_pretraining(monkeypatch):
    seen = []
    monkeypatch.setattr("peel_fed.pipeline.run_centralized", seen.append)
    assert main(["centralized", "--nested-dims", "2,4,8,16,32"]) == 0
    assert seen[0].lightgcn.nested_dims == (2, 4, 8, 16, 32)
    assert main(["centralized"]) == 0
    assert seen[1].lightgcn.nested_dims == ()


def test_old_option_names_still_work_with_a_warning(capsys, tmp_path, tiny_dir):
    """``--user-groups`` (renamed ``--num-user-groups``) still sets the value, and says so."""
    code = main(
        ["centralized", "--data-dir", str(tiny_dir), "--user-groups", "11", "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[0] == (
        "peel-fed: warning: --user-groups is renamed --num-user-groups; the old name goes in 0.3"
    )
    assert "more user groups (11)" in err[1]


def test_old_run_config_keys_still_work_with_a_warning():
    from peel_fed.fedconfig import ConfigError, FedConfig

    with pytest.warns(FutureWarning) as warned:
        cfg = FedConfig.from_run_config({"user-groups": 3, "local-steps": 2})
    assert (cfg.num_user_groups, cfg.pretrain_local_steps) == (3, 2)
    assert [str(w.message) for w in warned] == [
        "run-config key 'user-groups' is renamed 'num-user-groups'; the old name goes in 0.3",
        "run-config key 'local-steps' is renamed 'pretrain-local-steps'; the old name goes in 0.3",
    ]
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="both 'blocks'"):
        FedConfig.from_run_config({"blocks": 4, "num-blocks": 4})


def _simulate(capsys, *args) -> tuple[int, str]:
    from sim.cli import main

    rc = main(["simulate", *args])
    return rc, capsys.readouterr().err.strip()


def test_simulate_rejects_bad_run_config_in_one_line(capsys, tmp_path):
    out = str(tmp_path / "out")
    for args, expected in (
        (["--run-config", "bogus=1"], "unknown run-config key 'bogus'"),
        (["--run-config", "num-user-groups=0"], "num-user-groups must be >= 1"),
        (
            ["--run-config", "pretrain-cohort-fraction=1.5"],
            "pretrain-cohort-fraction must be in (0, 1]",
        ),
        (["--run-config", "budgets='10%,lots'"], "budgets: cannot parse budget 'lots'"),
        (["--run-config", "drill='half'"], "drill must be comma-separated fractions"),
        (["--run-config", "pretrain-passes"], "run-config entries must be key=value"),
    ):
        rc, err = _simulate(capsys, "--out", out, *args)
        assert rc == 2 and err.count("\n") == 0 and expected in err, (args, err)


@pytest.fixture
def no_ray(monkeypatch):
    """``simulate`` runs past its checks into a stub that records its arguments, not Ray."""
    started = []
    monkeypatch.setattr(
        "sim.simulate.run_federated_simulation",
        lambda cfg, n, ray_address=None: started.append((cfg, n, ray_address)),
    )
    return started


def _bad_folder(tmp_path, write_lightgcn_folder, bad: str):
    folder = write_lightgcn_folder(tmp_path / bad, TRAIN, TEST)
    if bad == "no-test":
        (folder / "test.txt").unlink()
    elif bad == "token":
        (folder / "train.txt").write_text("0 1 2\n1 3 4x\n")
    return folder


@pytest.mark.parametrize(
    "bad, args, expected",
    [
        ("no-test", [], "dataset file missing: no test.txt or test.txt.gz in "),
        ("token", [], "train.txt, line 2: non-integer id"),
        ("", ["--num-nodes", "11"], "--num-nodes (11) is more than the 10 users of "),
        ("", ["--num-nodes", "0"], "--num-nodes must be >= 1, got 0"),
        ("", ["--run-config", "num-item-groups=9"], "more item groups (9) than items (8)"),
        ("", ["--run-config", "num-user-groups=11"], "more user groups (11) than users (10)"),
        (
            "",
            ["--run-config", "num-item-groups=4 budgets='1MB'"],
            "budgets: budget '1MB' (1,000,000 B) is above the full item table (2,048 B)",
        ),
    ],
)
def test_simulate_checks_data_and_config_before_ray_starts(
    capsys, tmp_path, write_lightgcn_folder, no_ray, bad, args, expected
):
    folder = _bad_folder(tmp_path, write_lightgcn_folder, bad)
    out = tmp_path / "out"
    rc, err = _simulate(capsys, "--data-dir", str(folder), "--out", str(out), *args)
    assert rc == 2 and err.count("\n") == 0 and err.startswith("peel-fed: error: "), err
    assert expected in err, err
    assert no_ray == [] and not out.exists()


def test_simulate_starts_with_checked_data_and_config(capsys, tmp_path, tiny_dir, no_ray):
    args = ["--data-dir", str(tiny_dir), "--num-nodes", "10", "--run-config", "num-item-groups=4"]
    rc, err = _simulate(capsys, *args, "--out", str(tmp_path / "out"))
    assert (rc, err) == (0, "")
    [(cfg, nodes, ray_address)] = no_ray
    assert (nodes, cfg.min_nodes, cfg.num_item_groups, ray_address) == (10, 2, 4, None)
    assert cfg.data_dir == str(tiny_dir.resolve())
    rc, err = _simulate(capsys, *args, "--out", str(tmp_path / "out"), "--ray-address", "h:6379")
    assert (rc, err, no_ray[-1][2]) == (0, "", "h:6379")


def test_parse_run_config_reads_toml_values():
    from sim.cli import parse_run_config

    got = parse_run_config(
        "pretrain-passes=5 pretrain-server-lr=0.1 dataset='checkerboard' progress=false drill='0.5'"
    )
    assert got == {
        "pretrain-passes": 5,
        "pretrain-server-lr": 0.1,
        "dataset": "checkerboard",
        "progress": False,
        "drill": "0.5",
    }


def test_line_progress_prints_whole_lines_when_output_is_not_a_terminal(monkeypatch):
    import io
    import sys

    from peel_fed.console import LineProgress, progress_bar

    out = io.StringIO()
    bar = LineProgress(3, "rounds", every_s=3600, file=out)
    bar.update(1)
    bar.update(1)
    bar.set_postfix(loss="0.5", failed=0)
    bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in out.getvalue()  # one line at the end, no bar
    assert lines[0].startswith("[progress] rounds: 3/3 (loss=0.5, failed=0)")
    chatty = io.StringIO()
    bar = LineProgress(2, "steps", every_s=0, file=chatty)
    bar.update(1)
    bar.update(1)
    bar.close()
    assert [ln.split(",")[0] for ln in chatty.getvalue().splitlines()] == [
        "[progress] steps: 1/2",
        "[progress] steps: 2/2",
        "[progress] steps: 2/2",
    ]
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert isinstance(progress_bar(2, "x", True), LineProgress)


def test_budget_lists_are_split_one_way():
    from peel_fed.blocks import BudgetError, split_budget_list

    assert split_budget_list(" 10%, 2MB,,0.5 ") == ["10%", "2MB", "0.5"]
    for empty in ("", " , ,"):
        with pytest.raises(BudgetError, match="at least one budget"):
            split_budget_list(empty)


def test_study_options_are_a_subparser_of_the_main_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["study", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith("usage: peel-fed study")
    for option in (
        "--dataset",
        "--data-dir",
        "--seed",
        "--out",
        "--cache-dir",
        "--budgets",
        "--cold-start-fraction",
        "--steps",
        "--quick",
        "--no-progress",
    ):
        assert option in out
    with pytest.raises(SystemExit) as exc:  # its options belong to study alone
        main(["centralized", "--cold-start-fraction", "0.2"])
    assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_python_dash_m_runs_the_command_line(capsys, monkeypatch):
    import runpy
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "sim.cli", "study", "-h"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: peel-fed study"), done.stderr
    monkeypatch.setattr(sys, "argv", ["sim.study", "-h"])  # python -m sim.study -h, in-process
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("sim.study", run_name="__main__")
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("usage: peel-fed study")


def test_centralized_prints_bit_planes_and_baselines_unless_told_not_to(capsys, tmp_path):
    import json

    common = ["--dataset", "checkerboard", "--num-user-groups", "1", "--budgets", "50%,100%"]
    for flag, baselines in (([], True), (["--no-baselines"], False)):
        out = tmp_path / ("with" if baselines else "without")
        code = main(
            ["centralized", *common, *flag, "--num-item-groups", "2", "--num-blocks", "2"]
            + ["--dim", "4", "--epochs", "1", "--out", str(out), "--cache-dir", str(tmp_path)]
            + ["--no-progress"]
        )
        assert code == 0
        methods = {r["method"] for r in json.loads((out / "results.json").read_text())["rows"]}
        assert "PEEL bit-planes (G_u=1)" in methods and "PEEL blocks (G_u=1)" in methods
        assert ("magnitude pruning, int8 values" in methods) is baselines
        assert ("row quantization, best bits x dims" in methods) is baselines
    capsys.readouterr()


def test_simulate_refuses_a_ray_address_nobody_answers_at(capsys, tmp_path, tiny_dir):
    from sim.local_federation import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there: a one-line error, no Ray
    args = ["--data-dir", str(tiny_dir), "--out", str(tmp_path / "out")]
    args += ["--run-config", "num-item-groups=4", "--ray-address"]
    rc, err = _simulate(capsys, *args, address)
    assert rc == 2 and err.startswith(f"peel-fed: error: no Ray cluster answers at {address}")
    rc, err = _simulate(capsys, *args, "head-without-port")
    assert rc == 2 and "--ray-address must be HOST:PORT" in err


def test_a_resume_finds_its_checkpoint_with_relative_folders(tmp_path, tiny_dir, monkeypatch):
    """Folders given relative in --run-config are made absolute, as the checkpoint keeps them,
    so a resume from another working folder still matches; a missing checkpoint is one line."""
    import argparse

    from sim.cli import _fed_config

    monkeypatch.chdir(tiny_dir.parent)
    args = argparse.Namespace(
        run_config=(
            f"data-dir='{tiny_dir.name}' device-state-dir='state' num-item-groups=2 "
            "num-user-groups=2 num-blocks=2 dim=4 budgets='100%' device-budgets='100%'"
        ),
        dataset=None,
        seed=None,
        data_dir=None,
        out=str(tmp_path / "out"),
        no_progress=True,
        resume=False,
    )
    cfg = _fed_config(args, 2)
    assert cfg.data_dir == str(tiny_dir.resolve())
    assert cfg.device_state_dir == str((tiny_dir.parent / "state").resolve())
    args.resume = True
    with pytest.raises(ValueError, match="nothing to resume: no checkpoint.pt in"):
        _fed_config(args, 2)
