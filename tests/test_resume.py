"""Resume after a server crash: checkpoints (``strategies.checkpoint``), device state on file
(``clients.state.DeviceStore``), and a run that, resumed, ends as an uninterrupted one.

The pipeline runs in process on ``LocalGrid`` (no Ray, no SuperLink); a crash is an exception
the grid raises in place of the server's Nth exchange of some type, and the resumed run gets a
fresh grid: new node ids and devices whose memory (``context.state``) is gone. The deployment
test with real processes killed by PID is in ``test_deploy.py``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import set_server_identity
from flwr.app import Context, RecordDict
from test_adapters import SMALL
from test_federated import assert_same_metrics

from clients.state import DeviceStore
from peel_fed.clustering import fold_in_user_vectors
from peel_fed.data import split_validation
from peel_fed.fedconfig import ConfigError, FedConfig
from peel_fed.loading import load_dataset
from peel_fed.partition import partition_users
from sim.local_grid import LocalGrid, node_context
from strategies.checkpoint import CheckpointError
from strategies.server_app import run_pipeline


class Crash(BaseException):
    """The server process dies (not an error the pipeline could handle)."""


class CrashingGrid(LocalGrid):
    """Raises ``Crash`` once the devices did the ``nth`` exchange of ``message_type``, before
    the server reads their replies (the hard case: devices are a round ahead of the server);
    node ``first_id + p`` hosts partition p, or partition n - 1 - p with ``reverse`` (a
    restarted federation has new ids, in any order). ``snapshot`` copies the devices' state
    folder just before the crashing exchange: the state that matches the last checkpoint."""

    def __init__(
        self,
        num_nodes: int,
        message_type: str = "",
        nth: int = 0,
        first_id: int = 100,
        reverse: bool = False,
        snapshot: tuple[Path, Path] | None = None,
    ):
        super().__init__(num_nodes)
        part = (lambda p: num_nodes - 1 - p) if reverse else (lambda p: p)
        self.contexts = {
            first_id + p: node_context(first_id + p, part(p), num_nodes) for p in range(num_nodes)
        }
        self.message_type, self.nth, self.seen, self.snapshot = message_type, nth, 0, snapshot

    def push_messages(self, messages):
        crash = bool(messages) and messages[0].metadata.message_type == self.message_type
        self.seen += crash
        if crash and self.seen == self.nth and self.snapshot:
            shutil.copytree(*self.snapshot)
        ids = super().push_messages(messages)
        if crash and self.seen == self.nth:
            raise Crash
        return ids


def _cfg(tmp_path, **over) -> FedConfig:
    base = dict(
        SMALL,
        out_dir=str(tmp_path / "out"),
        device_state_dir=str(tmp_path / "devices"),
        pretrain_passes=2,
    )
    return FedConfig(**{**base, **over})


MODES = {
    "clear": {},
    "secure rows": {"secure_rows": True},
    "central DP": {"dp_clip": 1.0, "dp_noise_multiplier": 0.5},
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of each mode."""
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        set_server_identity(mp)
        for mode, over in MODES.items():
            runs[mode] = run_pipeline(CrashingGrid(3), _cfg(tmp_path_factory.mktemp(mode), **over))
    return runs


def _resume(cfg: FedConfig, **grid) -> dict:
    return run_pipeline(CrashingGrid(3, first_id=200, **grid), replace(cfg, resume=True))


@pytest.mark.parametrize(
    ("mode", "message_type", "nth", "at"),
    [
        ("clear", "train.pretrain", 2, "pretrain init 0"),  # mid-init
        ("clear", "train.pretrain", 5, "pretrain round 1"),  # 3 init layers, round 1, round 2 dies
        ("clear", "train.pretrain", 8, "pretrain round 4"),  # the final step
        ("clear", "query.kmeans", 2, "pretrain final"),
        ("clear", "query.planes", 1, "grouping"),  # between phases
        ("clear", "train.pee", 2, "pee round 1"),
        ("clear", "evaluate.budgets", 1, "serve"),
        ("secure rows", "train.rows", 5, "pretrain round 1"),  # second half of a secure round
        ("secure rows", "train.pretrain", 6, "pretrain round 2"),  # between the halves
        ("secure rows", "train.peerows", 2, "pee round 1"),
        ("central DP", "train.pretrain", 6, "pretrain round 2"),
        ("central DP", "train.pee", 2, "pee round 1"),
    ],
)
def test_a_resumed_run_ends_as_an_uninterrupted_one(
    server_identity, uninterrupted, tmp_path, mode, message_type, nth, at
):
    cfg = _cfg(tmp_path, **MODES[mode])
    with pytest.raises(Crash):
        run_pipeline(CrashingGrid(3, message_type, nth), cfg)
    assert json.loads((tmp_path / "out" / "checkpoint.json").read_text())["at"] == at
    assert not (tmp_path / "out" / "results.json").exists()
    resumed = _resume(cfg)  # new node ids, devices' memory gone
    reference = uninterrupted[mode]
    assert resumed["resumed_after"] == at
    assert_same_metrics(reference, resumed)
    for a, b in zip(resumed["pretrain"], reference["pretrain"], strict=True):
        assert (a["round"], a["users"], a["rows"]) == (b["round"], b["users"], b["rows"])
        if a["loss"] is not None:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert sorted(resumed["evaluated_nodes"]) == [200, 201, 202]
    assert sorted(resumed["serve"]["grow_back"]) == sorted(resumed["serve"]["nodes"])
    assert sorted(resumed["serve"]["nodes"]) == ["200", "201", "202"]
    assert not any(p["failures"] for p in resumed["phases"])
    part = resumed["participation"]
    assert part["late"] == {} and set(part["gone"]) == {"100", "101", "102"}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["resumed_after"] == at
    assert json.loads((tmp_path / "out" / "checkpoint.json").read_text())["at"] == "done"
    assert not list((tmp_path / "devices").rglob("*-pending*"))  # held in memory only


def test_state_a_crash_left_past_the_checkpoint_is_never_used(server_identity, tmp_path):
    """Partition 0 trained round 3, the server died before applying it; the resumed run (new
    ids in reverse order, one node sampled per round) redoes round 3 on partition 2. Partition
    0 must go on from its state before round 3, not from the void round 3 it saved: the run
    equals one resumed from the devices' state as it was at the checkpoint."""
    cfg = _cfg(tmp_path, fraction_nodes=0.34, min_nodes=1)
    snapshot = (tmp_path / "devices", tmp_path / "at-checkpoint")
    with pytest.raises(Crash):
        run_pipeline(CrashingGrid(3, "train.pretrain", 6, snapshot=snapshot), cfg)
    shutil.copytree(tmp_path / "out", tmp_path / "out-2")
    resumed = _resume(cfg, reverse=True)
    clean = replace(cfg, out_dir=str(tmp_path / "out-2"), device_state_dir=str(snapshot[1]))
    oracle = _resume(clean, reverse=True)
    assert_same_metrics(oracle, resumed)
    for a, b in zip(resumed["pretrain"], oracle["pretrain"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_a_device_that_lost_its_state_sits_out_pretraining_and_folds_in(server_identity, tmp_path):
    """No state folder: the devices' pretraining state dies with the server's run. Resumed,
    they refuse the remaining rounds (their old contributions are in the server's sums, so
    starting over would count them twice), then rebuild their vectors by fold-in: one
    LightGCN step from their own items over the final item table."""
    cfg = _cfg(tmp_path, device_state_dir="")
    with pytest.raises(Crash):
        run_pipeline(CrashingGrid(3, "train.pretrain", 5), cfg)
    grid = CrashingGrid(3, first_id=200)
    resumed = run_pipeline(grid, replace(cfg, resume=True))
    lost = [p for p in resumed["phases"] if p["phase"] == "pretrain" and p["failed"]]
    assert len(lost) == 3  # rounds 2 to 4, every node
    reasons = {r for p in lost for r in p["failures"].values()}
    assert all("device state lost" in r for r in reasons)
    assert len(resumed["pretrain"]) == 1  # only round 1, from before the crash
    assert sorted(resumed["evaluated_nodes"]) == [200, 201, 202]
    # the vectors each device kept are the fold-in over the final table, computed here
    ds = load_dataset(SMALL["dataset"])
    fit = split_validation(ds.train, ds.n_users, 0.1, seed=0).fit
    server = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=False)["pretrain"].server
    table, degree = server.final_item_table(), np.bincount(fit.items, minlength=ds.n_items)
    bounds = fit.user_bounds(ds.n_users)
    for node, ctx in grid.contexts.items():
        users = partition_users(ds.n_users, 3, node - 200)
        own = [fit.items[bounds[u] : bounds[u + 1]] for u in users]
        want = fold_in_user_vectors(users, own, table, degree)
        got = ctx.state.array_records["user-vectors"]["vectors"].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("message_type", "nth"), [("query.planes", 1), ("train.pee", 2)])
def test_devices_that_lost_their_state_after_pretraining_fold_in_and_go_on(
    server_identity, tmp_path, message_type, nth
):
    """Crashed after pretraining, resumed with no device state: the server sends the final
    step again, so every device folds in and takes part in everything after."""
    cfg = _cfg(tmp_path, device_state_dir="")
    with pytest.raises(Crash):
        run_pipeline(CrashingGrid(3, message_type, nth), cfg)
    resumed = _resume(cfg)
    assert sorted(resumed["evaluated_nodes"]) == [200, 201, 202]
    assert sum(resumed["user_group_sizes"]) == 12
    assert not any(p["failures"] for p in resumed["phases"])


def test_resume_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="resume needs the out-dir"):
        FedConfig(**{**SMALL, "resume": True})
    cfg = _cfg(tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="nothing to resume: no checkpoint.pt in"):
        run_pipeline(LocalGrid(3), cfg)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoint.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="checkpoint .*checkpoint.pt is unreadable"):
        run_pipeline(LocalGrid(3), cfg)


def test_resume_refuses_another_run_config(server_identity, tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(Crash):
        run_pipeline(CrashingGrid(3, "train.pretrain", 1), cfg)
    other = replace(cfg, resume=True, seed=1, pee_rounds=3)
    with pytest.raises(ConfigError, match="another run config .*: pee-rounds, seed differ"):
        run_pipeline(LocalGrid(3), other)


def test_a_finished_run_is_not_resumed(server_identity, tmp_path):
    cfg = _cfg(tmp_path, pee_rounds=1, kmeans_iters=1)
    run_pipeline(LocalGrid(3), cfg)
    with pytest.raises(CheckpointError, match="finished: start a new one"):
        run_pipeline(LocalGrid(3), replace(cfg, resume=True))


def test_the_device_store_never_loads_what_a_crash_left_past_the_resume_point(tmp_path):
    """Round 2 was saved by the crashed run (epoch 0) but the resumed run restarts at 2: in
    the resumed run (epoch 1) round 2's record is void, round 1's is the one to go on from,
    and saving round 2 again replaces the void record instead of keeping it as previous."""
    crashed = DeviceStore(Context(1, 1, {}, RecordDict(), {}), tmp_path)
    for r in (1, 2):
        crashed.save("pretrain", {"x": np.full(1, float(r))}, version=r)
    resumed = DeviceStore(Context(2, 1, {}, RecordDict(), {}), tmp_path, ((2, 1),))
    assert resumed.load("pretrain", before=3)["x"].tolist() == [1.0]
    assert resumed.load("pretrain")["x"].tolist() == [1.0]
    resumed.save("pretrain", {"x": np.full(1, 2.5)}, version=2)
    fresh = DeviceStore(Context(3, 1, {}, RecordDict(), {}), tmp_path, ((2, 1),))
    assert fresh.load("pretrain", before=3)["x"].tolist() == [2.5]
    assert fresh.load("pretrain", before=2)["x"].tolist() == [1.0]  # still the previous


def test_the_device_store_rolls_back_one_round_from_its_files(tmp_path):
    """After a restart (a new context), ``load(before=r)`` finds the state of the last round
    before ``r`` on file: the latest, or the one before it when round ``r`` was already done."""
    store = DeviceStore(Context(1, 1, {}, RecordDict(), {}), tmp_path)
    for r in (1, 2, 3):
        store.save("pretrain", {"x": np.full(2, float(r))}, version=r)
    store.save("pretrain", {"x": np.full(2, 3.5)}, version=3)  # round 3's second half
    fresh = DeviceStore(Context(2, 1, {}, RecordDict(), {}), tmp_path)
    assert fresh.load("pretrain", before=4)["x"].tolist() == [3.5, 3.5]
    fresh = DeviceStore(Context(2, 1, {}, RecordDict(), {}), tmp_path)
    assert fresh.load("pretrain", before=3)["x"].tolist() == [2.0, 2.0]
    assert fresh.load("pretrain", before=2) is None  # only one round back is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrain.npz", "pretrain.prev.npz"]
    assert (tmp_path / "pretrain.npz").stat().st_mode & 0o077 == 0  # the owner's only
    memory_only = DeviceStore(Context(3, 1, {}, RecordDict(), {}))
    memory_only.save("pretrain", {"x": np.zeros(1)}, version=1)
    assert memory_only.load("pretrain", before=1) is None
    assert memory_only.load("pretrain", before=2)["x"].tolist() == [0.0]
