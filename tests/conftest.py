"""Shared fixtures: tiny synthetic data and the few trained models the suite reuses."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from peel_fed.lightgcn import LightGCNConfig, train_lightgcn
from peel_fed.synthetic import checkerboard
from sim.flower_env import configure_flower_env

torch.set_num_threads(1)

# Flower writes under FLWR_HOME even with telemetry off: keep it out of the user's home.
configure_flower_env()


def pytest_configure(config):
    # torch's beta-feature notices for sparse tensors are noise in the test report.
    config.addinivalue_line("filterwarnings", "ignore:Sparse CSR tensor support:UserWarning")
    config.addinivalue_line("filterwarnings", "ignore:Sparse invariant checks:UserWarning")


BOARD_CFG = dict(dim=16, epochs=40, batch_size=256, lr=1e-2, num_blocks=4)


@pytest.fixture(scope="session")
def board():
    """Two clusters of users and items; users only like their own cluster's items."""
    return checkerboard(n_users=120, n_items=80, n_clusters=2, p_in=0.3, p_out=0.0)


@pytest.fixture(scope="session")
def board_model(board):
    """LightGCN trained on ``board`` (no diversity regulariser): (model, user_emb, item_emb)."""
    cfg = LightGCNConfig(**BOARD_CFG)
    model = train_lightgcn(board.n_users, board.n_items, board.train, cfg, seed=0)
    user_emb, item_emb = model.final_embeddings()
    return model, user_emb, item_emb


@pytest.fixture(scope="session")
def board_model_diverse(board):
    """Same data, seed and config as ``board_model`` but with a strong diversity regulariser."""
    cfg = LightGCNConfig(**BOARD_CFG, diversity_weight=1.0)
    model = train_lightgcn(board.n_users, board.n_items, board.train, cfg, seed=0)
    return model.final_embeddings()


def _write_lightgcn_folder(folder, train: dict, test: dict, gz: bool = False, extra=None):
    """Write ``{user: [items]}`` dicts as LightGCN ``train``/``test`` files (optionally gzip)."""
    import gzip

    folder.mkdir(parents=True, exist_ok=True)
    for stem, rows in (("train", train), ("test", test)):
        text = "".join(" ".join(str(v) for v in [u, *items]) + "\n" for u, items in rows.items())
        if gz:
            with gzip.open(folder / f"{stem}.txt.gz", "wt", encoding="ascii") as fh:
                fh.write(text)
        else:
            (folder / f"{stem}.txt").write_text(text, encoding="ascii")
    for name, text in (extra or {}).items():
        (folder / name).write_text(text, encoding="ascii")
    return folder


@pytest.fixture(scope="session")
def write_lightgcn_folder():
    """The folder writer, as a fixture so that test modules need no import tricks."""
    return _write_lightgcn_folder


# --- processes (signal and Ray-cluster tests; Linux /proc) ---------------------------------
def session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``: a ``ray start`` started in its own
    session, and every process it spawned, daemons that outlive it included."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if state[0] != "Z" and int(state[3]) == sid:  # fields after the name: state ppid pgrp sid
            out.append(int(entry.name))
    return out


def stop_session(proc: subprocess.Popen, grace_s: float = 20.0) -> list[int]:
    """Stop ``proc`` (``ray start --block`` stops its Ray on SIGTERM), then whatever of its
    session is left: SIGTERM, then SIGKILL, to each of the session's process groups (a group
    never reaches outside its session). Returns the survivors (none)."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        groups = set()
        for pid in session_members(proc.pid):
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s / 2
        while session_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    return session_members(proc.pid)


@pytest.fixture
def server_identity(monkeypatch):
    """What a running ServerApp sets before it builds messages."""
    set_server_identity(monkeypatch)


def set_server_identity(mp: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        mp.setattr(TaskIdentity, name, 1)


@pytest.fixture(autouse=True)
def _server_not_stopped():
    """A test that interrupted a run (Ctrl-C, SIGTERM) leaves the server's stop flag set for
    the process; a pipeline run in process by a later test must not see it."""
    from strategies.phases import STOP

    STOP.clear()
