"""The server's checkpoint: written after every phase and training round, read by a resumed run.

``<out-dir>/checkpoint.pt`` holds what the ServerApp needs to go on: the finished phases'
results (statistics, grouping, bit-plane orders), the phase in progress with its server tables,
optimiser moments, controllers, round counter and random streams (the strategy objects
themselves, pickled with ``torch.save``), the exchange log the report is built from, and the
run's job name. ``checkpoint.json`` beside it says, for people, where the run stands.

Each write replaces the file atomically, so a crash leaves the previous checkpoint or the new one.
A checkpoint is read back by the same code that wrote it (pickled objects, not a file format).
Devices keep their own state (:class:`clients.state.DeviceStore`); the job name lets a resumed
run find it.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from peel_fed.atomic import write_atomic, write_json_atomic
from peel_fed.console import log
from peel_fed.fedconfig import ConfigError, FedConfig

if TYPE_CHECKING:
    from strategies.stats import StatsResult

DONE = 2**62  # a resume point past every version: that phase finished
CHECKPOINT = "checkpoint.pt"
SUMMARY = "checkpoint.json"
# run-config keys a resumed run may change: how long to wait, what to print and where the
# run's folders are (moved with their files), not the run; nor does the secure-aggregation
# protocol (each secure sum is a session of its own, and both protocols give the same sums), so
# a checkpoint written before the keys existed resumes too
MAY_CHANGE = {
    "secagg",
    "secagg-threshold",
    "secagg-neighbours",
    "resume",
    "out-dir",
    "device-state-dir",
    "progress",
    "timing",
    "node-wait-s",
    "round-timeout-s",
    "evaluate-timeout-s",
    "min-nodes",
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of another run (bad input: one line)."""


class Checkpoint:
    """The checkpoint of a run with ``cfg``: loaded when ``cfg.resume``, else started fresh.

    Without an ``out-dir`` nothing is written (and devices keep their state in memory only).
    """

    def __init__(self, cfg: FedConfig) -> None:
        self.path = Path(cfg.out_dir) / CHECKPOINT if cfg.out_dir else None
        self.state: dict[str, Any] = {}
        if cfg.resume:
            self._load(cfg)
            self.state["resume_points"] = [*self.resume_points, self._resume_point(cfg)]
        else:  # replaces an earlier run's checkpoint at once: a crash now resumes this job
            self.state = {"job": uuid.uuid4().hex[:16] if self.path else "", "config": _run(cfg)}
            self.save("start")

    @property
    def resume_points(self) -> tuple[tuple[int, int], ...]:
        """For each resumption so far, the first (pretraining version, PEE round) it redid."""
        return tuple(tuple(p) for p in self.state.get("resume_points", []))

    def _resume_point(self, cfg: FedConfig) -> tuple[int, int]:
        """Where this resumption starts: the pretraining version (``init`` of layer k is
        ``k - layers``, round r is r) and the PEE round the checkpoint's phases go on from."""
        pre, pee = self.state.get("pretrain"), self.state.get("pee")
        if pre is None:
            pretrain = -cfg.layers
        elif pre.finished:
            pretrain = DONE
        elif pre.next_layer < cfg.layers:
            pretrain = pre.next_layer - cfg.layers
        else:
            pretrain = pre.next_round
        return pretrain, (1 if pee is None else pee.next_round)

    @property
    def job(self) -> str:
        """The run's name on the devices, the same in a resumed run."""
        return self.state["job"]

    @property
    def at(self) -> str:
        """Where the run stood at the last write ("" before the first)."""
        return self.state.get("at", "")

    def get(self, name: str, default: Any = None) -> Any:
        return self.state.get(name, default)

    def save(self, at: str, **objects: Any) -> None:
        """Record ``objects`` (replacing earlier ones of the same names) as the state ``at`` a
        point of the run, e.g. "pretrain round 3", and write the checkpoint."""
        self.state.update(objects)
        self.state["at"] = at
        if self.path is None:
            return
        write_atomic(self.path, lambda fh: torch.save(self.state, fh), mode=0o600)
        write_json_atomic(
            self.path.with_name(SUMMARY),
            {"job": self.job, "at": at, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        )

    def _load(self, cfg: FedConfig) -> None:
        assert self.path is not None  # FedConfig refuses resume without out-dir
        if not self.path.is_file():
            raise CheckpointError(f"nothing to resume: no {CHECKPOINT} in {self.path.parent}")
        try:
            state = torch.load(self.path, weights_only=False)
            saved = state["config"]
        except Exception as exc:  # noqa: BLE001 (any unreadable file is the same error)
            raise CheckpointError(f"checkpoint {self.path} is unreadable: {exc}") from None
        if state.get("at") == "done":
            raise CheckpointError(
                f"the run in {self.path.parent} finished: start a new one (without resume)"
            )
        now = _run(cfg)
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed:
            raise ConfigError(
                f"resume with another run config than the checkpoint's: {', '.join(changed)} differ"
            )
        self.state = state


def _run(cfg: FedConfig) -> dict[str, Any]:
    """The run-config values that define the run (a resumed run must repeat them)."""
    return {k: v for k, v in cfg.to_run_config().items() if k not in MAY_CHANGE}


def check_same_federation(saved: StatsResult, now: StatsResult) -> None:
    """A resumed run's statistics against the checkpoint's: data the crashed run never had (more
    users or interactions, another item count) is refused in one line; missing users (a node
    that did not come back) are reported, and the run goes on with the checkpoint's."""
    if now.n_items != saved.n_items:
        raise CheckpointError(
            f"the resumed federation has {now.n_items} items, the checkpoint {saved.n_items}"
        )
    grown = now.users > saved.users or bool(np.any(now.train_popularity > saved.train_popularity))
    if grown:
        raise CheckpointError(
            "the resumed federation holds data the checkpointed run did not "
            f"({now.users} users against {saved.users}): resume with the same nodes and data"
        )
    if now.users < saved.users:
        log(f"resumed with {now.users} of the run's {saved.users} users: the others sit it out")
