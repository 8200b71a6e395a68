"""User-level differential privacy: the accountant, per-user clipping, noised pretraining."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from clients.records import from_record_dict
from peel_fed.fedlightgcn import (
    FedLightGCN,
    FedLightGCNConfig,
    pretraining_releases,
    train_fed_lightgcn,
)
from peel_fed.messages import decode_device_update, decode_pee_reply
from peel_fed.metrics import evaluate_ranking
from peel_fed.privacy import DPConfig, PrivacyError, epsilon, local_epsilon, noise_for_epsilon
from peel_fed.scoring import dot_score_fn
from peel_fed.synthetic import checkerboard

CFG = FedLightGCNConfig(dim=16, layers=3, rounds=0, cohort_fraction=0.5, local_steps=2)


def _board():
    return checkerboard(n_users=120, n_items=80, n_clusters=2, p_in=0.3, p_out=0.02, seed=3)


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of one Gaussian mechanism of sensitivity 1 (Balle and Wang, ICML 2018,
    Theorem 8): delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s)."""

    def gap(eps: float) -> float:
        a = 1 / (2 * sigma)
        return norm.cdf(a - eps * sigma) - math.exp(eps) * norm.cdf(-a - eps * sigma) - delta

    return brentq(gap, 1e-9, 500)


@pytest.mark.parametrize("sigma, releases", [(1.0, 10), (4.0, 23), (0.8, 1)])
def test_the_accountant_matches_the_analytic_gaussian_mechanism(sigma, releases):
    # T Gaussian releases of noise multiplier s compose exactly to one of s / sqrt(T)
    delta = 1e-5
    exact = _analytic_gaussian_epsilon(sigma / math.sqrt(releases), delta)
    assert epsilon(sigma, releases, delta) == pytest.approx(exact, rel=0.01)


def test_the_noise_for_a_target_epsilon_reaches_it_and_no_more():
    sigma = noise_for_epsilon(4.0, 23, 1e-5)
    assert epsilon(sigma, 23, 1e-5) <= 4.0
    assert epsilon(sigma * 0.99, 23, 1e-5) > 4.0
    assert epsilon(0.0, 3, 1e-5) == math.inf and epsilon(1.0, 0, 1e-5) == 0.0


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: DPConfig(0.0, 1.0, 1e-5), "dp-clip"),
        (lambda: DPConfig(1.0, -1.0, 1e-5), "dp-noise-multiplier"),
        (lambda: DPConfig(1.0, 1.0, 1.5), "dp-delta"),
        (lambda: noise_for_epsilon(-1.0, 3, 1e-5), "dp-target-epsilon"),
        (lambda: noise_for_epsilon(1e-7, 3, 1e-5), "unreachable"),
    ],
)
def test_out_of_range_parameters_are_one_line_errors(call, words):
    with pytest.raises(PrivacyError) as err:
        call()
    assert words in str(err.value) and "\n" not in str(err.value)


def _upload_norms(fed: FedLightGCN, users: np.ndarray, clip: float | None) -> np.ndarray:
    """The L2 norm of each user's whole round upload, each user sent alone."""
    layers = fed.server.item_layers()
    out = []
    for u in users:
        up = fed.devices.device_round(np.array([u]), layers, 1, clip)
        out.append(torch.cat([up.grad.ravel(), up.contrib_delta.ravel()]).norm().item())
    return np.array(out)


def test_clipping_bounds_each_user_s_whole_upload():
    ds = _board()
    users = np.arange(0, 40)
    plain = _model(ds)
    plain.initialise()
    norms = _upload_norms(plain, users, None)
    clip = float(np.median(norms))
    clipped = _model(ds)
    clipped.initialise()
    got = _upload_norms(clipped, users, clip)
    assert (got <= clip * (1 + 1e-5)).all()
    small = norms < clip
    assert small.any() and (~small).any()
    np.testing.assert_allclose(got[small], norms[small], rtol=1e-5)  # under the bound: untouched
    np.testing.assert_allclose(got[~small], clip, rtol=1e-5)


def test_clipping_is_per_user_so_packing_does_not_change_the_upload():
    ds = _board()
    cohort = np.arange(0, 60)
    a, b = _model(ds), _model(ds)
    for m in (a, b):
        m.clip = 0.05
        m.initialise()
    a.run_round(cohort, num_nodes=1)
    b.run_round(cohort, num_nodes=60)
    np.testing.assert_allclose(a.E0.numpy(), b.E0.numpy(), atol=1e-6)
    np.testing.assert_allclose(a.S.numpy(), b.S.numpy(), atol=1e-5)


def _model(ds, dp=None):
    return FedLightGCN(ds.n_users, ds.n_items, ds.train, ds.item_popularity(), CFG, 7, dp)


def test_noise_zero_and_a_clip_above_every_upload_reproduce_the_run_without_dp():
    ds = _board()
    cfg = FedLightGCNConfig(dim=16, rounds=6, cohort_fraction=0.5, local_steps=2)
    args = (ds.n_users, ds.n_items, ds.train, ds.item_popularity(), cfg)
    plain = train_fed_lightgcn(*args, seed=1)
    dp = train_fed_lightgcn(*args, seed=1, dp=DPConfig(1e6, 0.0, 1e-5))
    np.testing.assert_allclose(dp.E0.numpy(), plain.E0.numpy(), atol=1e-6)
    np.testing.assert_allclose(dp.U0.numpy(), plain.U0.numpy(), atol=1e-6)
    np.testing.assert_allclose(dp.S.numpy(), plain.S.numpy(), atol=1e-5)


def test_the_server_noises_every_row_of_every_released_sum():
    ds = _board()
    dp = DPConfig(clip=0.5, noise_multiplier=2.0, delta=1e-5)
    fed = _model(ds, dp)
    fed.server.noise_contributions([1])
    assert fed.S[0].abs().sum() == 0 and fed.S[2].abs().sum() == 0  # only the released layer
    assert (fed.S[1] != 0).all()
    assert fed.S[1].std().item() == pytest.approx(1.0, rel=0.05)  # sigma * clip
    before = fed.E0.clone()
    fed.server.apply([])  # an empty round still moves every row: noise only
    assert (fed.E0 != before).all(dim=1).all()


def test_noised_pretraining_repeats_with_its_seed_and_learns_at_a_loose_epsilon():
    ds = _board()
    cfg = FedLightGCNConfig(
        dim=16, rounds=60, cohort_fraction=0.5, server_lr=2e-2, user_lr=2e-2, local_steps=1
    )
    args = (ds.n_users, ds.n_items, ds.train, ds.item_popularity(), cfg)
    releases = pretraining_releases(cfg, cfg.rounds)
    assert releases == 3 + 30
    dp = DPConfig(clip=0.5, noise_multiplier=noise_for_epsilon(50.0, releases, 1e-3), delta=1e-3)
    a = train_fed_lightgcn(*args, seed=1, dp=dp)
    b = train_fed_lightgcn(*args, seed=1, dp=dp)
    assert torch.equal(a.E0, b.E0) and torch.equal(a.S, b.S)

    def recall(model):
        u, v = model.final_embeddings()
        return evaluate_ranking(dot_score_fn(u, v), ds.n_users, ds.train, ds.test)["recall@20"]

    strict = DPConfig(clip=0.5, noise_multiplier=noise_for_epsilon(0.5, releases, 1e-3), delta=1e-3)
    loose, tight = recall(a), recall(train_fed_lightgcn(*args, seed=1, dp=strict))
    candidates = ds.n_items - np.bincount(ds.train.users, minlength=ds.n_users).mean()
    assert loose > 2 * 20 / candidates  # far above a random ranking
    assert loose > tight


@pytest.fixture
def pipeline(monkeypatch):
    """``run_pipeline`` on the tiny board with in-process devices (no Ray, no SuperLink)."""
    from flwr.supercore.task_identity import TaskIdentity
    from test_adapters import SMALL

    from peel_fed.fedconfig import FedConfig
    from sim.local_grid import LocalGrid
    from strategies.server_app import run_pipeline

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)

    class RecordingGrid(LocalGrid):
        """Keeps every training reply the devices send."""

        def __init__(self, num_nodes: int) -> None:
            super().__init__(num_nodes)
            self.sent: list = []

        def pull_messages(self, message_ids):
            replies = super().pull_messages(message_ids)
            self.sent.extend(r for r in replies if r.metadata.message_type.startswith("train."))
            return replies

    def run(**dp):
        grid = RecordingGrid(3)
        report = run_pipeline(grid, FedConfig(**SMALL, **dp))
        report["sent"] = grid.sent
        return report

    return run


def test_the_federated_pipeline_clips_on_devices_noises_and_reports_epsilon(pipeline):
    plain = pipeline()
    assert plain["privacy"] is None

    def losses(report):
        pee = [g["loss"] for r in report["pee"] for g in r["groups"]]
        return np.array([r["loss"] for r in report["pretrain"]] + pee)

    # a clip above every upload and no noise: the plain run; a tiny clip: the devices clipped
    # (pretraining and PEE learning alike)
    np.testing.assert_allclose(losses(pipeline(dp_clip=1e6)), losses(plain), rtol=1e-6)
    tiny = losses(pipeline(dp_clip=1e-4))
    assert not np.allclose(tiny[:4], losses(plain)[:4], rtol=1e-3)
    assert not np.allclose(tiny[5:], losses(plain)[5:], rtol=1e-3)  # round 1 of PEE sees no clip
    # every node's upload is a sum of its users' clipped uploads
    clip = 1e-4
    sent = pipeline(dp_clip=clip)["sent"]
    checked = 0
    for reply in sent:
        content = from_record_dict(reply.content)
        kind = reply.metadata.message_type
        if kind == "train.pretrain" and "grad" in content.arrays.get("upload", {}):
            up = decode_device_update(content)
            norm = torch.cat([up.grad.ravel(), up.contrib_delta.ravel()]).norm().item()
            assert norm <= up.users * clip * (1 + 1e-4)
            checked += up.users > 0
        if kind == "train.pee":
            for up in decode_pee_reply(content, 4).values():
                norm = np.sqrt((up.grad**2).sum() + (up.weight_grad**2).sum())
                assert norm <= up.users * clip * (1 + 1e-4)
                checked += up.users > 0
    assert checked >= 12  # pretraining rounds and PEE rounds
    noised = pipeline(dp_clip=0.5, dp_target_epsilon=8.0, dp_delta=1e-3)
    rep = noised["privacy"]
    assert rep["releases"] == {"pretrain": 3 + 2, "pee": 1}  # 3 init exchanges, 2 + 1 passes
    eps = rep["epsilon"]
    assert eps["covered"] == pytest.approx(8.0, rel=0.01) and eps["covered"] <= 8.0
    assert eps["covered"] == pytest.approx(epsilon(rep["noise_multiplier"], 6, 1e-3), rel=1e-3)
    assert eps["pretrain"] < eps["covered"] and eps["pee"] < eps["pretrain"]
    assert "GaussianDpEvent" in rep["dp_event"] and "count=6" in rep["dp_event"]
    assert any(line.startswith("statistics") for line in rep["not_covered"])
    items = noised["dataset"]["items"]
    assert [r["rows"] for r in noised["pretrain"]] == [items] * 4
    assert all(r["loss"] is None for r in noised["pretrain"])  # the loss stayed on the devices
    sent = [
        decode_device_update(content)
        for content in (from_record_dict(r.content) for r in noised["sent"])
        if "grad" in content.arrays.get("upload", {})
    ]
    assert sent and all(up.loss_sum == 0 for up in sent)
    assert all(g["rows"] == items and g["loss"] is None for r in noised["pee"] for g in r["groups"])


@pytest.mark.parametrize(
    "dp, words",
    [
        (dict(dp_noise_multiplier=1.0), "need dp-clip"),
        (dict(dp_clip=1.0, dp_noise_multiplier=1.0, dp_target_epsilon=2.0), "not both"),
        (dict(dp_clip=1.0, ldp_noise_multiplier=1.0, secure_rows=True), "distributed DP"),
        (dict(dp_clip=1.0, dp_noise_multiplier=1.0, dp_noise_source="os"), "dp-noise-source"),
        (dict(dp_clip=1.0, dp_target_epsilon=1e-9), "unreachable"),
        (dict(dp_clip=-1.0), "must be >= 0"),
        (dict(ldp_noise_multiplier=1.0), "need dp-clip"),
        (dict(dp_clip=1.0, ldp_noise_multiplier=-1.0), "must be >= 0"),
    ],
)
def test_dp_run_config_errors_are_one_line(dp, words):
    from peel_fed.fedconfig import ConfigError, FedConfig

    with pytest.raises(ConfigError) as err:
        FedConfig(**dp)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_strategy_noises_each_init_exchange_on_its_own_layer():
    from test_adapters import DATA, SMALL, _stats_result

    from peel_fed.fedconfig import FedConfig
    from strategies.log import PhaseLog
    from strategies.pretrain import PretrainStrategy

    cfg = FedConfig(**SMALL, dp_clip=0.5, dp_noise_multiplier=2.0)
    strategy = PretrainStrategy(cfg, PhaseLog(cfg, []), DATA, _stats_result(cfg))
    strategy.aggregate_contributions({}, 1)  # no node replied: the release is noise alone
    S = strategy.server.S
    assert (S[1] != 0).all() and S[0].abs().sum() == 0 and S[2].abs().sum() == 0
    assert S[1].std().item() == pytest.approx(1.0, rel=0.2)


def _pee_devices():
    from peel_fed.blocks import BlockLayout, popularity_item_groups
    from peel_fed.data import split_validation
    from peel_fed.fedpee import FedPEEConfig, PEEDevices

    ds = _board()
    split = split_validation(ds.train, ds.n_users, 0.2, seed=0)
    layout = BlockLayout(popularity_item_groups(ds.item_popularity(), 4), 16, 4)
    rng = np.random.default_rng(0)
    vecs = rng.normal(0, 0.3, (ds.n_users, 16)).astype(np.float32)
    table = rng.normal(0, 0.3, (ds.n_items, 16)).astype(np.float32)
    alpha = np.full((4, 4), 0.5)
    cfg = FedPEEConfig(local_steps=2)
    devices = PEEDevices(np.arange(ds.n_users), vecs, ds.n_users, split.fit, split.val, layout, cfg)
    return devices, table, alpha


def test_pee_clipping_bounds_each_user_s_rows_and_weight_gradient_together():
    users = np.arange(30)
    norms = {}
    for clip in (None, 0.25):
        devices, table, alpha = _pee_devices()
        norms[clip] = []
        for u in users:
            up = devices.device_round(np.array([u]), table, alpha, 1, clip)
            norms[clip].append(np.sqrt((up.grad**2).sum() + (up.weight_grad**2).sum()))
    plain, clipped = np.array(norms[None]), np.array(norms[0.25])
    assert (plain > 0.25).any() and (plain < 0.25).any()
    np.testing.assert_allclose(clipped, np.minimum(plain, 0.25), rtol=1e-4)
    # per user: one node with all of them uploads the sum of their clipped uploads
    devices, table, alpha = _pee_devices()
    together = devices.device_round(users, table, alpha, 1, 0.05)
    alone = []
    for u in users:
        devices, table, alpha = _pee_devices()
        alone.append(devices.device_round(np.array([u]), table, alpha, 1, 0.05))
    full = np.zeros_like(table)
    for up in alone:
        full[up.rows] += up.grad
    np.testing.assert_allclose(full[together.rows], together.grad, atol=1e-6)
    np.testing.assert_allclose(sum(up.weight_grad for up in alone), together.weight_grad, atol=1e-6)


def test_local_dp_noises_every_value_of_a_pee_upload_with_each_user_s_own_noise():
    """Each user adds noise of ldp_noise x clip to each of its row gradients and dL_val/d alpha
    values before the node sums them (from its own stream: packing does not change the sum);
    local DP without a clip is refused."""
    from dataclasses import replace as dc_replace

    users, clip, ldp = np.arange(30), 0.05, 2.0
    runs = {}
    for noise in (0.0, ldp):
        devices, table, alpha = _pee_devices()
        devices.cfg = dc_replace(devices.cfg, ldp_noise=noise)
        runs[noise] = devices.device_round(users, table, alpha, 1, clip)
    plain, noisy = runs[0.0], runs[ldp]
    assert np.array_equal(plain.rows, noisy.rows)
    # a row summed over n users carries n users' noise, the weight gradient every user's
    grad_noise = (noisy.grad - plain.grad) / np.sqrt(noisy.row_devices)[:, None]
    assert float(grad_noise.std()) == pytest.approx(ldp * clip, rel=0.05)
    weight_noise = (noisy.weight_grad - plain.weight_grad) / np.sqrt(users.size)
    assert float(weight_noise.std()) == pytest.approx(ldp * clip, rel=0.35)  # 16 values
    alone = []
    for u in users:
        devices, table, alpha = _pee_devices()
        devices.cfg = dc_replace(devices.cfg, ldp_noise=ldp)
        alone.append(devices.device_round(np.array([u]), table, alpha, 1, clip))
    full = np.zeros_like(table)
    for up in alone:
        full[up.rows] += up.grad
    np.testing.assert_allclose(full[noisy.rows], noisy.grad, atol=1e-5)
    np.testing.assert_allclose(sum(up.weight_grad for up in alone), noisy.weight_grad, atol=1e-6)
    devices, table, alpha = _pee_devices()
    devices.cfg = dc_replace(devices.cfg, ldp_noise=ldp)
    with pytest.raises(ValueError, match="needs dp-clip"):
        devices.device_round(users, table, alpha, 1, None)


def test_under_noise_pee_devices_keep_their_loss_statistics():
    devices, table, alpha = _pee_devices()
    up = devices.device_round(np.arange(30), table, alpha, 1, 0.05, private=True)
    assert up.loss_sum.sum() == 0 and up.loss_count.sum() == 0
    devices, table, alpha = _pee_devices()
    assert devices.device_round(np.arange(30), table, alpha, 1, 0.05).loss_count.sum() > 0


def test_under_noise_the_pee_server_noises_every_row_and_the_weight_gradient():
    from peel_fed.fedpee import FedPEEConfig, PEEGroupServer

    devices, table, alpha = _pee_devices()
    layout = devices.layout
    popularity = np.ones(table.shape[0])
    dp = DPConfig(clip=0.5, noise_multiplier=2.0, delta=1e-5)
    server = PEEGroupServer(table, popularity, layout, FedPEEConfig(), 0, dp, 10.0)
    weights = server.weights()
    stats = server.apply([])  # nobody took part: the release is noise alone
    assert (server.table.numpy() != table).all(axis=1).all()
    assert not np.allclose(server.weights(), weights)
    assert stats["rows"] == table.shape[0] and stats["loss"] is None


def test_the_privacy_benchmark_writes_its_report(tmp_path):
    from sim.bench_privacy import main

    out = tmp_path / "privacy.json"
    args = ["--dataset", "checkerboard", "--passes", "1", "--epsilons", "8", "--out", str(out)]
    report = main(args + ["--decoys", "3", "--ldp-noises", "3", "--repeats", "2"])
    assert [(r["target_epsilon"], r["decoys"], r["ldp_noise"]) for r in report["runs"]] == [
        (None, 0, 0.0),
        (8.0, 0, 0.0),
        (None, 3, 0.0),
        (None, 0, 3.0),
    ]
    noised, local = report["runs"][1], report["runs"][3]
    assert noised["epsilon"] == pytest.approx(8.0, rel=0.01) and noised["epsilon"] <= 8.0
    assert local["epsilon"] == pytest.approx(local_epsilon(3.0, report["releases"], 1e-5))
    assert "local DP, noise 3 x clip" in out.with_suffix(".md").read_text()
    assert all(len(r["train_seconds_runs"]) == 2 for r in report["runs"])
    assert out.is_file() and out.with_suffix(".md").is_file()
    # fixed noise multipliers, matrix factorisation (no contribution sums) and the SGD server
    mf_args = ["--epsilons", "", "--layers", "0", "--server-optimizer", "sgd", "--server-lr", "100"]
    mf = main(args[:-1] + [str(tmp_path / "mf.json"), *mf_args, "--noise-multipliers", "1e-4,2"])
    tiny, two = mf["runs"][1], mf["runs"][2]
    assert (tiny["noise_multiplier"], tiny["epsilon"]) == (1e-4, None)
    assert two["epsilon"] == pytest.approx(epsilon(2.0, mf["releases"], 1e-5))
    assert mf["releases"] == 1  # one pass, no init exchanges without layers
    assert "central DP, noise multiplier 2" in (tmp_path / "mf.md").read_text()


def test_local_dp_noises_every_uploaded_value_on_the_device_and_keeps_none_of_it():
    """Each user adds Gaussian noise of ldp_noise x clip to every value it sends (row gradients
    and contribution changes); the device's own record of its contributions stays un-noised,
    and the noise is its own (seeded by user and round), so packing does not change it."""
    from dataclasses import replace as dc_replace

    ds = _board()
    clip, users = 0.5, np.arange(0, 60)
    fed = _model(ds)
    fed.clip = clip
    fed.initialise()
    layers, before = fed.server.item_layers(), fed.devices.state_arrays()
    runs = {}
    for ldp in (0.0, 2.0):  # the same devices, from the same state, on the same tables
        fed.devices.load_state(before)
        fed.devices.cfg = dc_replace(CFG, ldp_noise=ldp)
        up = fed.devices.device_round(users, layers, 1, clip)
        runs[ldp] = (up, fed.devices.contrib.clone())
    (plain, kept_plain), (noisy, kept_noisy) = runs[0.0], runs[2.0]
    assert np.array_equal(plain.rows, noisy.rows)
    assert torch.equal(kept_plain, kept_noisy)  # the device keeps what it would without noise
    # a row summed over n users carries n users' noise: normalise by sqrt(n)
    grad_noise = (noisy.grad - plain.grad) / torch.from_numpy(noisy.row_devices).sqrt()[:, None]
    assert float(grad_noise.std()) == pytest.approx(2.0 * clip, rel=0.05)
    contrib_noise = noisy.contrib_delta - plain.contrib_delta
    assert float(contrib_noise.abs().mean()) > 0.5 * clip
    # the same users packed one per node upload the same noise in sum
    fed.devices.load_state(before)
    alone = [fed.devices.device_round(np.array([u]), layers, 1, clip) for u in users]
    total = torch.zeros_like(noisy.contrib_delta)
    for up in alone:
        idx = torch.from_numpy(np.searchsorted(noisy.contrib_rows, up.contrib_rows))
        total[:, idx] += up.contrib_delta
    np.testing.assert_allclose(total.numpy(), noisy.contrib_delta.numpy(), atol=1e-4)


def test_local_epsilon_is_the_gaussian_mechanism_at_twice_the_clip():
    """Local DP: two uploads of one user differ by up to 2 x clip, so noise s x clip per value
    is a Gaussian mechanism of multiplier s / 2 (the analytic epsilon, Balle and Wang)."""
    from peel_fed.privacy import local_epsilon

    exact = _analytic_gaussian_epsilon(8.0 / 2, 1e-5)
    assert local_epsilon(8.0, 1, 1e-5) == pytest.approx(exact, rel=0.01)
    assert local_epsilon(8.0, 4, 1e-5) == pytest.approx(
        _analytic_gaussian_epsilon(8.0 / 2 / 2, 1e-5), rel=0.01
    )


def test_a_local_dp_run_reports_its_epsilon_and_keeps_the_loss_on_the_devices(server_identity):
    from test_adapters import SMALL

    from peel_fed.fedconfig import FedConfig
    from peel_fed.privacy import local_epsilon
    from sim.local_grid import LocalGrid
    from strategies.server_app import run_pipeline

    cfg = FedConfig(**SMALL, dp_clip=1.0, ldp_noise_multiplier=4.0)
    report = run_pipeline(LocalGrid(3), cfg)
    local = report["privacy"]["local"]
    releases = cfg.dp_releases()
    assert local["releases"] == releases and set(releases) == {"pretrain", "pee"}
    for phase, n in releases.items():
        assert local["epsilon"][phase] == round(local_epsilon(4.0, n, cfg.dp_delta), 4)
    total = sum(releases.values())
    assert local["epsilon"]["covered"] == round(local_epsilon(4.0, total, cfg.dp_delta), 4)
    assert all(r["loss"] is None for r in report["pretrain"])  # a loss sum is a release too
    assert all(g["loss"] is None for r in report["pee"] for g in r["groups"])
    assert report["privacy"]["noise_multiplier"] == 0  # no central noise: clipped sums only


def test_distributed_dp_the_nodes_noise_every_released_sum_and_the_server_adds_none(
    pipeline, monkeypatch
):
    """secure-rows with DP noise: each of the 3 nodes adds a share of std sigma C / sqrt(3) to
    the released parts of its upload, which are (from the layouts, not from the code under
    test) a pretraining round's whole vector, an init step's own layer, and in PEE learning each
    group's row gradients and dL_val/d alpha but not its statistics; the shares of one exchange
    add up to sigma C = 1 there and to nothing elsewhere; every sum the server decodes is the
    clean sum plus exactly those shares; the devices send no row counts, the servers add no
    noise, and the report names the mechanism and the seeded shares' caveat."""
    import clients.client_app as client_app
    import strategies.pee as pee
    import strategies.pretrain as pretrain
    from peel_fed.privacy import DISTRIBUTED

    dp = dict(secure_rows=True, dp_clip=0.5, dp_noise_multiplier=2.0, dp_delta=1e-3)
    clean: dict[tuple, np.ndarray] = {}
    shares: dict[tuple, list[np.ndarray]] = {}
    share = client_app._noise_share

    def recording_share(content, context, vector, parts, exchange):
        out = share(content, context, vector, parts, exchange)
        clean[exchange] = clean.get(exchange, 0) + vector
        shares.setdefault(exchange, []).append(out - vector)
        return out

    decoded: list[np.ndarray] = []
    for cls in (pretrain.PretrainStrategy, pee.PEEStrategy):

        def recording_aggregate(self, values, *args, _aggregate=cls.aggregate_rows, **kw):
            decoded.append(values.copy())
            servers = getattr(self, "servers", None) or [self.server]
            assert not any(s.server_noise for s in servers)
            return _aggregate(self, values, *args, **kw)

        monkeypatch.setattr(cls, "aggregate_rows", recording_aggregate)
    counts: list[np.ndarray] = []
    configure_rows = {
        cls: cls.configure_rows for cls in (pretrain.PretrainStrategy, pee.PEEStrategy)
    }

    def recording_counts(cls):
        def configure(self, total, *args):
            counts.append(total[:-2] if cls is pretrain.PretrainStrategy else total[:-1])
            return configure_rows[cls](self, total, *args)

        return configure

    for cls in configure_rows:
        monkeypatch.setattr(cls, "configure_rows", recording_counts(cls))
    monkeypatch.setattr(client_app, "_noise_share", recording_share)
    noised = pipeline(**dp)
    assert len(counts) == 3 + 4 + 2 and all(not c.any() for c in counts)  # no row counts
    mechanism = noised["privacy"]["mechanism"]
    assert mechanism.startswith(DISTRIBUTED) and "dp-noise-source=device" in mechanism
    assert noised["privacy"]["noise_source"] == "seed"
    assert (
        noised["privacy"]["epsilon"]
        == pipeline(**{**dp, "secure_rows": False})["privacy"]["epsilon"]
    )
    items, dim, layers, item_groups, blocks = noised["dataset"]["items"], 16, 3, 4, 4
    block = items * dim

    def released(exchange: tuple) -> np.ndarray:
        phase, kind, k = exchange
        if phase == 1:  # [E0 gradient | contribution change of each layer], all rows
            inside = np.zeros((1 + layers) * block, dtype=bool)
            inside[(1 + k) * block : (2 + k) * block] = True
            return inside if kind == 0 else np.ones_like(inside)
        group = [True] * (block + item_groups * blocks) + [False] * (2 + 2 * item_groups)
        return np.array(group * 2)  # 2 user groups

    assert {e[0] for e in shares} == {1, 2} and len(shares) == len(decoded) == 3 + 4 + 2
    for (exchange, per_node), server_sum in zip(shares.items(), decoded, strict=True):
        assert len(per_node) == 3
        total, inside = np.sum(per_node, axis=0), released(exchange)
        assert total.shape == inside.shape and np.all(total[~inside] == 0), exchange
        assert total[inside].std() == pytest.approx(1.0, rel=0.15), exchange
        np.testing.assert_allclose(server_sum, clean[exchange] + total, atol=1e-5)
    assert [r["rows"] for r in noised["pretrain"]] == [items] * 4  # every row, no counts sent
