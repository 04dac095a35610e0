"""Online growth over all layers in lockstep: the same estimates and decisions as the per-layer
power iteration, one collective per product step for all layers, and the grouped kernels
(``LORAMBO_SKETCH=triton``, under the Triton interpreter on CPU)."""

import numpy as np
import pytest
import torch
from torch import nn

import lorambo
from lorambo.allocation import benefits
from lorambo.allocation.online import (OnlineGrowth, plan_growth, projected_top_singular,
                                       projected_top_singular_many, subspace_basis)
from lorambo.distributed import decision_generator
from lorambo.ops.sketch import set_sketch_backend

pytestmark = pytest.mark.usefixtures("one_thread")

# the kernel path runs on CUDA where there is one, else on CPU under the Triton interpreter
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device(path):
    return KERNEL_DEVICE if path == "triton" else torch.device("cpu")

# (in, out, tokens per call, active rank, k): two layers of one shape share a batched QR; layer 2
# has a B = 0 adapter, layer 3 rank 0 and a smaller k (fewer columns: its own group)
SPECS = [(9, 7, [13, 6], 2, 3), (9, 7, [11], 1, 3), (12, 5, [8], 2, 3), (6, 10, [15], 0, 1)]


@pytest.fixture
def sketch_backend():
    yield set_sketch_backend
    set_sketch_backend(None)


def _problem(dtype, device=torch.device("cpu")):
    pairs, a_cols, b_cols = [], [], []
    for l, (n_in, n_out, tokens, r, _) in enumerate(SPECS):
        pairs.append([(torch.randn(t, n_in, dtype=dtype).to(device), torch.randn(t, n_out, dtype=dtype).to(device))
                      for t in tokens])
        a_cols.append(torch.randn(n_in, r, dtype=dtype).to(device))
        b = torch.zeros(n_out, r, dtype=dtype) if l == 2 else torch.randn(n_out, r, dtype=dtype)
        b_cols.append(b.to(device))
    return pairs, a_cols, b_cols


def _dense(pairs, a, b):
    g = sum(dy.double().cpu().T @ x.double().cpu() for x, dy in pairs)
    a, b = a.cpu(), b.cpu()
    pa = torch.eye(g.shape[1], dtype=torch.float64)
    pb = torch.eye(g.shape[0], dtype=torch.float64)
    if a.shape[1]:
        q = torch.linalg.qr(a.double()).Q
        pa -= q @ q.T
    if b.shape[1] and b.abs().max() > 0:
        q = torch.linalg.qr(b.double()).Q
        pb -= q @ q.T
    return torch.linalg.svd(pb @ g @ pa)


def _many(pairs, a_cols, b_cols, niter, seeds=None, lockstep=True):
    gens = [torch.Generator().manual_seed(100 + l) for l in range(len(SPECS))]
    return projected_top_singular_many(pairs, [s[0] for s in SPECS], [s[1] for s in SPECS],
                                       [s[4] for s in SPECS], a_cols, b_cols, niter, 4, gens, seeds,
                                       lockstep=lockstep)


@pytest.mark.parametrize("lockstep", [True, None])  # None: the per-layer loop on one CPU process
def test_lockstep_equals_the_per_layer_power_iteration(sketch_backend, lockstep):
    sketch_backend("torch")
    pairs, a_cols, b_cols = _problem(torch.float64)
    host, sigmas, vectors = _many(pairs, a_cols, b_cols, niter=1, lockstep=lockstep)
    assert host.dtype == torch.float64 and host.device.type == "cpu" and host.shape == (4, 3)
    for l, (n_in, n_out, _, _, k) in enumerate(SPECS):
        want_s, want_v = projected_top_singular(pairs[l], n_in, n_out, k, subspace_basis(a_cols[l]),
                                                subspace_basis(b_cols[l]), 1, 4,
                                                torch.Generator().manual_seed(100 + l))
        torch.testing.assert_close(sigmas[l], want_s, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(host[l, :k], want_s, rtol=1e-10, atol=1e-12)
        assert not host[l, k:].any()
        for j in range(k):  # same directions up to sign
            assert abs(float(vectors[l][:, j] @ want_v[:, j])) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_estimates_match_the_dense_projected_svd(sketch_backend, path):
    sketch_backend(path)
    dtype = torch.float64 if path == "torch" else torch.float32
    pairs, a_cols, b_cols = _problem(dtype, _device(path))
    seeds = [int(s) for s in torch.randint(0, 2**62, (len(SPECS),))]
    _, sigmas, vectors = _many(pairs, a_cols, b_cols, niter=6, seeds=seeds)
    tol = 1e-8 if path == "torch" else 2e-4
    for l, (_, _, _, _, k) in enumerate(SPECS):
        exact = _dense(pairs[l], a_cols[l], b_cols[l])
        # the top value converges fastest; the rest to within the power iteration's accuracy
        sigma, vecs, a = sigmas[l].double().cpu(), vectors[l].double().cpu(), a_cols[l].double().cpu()
        torch.testing.assert_close(sigma[0], exact.S[0], rtol=tol, atol=tol)
        torch.testing.assert_close(sigma, exact.S[:k], rtol=2e-2, atol=1e-6)
        assert abs(float(vecs[:, 0] @ exact.Vh[0])) == pytest.approx(1.0, abs=1e-3)
        if a.shape[1]:  # new directions are orthogonal to the active rows of A
            assert float((a.T @ vecs).abs().max()) < 1e-4


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_one_collective_per_step_for_all_layers(sketch_backend, monkeypatch, path):
    sketch_backend(path)
    calls = {"reduce": 0, "broadcast": 0}
    real_reduce, real_broadcast = benefits.all_reduced_mean, benefits.broadcast_
    monkeypatch.setattr(benefits, "all_reduced_mean", lambda t: calls.__setitem__("reduce", calls["reduce"] + 1)
                        or real_reduce(t))
    monkeypatch.setattr(benefits, "broadcast_", lambda t: calls.__setitem__("broadcast", calls["broadcast"] + 1)
                        or real_broadcast(t))
    pairs, a_cols, b_cols = _problem(torch.float32, _device(path))
    _many(pairs, a_cols, b_cols, niter=2, seeds=list(range(len(SPECS))))
    assert calls == {"reduce": 2 * 2 + 2, "broadcast": 1}  # not per layer


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 10),
                        nn.Tanh(), nn.Linear(10, 3))
    return lorambo.configure_model(net, 1, capacity={"0": 5, "2": 5, "4": 4, "6": 3})


def _reference_plan(grower, step):
    """Today's decision: the per-layer power iteration, then the same greedy plan."""
    gains = {}
    for i, (name, layer) in enumerate(grower.layers.items()):
        room = layer.capacity - layer.rank
        if room > 0:
            a_basis = subspace_basis(layer.lora_A[:layer.rank].detach().T)
            b_basis = subspace_basis(layer.lora_B[:, :layer.rank].detach())
            sigma, _ = projected_top_singular(
                grower.capture.pairs(name), layer.in_features, layer.out_features, min(grower.sketch_rank, room),
                a_basis, b_basis, grower.power_iters, grower.oversample,
                decision_generator(grower.seed, "grow", step, i))
            gains[name] = sigma.double().cpu().numpy()
    room = {n: m.capacity - m.rank for n, m in grower.layers.items()}
    return gains, plan_growth(gains, grower.costs, room, grower.budget - grower.spent(), grower.threshold)


def _run(path, data_seed):
    set_sketch_backend(path)
    device = _device(path)
    net = _net().to(device)
    layers = lorambo.lora_layers(net)
    budget = sum(m.in_features + m.out_features for m in layers.values()) * 3
    grower = OnlineGrowth(layers, budget, sketch_rank=2, power_iters=4, seed=3)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    g = torch.Generator().manual_seed(data_seed)
    decisions = []
    for step in range(2):
        x, y = torch.randn(24, 6, generator=g).to(device), torch.randn(24, 3, generator=g).to(device)
        with grower.capture:
            ((net(x) - y) ** 2).mean().backward()
        gains, plan = _reference_plan(grower, step)
        records = grower.update(step)
        got = {r["layer"]: r["new_rank"] - r["old_rank"] for r in records}
        assert got == plan
        for r in records:
            np.testing.assert_allclose(r["gains"], gains[r["layer"]][:len(r["gains"])], rtol=1e-3)
        decisions.append([(r["layer"], r["old_rank"], r["new_rank"]) for r in records])
        opt.step()
        opt.zero_grad()
    return decisions


def test_online_growth_decides_as_the_per_layer_loop_on_both_paths(sketch_backend):
    data_seed = int(torch.randint(0, 2**20, ()))
    loop = _run("torch", data_seed)
    kernels = _run("triton", data_seed)
    assert loop == kernels and any(loop)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_layer_products_with_mixed_dtypes_and_a_layer_without_data(sketch_backend, path):
    from lorambo.ops.sketch import LayerProducts

    sketch_backend(path)
    device = _device(path)
    x = torch.randn(9, 5).to(device, torch.bfloat16)                      # bf16 input, fp32 gradient
    dy = torch.randn(9, 3).to(device)
    prod = LayerProducts([[(x, dy)], []], [5, 4], [3, 6], p=2)
    assert prod.kernels == (path == "triton")
    v, u = torch.randn(prod.numel(True)).to(device), torch.randn(prod.numel(False)).to(device)
    y, z = prod.apply(v), prod.apply(u, adjoint=True)
    g = dy.double().T @ x.double()
    torch.testing.assert_close(prod.blocks(y, "out")[0].double(), g @ prod.blocks(v, "in")[0].double(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prod.blocks(z, "in")[0].double(), g.T @ prod.blocks(u, "out")[0].double(),
                               rtol=1e-5, atol=1e-5)
    assert not prod.blocks(y, "out")[1].any() and not prod.blocks(z, "in")[1].any()


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_start_is_projected_when_the_gradient_lies_along_the_active_rows(sketch_backend, path):
    # G = 8 large tokens inside the active rows of A + 2 small ones outside: G_perp has rank 2
    # <= p = 6 columns, so even niter=0 spans it exactly. The kernel path multiplied an
    # unprojected start, whose sketch was G Pa's: gains 0.07 and 0.02 instead of 3 and 2.
    sketch_backend(path)
    device = _device(path)
    g = torch.Generator().manual_seed(11)
    n_in, n_out, r = 48, 40, 8
    rows = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64)).Q
    cols = torch.linalg.qr(torch.randn(n_out, n_out, generator=g, dtype=torch.float64)).Q
    x = torch.cat([rows[:, :r].T, rows[:, r:r + 2].T])
    dy = torch.cat([cols[:, :r].T * 100.0, cols[:, r:r + 2].T * torch.tensor([[3.0], [2.0]], dtype=torch.float64)])
    a = torch.randn(r, r, generator=g, dtype=torch.float64)
    a_cols = (rows[:, :r] @ a).float().to(device)          # active A rows span rows[:, :r]
    pairs = [(x.float().to(device), dy.float().to(device))]
    exact = _dense(pairs, a_cols, torch.zeros(n_out, 0))
    _, sigmas, vectors = projected_top_singular_many(
        [pairs], [n_in], [n_out], [2], [a_cols], [torch.zeros(n_out, 0, device=device)], 0, 4,
        [torch.Generator().manual_seed(5)], [123456789], lockstep=True)
    torch.testing.assert_close(sigmas[0].double().cpu(), exact.S[:2], rtol=1e-4, atol=1e-4)
    assert float(exact.S[2]) < 1e-3                         # the two gains above are all there is
    overlap = vectors[0].double().cpu().T @ exact.Vh[:2].T
    torch.testing.assert_close(overlap.abs().max(dim=1).values, torch.ones(2, dtype=torch.float64),
                               rtol=0, atol=1e-4)
