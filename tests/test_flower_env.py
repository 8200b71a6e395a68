"""One Flower environment setup for scripts, tests and deployed processes (``sim.flower_env``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sim.flower_env import FLOWER_SETTINGS, configure_flower_env, flower_env


def test_settings_and_a_fresh_flower_home_fill_what_is_unset():
    env = configure_flower_env({"FLWR_TELEMETRY_ENABLED": "1", "PATH": "/bin"})
    assert Path(env["FLWR_HOME"]).is_dir() and "peel-fed-flwr-" in env["FLWR_HOME"]
    assert env["FLWR_TELEMETRY_ENABLED"] == "1"  # the user's choice is kept
    for key in set(FLOWER_SETTINGS) - {"FLWR_TELEMETRY_ENABLED"}:
        assert env[key] == FLOWER_SETTINGS[key]
    assert env["PATH"] == "/bin"
    again = configure_flower_env(dict(env))
    assert again["FLWR_HOME"] == env["FLWR_HOME"]  # a set FLWR_HOME is kept


def test_a_process_environment_gets_its_own_home_and_every_setting(tmp_path):
    user = {"FLWR_HOME": "/elsewhere", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "0"}
    env = configure_flower_env(dict(user), flwr_home=tmp_path / "node", keep_set=False)
    assert env == {**FLOWER_SETTINGS, "FLWR_HOME": str(tmp_path / "node")}


def test_a_flower_home_made_for_a_block_is_removed_after_it_also_on_failure(monkeypatch, tmp_path):
    monkeypatch.delenv("FLWR_HOME", raising=False)
    homes = []
    for fail in (False, True):
        try:
            with flower_env() as env:
                home = Path(env["FLWR_HOME"])
                homes.append(home)
                assert home.is_dir() and os.environ["FLWR_HOME"] == str(home)
                (home / "written-by-flower").write_text("x")
                if fail:
                    raise RuntimeError("the run failed")
        except RuntimeError:
            assert fail
        assert not home.exists() and "FLWR_HOME" not in os.environ
    assert homes[0] != homes[1]
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))  # the user's own home is kept
    with flower_env() as env:
        assert env["FLWR_HOME"] == str(tmp_path)
    assert tmp_path.is_dir() and os.environ["FLWR_HOME"] == str(tmp_path)


@pytest.mark.parametrize("fail", [False, True])
def test_a_simulation_leaves_no_flower_home_behind(monkeypatch, fail):
    """``run_federated_simulation`` with Flower's simulation stubbed (no Ray start)."""
    import flwr.simulation

    from peel_fed.fedconfig import FedConfig
    from sim.simulate import run_federated_simulation

    monkeypatch.delenv("FLWR_HOME", raising=False)
    seen = []

    def run_simulation(**_) -> None:
        seen.append(Path(os.environ["FLWR_HOME"]))
        assert seen[0].is_dir()
        if fail:
            raise KeyboardInterrupt

    monkeypatch.setattr(flwr.simulation, "run_simulation", run_simulation)
    with pytest.raises(KeyboardInterrupt if fail else RuntimeError):
        run_federated_simulation(FedConfig(), 2)
    assert len(seen) == 1 and not seen[0].exists() and "FLWR_HOME" not in os.environ
