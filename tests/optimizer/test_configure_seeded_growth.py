"""``opt.configure()`` on a model whose adapters already exist grows them in place. Like every
other growth of the allocator, the new rows of A come from its ``seed``, not from torch's global
generator: under DDP each process may hold another global state (seeded per process for dropout
or data), and rows drawn from it would part the replicas at the first step."""

import copy
import math

import pytest
import torch

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer

from residual_net import ResidualNet

pytestmark = pytest.mark.usefixtures("one_thread")

BUDGET = 6 * 24  # 6 ranks of the 8 -> 16 / 16 -> 8 layers (d + k = 24)


def _adapted():
    torch.manual_seed(0)
    model = ResidualNet()
    lorambo.configure_model(model, 1, capacity=4)
    g = torch.Generator().manual_seed(1)
    for layer in lorambo.lora_layers(model).values():  # trained adapters: B != 0 in the active slot
        with torch.no_grad():
            layer.lora_B[:, :1].copy_(torch.randn(layer.out_features, 1, generator=g, dtype=torch.float64))
    return model


def _configured(model, global_seed, seed):
    opt = LoRAMBoOptimizer(model, BUDGET, sensitivity_method="frobenius", seed=seed)
    opt.compute_optimal_ranks()
    torch.manual_seed(global_seed)  # this process's global generator, e.g. seeded by its rank
    state = torch.get_rng_state()
    opt.configure()
    assert torch.equal(torch.get_rng_state(), state), "configure() drew from the global generator"
    return model


def _delta(model):
    """sum_r s B[:, r] A[r] of every layer in float64: the adapters' function."""
    return {n: (m.scaling * m.lora_B[:, :m.rank].double() @ m.lora_A[:m.rank].double()).detach()
            for n, m in lorambo.lora_layers(model).items()}


def test_configure_growth_is_seeded_by_the_allocator_not_the_global_generator():
    base = _adapted()
    before = _delta(base)
    first = _configured(copy.deepcopy(base), global_seed=1000, seed=7)
    second = _configured(copy.deepcopy(base), global_seed=2000, seed=7)
    other_seed = _configured(copy.deepcopy(base), global_seed=1000, seed=8)

    layers, twins = lorambo.lora_layers(first), lorambo.lora_layers(second)
    grown = [n for n, m in layers.items() if m.rank > 1]
    assert grown, "the allocation grew no adapter"
    for n, m in layers.items():
        assert m.rank == twins[n].rank
        assert torch.equal(m.lora_A, twins[n].lora_A), n   # the same rows on every process
        assert torch.equal(m.lora_B, twins[n].lora_B), n
        bound = 1.0 / math.sqrt(m.in_features)            # LoRA's Kaiming-uniform rows
        new = m.lora_A[1:m.rank]
        assert bool((new.abs() <= bound).all()) and bool((new != 0).all()), n
        assert not bool(m.lora_B[:, 1:].any()), n          # new columns of B are zero
        torch.testing.assert_close(_delta(first)[n], before[n], rtol=0, atol=0)
    # the rows follow the allocator's seed
    others = lorambo.lora_layers(other_seed)
    assert any(not torch.equal(layers[n].lora_A, others[n].lora_A) for n in grown)


def test_configure_model_generator_must_be_a_generator():
    model = _adapted()
    want = {n: m.lora_A.clone() for n, m in lorambo.lora_layers(model).items()}
    with pytest.raises(TypeError, match=r"configure_model: generator must be a torch.Generator or None, got 7"):
        lorambo.configure_model(model, 3, generator=7)
    for n, m in lorambo.lora_layers(model).items():
        assert m.rank == 1 and torch.equal(m.lora_A, want[n]), n
