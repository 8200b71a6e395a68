"""Double masking with Shamir shares wired into the phases (run config ``secagg = "shamir"``):
the config, the device's session state, dropouts at each step, late uploads, and the whole
pipeline in process against the pairwise protocol."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import Error, Message
from test_adapters import DATA, SMALL, TINY, _message

from clients.client_app import keys, shares, stats
from clients.records import from_record_dict, to_record_dict
from peel_fed.data import split_validation
from peel_fed.fedconfig import ConfigError, FedConfig
from peel_fed.loading import load_dataset
from peel_fed.messages import (
    Content,
    data_content,
    decode_masked,
    decode_public_key,
    decode_shares_revealed,
    encode_peer_keys,
    encode_session,
    encode_share_request,
    encode_stats,
)
from peel_fed.partition import partition_users
from peel_fed.secagg import FixedPoint, mask_vector, pair_seed
from peel_fed.shamir import combine_shares
from sim.local_grid import LocalGrid, node_context
from strategies.phases import secure_sum, shamir_threshold
from strategies.server_app import run_pipeline

KEY = 32  # bytes of one X25519 key; a node's Shamir public keys are two


def test_config_names_the_protocol_and_a_threshold_in_range():
    cfg = FedConfig.from_run_config({"secagg": "shamir", "secagg-threshold": 0.8})
    assert (cfg.secagg, cfg.secagg_threshold) == ("shamir", 0.8)
    assert FedConfig().secagg == "pairwise"
    with pytest.raises(ConfigError, match=r"^secagg must be one of pairwise, shamir, got 'x'$"):
        FedConfig(secagg="x")
    for bad in (0.5, 1.01, 0.0):
        with pytest.raises(ConfigError, match=r"^secagg-threshold must be in \(0.5, 1\]"):
            FedConfig(secagg_threshold=bad)
    # t = max(ceil(threshold * n), n // 2 + 1), at most n (0.67 * 100 is 67.00000000000001)
    got = {n: shamir_threshold(0.67, n) for n in (2, 3, 4, 10, 50, 100)}
    assert got == {2: 2, 3: 3, 4: 3, 10: 7, 50: 34, 100: 67}
    assert [shamir_threshold(0.51, n) for n in (4, 5)] == [3, 3]
    assert shamir_threshold(1.0, 5) == 5


def test_a_resumed_run_may_switch_the_protocol():
    """Each secure sum is a session of its own and gives the same sums either way; a checkpoint
    written before the keys existed (no secagg in its config) resumes too."""
    from strategies.checkpoint import MAY_CHANGE, _run

    old = FedConfig().to_run_config()
    del old["secagg"], old["secagg-threshold"]  # as a checkpoint of an older version saved it
    saved = {k: v for k, v in old.items() if k not in MAY_CHANGE}
    assert _run(FedConfig(secagg="shamir", secagg_threshold=0.9)) == saved == _run(FedConfig())


def _stats_of(partitions: list[int], num: int) -> np.ndarray:
    """The statistics vectors of the listed partitions, summed (what the server should get)."""
    ds = load_dataset(TINY)
    split = split_validation(ds.train, ds.n_users, DATA.val_fraction, seed=DATA.seed)
    want = 0
    for p in partitions:
        users = partition_users(ds.n_users, num, p)

        def counts(edges, users=users):
            return np.bincount(edges.items[np.isin(edges.users, users)], minlength=ds.n_items)

        want = want + encode_stats(counts(ds.train), counts(split.fit), users.size, p, num)
    return want


class FailingGrid(LocalGrid):
    """Node ``n`` answers message type ``m`` with an error for every ``(n, m)`` in ``fail``
    (the device failed there); replies of ``(n, m)`` in ``hold`` are kept back (``late``)."""

    def __init__(self, num_nodes: int, fail=(), hold=()) -> None:
        super().__init__(num_nodes)
        self.fail, self.hold = set(fail), set(hold)
        self.late: list[Message] = []
        self.pulled: list[Message] = []

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = super().push_messages(messages)
        for mid, msg in zip(ids, messages, strict=True):
            sent = (msg.metadata.dst_node_id, msg.metadata.message_type)
            if sent in self.fail:
                self.replies[mid] = Message(Error(0, "planted failure"), reply_to=msg)
            elif sent in self.hold:
                self.late.append(self.replies.pop(mid))
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        replies = super().pull_messages(message_ids)
        self.pulled.extend(replies)
        return replies


def _stats_sum(grid, protocol: str, threshold: float = 0.67, timeout: float = 5.0):
    content = to_record_dict(data_content(DATA))
    nodes = sorted(grid.contexts)
    return secure_sum(grid, nodes, "query.stats", content, timeout, "stats", 0, protocol, threshold)


def test_shamir_survives_a_node_failing_after_its_upload_that_fails_pairwise(server_identity):
    """Node 104 fails on the statistics, node 101 after uploading them (on ``query.reveal``).
    Pairwise: 101's own masks with 104 cannot be removed, the round fails (today's behaviour).
    Shamir (5 nodes, t = 3): the other survivors' shares unmask 101's upload, which is in the
    sum; 104's masks are removed from its shared mask key."""
    fail = [(104, "query.stats"), (101, "query.reveal")]
    with pytest.raises(ValueError, match=r"missing revealed seed for pair \(101, 104\)"):
        _stats_sum(FailingGrid(5, fail), "pairwise")
    grid = FailingGrid(5, fail)
    total, senders, reports = _stats_sum(grid, "shamir", threshold=0.6)
    assert senders == [100, 101, 102, 103]
    phases = [r.phase for r in reports]
    assert phases == ["stats/keys", "stats/shares", "stats", "stats/reveal"]
    assert list(reports[2].failed) == [104] and list(reports[3].failed) == [101]
    np.testing.assert_allclose(total, _stats_of([0, 1, 2, 3], 5))
    assert grid.types.count("query.shares") == 5


@pytest.mark.parametrize(
    ("fail", "step"),
    [
        ([(101, "query.shares")], "query.shares"),
        ([(102, "query.stats")], "query.stats"),
        ([(100, "query.reveal")], "query.reveal"),
    ],
)
def test_fewer_than_t_nodes_left_at_any_step_is_a_one_line_error(server_identity, fail, step):
    """3 nodes at the default 0.67: t = 3, so one dropout at any step stops the phase."""
    with pytest.raises(RuntimeError) as err:
        _stats_sum(FailingGrid(3, fail), "shamir")
    msg = str(err.value)
    assert msg.startswith(f"stats: secure aggregation (shamir) has 2 of 3 nodes left after {step}")
    assert "threshold t=3" in msg and "\n" not in msg


def test_a_late_upload_stays_masked(server_identity):
    """Node 102's masked statistics reach the server only after it unmasked the round with 102
    as dropped. The server then holds 102's mask key (from the survivors' shares) and removes
    every pairwise mask of 102; what is left is still hidden under 102's self-mask, whose shares
    no device gave. (Removing the self-mask too, with the seed from 102's own state, gives 102's
    true statistics: the check below would see an unmasking.)"""
    grid = FailingGrid(4, hold=[(102, "query.stats")])
    total, senders, reports = _stats_sum(grid, "shamir", timeout=0.3)
    assert senders == [100, 101, 103] and reports[2].failed == {
        102: "no reply (timeout or node gone)"
    }
    np.testing.assert_allclose(total, _stats_of([0, 1, 3], 4))
    (late,) = grid.late
    y = decode_masked(from_record_dict(late.content))
    # what the server saw: the public keys, and the shares revealed
    public = {
        r.metadata.src_node_id: decode_public_key(from_record_dict(r.content))
        for r in grid.pulled
        if r.metadata.message_type == "query.keys"
    }
    reveals = [
        decode_shares_revealed(from_record_dict(r.content))
        for r in grid.pulled
        if r.metadata.message_type == "query.reveal"
    ]
    assert all(102 not in b and 102 in s for b, s in reveals)  # never a share of 102's b
    tag = bytes(grid.contexts[102].state.config_records["secagg"]["round_tag"])
    s_102 = X25519PrivateKey.from_private_bytes(combine_shares([s[102] for _, s in reveals][:3]))
    best = y.copy()
    for peer in (100, 101, 103):
        seed = pair_seed(s_102, public[peer][KEY:], (102, peer))
        mask = mask_vector(seed, tag, y.size)
        best = best - mask if peer > 102 else best + mask
    fp, truth = FixedPoint(), _stats_of([2], 4)
    assert np.max(np.abs(fp.decode(best) - truth)) > 1e6  # noise over +-2^39
    self_seed = bytes(grid.contexts[102].state.config_records["secagg"]["self_seed"])
    np.testing.assert_allclose(fp.decode(best - mask_vector(self_seed, tag, y.size)), truth)


def test_a_node_s_shamir_state_is_bound_to_its_session():
    """Another session's (or protocol's) message fails on the device: a dropout, never masks
    or shares under the wrong session."""
    ctx = node_context(11, 0, 2)
    ask = to_record_dict(encode_session(b"a" * 16, "shamir"))
    public = decode_public_key(from_record_dict(keys(_message(ask, 11, "query.keys"), ctx).content))
    assert len(public) == 2 * KEY
    state = ctx.state.config_records["secagg"]
    assert bytes(state["round_tag"]) == b"a" * 16 and state["step"] == "setup"
    other = to_record_dict(encode_share_request({11: public, 12: b"x" * 64}, b"b" * 16, 2))
    with pytest.raises(RuntimeError, match="another session than this node's key"):
        shares(_message(other, 11, "query.shares"), ctx)
    same = to_record_dict(encode_share_request({11: public, 12: public}, b"a" * 16, 2))
    reply = shares(_message(same, 11, "query.shares"), ctx)
    assert set(reply.content.config_records["secagg"]) == {"ct-12"}
    assert ctx.state.config_records["secagg"]["step"] == "shared"
    # a pairwise message in a Shamir session: no pairwise key there
    peers = {11: b"k" * 32, 12: b"l" * 32}
    down = to_record_dict(
        Content(configs={"data": DATA.to_config(), "secagg": encode_peer_keys(peers, b"a" * 16)})
    )
    with pytest.raises(RuntimeError, match="another session than this node's key"):
        stats(_message(down, 11, "query.stats"), ctx)


def _close(a, b, path="") -> None:
    """``a`` and ``b`` equal, numbers to float noise, in nested dicts and lists."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


@pytest.mark.parametrize("secure_rows", [False, True])
def test_pipeline_in_process_shamir_and_pairwise_agree(server_identity, secure_rows):
    """Same sums, so the same run: fixed-point sums are exact in both protocols."""
    runs = {}
    for protocol in ("pairwise", "shamir"):
        grid = LocalGrid(3)
        cfg = FedConfig(**SMALL, secure_rows=secure_rows, secagg=protocol, secagg_threshold=0.6)
        runs[protocol] = run_pipeline(grid, cfg)
        assert ("query.shares" in grid.types) == (protocol == "shamir")
        assert not any(p["failures"] for p in runs[protocol]["phases"])
    pairwise, shamir = runs["pairwise"], runs["shamir"]
    keys_ = ("user_group_sizes", "unit_weights", "rows", "drill", "per_group", "pretrain", "pee")
    for key in keys_:
        _close(pairwise[key], shamir[key], key)
    assert shamir["dataset"]["users"] == load_dataset(TINY).n_users
    stats = [p["phase"] for p in shamir["phases"] if p["phase"].startswith("stats")]
    assert stats == ["stats/keys", "stats/shares", "stats", "stats/reveal"]


def test_bench_secure_sum_runs_both_protocols_and_checks_the_sum(tmp_path):
    from sim.bench_secure_sum import main

    out = tmp_path / "bench.json"
    argv = ["--nodes", "4,12", "--length", "16", "--repeats", "1", "--dropouts", "0"]
    report = main([*argv, "--out", str(out)])
    rows = {(r["protocol"], r["nodes"]): r for r in report["rows"]}
    assert set(rows) == {(p, n) for p in ("pairwise-all", "pairwise", "shamir") for n in (4, 12)}
    assert rows["pairwise", 4]["exchanges"] == 2 and rows["shamir", 4]["exchanges"] == 4
    # 12 nodes: 8 mask neighbours (2 ceil(log2 12)) instead of 11 keys down per node
    assert rows["pairwise", 12]["neighbours"] == 8 and rows["pairwise-all", 12]["neighbours"] == 11
    assert (
        rows["pairwise", 12]["down_bytes_per_node"]
        < rows["pairwise-all", 12]["down_bytes_per_node"]
    )
    assert max(r["max_abs_error"] for r in rows.values()) < 1e-5
    assert out.is_file() and out.with_suffix(".md").is_file()


@pytest.mark.parametrize("protocol", ["pairwise", "shamir"])
def test_distributed_dp_does_not_unmask_a_sum_with_fewer_noise_shares(server_identity, protocol):
    """Node 104 fails on its upload: both protocols would unmask the other 4 (pairwise through
    the survivors' revealed keys, Shamir with t = 3), but a sum noised for 5 shares carries too
    little noise without one, so it stays masked."""
    fail = [(104, "query.stats")]
    content = to_record_dict(data_content(DATA))
    nodes = sorted(FailingGrid(5).contexts)
    total, senders, _ = secure_sum(
        FailingGrid(5, fail), nodes, "query.stats", content, 5.0, "stats", 0, protocol, 0.6, 4
    )
    assert senders == [100, 101, 102, 103]
    np.testing.assert_allclose(total, _stats_of([0, 1, 2, 3], 5))
    with pytest.raises(RuntimeError) as err:
        secure_sum(
            FailingGrid(5, fail), nodes, "query.stats", content, 5.0, "stats", 0, protocol, 0.6, 5
        )
    msg = str(err.value)
    assert msg.startswith("stats: 4 masked uploads arrived") and "5 noise shares" in msg
    assert "\n" not in msg


class KeyCountingGrid(FailingGrid):
    """Also counts the public keys each node is sent with its masked-vector message."""

    def __init__(self, num_nodes: int, fail=()) -> None:
        super().__init__(num_nodes, fail)
        self.keys_sent: dict[int, int] = {}

    def push_messages(self, messages: list[Message]) -> list[str]:
        for msg in messages:
            if msg.metadata.message_type == "query.stats":
                rec = msg.content["secagg"]
                self.keys_sent[msg.metadata.dst_node_id] = sum(k.startswith("pk-") for k in rec)
        return super().push_messages(messages)


def test_pairwise_masks_over_a_graph_send_each_node_its_neighbours_and_sum_exactly(
    server_identity, monkeypatch
):
    """12 nodes, 4 mask neighbours each: each node gets 5 keys (its own too), the sum is exact,
    also with 2 dropouts (their neighbours reveal); dropouts that cut the graph (a ring here)
    leave the sum masked, in one line."""
    import strategies.phases as phases

    content = to_record_dict(data_content(DATA))
    nodes = list(range(100, 112))

    def stats(grid, neighbours):
        return secure_sum(
            grid, nodes, "query.stats", content, 5.0, "stats", 0, neighbours=neighbours
        )

    grid = KeyCountingGrid(12)
    total, senders, _ = stats(grid, 4)
    assert senders == nodes and set(grid.keys_sent.values()) == {5}
    np.testing.assert_allclose(total, _stats_of(list(range(12)), 12))
    grid = KeyCountingGrid(12, fail=[(103, "query.stats"), (108, "query.stats")])
    total, senders, reports = stats(grid, 4)
    assert 103 not in senders and 108 not in senders
    np.testing.assert_allclose(total, _stats_of([p for p in range(12) if p not in (3, 8)], 12))
    assert reports[-1].phase == "stats/reveal" and len(reports[-1].sent_to) <= 8
    ring = {i: {nodes[(p - 1) % 12], nodes[(p + 1) % 12]} for p, i in enumerate(nodes)}
    monkeypatch.setattr(phases, "mask_graph", lambda ids, degree, rng: ring)
    grid = KeyCountingGrid(12, fail=[(101, "query.stats"), (105, "query.stats")])
    with pytest.raises(RuntimeError) as err:
        stats(grid, 2)
    assert str(err.value).startswith("stats: 2 dropouts cut the mask graph (degree 2) of 12")
    assert "query.reveal" not in grid.types
