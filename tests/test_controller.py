"""The block-weight controller: output contract and gradients against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peel_fed.controller import Controller, ControllerConfig, controller_features
from peel_fed.peel import validation_weight_grad

G_V, N = 3, 4


def _features(seed=0):
    return np.random.default_rng(seed).normal(size=2 * G_V)


def _perturbed(seed=0, lr=1e-2) -> Controller:
    torch.manual_seed(seed)
    ctrl = Controller(G_V, N, ControllerConfig(hidden=5, lr=lr)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ctrl.parameters():
            p.add_(0.7 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return ctrl


def test_untrained_controller_gives_ones():
    ctrl = Controller(G_V, N)
    w = ctrl.weights(_features())
    assert w.shape == (G_V, N)
    np.testing.assert_allclose(w, np.ones((G_V, N)), rtol=1e-6)


def test_output_contract_after_perturbation():
    ctrl = _perturbed()
    for seed in range(3):
        w = ctrl.weights(_features(seed))
        assert w.shape == (G_V, N)
        assert (w > 0).all()
        assert w.sum() == pytest.approx(G_V * N, rel=1e-12)
        assert not np.allclose(w, 1.0)  # the perturbation really changed the output


def test_controller_features_standardised():
    pop = np.array([10.0, 0.0, 4.0, 2.0, 1.0, 1.0])
    groups = np.array([0, 0, 1, 1, 2, 2])
    f = controller_features(pop, groups, np.array([0.5, 0.5, 0.5]))
    mean_pop = np.log1p(np.array([5.0, 3.0, 1.0]))
    z = (mean_pop - mean_pop.mean()) / mean_pop.std()
    np.testing.assert_allclose(f, np.concatenate([z, np.zeros(3)]))


def _objective(ctrl: Controller, feats: np.ndarray, grad_w: np.ndarray) -> float:
    with torch.no_grad():
        return float((ctrl(torch.as_tensor(feats)) * torch.as_tensor(grad_w)).sum())


def test_apply_weight_grad_backpropagates_exact_gradient():
    ctrl = _perturbed(lr=1e-4)
    feats = _features()
    grad_w = np.random.default_rng(5).normal(size=(G_V, N))
    # central finite differences of f(theta) = sum(alpha(theta) * G)
    eps = 1e-6
    fd = []
    for p in ctrl.parameters():
        flat = p.data.view(-1)
        g = torch.zeros_like(flat)
        for j in range(flat.numel()):
            old = float(flat[j])
            flat[j] = old + eps
            up = _objective(ctrl, feats, grad_w)
            flat[j] = old - eps
            down = _objective(ctrl, feats, grad_w)
            flat[j] = old
            g[j] = (up - down) / (2 * eps)
        fd.append(g.view(p.shape))
    before = _objective(ctrl, feats, grad_w)
    stepped = _perturbed(lr=1e-4)  # same seed: an identical controller with its own optimiser
    for p, q in zip(stepped.parameters(), ctrl.parameters(), strict=True):
        assert torch.equal(p, q)
    stepped.apply_weight_grad(feats, grad_w)
    for p, g in zip(stepped.parameters(), fd, strict=True):
        assert float(g.abs().max()) > 0
        np.testing.assert_allclose(p.grad.numpy(), g.numpy(), rtol=1e-6, atol=1e-8)
    # and the optimiser step goes downhill on the objective
    assert _objective(stepped, feats, grad_w) < before


def _val_loss_reference(u, items, pos, neg, alpha, groups) -> float:
    """float64 numpy BPR loss with weighted block scores."""
    b = u.shape[0]
    bd = u.shape[1] // alpha.shape[1]

    def score(it):
        per_block = (u * items[it]).reshape(b, alpha.shape[1], bd).sum(-1)
        return (per_block * alpha[groups[it]]).sum(-1)

    return float(np.mean(np.logaddexp(0.0, score(neg) - score(pos))))


def test_validation_weight_grad_matches_finite_differences():
    rng = np.random.default_rng(3)
    n_items, dim, b = 12, 8, 16
    groups = np.array([0, 1, 2] * 4)
    u = rng.normal(size=(b, dim))
    items = rng.normal(size=(n_items, dim))
    pos, neg = rng.integers(0, n_items, b), rng.integers(0, n_items, b)
    alpha = rng.random((G_V, N)).astype(np.float32).astype(np.float64) + 0.5
    grad, loss = validation_weight_grad(
        torch.from_numpy(u),
        torch.from_numpy(items),
        torch.from_numpy(pos),
        torch.from_numpy(neg),
        alpha,
        torch.from_numpy(groups),
    )
    assert grad.shape == (G_V, N)
    assert loss == pytest.approx(_val_loss_reference(u, items, pos, neg, alpha, groups), rel=1e-6)
    eps = 1e-6
    fd = np.zeros_like(alpha)
    for g in range(G_V):
        for n in range(N):
            a_up, a_dn = alpha.copy(), alpha.copy()
            a_up[g, n] += eps
            a_dn[g, n] -= eps
            fd[g, n] = (
                _val_loss_reference(u, items, pos, neg, a_up, groups)
                - _val_loss_reference(u, items, pos, neg, a_dn, groups)
            ) / (2 * eps)
    assert np.abs(fd).max() > 1e-3
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)
