"""Federated pipeline in Flower's simulation runtime (Ray), on the synthetic checkerboard."""

from __future__ import annotations

import json

import numpy as np
import pytest

from peel_fed.data import load_dataset
from peel_fed.fedconfig import ConfigError, FedConfig
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


FAILING_PARTITION = 1


@pytest.fixture(scope="session")
def simulated_stats(tmp_path_factory):
    """One Ray-backed simulation of the pipeline with 4 nodes (shared: Ray starts cost ~12 s)."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from strategies.server_app import run_pipeline

    def fail_on_partition_1(msg, context, call_next):
        # a device that crashes in the statistics phase, after the key exchange
        failing = int(context.node_config["partition-id"]) == FAILING_PARTITION
        if failing and msg.metadata.message_type == "query.stats":
            raise RuntimeError("injected device failure")
        return call_next(msg, context)

    class AuditGrid:
        """The real grid, recording every reply a device sends to the server."""

        def __init__(self, grid):
            self._grid = grid

        def __getattr__(self, name):
            return getattr(self._grid, name)

        def send_and_receive(self, messages, *, timeout=None):
            replies = list(self._grid.send_and_receive(messages, timeout=timeout))
            captured.setdefault("uploads", []).extend(replies)
            return replies

    out = tmp_path_factory.mktemp("fed")
    captured: dict = {}
    server = ServerApp()

    @server.main()
    def _main(grid, context):
        cfg = FedConfig(dataset="checkerboard", min_nodes=4, out_dir=str(out))
        captured["report"] = run_pipeline(AuditGrid(grid), cfg)

    run_simulation(
        server_app=server,
        client_app=make_client_app(mods=[fail_on_partition_1]),
        num_supernodes=4,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    return captured["report"], out, captured["uploads"]


def test_stats_phase_survives_a_failing_device(simulated_stats):
    report, out, _ = simulated_stats
    ds = load_dataset("checkerboard")
    lost = partition_users(ds.n_users, 4, FAILING_PARTITION)
    alive = ~np.isin(ds.train.users, lost)
    assert report["users"] == ds.n_users - lost.size
    expected = np.bincount(ds.train.items[alive], minlength=ds.n_items)
    assert np.array_equal(np.array(report["popularity"]), expected)
    by_phase = {p["phase"]: p for p in report["phases"]}
    assert by_phase["stats/keys"]["replied"] == 4
    stats = by_phase["stats"]
    assert stats["nodes"] == 4 and stats["replied"] == 3 and stats["failed"] == 1
    assert "injected device failure" in next(iter(stats["failures"].values()))
    assert stats["bytes_up_total"] > 0
    assert by_phase["stats/reveal"]["replied"] == 3  # survivors unmasked the dropped node
    assert len(report["failed_nodes"]) == 1 and len(report["stats_nodes"]) == 3
    saved = json.loads((out / "results.json").read_text())
    assert saved["popularity"] == report["popularity"]


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


def test_no_upload_carries_a_nodes_items_or_counts(simulated_stats):
    """Audit every message the devices sent: none may hold a node's item set or item counts."""
    _, _, uploads = simulated_stats
    ds = load_dataset("checkerboard")
    private = []
    for pid in range(4):
        users = partition_users(ds.n_users, 4, pid)
        items = ds.train.items[np.isin(ds.train.users, users)]
        private.append(np.unique(items))
        private.append(np.bincount(items, minlength=ds.n_items))
    assert len(uploads) >= 4 + 3 + 3
    for reply in uploads:
        for value in _values(reply):
            flat = value.ravel()
            for secret in private:
                assert not (flat.size == secret.size and np.array_equal(flat, secret))
                assert not (
                    flat.size > secret.size
                    and np.isin(secret, flat).all()
                    and flat.dtype != np.uint8
                )


def test_run_config_defaults_match_fedconfig():
    from pathlib import Path

    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    defaults = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    assert FedConfig.from_run_config(defaults) == FedConfig()
    assert set(defaults) == set(FedConfig().to_run_config())
