"""An allocator keeps working on its model after ``unload`` and a new ``configure``.

Online growth and ALoRA kept the LoRAMBoLinear objects they were first used with. After
``lorambo.unload`` and ``opt.configure`` (new layer objects) they armed hooks on and grew
layers no longer in the model: every decision was skipped with a warning to run the step inside
``capture()``, which the loop did, and the removed layers' pools stayed in memory.
"""

import copy
import gc
import warnings
import weakref

import torch

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer

from residual_net import ResidualNet, mse

DT = torch.float64


def _batches(n=3):
    return [(torch.randn(6, 8, dtype=DT), torch.randn(6, 8, dtype=DT)) for _ in range(n)]


def _allocator(model, batches, **settings):
    return LoRAMBoOptimizer(model, total_budget=2_000, sensitivity_method="gradient", sketch_rank=1,
                            heldout_batches=batches, loss_fn=mse, **settings)


def _decide(opt, model, step, batch):
    with opt.capture(step, batch):
        mse(model, batch).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a skipped decision warns
        records = opt.step(step)
    model.zero_grad()
    return records


def _reconfigured(settings):
    """A model whose adapters were unloaded and configured again under its allocator, that
    allocator, the removed pool (weakly) and a fresh allocator's twin of both."""
    model, batches = ResidualNet(), _batches()
    opt = _allocator(model, batches, initial_budget=200, **settings)
    opt.compute_optimal_ranks(batches, mse)
    opt.configure()
    removed = weakref.ref(lorambo.lora_layers(model)["blocks.0.up"].lora_A)
    if opt.allocation != "alora":
        assert _decide(opt, model, 0, batches[0])  # online growth built and used on these layers
    else:
        assert opt.step(1)
    lorambo.unload(model, merge=True)
    opt.configure(opt.ranks)
    twin = copy.deepcopy(model)
    fresh = _allocator(twin, batches, initial_budget=200, **settings)
    fresh.ranks, fresh.capacities = opt.ranks, opt.capacities
    return model, opt, removed, twin, fresh, batches


def test_online_growth_follows_a_reconfigured_model():
    model, opt, removed, twin, fresh, batches = _reconfigured(dict(warmup_steps=0, interval=1))
    records = _decide(opt, model, 1, batches[1])
    assert records and records == _decide(fresh, twin, 1, batches[1])
    for (name, layer), other in zip(lorambo.lora_layers(model).items(), lorambo.lora_layers(twin).values()):
        assert layer.rank == other.rank and torch.equal(layer.lora_A, other.lora_A), name
    gc.collect()
    assert removed() is None  # nothing holds the unloaded layers' pools


def test_alora_follows_a_reconfigured_model():
    settings = dict(allocation="alora", alora=dict(k1=1, k2=1, rounds=2, n_prune=1))
    model, opt, removed, twin, fresh, batches = _reconfigured(settings)
    fresh.alora_schedule().rounds_done = 1
    records = opt.step(2)
    assert records and records == fresh.step(2)
    assert opt.current_ranks() == fresh.current_ranks() != opt.ranks
    gc.collect()
    assert removed() is None
