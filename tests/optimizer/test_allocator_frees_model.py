"""Deleting an allocator frees its model at once, as deleting the model alone does.

Python frees an object when its last reference goes, except inside a reference cycle, which
waits for the cyclic garbage collector; device memory pressure never starts that collector, so
a cycle through the allocator kept a deleted model (and its GPU memory) alive for an unbounded
time: a sweep that builds one model per run could run out of device memory.
"""

import copy
import gc
import weakref

import pytest
import torch

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer

from residual_net import ResidualNet, mse

DT = torch.float64


@pytest.fixture
def no_cyclic_gc():
    """Only reference counting frees objects inside the test."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def _batches(n=3):
    return [(torch.randn(6, 8, dtype=DT), torch.randn(6, 8, dtype=DT)) for _ in range(n)]


def _trained_allocator(allocation):
    """A model, its allocator and torch optimizer after a few steps with rank decisions."""
    model, batches = ResidualNet(), _batches()
    settings = (dict(allocation="alora", alora=dict(k1=1, k2=1, rounds=2, n_prune=1), heldout_batches=batches,
                     loss_fn=mse)
                if allocation == "alora" else dict(initial_budget=200, warmup_steps=1, interval=2))
    opt = LoRAMBoOptimizer(model, total_budget=400, sensitivity_method="gradient", **settings)
    opt.compute_optimal_ranks(batches, mse)
    opt.configure()
    torch_opt = opt.make_optimizer(lr=1e-2)
    for step in range(5):
        with opt.capture(step, batches[step % 3]):
            mse(model, batches[step % 3]).backward()
        opt.step(step)
        torch_opt.step()
        torch_opt.zero_grad()
    assert opt.decisions  # the schedule called back into the allocator
    return model, opt, torch_opt


@pytest.mark.parametrize("allocation", ["closed_form", "alora"])
def test_deleting_the_allocator_frees_the_model_without_the_cyclic_collector(allocation, no_cyclic_gc):
    model, opt, torch_opt = _trained_allocator(allocation)
    model_ref = weakref.ref(model)
    pool_ref = weakref.ref(next(iter(lorambo.lora_layers(model).values())).lora_A)
    del model, opt, torch_opt
    assert model_ref() is None and pool_ref() is None


def test_a_copied_allocator_grows_its_own_model():
    """The schedule's call back into the allocator follows a deepcopy to the copy, as a bound
    method would: the copy's online growth edits the copy's layers."""
    model, batches = ResidualNet(), _batches()
    opt = LoRAMBoOptimizer(model, total_budget=400, initial_budget=200, sensitivity_method="gradient",
                           warmup_steps=0, interval=1)
    opt.compute_optimal_ranks(batches, mse)
    opt.configure()
    twin = copy.deepcopy(opt)
    assert twin.online.layers == lorambo.lora_layers(twin.model) != lorambo.lora_layers(model)
    assert opt.online.layers == lorambo.lora_layers(model)
