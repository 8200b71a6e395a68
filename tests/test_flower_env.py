"""One Flower environment setup for scripts, tests and deployed processes (``sim.flower_env``)."""

from __future__ import annotations

from pathlib import Path

from sim.flower_env import FLOWER_SETTINGS, configure_flower_env


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
