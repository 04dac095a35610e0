"""LoRAMBoOptimizer on a CUDA model: every sensitivity method and allocation, which the CPU suite
runs on CPU tensors only (a device tensor handed to numpy, or a CPU generator used on a CUDA
tensor, fails only here). It lives in tests/kernels because gpu-check collects the gpu tests of
tests/kernels and tests/ext."""

import pytest
import torch

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer

from residual_net import ResidualNet, mse

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _net():
    return ResidualNet(32, 64, head=("head", 4), dtype=torch.float32)


def _batches(device, dtype):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(24, 32, generator=g).to(device, dtype), torch.randn(24, 4, generator=g).to(device, dtype))
            for _ in range(2)]


def _sensitivities(device, dtype, method):
    torch.manual_seed(0)
    model = _net().to(device, dtype)
    opt = LoRAMBoOptimizer(model, 4000, sensitivity_method=method, num_probes=4, target_modules=["up", "down"])
    return opt.compute_sensitivities(_batches(device, dtype), mse)


@pytest.mark.filterwarnings("ignore:negative Hessian trace")
@pytest.mark.parametrize("method,allocation", [
    ("hessian", "closed_form"), ("gradient", "closed_form"), ("data", "closed_form"),
    ("frobenius", "closed_form"), ("frobenius", "frobenius_greedy"), ("data", "data_weighted"),
    ("gradient", "uniform"), ("gradient", "alora")])
def test_ranks_within_budget_and_configured_on_cuda(method, allocation):
    torch.manual_seed(0)
    model = _net().cuda()
    budget = 4000
    opt = LoRAMBoOptimizer(model, budget, sensitivity_method=method, allocation=allocation, num_probes=4,
                           target_modules=["up", "down"])
    ranks = opt.compute_optimal_ranks(_batches("cuda", torch.float32), mse)
    assert set(ranks) == set(opt.names) and sum(opt.costs[n] * r for n, r in ranks.items()) <= budget
    opt.configure()
    layers = lorambo.lora_layers(model)
    assert {n: m.rank for n, m in layers.items()} == ranks
    assert all(m.lora_A.is_cuda and m.lora_B.is_cuda for m in layers.values())


@pytest.mark.parametrize("method", ["gradient", "data", "frobenius"])
def test_deterministic_sensitivities_match_the_cpu_in_float64(method):
    on_cuda, on_cpu = (_sensitivities(device, torch.float64, method) for device in ("cuda", "cpu"))
    assert on_cuda.keys() == on_cpu.keys()
    for name, value in on_cpu.items():
        assert on_cuda[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_alora_rounds_move_ranks_on_cuda():
    """ALoRA prunes by ablation forwards and regrows with CPU decision generators into CUDA pools."""
    from lorambo.allocation.alora import ALoRAConfig

    torch.manual_seed(0)
    model, target = _net().cuda(), _net().cuda()
    g = torch.Generator().manual_seed(4)
    heldout = [(x, target(x).detach()) for x in (torch.randn(16, 32, generator=g).cuda() for _ in range(2))]
    opt = LoRAMBoOptimizer(model, 12 * 96, allocation="alora", loss_fn=mse, heldout_batches=heldout,
                           target_modules=["up", "down"], alora=ALoRAConfig(k1=2, k2=3, rounds=3, n_prune=2))
    ranks = opt.compute_optimal_ranks()
    opt.configure()
    adam = opt.make_optimizer(lr=0.02)
    for step in range(10):
        x = torch.randn(16, 32, generator=g).cuda()
        mse(model, (x, target(x).detach())).backward()
        opt.step(step, optimizer=adam)
        adam.step()
        adam.zero_grad()
    assert any(r["event"] == "grow" for r in opt.decisions) and opt.current_ranks() != ranks
    assert sum(opt.current_ranks().values()) == sum(ranks.values())


@pytest.mark.parametrize("sketch_dim", [None, 8])
def test_fisher_proxy_on_cuda(sketch_dim):
    """Exact per-example norms match the CPU in float64; the sketch (probes drawn on the device)
    is finite and within its own standard error scale of the exact value."""
    from lorambo.sensitivity import FisherProxy

    def traces(device, sketch):
        torch.manual_seed(0)
        model = _net().to(device, torch.float64)
        with FisherProxy(model, modules=["blocks.0.up", "blocks.1.down"], sketch_dim=sketch) as fisher:
            for batch in _batches(device, torch.float64):
                model.zero_grad()
                mse(model, batch).backward()
        return fisher.estimates()

    exact_cpu = traces("cpu", None)
    on_cuda = traces("cuda", sketch_dim)
    assert on_cuda.keys() == exact_cpu.keys()
    for name, estimate in on_cuda.items():
        want = exact_cpu[name].value
        if sketch_dim is None:
            assert estimate.value == pytest.approx(want, rel=1e-9), name
        else:
            assert 0 < estimate.value < 10 * want, (name, estimate, want)
