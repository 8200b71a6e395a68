"""The Flower adapters without Ray: ClientApp handlers called with hand-built messages, strategy
``aggregate`` steps fed hand-built replies, and the whole pipeline over an in-process grid."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, Metadata, RecordDict

from clients.client_app import group, keys, stats
from clients.records import from_record_dict, to_array_record, to_record_dict
from peel_fed.data import split_validation
from peel_fed.fedconfig import FedConfig
from peel_fed.fedlightgcn import DeviceUpdate, PretrainServer
from peel_fed.fedpee import PEEGroupServer, PEEUpload
from peel_fed.loading import load_dataset
from peel_fed.messages import (
    Content,
    DataSpec,
    data_content,
    decode_masked,
    decode_public_key,
    encode_device_update,
    encode_group_counts,
    encode_pee_reply,
    encode_peer_keys,
    encode_session,
    encode_stats,
)
from peel_fed.partition import partition_users
from peel_fed.secagg import FixedPoint, SecAggServer
from sim.local_grid import LocalGrid, node_context
from strategies.grouping import GroupingResult, GroupingStrategy
from strategies.log import PhaseLog
from strategies.pee import PEEStrategy
from strategies.pretrain import PretrainStrategy
from strategies.server_app import run_pipeline
from strategies.stats import StatsStrategy

TINY = "checkerboard-tiny"
DATA = DataSpec(TINY, "", 0, 0.1)
SMALL = dict(
    dataset=TINY,
    min_nodes=3,
    pretrain_passes=2,
    pretrain_cohort_fraction=0.5,
    pretrain_local_steps=1,
    num_user_groups=2,
    kmeans_iters=2,
    pee_rounds=2,
    pee_cohort_fraction=0.5,
    num_item_groups=4,
    num_blocks=4,
    dim=16,
    budgets="25%,50%,100%",
    device_budgets="50%,100%",
    progress=False,
)


def _message(content: RecordDict, node: int, message_type: str) -> Message:
    """A message as a node receives it (ids set as the SuperLink would)."""
    meta = Metadata(
        run_id=1,
        message_id=uuid.uuid4().hex,
        src_node_id=1,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="test",
        created_at=0.0,
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content, metadata=meta)


def _secure_contents(contexts: dict[int, Context], content: RecordDict) -> dict[int, RecordDict]:
    """``content`` with the cohort's keys, as ``secure_sum`` sends it to each node."""
    ask = to_record_dict(encode_session(b"r" * 16))
    public = {
        n: decode_public_key(from_record_dict(keys(_message(ask, n, "query.keys"), c).content))
        for n, c in contexts.items()
    }
    secagg = to_record_dict(Content(configs={"secagg": encode_peer_keys(public, b"r" * 16)}))
    return {n: RecordDict({**dict(content.items()), **dict(secagg.items())}) for n in contexts}


def test_stats_handler_uploads_masked_counts_that_sum_to_the_dataset():
    ds = load_dataset(TINY)
    contexts = {11: node_context(11, 0, 2), 12: node_context(12, 1, 2)}
    down = _secure_contents(contexts, to_record_dict(data_content(DATA)))
    masked = {}
    for n, ctx in contexts.items():
        reply = stats(_message(down[n], n, "query.stats"), ctx)
        masked[n] = decode_masked(from_record_dict(reply.content))
    length = 2 * ds.n_items + 2 + 3  # two partitions, users, the node, num-partitions
    assert all(m.shape == (length,) for m in masked.values())
    total = SecAggServer().unmask_sum(masked, sorted(masked), {}, length, FixedPoint())
    cfg = FedConfig(**SMALL)
    result = StatsStrategy(cfg, PhaseLog(cfg, [11, 12]), DATA).aggregate(total)
    assert result.users == ds.n_users
    assert (
        result.train_popularity.tolist()
        == np.bincount(ds.train.items, minlength=ds.n_items).tolist()
    )
    assert (
        result.layout.num_item_groups == 4
        and result.budget_bytes[-1] == result.layout.full_table_bytes
    )


def test_group_handler_keeps_groups_on_the_device_and_sends_counts():
    ctx = node_context(5, 0, 1)
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    ctx.state["user-vectors"] = to_array_record({"vectors": vectors})
    centroids = np.array([[0.0, 1.0], [1.0, 0.0]])
    content = to_record_dict(
        Content(arrays={"kmeans": {"centroids": centroids}}, configs={"data": DATA.to_config()})
    )
    reply = group(_message(content, 5, "query.group"), ctx)
    assert dict(reply.content.metric_records["groups"]) == {"g0": 1, "g1": 2}
    assert set(reply.content) == {"groups"}  # nothing else goes up
    assert ctx.state.array_records["group"]["group"].numpy().tolist() == [1, 1, 0]


@pytest.mark.parametrize(
    ("claims", "failed", "error"),
    [
        ([1, 2, 1], 0, r"partition\(s\) \[1\] of 3 claimed by more than one node"),
        ([1, 0, 1], 0, r"partition\(s\) \[1\] of 3 claimed by no node"),
        ([1, 0, 0], 1, r"partition\(s\) \[1, 2\] of 3 claimed by no node"),
        ([1, 0, 1], 1, None),  # the node that failed held it: a warning
        ([1, 1, 1], 0, None),
    ],
)
def test_stats_refuse_partitions_that_do_not_cover_the_users_once(claims, failed, error):
    """A rogue node claiming a taken partition, or a partition nobody holds, is refused."""
    from strategies.stats import check_partitions

    if error is None:
        check_partitions(np.array(claims), failed)
        return
    with pytest.raises(ValueError, match=error):
        check_partitions(np.array(claims), failed)


def test_a_second_node_on_a_taken_partition_is_refused_by_the_statistics(server_identity):
    """End to end on the in-process grid: node 103 also claims partition 0."""
    from strategies.stats import StatsStrategy

    grid = LocalGrid(3)
    grid.contexts[103] = node_context(103, 0, 3)
    cfg = FedConfig(**SMALL)
    with pytest.raises(ValueError, match=r"partition\(s\) \[0\] of 3 claimed by more than"):
        StatsStrategy(cfg, PhaseLog(cfg, [100, 101, 102, 103]), DATA).run(
            grid, [100, 101, 102, 103]
        )


def test_stats_aggregate_refuses_more_user_groups_than_users():
    cfg = FedConfig(**{**SMALL, "num_user_groups": 5})
    total = encode_stats(np.ones(8), np.ones(8), 4).astype(float)  # one node, one partition
    with pytest.raises(Exception, match="more user groups"):
        StatsStrategy(cfg, PhaseLog(cfg, []), DATA).aggregate(total)


def test_grouping_aggregate_counts_sizes_and_node_groups():
    cfg = FedConfig(**SMALL)
    strategy = GroupingStrategy(cfg, PhaseLog(cfg, [1, 2]), DATA)
    replies = {
        1: to_record_dict(encode_group_counts(np.array([3, 0]))),
        2: to_record_dict(encode_group_counts(np.array([1, 2]))),
    }
    result = strategy.aggregate_groups(replies, np.zeros((2, 16)))
    assert result.sizes == [4, 2] and result.node_groups == {1: [0], 2: [0, 1]}


def _stats_result(cfg: FedConfig):
    ds = load_dataset(TINY)
    total = encode_stats(
        np.bincount(ds.train.items, minlength=ds.n_items),
        np.bincount(ds.train.items, minlength=ds.n_items),
        ds.n_users,
    ).astype(float)
    return StatsStrategy(cfg, PhaseLog(cfg, []), DATA).aggregate(total)


def test_pretrain_aggregate_round_applies_decoded_uploads_in_arrival_order():
    cfg = FedConfig(**SMALL)
    stats_result = _stats_result(cfg)
    strategy = PretrainStrategy(cfg, PhaseLog(cfg, []), DATA, stats_result)
    twin = PretrainServer(stats_result.n_items, stats_result.fit_degree, cfg.lightgcn(), cfg.seed)
    rng = np.random.default_rng(0)

    def update(rows, contrib):
        return DeviceUpdate(
            rows=np.array(rows),
            grad=torch.from_numpy(rng.normal(size=(len(rows), cfg.dim)).astype(np.float32)),
            row_devices=np.ones(len(rows), dtype=np.int64),
            contrib_rows=np.array(contrib),
            contrib_delta=torch.from_numpy(
                rng.normal(size=(cfg.layers, len(contrib), cfg.dim)).astype(np.float32)
            ),
            loss_sum=0.5,
            users=1,
            solo_bytes=10,
        )

    updates = {7: update([0, 3], [3]), 9: update([3, 5], [1, 5])}
    replies = {n: to_record_dict(encode_device_update(u)) for n, u in updates.items()}
    got = strategy.aggregate_round(replies)
    want = twin.apply(list(updates.values()))
    assert got == want == {"loss": 0.5, "users": 2, "rows": 3}
    for a, b in zip(strategy.server.item_layers(), twin.item_layers(), strict=True):
        assert torch.equal(a, b)


def test_pee_aggregate_sends_each_group_its_nodes_uploads():
    cfg = FedConfig(**SMALL)
    stats_result = _stats_result(cfg)
    layout = stats_result.layout
    table = np.random.default_rng(1).normal(size=(layout.n_items, cfg.dim)).astype(np.float32)
    groups = GroupingResult(np.zeros((2, cfg.dim)), [6, 6], {1: [0], 2: [0, 1]})
    strategy = PEEStrategy(cfg, PhaseLog(cfg, []), DATA, stats_result, table, groups)
    n = layout.num_item_groups

    def upload(rows, users):
        return PEEUpload(
            rows=np.array(rows),
            grad=np.full((len(rows), cfg.dim), 0.1, dtype=np.float32),
            row_devices=np.ones(len(rows), dtype=np.int64),
            weight_grad=np.full((n, layout.num_blocks), 0.01),
            val_devices=users,
            loss_sum=np.full(n, 0.2),
            loss_count=np.full(n, 2.0),
            users=users,
        )

    per_node = {1: {0: upload([0, 1], 2)}, 2: {0: upload([1], 1), 1: upload([4], 3)}}
    replies = {node: to_record_dict(encode_pee_reply(u)) for node, u in per_node.items()}
    got = strategy.aggregate(replies)
    twins = [
        PEEGroupServer(table, stats_result.train_popularity, layout, cfg.pee(), cfg.seed * 1000 + g)
        for g in range(2)
    ]
    want = [twins[0].apply([per_node[1][0], per_node[2][0]]), twins[1].apply([per_node[2][1]])]
    assert got == want and [g["users"] for g in got] == [3, 3]
    for server, twin in zip(strategy.servers, twins, strict=True):
        assert torch.equal(server.table, twin.table)
        np.testing.assert_array_equal(server.weights(), twin.weights())


def test_pipeline_in_process_clear_and_secure_rows_agree(server_identity):
    runs = {}
    for secure in (False, True):
        grid = LocalGrid(3)
        cfg = FedConfig(**SMALL, secure_rows=secure)
        runs[secure] = run_pipeline(grid, cfg)
        assert ("train.rows" in grid.types) == secure and ("train.peerows" in grid.types) == secure
    clear, secure = runs[False], runs[True]
    assert not any(p["failures"] for p in clear["phases"] + secure["phases"])
    assert clear["dataset"]["users"] == load_dataset(TINY).n_users
    assert clear["user_group_sizes"] == secure["user_group_sizes"]
    # the secure layouts decode to the same sums as the clear uploads (up to fixed point,
    # whose rounding compounds over rounds)
    for a, b in zip(clear["pretrain"], secure["pretrain"], strict=True):
        assert (a["users"], a["rows"]) == (b["users"], b["rows"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for a, b in zip(clear["pee"], secure["pee"], strict=True):
        for ga, gb in zip(a["groups"], b["groups"], strict=True):
            assert (ga["users"], ga["rows"]) == (gb["users"], gb["rows"])
            assert ga["loss"] == pytest.approx(gb["loss"], rel=1e-4)
    np.testing.assert_allclose(clear["unit_weights"], secure["unit_weights"], atol=1e-3)
    users = {r["users"] for r in clear["rows"]}
    assert len(users) == 1 and users == {r["users"] for r in secure["rows"]}


def test_node_budget_reads_device_budget_and_the_old_key_with_a_warning():
    from clients.state import node_budget

    assert node_budget(Context(1, 7, {"device-budget": "25%"}, RecordDict(), {})) == "25%"
    assert node_budget(node_context(7, 0, 1)) is None
    with pytest.warns(FutureWarning, match="'budget-bytes' is renamed 'device-budget'"):
        old = node_budget(Context(1, 7, {"budget-bytes": "10%"}, RecordDict(), {}))
    assert old == "10%"


def test_a_node_refuses_to_mask_for_another_session():
    """A late message of an earlier session (or state overwritten by one) fails on the device,
    a dropout the server recovers from, instead of masking under the wrong key."""
    ctx = node_context(11, 0, 2)
    keys(_message(to_record_dict(encode_session(b"a" * 16)), 11, "query.keys"), ctx)
    other = Content(configs={"secagg": encode_peer_keys({11: b"k" * 32, 12: b"l" * 32}, b"b" * 16)})
    down = RecordDict({**dict(to_record_dict(data_content(DATA)).items())})
    down["secagg"] = to_record_dict(other)["secagg"]
    with pytest.raises(RuntimeError, match="another session than this node's key"):
        stats(_message(down, 11, "query.stats"), ctx)


class _ClobberingGrid(LocalGrid):
    """Before node 101 masks its statistics, its stored key is replaced by a fresh one of the
    same session (as a racing message's stale state could): its masks no longer cancel."""

    def push_messages(self, messages: list[Message]) -> list[str]:
        from clients.state import new_secagg_key

        for msg in messages:
            if msg.metadata.message_type == "query.stats" and msg.metadata.dst_node_id == 101:
                tag = bytes(self.contexts[101].state.config_records["secagg"]["round-tag"])
                new_secagg_key(self.contexts[101], tag)
        return super().push_messages(messages)


def test_secure_sum_drops_an_upload_masked_under_another_key(server_identity):
    """The server checks the key each masked upload names against the one it collected: node
    101's upload is dropped, the survivors reveal, and the sum is exactly theirs (without the
    check it would be garbage)."""
    from strategies.phases import secure_sum

    grid = _ClobberingGrid(3)
    content = to_record_dict(data_content(DATA))
    total, senders, reports = secure_sum(grid, [100, 101, 102], "query.stats", content, 5.0, "s")
    assert senders == [100, 102]
    assert reports[1].failed == {101: "masked under another key than the session's"}
    assert [r.phase for r in reports][-1].endswith("reveal")
    # the survivors' statistics, from the dataset: partitions 0 and 2 of 3
    ds = load_dataset(TINY)
    split = split_validation(ds.train, ds.n_users, DATA.val_fraction, seed=DATA.seed)
    want = 0
    for p in (0, 2):
        users = partition_users(ds.n_users, 3, p)

        def counts(edges, users=users):
            return np.bincount(edges.items[np.isin(edges.users, users)], minlength=ds.n_items)

        want = want + encode_stats(counts(ds.train), counts(split.fit), users.size, p, 3)
    np.testing.assert_allclose(total, want)


def test_pipeline_in_process_pretrains_with_dns_and_a_cosine_rate(server_identity):
    """The run config reaches the devices: from the same start, every round's loss against hard
    negatives (DNS) is higher than against uniform ones, and the run still finishes."""
    runs = {}
    for sampling in ("uniform", "dns"):
        cfg = FedConfig(
            **SMALL,
            pretrain_negative_sampling=sampling,
            pretrain_dns_candidates=8,
            pretrain_lr_schedule="cosine",
        )
        runs[sampling] = run_pipeline(LocalGrid(3), cfg)
    uniform, dns = runs["uniform"]["pretrain"], runs["dns"]["pretrain"]
    assert len(uniform) == len(dns) == 2 * 2
    # measured: uniform 0.6879 -> 0.6708, dns 0.6911 -> 0.6837 over the 4 rounds (identical
    # losses would mean the devices ignored the setting)
    assert all(d["loss"] > u["loss"] + 2e-3 for u, d in zip(uniform, dns, strict=True))
    assert not any(p["failures"] for p in runs["dns"]["phases"])
