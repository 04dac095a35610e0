"""Gradient, data-covariance and Frobenius sensitivities against closed forms on linear models."""

import pytest
import torch
from torch import nn

from lorambo.sensitivity import (data_covariance, data_weighted_tail_energy,
                                 frobenius_tail_energy, gradient_sensitivity)

DT = torch.float64


def linear2(seed):
    """x -> W2 (W1 x + b1), random 3-D batches of different token counts."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4, dtype=DT), nn.Linear(4, 3, bias=False, dtype=DT))
    batches = [(torch.randn(2, t, 5, generator=g, dtype=DT), torch.randn(2, t, 3, generator=g, dtype=DT))
               for t in (3, 7)]
    return model, batches


def test_gradient_sensitivity_closed_form(h):
    model, batches = linear2(0)
    model[0].weight.requires_grad_(False)
    w1, b1, w2 = model[0].weight.detach(), model[0].bias.detach(), model[1].weight.detach()
    expected = {"0": 0.0, "1": 0.0}
    for x, y in batches:
        x, y = x.reshape(-1, 5), y.reshape(-1, 3)
        hid = x @ w1.T + b1
        r = 2 * (hid @ w2.T - y) / y.numel()              # d mean((yhat - y)^2) / d yhat
        expected["1"] += float((r.T @ hid).pow(2).sum()) / len(batches)
        expected["0"] += float((w2.T @ r.T @ x).pow(2).sum()) / len(batches)
    got = gradient_sensitivity(model, h.mse, batches)
    assert got == pytest.approx(expected, rel=1e-12)
    assert model[0].weight.requires_grad is False
    assert all(p.grad is None for p in model.parameters())
    assert gradient_sensitivity(model, h.mse, batches, modules=["1"]) == pytest.approx(
        {"1": expected["1"]}, rel=1e-12)


def test_data_covariance_is_token_mean_of_outer_products(h):
    model, batches = linear2(1)
    got = data_covariance(model, h.mse, batches)
    xs = torch.cat([x.reshape(-1, 5) for x, _ in batches])             # 20 tokens
    hid = xs @ model[0].weight.detach().T + model[0].bias.detach()
    torch.testing.assert_close(got["0"], xs.T @ xs / 20, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got["1"], hid.T @ hid / 20, rtol=1e-12, atol=1e-14)
    # any forward callable works; hooks are removed afterwards
    fwd = data_covariance(model, lambda m, b: m(b[0]), batches, modules=["0"])
    torch.testing.assert_close(fwd["0"], got["0"])
    assert not model[0]._forward_hooks and not model[1]._forward_hooks
    # layers called by keyword (nn.Linear's input=): the hook read args[0] only (IndexError)
    by_keyword = data_covariance(model, lambda m, b: m[1](input=m[0](input=b[0])), batches)
    torch.testing.assert_close(by_keyword["0"], xs.T @ xs / 20, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(by_keyword["1"], hid.T @ hid / 20, rtol=1e-12, atol=1e-14)


def test_frobenius_tail_energy_equals_truncated_svd_error():
    W = torch.randn(7, 5, dtype=DT)
    u, s, vh = torch.linalg.svd(W, full_matrices=False)
    tails = frobenius_tail_energy(W)
    assert tails.shape == (6,)
    for r in range(6):
        best = (u[:, :r] * s[:r]) @ vh[:r]
        assert float(tails[r]) == pytest.approx(float((W - best).pow(2).sum()), rel=1e-10, abs=1e-12)
    assert frobenius_tail_energy(W, max_rank=2).tolist() == pytest.approx(tails[:3].tolist())
    assert frobenius_tail_energy(W.T).tolist() == pytest.approx(tails.tolist())   # Conv1D layout


def test_frobenius_randomized_exact_on_low_rank():
    W = torch.randn(40, 4, dtype=DT) @ torch.randn(4, 30, dtype=DT)       # rank 4
    exact = frobenius_tail_energy(W, max_rank=6)
    approx = frobenius_tail_energy(W, max_rank=6, randomized=True)
    torch.testing.assert_close(approx, exact, rtol=1e-8, atol=1e-8 * float(exact[0]))
    assert float(exact[4]) < 1e-20 * float(exact[0]) + 1e-18


def _weighted_error(W, X, G):
    d = W - X
    return float((d @ G @ d.T).trace())


def test_data_weighted_tail_energy_full_rank_is_optimal():
    W = torch.randn(4, 6, dtype=DT)
    A = torch.randn(6, 6, dtype=DT)
    G = A @ A.T + 0.1 * torch.eye(6, dtype=DT)
    tails = data_weighted_tail_energy(W, G)
    assert tails.shape == (5,)
    L = torch.linalg.cholesky(G)                   # G = L L^T, an independent square root
    u, s, vh = torch.linalg.svd(W @ L, full_matrices=False)
    linv = torch.linalg.inv(L)
    for r in range(5):
        X = (u[:, :r] * s[:r]) @ vh[:r] @ linv     # a rank-r minimiser
        assert float(tails[r]) == pytest.approx(_weighted_error(W, X, G), rel=1e-9, abs=1e-12)
        for _ in range(5):                         # random rank-r candidates do no better
            Y = torch.randn(4, r, dtype=DT) @ torch.randn(r, 6, dtype=DT)
            assert _weighted_error(W, Y, G) >= float(tails[r]) - 1e-10
    assert float(tails[0]) == pytest.approx(float((W @ G @ W.T).trace()), rel=1e-12)


def test_data_weighted_tail_energy_singular_covariance():
    # G from 3 tokens in 6 dims has rank 3: Tr((W-X) G (W-X)^T) = ||(W-X) Xd^T||^2 / n
    W = torch.randn(5, 6, dtype=DT)
    xd = torch.randn(3, 6, dtype=DT)
    G = xd.T @ xd / 3
    tails = data_weighted_tail_energy(W, G, max_rank=5)
    s2 = torch.linalg.svdvals(W @ xd.T / 3 ** 0.5).pow(2)
    expected = [float(s2[r:].sum()) for r in range(6)]
    assert tails.tolist() == pytest.approx(expected, abs=1e-10)
    assert tails[3:].abs().max() < 1e-10


def test_simple_bad_inputs(h):
    model, batches = linear2(2)
    with pytest.raises(ValueError, match=r"scalar tensor, got shape \(2, 3, 3\)"):
        gradient_sensitivity(model, lambda m, b: m(b[0]), batches)
    with pytest.raises(ValueError, match="no batches"):
        gradient_sensitivity(model, h.mse, iter([]))
    with pytest.raises(ValueError, match="unknown module 'lm_head'"):
        data_covariance(model, h.mse, batches, modules=["lm_head"])
    with pytest.raises(ValueError, match="no batches"):
        data_covariance(model, h.mse, [])
    with pytest.raises(RuntimeError, match="never ran through"):
        data_covariance(model, lambda m, b: m[0](b[0]), batches)
    with pytest.raises(ValueError, match="transpose a Conv1D weight"):
        data_weighted_tail_energy(torch.randn(6, 4, dtype=DT), torch.eye(6, dtype=DT))
    with pytest.raises(ValueError, match="max_rank must be a non-negative integer"):
        frobenius_tail_energy(torch.randn(3, 3), max_rank=-1)
