"""Resume after a server crash: checkpoints (``strategies.checkpoint``), device state on file
(``clients.state.DeviceStore``), and a run that, resumed, ends as an uninterrupted one.

The pipeline runs in process on ``LocalGrid`` (no Ray, no SuperLink); a crash is an exception
the grid raises in place of the server's Nth exchange of some type, and the resumed run gets a
fresh grid: new node ids and devices whose memory (``context.state``) is gone. The deployment
test with real processes killed by PID is in ``test_deploy.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import set_server_identity
from flwr.app import Context, RecordDict
from test_adapters import SMALL, LocalGrid, _context
from test_federated import assert_same_metrics

from clients.state import DeviceStore
from peel_fed.fedconfig import ConfigError, FedConfig
from strategies.checkpoint import CheckpointError
from strategies.server_app import run_pipeline


class Crash(BaseException):
    """The server process dies (not an error the pipeline could handle)."""


class CrashingGrid(LocalGrid):
    """Raises ``Crash`` once the devices did the ``nth`` exchange of ``message_type``, before
    the server reads their replies (the hard case: devices are a round ahead of the server);
    nodes ``first_id + p`` (a restarted federation has new ids)."""

    def __init__(self, num_nodes: int, message_type: str = "", nth: int = 0, first_id: int = 100):
        super().__init__(num_nodes)
        self.contexts = {
            first_id + p: _context(first_id + p, p, num_nodes) for p in range(num_nodes)
        }
        self.message_type, self.nth, self.seen = message_type, nth, 0

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        if messages and messages[0].metadata.message_type == self.message_type:
            self.seen += 1
            if self.seen == self.nth:
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


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as mp:
        set_server_identity(mp)
        return run_pipeline(CrashingGrid(3), _cfg(tmp))


@pytest.mark.parametrize(
    ("message_type", "nth", "at"),
    [
        ("train.pretrain", 5, "pretrain round 1"),  # 3 init layers, round 1, then round 2 dies
        ("query.planes", 1, "grouping"),  # between phases
        ("train.pee", 2, "pee round 1"),
    ],
)
def test_a_resumed_run_ends_as_an_uninterrupted_one(
    server_identity, uninterrupted, tmp_path, message_type, nth, at
):
    cfg = _cfg(tmp_path)
    with pytest.raises(Crash):
        run_pipeline(CrashingGrid(3, message_type, nth), cfg)
    assert json.loads((tmp_path / "out" / "checkpoint.json").read_text())["at"] == at
    assert not (tmp_path / "out" / "results.json").exists()
    restarted = CrashingGrid(3, first_id=200)  # new node ids, devices' memory gone
    resumed = run_pipeline(restarted, FedConfig(**{**cfg.__dict__, "resume": True}))
    assert resumed["resumed_after"] == at
    assert_same_metrics(uninterrupted, resumed)
    for a, b in zip(resumed["pretrain"], uninterrupted["pretrain"], strict=True):
        assert (a["round"], a["users"], a["rows"]) == (b["round"], b["users"], b["rows"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    part = resumed["participation"]
    assert part["late"] == {} and set(part["gone"]) == {"100", "101", "102"}
    assert sorted(resumed["evaluated_nodes"]) == [200, 201, 202]
    assert not any(p["failures"] for p in resumed["phases"])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["resumed_after"] == at


def test_a_device_that_lost_its_state_sits_out_pretraining_and_folds_in(
    server_identity, uninterrupted, tmp_path
):
    """No state folder: the devices' pretraining state dies with the server's run. Resumed,
    they refuse the remaining rounds (their old contributions are in the server's sums, so
    starting over would count them twice), then rebuild their vectors by fold-in."""
    cfg = _cfg(tmp_path, device_state_dir="")
    with pytest.raises(Crash):
        run_pipeline(CrashingGrid(3, "train.pretrain", 5), cfg)
    resumed = run_pipeline(
        CrashingGrid(3, first_id=200), FedConfig(**{**cfg.__dict__, "resume": True})
    )
    lost = [p for p in resumed["phases"] if p["phase"] == "pretrain" and p["failed"]]
    assert len(lost) == 3  # rounds 2 to 4, every node
    reasons = {r for p in lost for r in p["failures"].values()}
    assert all("device state lost" in r for r in reasons)
    assert len(resumed["pretrain"]) == 1  # only round 1, from before the crash
    assert sorted(resumed["evaluated_nodes"]) == [200, 201, 202]
    full = [r["recall@20"] for r in resumed["rows"] if r["budget_fraction"] == 1.0]
    assert full and all(0 < r <= 1 for r in full)  # folded-in vectors still rank


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
    other = FedConfig(**{**cfg.__dict__, "resume": True, "seed": 1, "pee_rounds": 3})
    with pytest.raises(ConfigError, match="another run config .*: pee-rounds, seed differ"):
        run_pipeline(LocalGrid(3), other)


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
