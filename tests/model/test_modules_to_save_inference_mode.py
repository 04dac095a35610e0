"""A module to save whose weight is tied elsewhere (GPT-2's lm_head and wte) trains its own copy
of that weight. Configured under ``torch.inference_mode()``, the copy (and the original state
``disable_adapter`` restores) were inference tensors: training the head outside inference mode
raised "Inference tensors cannot be saved for backward", its optimizer step "Inplace update to
inference tensor". They are plain tensors now, and train as when configured outside it."""

import torch

from lorambo import configure_model
from lorambo.model.modules_to_save import original_state

from tied_gpt2 import IDS, tied_gpt2


def _trained_head(inference: bool) -> torch.Tensor:
    model = tied_gpt2()
    with torch.inference_mode(inference):
        configure_model(model, 2, target_modules=["c_attn"], modules_to_save=["lm_head"])
    assert not model.lm_head.weight.is_inference()
    assert not any(t.is_inference() for t in original_state(model)["lm_head"].values())
    model.train()
    optimizer = torch.optim.SGD([model.lm_head.weight], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        optimizer.step()
    return model.lm_head.weight.detach()


def test_a_tied_module_to_save_configured_in_inference_mode_trains_outside_it():
    torch.testing.assert_close(_trained_head(True), _trained_head(False), rtol=0, atol=0)
