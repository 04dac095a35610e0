"""Entry points on LoRA models (ablation, the allocator's sensitivity pass) leave a train-mode
model with BatchNorm and dropout as they found it; see test_side_effects for the plain passes."""

import pytest
import torch

import lorambo
from lorambo import LoRAMBoOptimizer
from lorambo.sensitivity import ablation_scores

from model_snapshot import assert_same, snapshot
from side_effect_net import model_and_batches, mse


def lora_model():
    model, batches = model_and_batches()
    lorambo.configure_model(model, {"0": 2, "4": 2}, capacity={"0": 3, "4": 3})
    torch.manual_seed(2)
    for layer in (model[0], model[4]):  # trained-looking adapters, so ablation has something to remove
        with torch.no_grad():
            layer.lora_B.normal_()
    model.train()
    model[2].eval()
    return model, batches


@pytest.mark.parametrize("entry", ["ablation", "hessian", "gradient", "data"])
def test_lora_entry_point_leaves_model_untouched(entry):
    model, batches = lora_model()
    before = snapshot(model)
    modes = []

    def loss_fn(m, batch):
        modes.append(any(mod.training for mod in m.modules()))
        return mse(m, batch)

    if entry == "ablation":
        ablation_scores(model, loss_fn, batches)
    else:
        opt = LoRAMBoOptimizer(model, total_budget=40, sensitivity_method=entry, num_probes=2)
        opt.compute_optimal_ranks(batches, loss_fn)
    assert modes and not any(modes)
    assert_same(before, snapshot(model))
