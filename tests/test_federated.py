"""Federated pipeline in Flower's simulation runtime (Ray), on the synthetic checkerboard."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import session_members, stop_session

from clients.records import from_record_dict
from peel_fed.audit import NodeSecrets, audit
from peel_fed.fedconfig import ConfigError, FedConfig
from peel_fed.loading import load_dataset
from peel_fed.partition import partition_users, user_rng


def test_partitions_cover_all_users_once():
    for n_parts in (1, 3, 7):
        parts = [partition_users(20, n_parts, p) for p in range(n_parts)]
        assert np.array_equal(np.concatenate(parts), np.arange(20))
        assert max(p.size for p in parts) - min(p.size for p in parts) <= 1
    with pytest.raises(ValueError, match="more partitions"):
        partition_users(3, 4, 0)
    with pytest.raises(ValueError, match="partition-id"):
        partition_users(10, 2, 2)


def test_user_rng_depends_only_on_seed_and_user():
    a = user_rng(5, 17).random(4)
    b = user_rng(5, 17).random(4)
    c = user_rng(5, 18).random(4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_fedconfig_from_run_config_checks_keys_and_types():
    cfg = FedConfig.from_run_config({"dataset": "checkerboard", "min-nodes": 3, "node-wait-s": 5})
    assert cfg.min_nodes == 3 and cfg.node_wait_s == 5.0
    assert FedConfig.from_run_config(cfg.to_run_config()) == cfg
    with pytest.raises(ConfigError, match="unknown run-config key 'min_nodes'"):
        FedConfig.from_run_config({"min_nodes": 3})
    with pytest.raises(ConfigError, match="min-nodes must be int"):
        FedConfig.from_run_config({"min-nodes": "three"})
    with pytest.raises(ConfigError, match="min-nodes must be >= 1"):
        FedConfig.from_run_config({"min-nodes": 0})
    with pytest.raises(ConfigError, match="pretrain-negative-sampling must be one of uniform, dns"):
        FedConfig.from_run_config({"pretrain-negative-sampling": "hard"})
    with pytest.raises(ConfigError, match="pretrain-dns-candidates must be >= 1, got 0"):
        FedConfig.from_run_config({"pretrain-dns-candidates": 0})
    with pytest.raises(ConfigError, match="pretrain-lr-schedule must be one of constant, cosine"):
        FedConfig.from_run_config({"pretrain-lr-schedule": "linear"})
    dns = FedConfig.from_run_config(
        {"pretrain-negative-sampling": "dns", "pretrain-lr-schedule": "cosine"}
    ).lightgcn()
    assert (dns.negative_sampling, dns.lr_schedule, dns.rounds) == ("dns", "cosine", 20 * 4)


FAILING_PARTITION = 1
SLOW_PARTITION = 2  # answers query.group after the round timeout
SLOW_TIMEOUT_S = 30.0  # every round of this run waits at most this; 20 s timed out under load
# every phase's device action fails once on partition 1 (pretraining: its first training round)
FAIL_ONCE = (
    "query.stats",
    "train.pretrain",
    "query.kmeans",
    "query.planes",
    "train.pee",
    "evaluate.budgets",
)
SMALL_RUN = dict(
    pretrain_passes=4,
    pretrain_cohort_fraction=0.5,
    pretrain_local_steps=1,
    num_user_groups=2,
    kmeans_iters=3,
    pee_rounds=4,
    pee_cohort_fraction=0.5,
    num_item_groups=4,
    num_blocks=4,
    dim=16,
    budgets="25%,50%,100%",
    device_budgets="50%,100%",
    progress=False,
    round_timeout_s=60.0,
    evaluate_timeout_s=120.0,
)


def _state_arrays(context) -> dict[str, np.ndarray]:
    out = {}
    for name, rec in context.state.array_records.items():
        for key, arr in rec.items():
            out[f"{name}/{key}"] = arr.numpy()
    return out


@pytest.fixture(scope="session")
def failing_run(tmp_path_factory):
    """One Ray simulation of the whole pipeline, 4 nodes, partition 1 failing once per phase;
    every reply is recorded, and every device state is snapshotted after every message."""
    from sim.simulate import run_federated_simulation

    marks = tmp_path_factory.mktemp("marks")
    snaps = tmp_path_factory.mktemp("snapshots")
    out = tmp_path_factory.mktemp("fed")
    uploads: list = []

    def fail_once_per_phase(msg, context, call_next):
        pid = int(context.node_config["partition-id"])
        kind = msg.metadata.message_type
        step = ""
        if kind == "train.pretrain":
            step = str(msg.content.config_records["pretrain"]["step"])
        mark = marks / f"{pid}-{kind}"
        if pid == FAILING_PARTITION and kind in FAIL_ONCE and step in ("", "round"):
            if not mark.exists():
                mark.touch()
                raise RuntimeError(f"injected device failure in {kind}")
        slow = marks / f"{pid}-{kind}-slow"
        if pid == SLOW_PARTITION and kind == "query.group" and not slow.exists():
            slow.touch()
            time.sleep(SLOW_TIMEOUT_S + 5)  # the server has moved on without this reply
        reply = call_next(msg, context)
        np.savez(snaps / f"{pid}-{uuid.uuid4().hex}.npz", **_state_arrays(context))
        return reply

    class AuditGrid:
        """The real grid, recording every reply a device sends to the server."""

        def __init__(self, grid):
            self._grid = grid

        def __getattr__(self, name):
            return getattr(self._grid, name)

        def pull_messages(self, message_ids):
            replies = list(self._grid.pull_messages(message_ids))
            uploads.extend(replies)
            return replies

    cfg = FedConfig.from_run_config(
        {
            **FedConfig(
                dataset="checkerboard", min_nodes=4, out_dir=str(out), **SMALL_RUN
            ).to_run_config(),
            "round-timeout-s": SLOW_TIMEOUT_S,
            "secure-rows": True,  # training rows by secure aggregation (packing run: clear)
        }
    )
    report = run_federated_simulation(
        cfg, 4, mods=[fail_once_per_phase], wrap_grid=AuditGrid, num_cpus=2
    )
    return report, out, uploads, snaps


def test_full_run_survives_a_device_failing_in_every_phase(failing_run):
    report, out, _, _ = failing_run
    ds = load_dataset("checkerboard")
    lost = partition_users(ds.n_users, 4, FAILING_PARTITION)
    # statistics: the failing node's users are missing from the secure sums
    assert report["dataset"]["users"] == ds.n_users - lost.size
    alive = ~np.isin(ds.train.users, lost)
    assert report["dataset"]["train"] == int(alive.sum())
    fails = report["failures"]
    for phase in ("stats", "pretrain", "kmeans", "planes", "pee", "evaluate"):
        assert fails[phase]["failed_replies"] == 1, [
            (p["phase"], p["failures"]) for p in report["phases"] if p["failures"]
        ]
        assert list(fails[phase]["by_node"].values()) == [1]
    assert fails["final"]["failed_replies"] == 0
    # the slow node timed out in grouping: no group known for it, so it sat out PEE learning
    assert fails["group"]["failed_replies"] == 1
    failures = [f for p in report["phases"] for f in p["failures"].values()]
    assert sum("injected device failure" in f for f in failures) == len(FAIL_ONCE)
    assert sum("no reply (timeout" in f for f in failures) == 1
    assert len(failures) == len(FAIL_ONCE) + 1
    # evaluation: the failing node's users are not in the averages
    has_test = np.bincount(ds.test.users, minlength=ds.n_users) > 0
    counted = int(has_test.sum() - has_test[lost].sum())
    assert {r["users"] for r in report["rows"]} == {counted}
    assert sum(d["users"] for d in report["drill"] if d["fraction_of_own"] == 1.0) == counted
    assert len(report["evaluated_nodes"]) == 3
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == report["rows"]
    assert (out / "results.md").read_text().startswith("## Federated PEEL on checkerboard")
    assert (out / "recall_vs_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_federated_peel_ranks_the_checkerboard_well(failing_run):
    report = failing_run[0]
    ds = load_dataset("checkerboard")
    full = {r["method"]: r for r in report["rows"] if r["budget_fraction"] == 1.0}
    # a random ranking of the ~150 unseen items puts ~13% of test items in a top 20 (this short
    # run reaches about twice that)
    candidates = ds.n_items - np.bincount(ds.train.users, minlength=ds.n_users).mean()
    for method in ("PEEL bit-planes (G_u=2)", "PEEL blocks (G_u=2)"):
        assert full[method]["recall@20"] > 1.5 * 20 / candidates, method
    assert report["bytes"]["pretrain"]["up_bytes_total"] > 0
    # the node that failed the statistics phase still trains and joins a group; the slow node's
    # group counts never arrived
    slow = partition_users(ds.n_users, 4, SLOW_PARTITION).size
    assert sum(report["user_group_sizes"]) == ds.n_users - slow


def _values(reply):
    """Every array and config value in a reply, as numpy arrays (none for error replies)."""
    out = []
    if not reply.has_content():
        return out
    for rec in reply.content.values():
        for value in rec.values():
            if hasattr(value, "numpy"):
                out.append(value.numpy())
            elif isinstance(value, (bytes, str)):
                out.append(
                    np.frombuffer(
                        value.encode() if isinstance(value, str) else value, dtype=np.uint8
                    )
                )
            else:
                out.append(np.atleast_1d(np.asarray(value)))
    return out


def test_no_upload_carries_an_interaction_list_or_a_user_vector(failing_run):
    """Audit every message the devices sent in the full run against every device's data and
    every user vector any device ever held (ego vectors, final vectors, PEE vectors)."""
    _, _, uploads, snaps = failing_run
    ds = load_dataset("checkerboard")
    bounds = ds.train.user_bounds(ds.n_users)
    lists, counts = [], []
    for u in range(ds.n_users):
        lists.append(np.sort(ds.train.items[bounds[u] : bounds[u + 1]]))
    for pid in range(4):
        users = partition_users(ds.n_users, 4, pid)
        counts.append(
            np.bincount(ds.train.items[np.isin(ds.train.users, users)], minlength=ds.n_items)
        )
        for u in users:
            counts.append(np.bincount(lists[u], minlength=ds.n_items))
    vectors = []
    for f in snaps.glob("*.npz"):
        with np.load(f) as z:
            for key in ("pretrain/U0", "user-vectors/vectors", "pee/vecs"):
                if key in z.files:
                    vectors.append(z[key].reshape(-1, z[key].shape[-1]))
    vectors = np.unique(np.concatenate(vectors), axis=0)
    assert vectors.shape[0] >= 3 * ds.n_users  # the snapshots saw ego, final and PEE vectors
    vec_set = {v.astype(np.float32).tobytes() for v in vectors}
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    checked = 0
    for reply in uploads:
        kind = reply.metadata.message_type
        for value in _values(reply):
            if kind.startswith("train.") and value.dtype.kind == "f":
                # secure rows: no training row may even be a scaled copy of a user vector
                rows = value.reshape(-1, value.shape[-1]) if value.ndim else value.reshape(1, 1)
                if rows.shape[1] == 16:
                    norms = np.linalg.norm(rows, axis=1)
                    cos = np.abs(rows[norms > 0] / norms[norms > 0, None] @ unit.T)
                    assert not (cos > 0.99).any(), "a training row is collinear with a vector"
            flat = value.ravel()
            if value.dtype.kind in "iu" and value.dtype != np.uint8:
                srt = np.sort(flat)
                for secret in lists:
                    assert not np.array_equal(srt, secret), "an upload is a user's item list"
            if flat.size == ds.n_items:
                for secret in counts:
                    assert not np.array_equal(flat, secret), "an upload is an item-count vector"
            if value.dtype.kind == "f" and value.shape[-1:] == (16,):
                rows = value.reshape(-1, 16).astype(np.float32)
                assert not any(r.tobytes() in vec_set for r in rows), "an upload is a user vector"
            checked += 1
    assert checked > 50
    # what the server can decode (fixed point, masked or not) holds no user's data either
    everyone = NodeSecrets.of_users(np.arange(ds.n_users), ds.train, ds.n_users, ds.n_items)
    everyone.item_counts += counts
    decoded = [
        (r.metadata.message_type, from_record_dict(r.content), everyone)
        for r in uploads
        if r.has_content()
    ]
    assert sum("secagg" in c.arrays for _, c, _ in decoded) > 20
    assert audit(decoded) == []


def _listening_sockets(pids) -> set[tuple[int, str, int]]:
    """``(pid, ip, port)`` of every listening TCP socket the processes ``pids`` hold (Linux:
    ``/proc/net/tcp*`` for the sockets, ``/proc/PID/fd`` for their owners)."""
    listen = {}
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        for fields_ in (line.split() for line in lines):
            if fields_[3] == "0A":  # TCP_LISTEN
                ip_hex, port_hex = fields_[1].split(":")
                raw = bytes.fromhex(ip_hex)  # 32-bit words, each in the machine's byte order
                if sys.byteorder == "little":
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                ip = str(ipaddress.ip_address(raw))
                listen[f"socket:[{fields_[9]}]"] = (ip, int(port_hex, 16))
    out = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # gone, or not ours
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target in listen:
                out.add((pid, *listen[target]))
    return out


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or bool(
        getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback
    )


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


class RayWatch:
    """A grid wrapper that, after every batch of replies (all of Ray's processes are up by then),
    records the GCS this driver is connected to, every process below this one (session id and
    command line) and the listening TCP sockets of those and of this process."""

    def __init__(self):
        self.gcs: set[str] = set()
        self.processes: dict[int, tuple[int, str]] = {}
        self.sockets: dict[tuple[int, str, int], str] = {}

    def __call__(self, grid):
        self._grid = grid
        return self

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def pull_messages(self, message_ids):
        replies = list(self._grid.pull_messages(message_ids))
        if replies:
            import ray

            from sim.local_federation import descendants

            self.gcs.add(ray.get_runtime_context().gcs_address)
            pids = {os.getpid(), *descendants(os.getpid())}
            for pid in pids - set(self.processes):
                try:
                    self.processes[pid] = (os.getsid(pid), _command(pid))
                except ProcessLookupError:
                    pass
            for sock in _listening_sockets(pids):
                self.sockets.setdefault(sock, _command(sock[0]))
        return replies

    def seen(self, name: str) -> set[int]:
        """Session ids of the processes seen whose command line has ``name``."""
        return {sid for sid, cmd in self.processes.values() if name in cmd}

    def outside_loopback(self) -> list[str]:
        return [
            f"{ip}:{port} {cmd[:80]}"
            for (_, ip, port), cmd in self.sockets.items()
            if not _is_loopback(ip)
        ]


TINY_CFG = FedConfig(dataset="checkerboard-tiny", min_nodes=3, **SMALL_RUN)


@pytest.fixture(scope="session")
def packing_runs():
    """The same tiny federation with one user per node, in process (``LocalGrid``: the same
    ServerApp and ClientApp, no Ray), and with four users per node in Ray's simulation; that
    run's Ray (started here) is watched: its listening sockets and GCS."""
    from sim.local_grid import LocalGrid, server_identity
    from sim.simulate import run_federated_simulation
    from strategies.server_app import run_pipeline

    ds = load_dataset("checkerboard-tiny")
    with tempfile.TemporaryDirectory() as out, server_identity():
        cfg = {**TINY_CFG.to_run_config(), "min-nodes": ds.n_users, "out-dir": out}
        one_each = run_pipeline(LocalGrid(ds.n_users), FedConfig.from_run_config(cfg))
    watch = RayWatch()
    packed = run_federated_simulation(TINY_CFG, 3, num_cpus=2, wrap_grid=watch)
    return one_each, packed, watch


def test_packing_users_into_nodes_does_not_change_the_metrics(packing_runs):
    one_each, packed, _ = packing_runs
    assert_same_metrics(one_each, packed)
    assert len(one_each["nodes"]) == 12 and len(packed["nodes"]) == 3
    # clear row uploads: a lone device sends a small fraction of a dense upload
    assert 0 < one_each["bytes"]["pretrain"]["sparse_over_dense"] < 0.5


def assert_same_metrics(a_run: dict, b_run: dict) -> None:
    assert a_run["user_group_sizes"] == b_run["user_group_sizes"]
    for a, b in zip(a_run["rows"], b_run["rows"], strict=True):
        assert a["method"] == b["method"] and a["users"] == b["users"]
        assert a["recall@20"] == pytest.approx(b["recall@20"], abs=1e-6)
        assert a["ndcg@20"] == pytest.approx(b["ndcg@20"], abs=1e-5)
    for a, b in zip(a_run["drill"], b_run["drill"], strict=True):
        assert a["recall@20"] == pytest.approx(b["recall@20"], abs=1e-6)
    np.testing.assert_allclose(
        np.array(a_run["unit_weights"]), np.array(b_run["unit_weights"]), atol=1e-4
    )


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="lists sockets through /proc")
def test_the_simulation_s_ray_listens_on_loopback_only(packing_runs):
    watch = packing_runs[2]
    # the watch saw the servers of the Ray this run started (the GCS, the raylet, the actors, the
    # runtime-env agent) and of this driver
    listening = " ".join(watch.sockets.values())
    for name in ("gcs_server", "raylet", "ClientAppActor", "RuntimeEnvAgent"):
        assert name in listening, (name, watch.sockets)
    assert any(pid == os.getpid() for pid, _, _ in watch.sockets)
    assert len(watch.gcs) == 1 and _is_loopback(next(iter(watch.gcs)).rsplit(":", 1)[0])
    assert watch.outside_loopback() == []


def test_run_config_defaults_match_fedconfig():
    from pathlib import Path

    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    defaults = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    assert FedConfig.from_run_config(defaults) == FedConfig()
    assert set(defaults) == set(FedConfig().to_run_config())


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="lists sockets through /proc")
def test_the_simulation_attaches_to_a_running_ray_cluster(packing_runs, tmp_path):
    """A head started as docs/federated.md says (on 127.0.0.1, so single-node and on loopback);
    the tiny run attaches to it, starts no Ray of its own and gives the metrics of the run that
    started its own Ray."""
    from sim.local_federation import free_port
    from sim.simulate import RAY_MULTI_NODE, run_federated_simulation

    port, client_port = free_port(), free_port()
    # Ray's socket paths (temp dir + session + sockets/plasma_store) must stay under 107 bytes:
    # tmp_path is too deep, so the head's temp dir is a short one, removed below
    temp = Path(tempfile.mkdtemp(prefix="pf-ray-"))
    log = tmp_path / "ray-head.log"
    head = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--ray-client-server-port={client_port}",
            f"--temp-dir={temp}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env={**os.environ, RAY_MULTI_NODE: "0"},
        start_new_session=True,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    watch = RayWatch()
    try:
        deadline = time.monotonic() + 60
        while not (temp / "ray_current_cluster").exists():  # written once the head is up
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        report = run_federated_simulation(
            TINY_CFG, 3, wrap_grid=watch, ray_address=f"127.0.0.1:{port}"
        )
        head_sockets = _listening_sockets(session_members(head.pid))
    finally:
        left = stop_session(head)
        shutil.rmtree(temp, ignore_errors=True)
    assert left == [], [_command(p) for p in left]
    assert watch.gcs == {f"127.0.0.1:{port}"}  # the driver joined the head's GCS
    # every Ray process the run used is the head's: it started none of its own
    for name in ("gcs_server", "raylet", "ClientAppActor"):
        assert watch.seen(name) == {head.pid}, (name, watch.processes)
    assert watch.outside_loopback() == []
    assert head_sockets and all(_is_loopback(ip) for _, ip, _ in head_sockets), head_sockets
    assert_same_metrics(report, packing_runs[1])
