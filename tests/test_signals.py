"""A single Ctrl-C (SIGINT) or SIGTERM ends ``peel-fed simulate``, ``study`` and ``deploy local``
within seconds, with exit 130 or 143, no process left behind and no partial result file.

Each command runs as a real process in its own session; the signal goes to that process once
its log shows it mid-run. (Before the fix ``simulate`` hung until the round timeout, 600 s.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import session_members, stop_session

pytestmark = pytest.mark.skipif(
    not Path("/proc").is_dir(), reason="finds a run's processes through /proc (Linux)"
)
SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _signal_mid_run(argv: list[str], marker: str, sig: int, tmp_path: Path) -> tuple[int, float]:
    """Start ``peel-fed argv``, send ``sig`` once a log line holds ``marker``; returns its exit
    status and the seconds it took to exit. Whatever it leaves is stopped after, by session."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sim.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        # as from a terminal: a shell's background job (a CI runner, `pytest &`) ignores SIGINT,
        # and a child inherits that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                break
        else:
            pytest.fail(f"the run ended before {marker!r}:\n{''.join(seen[-20:])}")
        proc.send_signal(sig)
        t0 = time.monotonic()
        proc.communicate(timeout=60)
        seconds = time.monotonic() - t0
        deadline = time.monotonic() + 10  # Ray's daemons end a moment after the driver
        while session_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_members(proc.pid) == [], "processes left behind"
        return proc.returncode, seconds
    finally:
        if proc.poll() is None or session_members(proc.pid):
            stop_session(proc)


def test_simulate_ends_within_seconds_on_sigterm(tmp_path):
    """SIGTERM mid-pretraining (just after the statistics phase): Ray replaces peel-fed's SIGTERM
    handler (it exits with status 15), and the ServerApp's thread waits on its nodes; both are
    handled (exit 143)."""
    out = tmp_path / "run"
    argv = ["simulate", "--dataset", "checkerboard", "--num-nodes", "2", "--no-progress"]
    argv += ["--out", str(out), "--run-config", "pretrain-passes=500"]
    status, seconds = _signal_mid_run(argv, "stats (secure aggregation)", signal.SIGTERM, tmp_path)
    assert status == SIGNALS[signal.SIGTERM]
    assert seconds < 30
    assert not (out / "results.json").exists()  # no partial result


def test_study_ends_within_seconds_on_ctrl_c(tmp_path):
    """Mid-step (pretraining Gowalla, minutes of work): no step file is written."""
    out = tmp_path / "report"
    argv = ["study", "--steps", "pruning", "--out", str(out), "--no-progress"]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    status, seconds = _signal_mid_run(argv, "pruning: running", signal.SIGINT, tmp_path)
    assert status == SIGNALS[signal.SIGINT] and seconds < 30
    assert not (out / "steps" / "pruning.json").exists()


def test_deploy_ends_within_seconds_on_sigterm(tmp_path):
    out = tmp_path / "run"
    argv = ["deploy", "local", "--insecure", "--dataset", "checkerboard", "--num-nodes", "2"]
    argv += ["--out", str(out), "--run-config", "pretrain-passes=500", "--no-progress"]
    status, seconds = _signal_mid_run(argv, "SuperNodes connected", signal.SIGTERM, tmp_path)
    assert status == 143 and seconds < 30
    assert not (out / "results.json").exists()
