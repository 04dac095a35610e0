"""transformers' gradient checkpointing recomputes LoRAMBoLinear in the backward pass: with LoRA
dropout the recomputation must draw the same mask, so the gradients equal those of the plain
model run with the same seed (a different mask changes them at the 1e-1 level)."""

import copy

import pytest
import torch
from test_transformers_models import tiny_gpt2, tiny_llama

from lorambo import configure_model, lora_layers


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("build,targets", [(tiny_gpt2, None), (tiny_llama, ["q_proj", "v_proj", "down_proj"])])
def test_checkpointed_gradients_equal_the_plain_ones_with_lora_dropout(build, targets, use_reentrant, backend):
    torch.manual_seed(0)
    model = configure_model(build(), 4, target_modules=targets, dropout=0.3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[:, : layer.rank].normal_(std=0.05)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())  # really on
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for net in (model, checkpointed):
        net.train()
        torch.manual_seed(2)  # the same dropout masks, base model's and LoRA's
        net(input_ids=ids).logits.float().square().mean().backward()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.requires_grad})
    plain, recomputed = grads
    assert plain.keys() == recomputed.keys() and len(plain) == 2 * len(lora_layers(model))
    for name, grad in plain.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
