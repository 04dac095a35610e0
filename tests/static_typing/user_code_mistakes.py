"""Mistakes a type checker must catch in a user's script (tests/static_typing/test_user_code_types.py):
each line marked ``# error: CODE`` must be reported with that error code, and nothing else may be.
Only type-checked, never run."""

from __future__ import annotations

import torch
from torch import nn

import lorambo
import lorambo.sensitivity
from lorambo import LoRAMBoLinear
from lorambo.integrations import LoRAMBoCallback


def mistakes(model: nn.Module, base: nn.Linear, opt: torch.optim.Optimizer) -> None:
    layer = LoRAMBoLinear(base, rank="8")  # error: arg-type
    layer.set_rank("16", optimizer=opt)  # error: arg-type
    layer.set_rank(4, optimizer=model)  # error: arg-type
    layer.set_rank(4, optimizer=[opt, model])  # error: list-item
    layer.keep_components(0)  # error: arg-type
    lorambo.configure_model(model, ranks="8")  # error: arg-type
    lorambo.save_adapter(model, 42)  # error: arg-type
    scaling: str = layer.scaling  # error: assignment
    lorambo.optim.AdamW(model.parameters(), lr="1e-3")  # error: arg-type
    lorambo.configure_model(model, 8, target_modules=["query", 3])  # error: list-item
    lorambo.configure_model(model, 8, modules_to_save=[nn.Linear(4, 2)])  # error: list-item
    lorambo.LoRAMBoOptimizer(model, total_budget="6000")  # error: arg-type
    lorambo.LoRAMBoOptimizer(model, 6000, token_mask="attention_mask")  # error: arg-type
    lorambo.LoRAMBoOptimizer(model, 6000, loss_fn=torch.ones(()))  # error: arg-type  (a loss, not its function)
    LoRAMBoCallback(model)  # error: arg-type  (the allocator, not the model)
    lorambo.sensitivity.hessian_trace(model, torch.ones(()), [])  # error: arg-type  (a loss, not its function)
    lorambo.sensitivity.gradient_sensitivity(model, lambda m, b: m(b), [], modules=3)  # error: arg-type
    lorambo.sensitivity.FisherProxy(model, token_mask="attention_mask")  # error: arg-type
    allocator = lorambo.LoRAMBoOptimizer(model, 6000)
    with allocator.capture(0) as capturing:
        capturing.stepp(0)  # error: attr-defined
    heatmap: str = allocator.save_heatmap("ranks.png")  # error: assignment
    lorambo.read_decisions(3)  # error: arg-type
    with lorambo.disable_adapter(model) as frozen:
        count: int = frozen  # error: assignment
    allocator.make_optimizer().stepp()  # error: attr-defined
    allocator.step(5, grad_scaler=1.0)  # error: arg-type
    print(scaling, heatmap, count)
