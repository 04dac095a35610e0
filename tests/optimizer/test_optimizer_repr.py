"""repr(LoRAMBoOptimizer) says what the allocator is set to and where it stands, and never
raises: not for an allocator whose constructor failed half-way (a debugger shows it), nor after
its model was unloaded."""

import torch

import lorambo
from lorambo import LoRAMBoOptimizer


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def test_repr_shows_the_settings_the_allocation_and_the_decisions():
    model = small_model()
    opt = LoRAMBoOptimizer(model, total_budget=100, initial_budget=80, sensitivity_method="frobenius", interval=5)
    before = repr(opt)
    assert before == ("LoRAMBoOptimizer(2 layers, total_budget=100, initial_budget=80, sensitivity_method='frobenius', "
                      "allocation='closed_form', interval=5, not allocated, decisions=0)")
    ranks = opt.compute_optimal_ranks()
    opt.configure()
    assert f"allocated ranks={sum(ranks.values())}, decisions=0)" in repr(opt)
    lorambo.unload(model)  # the layers are gone; the repr reads none of them
    assert repr(opt).startswith("LoRAMBoOptimizer(2 layers")


def test_repr_of_a_half_built_allocator_does_not_raise():
    half = LoRAMBoOptimizer.__new__(LoRAMBoOptimizer)
    assert repr(half) == ("LoRAMBoOptimizer(0 layers, total_budget=None, initial_budget=None, sensitivity_method=None, "
                          "allocation=None, interval=None, not allocated, decisions=0)")
