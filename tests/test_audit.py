"""The upload audit: it decodes what the server can decode, finds a planted leak, and reports
what clear mode leaks."""

from __future__ import annotations

import numpy as np
import pytest

from clients.records import from_record_dict
from peel_fed.audit import NodeSecrets, audit, audit_upload
from peel_fed.data import Interactions
from peel_fed.loading import load_dataset
from peel_fed.messages import Content
from peel_fed.partition import partition_users
from peel_fed.secagg import FixedPoint


def _secrets() -> NodeSecrets:
    train = Interactions(np.array([0, 0, 0, 1, 1]), np.array([2, 5, 7, 5, 9]))
    return NodeSecrets.of_users(np.array([0, 1]), train, 2, 12)


def test_audit_known_answers():
    secrets = _secrets()
    fp = FixedPoint()
    counts = np.bincount([2, 5, 7, 5, 9], minlength=12).astype(float)
    plain = Content(arrays={"u": {"v": fp.encode(np.concatenate([[3.0], counts, [1.0]]))}})
    rng = np.random.default_rng(0)
    masked = Content(arrays={"u": {"v": rng.integers(0, 2**63, 40, dtype=np.uint64) * 2}})
    items = Content(arrays={"u": {"rows": np.array([5, 7, 2])}})
    partial = Content(arrays={"u": {"rows": np.array([5, 7])}})  # no user's whole list
    found = audit_upload("t", plain, secrets)
    assert any("plain values" in f for f in found) and any("item counts" in f for f in found)
    assert audit_upload("t", masked, secrets) == []
    assert audit_upload("t", items, secrets) == [
        "t: u/rows: item list (every item of a hosted user)"
    ]
    assert audit_upload("t", partial, secrets) == []


@pytest.fixture
def run(monkeypatch):
    """The pipeline on the tiny board with in-process devices; returns every training, query
    and evaluation upload with the sending node's secrets."""
    from flwr.supercore.task_identity import TaskIdentity
    from test_adapters import SMALL, TINY

    from peel_fed.fedconfig import FedConfig
    from sim.local_grid import LocalGrid
    from strategies.server_app import run_pipeline

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    ds = load_dataset(TINY)

    def go(**cfg):
        grid = LocalGrid(3)
        sent = []
        pull = grid.pull_messages

        def record(ids):
            replies = pull(ids)
            sent.extend(replies)
            return replies

        grid.pull_messages = record
        run_pipeline(grid, FedConfig(**SMALL, **cfg))
        secrets = {
            100 + p: NodeSecrets.of_users(
                partition_users(ds.n_users, 3, p), ds.train, ds.n_users, ds.n_items
            )
            for p in range(3)
        }
        return [
            (r.metadata.message_type, from_record_dict(r.content), secrets[r.metadata.src_node_id])
            for r in sent
            if r.has_content()
        ]

    return go


@pytest.mark.parametrize("secagg", ["pairwise", "shamir"])
def test_secure_rows_leak_nothing_the_audit_can_find(run, secagg):
    uploads = run(secure_rows=True, secagg=secagg)
    assert sum(c.arrays.get("secagg") is not None for _, c, _ in uploads) >= 20
    assert (secagg == "shamir") == any(kind == "query.shares" for kind, _, _ in uploads)
    assert audit(uploads) == []


@pytest.mark.parametrize("secagg", ["pairwise", "shamir"])
def test_a_planted_leak_masking_disabled_fails_the_audit(run, monkeypatch, secagg):
    import peel_fed.secagg as pairwise
    import peel_fed.secagg_shamir as shamir

    def no_mask(seed, tag, n):
        return np.zeros(n, dtype=np.uint64)

    # every mask of both protocols (Shamir's self-masks and pairwise masks) comes from here
    monkeypatch.setattr(pairwise, "mask_vector", no_mask)
    monkeypatch.setattr(shamir, "mask_vector", no_mask)
    found = audit(run(secure_rows=True, secagg=secagg))
    assert any("query.stats" in f and "item counts" in f for f in found)
    assert any("train.rows" in f and "plain values" in f for f in found)


def test_clear_mode_is_audited_and_reports_what_leaks(run):
    found = audit(run(secure_rows=False))
    assert any(f.startswith("train.pretrain") and "item list" in f for f in found)
    assert not any(f.startswith("query.stats") for f in found)  # statistics stay masked


def test_with_decoys_no_clear_upload_is_exactly_a_user_s_item_list(run):
    found = audit(run(secure_rows=False, decoy_items=3))
    assert not any("item list" in f for f in found)
