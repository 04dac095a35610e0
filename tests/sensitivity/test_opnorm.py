"""hessian_opnorm against the eigenvalues of dense per-layer Hessians."""

import numpy as np
import pytest
import torch
from torch import nn

from lorambo.sensitivity import find_targets, hessian_opnorm


def test_matches_max_abs_eigenvalue(h, case):
    model, loss_fn, batches = case
    est = hessian_opnorm(model, loss_fn, batches, num_iters=3000, tol=1e-12, probes_per_pass=3)
    assert len(est) >= 2
    for name, e in est.items():
        dense = h.dense_hessian(model, loss_fn, batches, h.weight_of(model, name))
        exact = float(torch.linalg.eigvalsh(dense).abs().max())
        assert e.value == pytest.approx(exact, rel=1e-6), name
        assert e.value <= exact * (1 + 1e-12)          # ||H v|| never exceeds ||H||
        assert e.num_probes < 3000 and e.stderr <= 1e-12 * e.value   # stopped on tol


def test_few_iterations_stop_at_num_iters_and_lower_bound(h):
    model, loss_fn, batches = h.make_attention(seed=1)
    est = hessian_opnorm(model, loss_fn, batches, num_iters=3, tol=0.0)
    assert set(est) == {t.name for t in find_targets(model)} and len(est) >= 2
    for name, e in est.items():
        exact = float(torch.linalg.eigvalsh(
            h.dense_hessian(model, loss_fn, batches, h.weight_of(model, name))).abs().max())
        assert e.num_probes == 3 and 0 < e.value <= exact * (1 + 1e-12) and e.stderr > 0


def test_indefinite_block_with_tied_magnitudes():
    # loss = (w0^2 - w1^2) / 2: Hessian diag(1, -1). For every +-1 start the Rayleigh quotient
    # is 0 at every iteration (power iteration oscillates), while ||H v|| is exactly 1
    model = nn.Sequential(nn.Linear(2, 1, bias=False, dtype=torch.float64))
    loss = lambda m, b: (m[0].weight[0, 0] ** 2 - m[0].weight[0, 1] ** 2) / 2  # noqa: E731
    est = hessian_opnorm(model, loss, [None], num_iters=5)
    assert est["0"].value == pytest.approx(1.0, rel=1e-12)


def test_restores_flags_and_rejects_bad_inputs(h):
    model, loss_fn, batches = h.make_mlp(seed=2)
    model[0].weight.requires_grad_(False)
    hessian_opnorm(model, loss_fn, batches, num_iters=2)
    assert model[0].weight.requires_grad is False and model[2].weight.requires_grad is True
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="num_iters must be a positive integer"):
        hessian_opnorm(model, loss_fn, batches, num_iters=0)
    with pytest.raises(ValueError, match="no batches"):
        hessian_opnorm(model, loss_fn, [])
    with pytest.raises(ValueError, match="unknown module 'x'"):
        hessian_opnorm(model, loss_fn, batches, modules=["x"])
    with pytest.raises(ValueError, match=r"scalar tensor, got shape \(10, 4\)"):
        hessian_opnorm(model, lambda m, b: m(b[0]), batches)
    with pytest.raises(RuntimeError, match="non-finite Hessian-vector product"):
        hessian_opnorm(model, lambda m, b: loss_fn(m, b) * float("nan"), batches)
    assert model[0].weight.requires_grad is False


def test_numpy_seed_starts_from_the_probe_of_the_plain_int(h):
    # the start vector is keyed by the seed's repr: np.int64(7) started elsewhere than 7
    from lorambo.sensitivity.probes import rademacher

    model, loss_fn, batches = h.make_mlp(seed=2)
    est = hessian_opnorm(model, loss_fn, batches, modules=["2"], num_iters=2, tol=0.0, seed=np.int64(7))
    dense = h.dense_hessian(model, loss_fn, batches, model[2].weight)
    v = rademacher((dense.shape[0], 1), 7, 0, "opnorm", dtype=torch.float64)
    v = dense @ (v / v.norm())
    ref = dense @ (v / v.norm())                       # two power steps by hand
    assert est["2"].value == pytest.approx(float(ref.norm()), rel=1e-10)
    assert est["2"].stderr == pytest.approx(abs(float(ref.norm()) - float(v.norm())), rel=1e-8)


@pytest.mark.parametrize("tol", [None, float("nan"), -1e-4, float("inf"), "1e-4"])
def test_bad_tol_is_refused(h, tol):
    model, loss_fn, batches = h.make_mlp(seed=2)
    with pytest.raises(ValueError, match=r"tol must be a finite number >= 0, got"):
        hessian_opnorm(model, loss_fn, batches, num_iters=2, tol=tol)
